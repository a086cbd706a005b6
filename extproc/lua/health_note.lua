-- Note attempts on one provider and open its circuit when the failures of the recent window
-- are many enough, a large enough share, and from enough distinct customers: one tenant alone
-- cannot take a provider down for everybody. All keys share the provider's hash tag.
-- KEYS: 1 open flag  2 probation flag  3..2+n attempt counts per time bucket (hash ok/fail,
--       current bucket first)  3+n..2+2n failing customers per bucket (sets, same order)
-- ARGV: 1 n  2 kind ('ok' or 'fail')  3 count  4 customer  5 event that failed
--       6 min failures  7 min failed share  8 min customers  9 cooldown s  10 bucket ttl s
-- Returns 1 when this failure opened the circuit, else 0.
local n = tonumber(ARGV[1])
local kind = ARGV[2]
local ttl = tonumber(ARGV[10])
redis.call('HINCRBY', KEYS[3], kind, tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[3], ttl)
if kind == 'ok' then
  -- A success after the cooldown (half-open) closes the circuit for good.
  if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]) end
  return 0
end
redis.call('SADD', KEYS[3 + n], ARGV[4])
redis.call('EXPIRE', KEYS[3 + n], ttl)
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local trip = redis.call('EXISTS', KEYS[2]) == 1  -- half-open: a failed probe reopens at once
if not trip then
  local ok, fail = 0, 0
  for i = 3, 2 + n do
    local v = redis.call('HMGET', KEYS[i], 'ok', 'fail')
    ok = ok + (tonumber(v[1]) or 0)
    fail = fail + (tonumber(v[2]) or 0)
  end
  local customers = #redis.call('SUNION', unpack(KEYS, 3 + n, 2 + 2 * n))
  trip = fail >= tonumber(ARGV[6]) and fail >= tonumber(ARGV[7]) * (ok + fail) and customers >= tonumber(ARGV[8])
end
if not trip then return 0 end
local cooldown = tonumber(ARGV[9])
redis.call('SET', KEYS[1], ARGV[5], 'EX', cooldown)
-- On probation for one window after the cooldown: the first failure then reopens it.
redis.call('SET', KEYS[2], ARGV[5], 'EX', cooldown + ttl)
redis.call('DEL', unpack(KEYS, 3, 2 + 2 * n))
return 1
