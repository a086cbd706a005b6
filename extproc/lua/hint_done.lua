-- Remove a hint only if it is still the one that was read (not removed and added again
-- meanwhile by a writer that is about to write what the hint points to).
-- KEYS: 1 hint zset   ARGV: 1 member  2 the score read
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
