-- Turn one overdue reservation (its processor died or lost Redis) into an 'unsettled' usage
-- record and release its money. Safe to run from every processor at once.
--
-- KEYS: 1 marker  2 reservation hash  3 reservation index  4 customer reserved  5 workspace reserved
--       6 usage stream  7 request index
-- ARGV: 1 index member  2 now ms  3 marker ttl s
-- Returns the stream id of the record, or '' when there was nothing (left) to expire.

local r = redis.call('HMGET', KEYS[2], 'amount', 'deadline', 'record')
if not r[1] then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return ''
end
if tonumber(r[2]) > tonumber(ARGV[2]) then return '' end
local amount = tonumber(r[1])
redis.call('DECRBY', KEYS[4], amount)
redis.call('DECRBY', KEYS[5], amount)
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
local rec = cjson.decode(r[3])
local fields = {}
for k, v in pairs(rec) do
  fields[#fields + 1] = k
  fields[#fields + 1] = tostring(v)
end
for _, kv in ipairs({{'status', 'unsettled'}, {'cost_micro_usd', '0'}, {'retry_cost_micro_usd', '0'},
                      {'reserved_micro_usd', tostring(amount)}, {'prompt_tokens', '0'}, {'completion_tokens', '0'}}) do
  fields[#fields + 1] = kv[1]
  fields[#fields + 1] = kv[2]
end
local id = redis.call('XADD', KEYS[6], '*', unpack(fields))
redis.call('SET', KEYS[1], 'unsettled', 'EX', tonumber(ARGV[3]))
redis.call('SET', KEYS[7], id, 'EX', tonumber(ARGV[3]))
return id
