-- Finish one request: settle its real cost (0 when no attempt succeeded), release the
-- reservation, refund unused tokens-per-minute, and put its one usage record in the
-- customer's outbox — all in one atomic step in the customer's hash slot. The record then goes
-- to the usage stream by publish.lua (exactly once, by its uid).
-- Idempotent: a request id already finished is never billed again.
--
-- KEYS: named K.<field> after keyspace.FinishKeys, whose field order is the KEYS list
--       (store.Scripts prefixes `local K = {marker = KEYS[1], ...}` generated from it).
-- ARGV: 1 cost micro-USD  2 prepaid (0/1)  3 actual tokens  4 request id  5 marker ttl s
--       6 served (1: the id is spent; 0: nothing was served, a retry may reuse the id)
--       7 record uid  8 the usage record as a JSON object of strings
-- Returns 1 when settled now, 0 when the request id was already finished.

local state = redis.call('GET', K.marker)
if state == 'settled' then return 0 end

local cost = tonumber(ARGV[1])
local r = redis.call('HMGET', K.reservation, 'amount', 'tokens')
local reserved = tonumber(r[1])
local record = ARGV[8]
if reserved then
  redis.call('DECRBY', K.reserved, reserved)
  redis.call('DECRBY', K.ws_reserved, reserved)
  redis.call('DEL', K.reservation)
  redis.call('ZREM', K.index, ARGV[4])
  -- Give back the tokens-per-minute the estimate took beyond what was used. A bucket took at
  -- most its capacity (reserve.lua), so it gets back at most that, less what was used.
  local est, used = tonumber(r[2]), tonumber(ARGV[3])
  for _, k in ipairs({K.key_tpm, K.ws_tpm, K.tpm}) do
    local b = redis.call('HMGET', k, 'tokens', 'cap')
    if b[1] then
      local cap = tonumber(b[2]) or math.huge
      local back = math.min(est, cap) - math.min(used, cap)
      if back ~= 0 then redis.call('HSET', k, 'tokens', tostring(tonumber(b[1]) + back)) end
    end
  end
else
  -- The reservation was already expired into an 'unsettled' record: this record supersedes it.
  local rec = cjson.decode(record)
  rec['late'] = '1'
  record = cjson.encode(rec)
end

if cost > 0 then
  if ARGV[2] == '1' then redis.call('DECRBY', K.balance, cost) end
  redis.call('INCRBY', K.spend, cost)
  redis.call('INCRBY', K.ws_spend, cost)
  redis.call('EXPIRE', K.spend, 34560000)
  redis.call('EXPIRE', K.ws_spend, 34560000)
end

redis.call('HSET', K.outbox, ARGV[7], record)
if ARGV[6] == '1' or cost > 0 then
  redis.call('SET', K.marker, 'settled', 'EX', tonumber(ARGV[5]))
else
  redis.call('DEL', K.marker)
end
return 1
