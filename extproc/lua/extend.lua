-- Move a live reservation's deadline (a stream still flowing), so the reaper never releases
-- money a provider is still spending. Does nothing once the request was finished or expired.
--
-- KEYS: 1 reservation hash  2 the customer's reservation index (zset by deadline)
-- ARGV: 1 request id  2 ttl ms from now
-- Returns the new deadline (ms), or 0 when there is no reservation any more.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local deadline = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'deadline', deadline)
redis.call('ZADD', KEYS[2], deadline, ARGV[1])
return deadline
