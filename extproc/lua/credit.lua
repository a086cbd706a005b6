-- Credit (or debit) a customer's prepaid balance once per reference (a payment id): the same
-- reference never credits twice, however often a webhook is delivered. The credit record goes
-- to the customer's outbox in the same atomic step; publish.lua then appends it to the usage
-- stream exactly once, so every balance change is exported to the ledger.
-- All keys are in the customer's hash slot ({c:<customer>}).
--
-- KEYS: 1 reference marker  2 balance  3 the customer's outbox
-- ARGV: 1 amount micro-USD  2 record uid  3 the credit record (JSON object of strings)
-- Returns {1, uid, balance} when credited now, {0, uid of the first credit, balance} for a
-- reference already used.

local first = redis.call('GET', KEYS[1])
if first then
  return {0, first, tonumber(redis.call('GET', KEYS[2]) or '0')}
end
local balance = redis.call('INCRBY', KEYS[2], tonumber(ARGV[1]))
local rec = cjson.decode(ARGV[3])
rec['balance_after_micro_usd'] = tostring(balance)
redis.call('HSET', KEYS[3], ARGV[2], cjson.encode(rec))
redis.call('SET', KEYS[1], ARGV[2])
return {1, ARGV[2], balance}
