-- dtmcli Redis barrier: check and adjust an amount (protocol.md §7).
-- KEYS[1] business key, KEYS[2] current-op barrier key, KEYS[3] origin-op barrier key
-- ARGV[1] amount (an int64), ARGV[2] origin op ('' when none), ARGV[3] expiry in seconds
-- Returns APPLIED, DUPLICATE, NULL_COMPENSATION or FAILURE (key missing or the result below zero), or,
-- having written nothing, BAD_ARGUMENT, NOT_INTEGER (the key holds no int64) or OVERFLOW (the sum
-- leaves int64). Redis keeps the writes of a script that fails halfway, so every check that can fail
-- runs before the first write.
-- Unlike Go's script, the barrier markers are checked before the balance: a repeated op (DUPLICATE) and a
-- compensation whose op never ran (NULL_COMPENSATION) have no effect, so the balance cannot fail them; only
-- the op that applies the amount answers FAILURE/NOT_INTEGER/OVERFLOW. Go's order answers FAILURE to a
-- redelivered, applied op once the balance dropped (DTM then compensates it) and to a debiting null
-- compensation (no marker, so the suspended op runs later). The markers written are the same as Go's.

-- An int64 in Redis's canonical decimal form, as the signed high and low halves of value = high * 1e9 + low
-- (both exact in Lua's doubles); nil for anything else (error tables, '+1', '01', '-0', ' 1', '1.5', 2^63).
local function int64(text)
  if type(text) ~= 'string' then
    return nil
  end
  local sign, digits = 1, text
  if text:sub(1, 1) == '-' then
    sign, digits = -1, text:sub(2)
  end
  if #digits > 19 or not ((digits == '0' and sign == 1) or digits:match('^[1-9]%d*$')) then
    return nil
  end
  local high, low = tonumber(digits:sub(1, -10)) or 0, tonumber(digits:sub(-9))
  local max_low = sign == 1 and 854775807 or 854775808
  if high > 9223372036 or (high == 9223372036 and low > max_low) then
    return nil
  end
  return sign * high, sign * low
end

local amount_high, amount_low = int64(ARGV[1])
if not amount_high or #ARGV[3] > 10 or not ARGV[3]:match('^[1-9]%d*$')
    or KEYS[1] == KEYS[2] or KEYS[1] == KEYS[3] then
  return 'BAD_ARGUMENT'
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 'DUPLICATE'
end
if ARGV[2] ~= '' and redis.call('EXISTS', KEYS[3]) == 0 then
  -- null compensation: mark the origin op as rolled back, so a suspended one arriving later is a duplicate
  redis.call('SET', KEYS[3], 'rollback', 'EX', ARGV[3])
  redis.call('SET', KEYS[2], 'op', 'EX', ARGV[3])
  return 'NULL_COMPENSATION'
end
local balance = redis.pcall('GET', KEYS[1])
if balance == false then
  return 'FAILURE'
end
local high, low = int64(balance)
if not high then
  return 'NOT_INTEGER'
end
high, low = high + amount_high, low + amount_low
while low < 0 do
  high, low = high - 1, low + 1e9
end
while low >= 1e9 do
  high, low = high + 1, low - 1e9
end
if high < 0 then
  return 'FAILURE'
end
if high > 9223372036 or (high == 9223372036 and low > 854775807) then
  return 'OVERFLOW'
end
-- Every check passed: INCRBY cannot fail on its arguments or the stored value, and it is the first write.
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], 'op', 'EX', ARGV[3])
return 'APPLIED'
