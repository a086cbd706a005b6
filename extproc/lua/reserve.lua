-- Reserve the expected cost of one request, atomically, before any upstream byte.
-- Every limit is checked first; only if all pass is anything charged.
--
-- KEYS: 1 marker (req id)   2 reservation hash   3 the customer's reservation index (zset by deadline)
--       4 balance           5 customer reserved  6 customer month spend  7 customer limits hash
--       8 workspace reserved 9 workspace month spend 10 workspace limits hash
--       11 key rpm bucket   12 key tpm bucket    13 workspace rpm bucket 14 workspace tpm bucket
--       15 customer rpm bucket  16 customer tpm bucket
-- ARGV: 1 estimate micro-USD  2 estimate tokens  3 prepaid (0/1)  4 plan monthly budget micro (-1: none)
--       5 plan rpm (-1)  6 plan tpm (-1)  7 key rpm override (-1)  8 key tpm override (-1)
--       9 reservation ttl ms  10 request id  11 record json (for an unsettled record)
-- Every key is in the customer's hash slot ({c:<customer>}): Redis Cluster runs it on one node.
-- Returns {status, reason, retry_after_ms, rpm_limit, rpm_remaining, rpm_reset_ms, tpm_limit, tpm_remaining, tpm_reset_ms}
--   status 1 reserved, 0 refused (reason rpm|tpm|balance|budget), -1 duplicate request id

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local est = tonumber(ARGV[1])
local est_tokens = tonumber(ARGV[2])

if redis.call('EXISTS', KEYS[1]) == 1 then
  return {-1, 'duplicate', 0, -1, -1, 0, -1, -1, 0}
end

local function num(v, default)
  local n = tonumber(v)
  if n == nil then return default end
  return n
end

local function override(hash, field, default)
  local v = redis.call('HGET', hash, field)
  if v then return tonumber(v) end
  return default
end

-- Token bucket: capacity per minute, refilled continuously.
local function bucket(key, capacity)
  if capacity < 0 then return nil end
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = num(b[1], capacity)
  local ts = num(b[2], now)
  local rate = capacity / 60000.0
  tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
  return {key = key, capacity = capacity, tokens = tokens, rate = rate}
end

local function wait_ms(b, cost)
  if b.tokens >= cost then return 0 end
  return math.ceil((cost - b.tokens) / b.rate)
end

local ws_rpm = override(KEYS[10], 'rpm', tonumber(ARGV[5]))
local ws_tpm = override(KEYS[10], 'tpm', tonumber(ARGV[6]))
local cust_rpm = override(KEYS[7], 'rpm', tonumber(ARGV[5]))
local cust_tpm = override(KEYS[7], 'tpm', tonumber(ARGV[6]))
local key_rpm = tonumber(ARGV[7]) >= 0 and tonumber(ARGV[7]) or tonumber(ARGV[5])
local key_tpm = tonumber(ARGV[8]) >= 0 and tonumber(ARGV[8]) or tonumber(ARGV[6])

-- Limits apply per key, per workspace and per customer: each has its own bucket, and every
-- one of them must have room.
local rpm_buckets = {bucket(KEYS[11], key_rpm), bucket(KEYS[13], ws_rpm), bucket(KEYS[15], cust_rpm)}
local tpm_buckets = {bucket(KEYS[12], key_tpm), bucket(KEYS[14], ws_tpm), bucket(KEYS[16], cust_tpm)}

-- The headers report the tightest bucket of each kind.
local function report(buckets, cost)
  local best = nil
  for _, b in pairs(buckets) do
    if b and (best == nil or b.tokens - math.min(cost, b.capacity) < best.tokens - math.min(cost, best.capacity)) then best = b end
  end
  if best == nil then return -1, -1, 0 end
  local left = math.max(0, math.floor(best.tokens - math.min(cost, best.capacity)))
  local reset = math.ceil((best.capacity - (best.tokens - math.min(cost, best.capacity))) / best.rate)
  return best.capacity, left, reset
end

local function refuse(reason, retry_ms)
  local rl, rr, rs = report(rpm_buckets, 0)
  local tl, tr, ts = report(tpm_buckets, 0)
  return {0, reason, retry_ms, rl, rr, rs, tl, tr, ts}
end

for _, b in pairs(rpm_buckets) do
  if b and b.tokens < 1 then return refuse('rpm', wait_ms(b, 1)) end
end
for _, b in pairs(tpm_buckets) do
  if b then
    local cost = math.min(est_tokens, b.capacity)
    if b.tokens < cost then return refuse('tpm', wait_ms(b, cost)) end
  end
end

local cust_reserved = num(redis.call('GET', KEYS[5]), 0)
if ARGV[3] == '1' then
  local balance = num(redis.call('GET', KEYS[4]), 0)
  if balance - cust_reserved < est or balance <= 0 then return refuse('balance', 0) end
end
local budget = override(KEYS[7], 'monthly_budget_micro', tonumber(ARGV[4]))
if budget >= 0 and num(redis.call('GET', KEYS[6]), 0) + cust_reserved + est > budget then
  return refuse('budget', 0)
end
local ws_budget = override(KEYS[10], 'monthly_budget_micro', -1)
if ws_budget >= 0 and num(redis.call('GET', KEYS[9]), 0) + num(redis.call('GET', KEYS[8]), 0) + est > ws_budget then
  return refuse('budget', 0)
end

-- Everything passed: charge.
local function charge(b, cost)
  if b then
    b.tokens = b.tokens - math.min(cost, b.capacity)
    redis.call('HSET', b.key, 'tokens', tostring(b.tokens), 'ts', now)
    redis.call('PEXPIRE', b.key, 120000)
  end
end
for _, b in pairs(rpm_buckets) do charge(b, 1) end
for _, b in pairs(tpm_buckets) do charge(b, est_tokens) end
redis.call('INCRBY', KEYS[5], est)
redis.call('INCRBY', KEYS[8], est)
local deadline = now + tonumber(ARGV[9])
redis.call('HSET', KEYS[2], 'amount', est, 'tokens', est_tokens, 'deadline', deadline, 'record', ARGV[11])
redis.call('ZADD', KEYS[3], deadline, ARGV[10])
redis.call('SET', KEYS[1], 'inflight')

local rl, rr, rs = report(rpm_buckets, 0)
local tl, tr, ts = report(tpm_buckets, 0)
return {1, 'ok', 0, rl, rr, rs, tl, tr, ts}
