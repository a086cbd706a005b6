-- Remove a hint from a hint zset only if it was not renewed since it was read (a concurrent
-- writer renews it before writing what the hint points to).
-- KEYS: 1 hint zset   ARGV: 1 member  2 the score read
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
