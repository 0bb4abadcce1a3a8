-- dtmcli Redis barrier: the msg query_prepared check (protocol.md §7).
-- KEYS[1] msg barrier key; ARGV[1] expiry in seconds. Returns the key's value.
local value = redis.call('GET', KEYS[1])
if value == false then
  redis.call('SET', KEYS[1], 'rollback', 'EX', ARGV[1])
  value = 'rollback'
end
return value
