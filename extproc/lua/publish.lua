-- Append one usage record to the usage stream exactly once (by its uid), and point the
-- request id at it for `tollgate explain`. All keys share the usage stream's hash slot.
--
-- KEYS: 1 usage stream (tollgate:usage)  2 {tollgate:usage}:uid:<uid>  3 {tollgate:usage}:request:<id>
-- ARGV: 1 the record as a JSON object of strings  2 ttl s of the uid mark
--       3 ttl s of the request index (the idempotency window; absent: as 2)
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
redis.call('SET', KEYS[3], id, 'EX', tonumber(ARGV[3] or ARGV[2]))
return id
