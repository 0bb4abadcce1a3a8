-- dtmcli Redis barrier: check and adjust an amount (protocol.md §7).
-- KEYS[1] business key, KEYS[2] current-op barrier key, KEYS[3] origin-op barrier key
-- ARGV[1] amount, ARGV[2] origin op ('' when none), ARGV[3] expiry in seconds
local balance = redis.call('GET', KEYS[1])
if balance == false or tonumber(balance) + tonumber(ARGV[1]) < 0 then
  return 'FAILURE'
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 'DUPLICATE'
end
redis.call('SET', KEYS[2], 'op', 'EX', ARGV[3])
if ARGV[2] ~= '' and redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('SET', KEYS[3], 'rollback', 'EX', ARGV[3])
  return 'NULL_COMPENSATION'
end
redis.call('INCRBY', KEYS[1], ARGV[1])
return 'APPLIED'
