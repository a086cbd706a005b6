-- Finish one request: settle its real cost (0 when no attempt succeeded), release the
-- reservation, refund unused tokens-per-minute, and put its one usage record in the
-- customer's outbox — all in one atomic step in the customer's hash slot. The record then goes
-- to the usage stream by publish.lua (exactly once, by its uid).
-- Idempotent: a request id already finished is never billed again.
--
-- KEYS: 1 marker  2 reservation hash  3 the customer's reservation index  4 balance
--       5 customer reserved  6 customer month spend  7 workspace reserved  8 workspace month spend
--       9 key tpm bucket  10 workspace tpm bucket  11 the customer's outbox (hash uid -> record json)
--       12 customer tpm bucket
-- ARGV: 1 cost micro-USD  2 prepaid (0/1)  3 actual tokens  4 request id  5 marker ttl s
--       6 served (1: the id is spent; 0: nothing was served, a retry may reuse the id)
--       7 record uid  8 the usage record as a JSON object of strings
-- Returns 1 when settled now, 0 when the request id was already finished.

local state = redis.call('GET', KEYS[1])
if state == 'settled' then return 0 end

local cost = tonumber(ARGV[1])
local r = redis.call('HMGET', KEYS[2], 'amount', 'tokens')
local reserved = tonumber(r[1])
local record = ARGV[8]
if reserved then
  redis.call('DECRBY', KEYS[5], reserved)
  redis.call('DECRBY', KEYS[7], reserved)
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[4])
  -- Give back the tokens-per-minute the estimate took beyond what was used.
  local unused = tonumber(r[2]) - tonumber(ARGV[3])
  if unused ~= 0 then
    for _, k in ipairs({KEYS[9], KEYS[10], KEYS[12]}) do
      local b = redis.call('HGET', k, 'tokens')
      if b then redis.call('HSET', k, 'tokens', tostring(tonumber(b) + unused)) end
    end
  end
else
  -- The reservation was already expired into an 'unsettled' record: this record supersedes it.
  local rec = cjson.decode(record)
  rec['late'] = '1'
  record = cjson.encode(rec)
end

if cost > 0 then
  if ARGV[2] == '1' then redis.call('DECRBY', KEYS[4], cost) end
  redis.call('INCRBY', KEYS[6], cost)
  redis.call('INCRBY', KEYS[8], cost)
  redis.call('EXPIRE', KEYS[6], 34560000)
  redis.call('EXPIRE', KEYS[8], 34560000)
end

redis.call('HSET', KEYS[11], ARGV[7], record)
if ARGV[6] == '1' or cost > 0 then
  redis.call('SET', KEYS[1], 'settled', 'EX', tonumber(ARGV[5]))
else
  redis.call('DEL', KEYS[1])
end
return 1
