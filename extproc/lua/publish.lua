-- Append one usage record to the usage stream exactly once (by its uid), and point the
-- request id, per customer, at it for `tollgate explain`: request ids are scoped per customer,
-- so two customers using one id each keep their own record. All keys share the stream's slot.
--
-- KEYS: 1 usage stream (tollgate:usage)  2 {tollgate:usage}:uid:<uid>  3 {tollgate:usage}:requests:<id> (hash)
-- ARGV: 1 the record as a JSON object of strings  2 ttl s of the uid mark  3 customer id
--       4 ttl s of the request index (the idempotency window; absent: as 2)
-- Returns the stream entry id.
local done = redis.call('GET', KEYS[2])
if done then return done end
local fields = {}
for k, v in pairs(cjson.decode(ARGV[1])) do
  fields[#fields + 1] = k
  fields[#fields + 1] = v
end
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('SET', KEYS[2], id, 'EX', tonumber(ARGV[2]))
redis.call('HSET', KEYS[3], ARGV[3], id)
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[4] or ARGV[2]))
return id
