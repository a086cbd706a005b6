-- Turn one overdue reservation (its processor died or lost Redis) into an 'unsettled' usage
-- record in the customer's outbox and release its money. Safe to run from every processor
-- at once; all keys are in the customer's hash slot.
--
-- KEYS: named K.<field> after keyspace.ExpireKeys, whose field order is the KEYS list
--       (store.Scripts prefixes `local K = {marker = KEYS[1], ...}` generated from it).
-- ARGV: 1 request id  2 marker ttl s  3 record uid
-- Returns 1 when it expired the reservation, 0 when there was nothing (left) to expire,
-- -1 when the reservation is not yet due (by this node's clock).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', K.reservation, 'amount', 'deadline', 'record')
if not r[1] then
  redis.call('ZREM', K.index, ARGV[1])
  return 0
end
if tonumber(r[2]) > now then return -1 end
local amount = tonumber(r[1])
redis.call('DECRBY', K.reserved, amount)
redis.call('DECRBY', K.ws_reserved, amount)
redis.call('DEL', K.reservation)
redis.call('ZREM', K.index, ARGV[1])
local rec = cjson.decode(r[3])
rec['status'] = 'unsettled'
rec['cost_micro_usd'] = '0'
rec['retry_cost_micro_usd'] = '0'
rec['fallback_cost_micro_usd'] = '0'
rec['reserved_micro_usd'] = tostring(amount)
rec['prompt_tokens'] = '0'
rec['completion_tokens'] = '0'
redis.call('HSET', K.outbox, ARGV[3], cjson.encode(rec))
redis.call('SET', K.marker, 'unsettled', 'EX', tonumber(ARGV[2]))
return 1
