-- Count one failure of a provider; open its circuit when failures within the window reach
-- the threshold. Both keys share the provider's hash tag (one Redis Cluster slot).
-- KEYS: 1 failure counter  2 open flag
-- ARGV: 1 window s  2 threshold  3 cooldown s
-- Returns 1 when this failure opened the circuit, else 0.
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1])) end
if n >= tonumber(ARGV[2]) and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], '1', 'EX', tonumber(ARGV[3]))
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
