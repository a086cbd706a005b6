-- Reserve the most one request can cost, atomically, before any upstream byte. Every limit
-- is checked first; only if all pass is anything charged. The output cap is fitted to the
-- money left: the request gets the cap it asked for if that is affordable, else the largest
-- cap the money allows (never below its useful minimum, else it is refused). The processor
-- writes the returned cap into the forwarded body, so the reservation is a cap, not a guess.
--
-- KEYS: named K.<field> after keyspace.ReserveKeys, whose field order is the KEYS list
--       (store.Scripts prefixes `local K = {marker = KEYS[1], ...}` generated from it).
-- ARGV: 1 the request as a JSON object (quota.ReserveArgs: input_nano, token_nano, want, min,
--         rate_tokens, choices, prepaid, budget, rpm, tpm, key_rpm, key_tpm, ttl_ms, request_id,
--         call, settling; -1 means "no limit")
--       2 record json (for an unsettled record)
-- Every key is in the customer's hash slot ({c:<customer>}): Redis Cluster runs it on one node.
-- Money arithmetic stays below 2^53 nano-USD (the processor bounds it), so doubles are exact.
-- Returns {status, reason, retry_after_ms, rpm_limit, rpm_remaining, rpm_reset_ms,
--          tpm_limit, tpm_remaining, tpm_reset_ms, cap, amount, need, available}
--   status 1 reserved, 0 refused (reason rpm|tpm|balance|budget|settling), -1 duplicate request id
--   cap: output tokens per choice; amount: micro-USD reserved; on a money refusal need is
--   what the smallest useful request costs and available what the tightest limit has left.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local req = cjson.decode(ARGV[1])

-- The marker names the call that reserved. A client library that resends this very call (it
-- lost the reply to a dropped connection; redis-py's cluster client does) gets the same answer
-- again instead of 'duplicate': one call reserves once, however often it is delivered.
-- A call cancelled before it ran (cancel.lua left a tombstone) must not reserve when it
-- arrives late; another call with the same id (the client's retry) may.
local state = redis.call('GET', K.marker)
if state == 'inflight:' .. req.call then
  local r = redis.call('HMGET', K.reservation, 'amount', 'cap')
  return {1, 'ok', 0, -1, -1, 0, -1, -1, 0, tonumber(r[2]), tonumber(r[1]), 0, 0}
elseif state == 'cancelled:' .. req.call then
  return {-1, 'cancelled', 0, -1, -1, 0, -1, -1, 0, 0, 0, 0, 0}
elseif state and string.sub(state, 1, 10) ~= 'cancelled:' then
  return {-1, 'duplicate', 0, -1, -1, 0, -1, -1, 0, 0, 0, 0, 0}
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

-- Exact integer division of doubles below 2^53 (floor and ceiling).
local function floor_div(x, d)
  local q = math.floor(x / d)
  if q * d > x then q = q - 1 elseif (q + 1) * d <= x then q = q + 1 end
  return q
end
local function ceil_div(x, d)
  local q = floor_div(x, d)
  if q * d < x then q = q + 1 end
  return q
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

local ws_rpm = override(K.ws_limits, 'rpm', req.rpm)
local ws_tpm = override(K.ws_limits, 'tpm', req.tpm)
local cust_rpm = override(K.limits, 'rpm', req.rpm)
local cust_tpm = override(K.limits, 'tpm', req.tpm)
local key_rpm = req.key_rpm >= 0 and req.key_rpm or req.rpm
local key_tpm = req.key_tpm >= 0 and req.key_tpm or req.tpm

-- Limits apply per key, per workspace and per customer: each has its own bucket, and every
-- one of them must have room.
local rpm_buckets = {bucket(K.key_rpm, key_rpm), bucket(K.ws_rpm, ws_rpm), bucket(K.rpm, cust_rpm)}
local tpm_buckets = {bucket(K.key_tpm, key_tpm), bucket(K.ws_tpm, ws_tpm), bucket(K.tpm, cust_tpm)}

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

local function refuse(reason, retry_ms, need, available)
  local rl, rr, rs = report(rpm_buckets, 0)
  local tl, tr, ts = report(tpm_buckets, 0)
  return {0, reason, retry_ms, rl, rr, rs, tl, tr, ts, 0, 0, need or 0, available or 0}
end

for _, b in pairs(rpm_buckets) do
  if b and b.tokens < 1 then return refuse('rpm', wait_ms(b, 1)) end
end

-- Money: the tightest of the prepaid balance and the monthly budgets (customer, workspace),
-- each less what is already in flight.
local function cost(cap)
  return ceil_div(req.input_nano + cap * req.token_nano, 1000000)
end
local cust_reserved = num(redis.call('GET', K.reserved), 0)
local available, tightest = nil, nil
local function limit(reason, left)
  if available == nil or left < available then available, tightest = left, reason end
end
if req.prepaid == 1 then
  local balance = num(redis.call('GET', K.balance), 0)
  if balance <= 0 then return refuse('balance', 0, cost(req.min), balance - cust_reserved) end
  limit('balance', balance - cust_reserved)
end
local budget = override(K.limits, 'monthly_budget_micro', req.budget)
if budget >= 0 then limit('budget', budget - num(redis.call('GET', K.spend), 0) - cust_reserved) end
local ws_budget = override(K.ws_limits, 'monthly_budget_micro', -1)
if ws_budget >= 0 then
  limit('budget', ws_budget - num(redis.call('GET', K.ws_spend), 0) - num(redis.call('GET', K.ws_reserved), 0))
end

local cap = req.want
local amount = cost(cap)
if available ~= nil and amount > available then
  -- An answer Envoy priced alone is settled from its access log a few milliseconds after its
  -- client got it, so a client's next request may find the last one's cap still in flight.
  -- Asked to (req.settling), refuse as 'settling' rather than cut the cap or refuse while money
  -- (or, below, tokens per minute) is in flight: the processor asks again (without it) once
  -- such settlements have landed.
  if req.settling == 1 and cust_reserved > 0 then return refuse('settling', 0) end
  if cost(req.min) > available then return refuse(tightest, 0, cost(req.min), math.max(0, available)) end
  -- The largest cap the money covers: input + cap * token_nano <= available * 1e6.
  cap = math.min(req.want, floor_div(available * 1000000 - req.input_nano, req.token_nano))
  amount = cost(cap)
end

local est_tokens = req.rate_tokens + cap * req.choices
for _, b in pairs(tpm_buckets) do
  if b then
    local need = math.min(est_tokens, b.capacity)
    if b.tokens < need then
      -- Tokens a request in flight holds come back (what it did not use) when it settles.
      if req.settling == 1 and redis.call('ZCARD', K.index) > 0 then return refuse('settling', 0) end
      return refuse('tpm', wait_ms(b, need))
    end
  end
end

-- Everything passed: charge.
local function charge(b, n)
  if b then
    b.tokens = b.tokens - math.min(n, b.capacity)
    -- 'cap': finish.lua and cancel.lua give back at most what was taken, min(n, capacity).
    redis.call('HSET', b.key, 'tokens', tostring(b.tokens), 'ts', now, 'cap', b.capacity)
    redis.call('PEXPIRE', b.key, 120000)
  end
end
for _, b in pairs(rpm_buckets) do charge(b, 1) end
for _, b in pairs(tpm_buckets) do charge(b, est_tokens) end
redis.call('INCRBY', K.reserved, amount)
redis.call('INCRBY', K.ws_reserved, amount)
local deadline = now + req.ttl_ms
redis.call('HSET', K.reservation, 'amount', amount, 'cap', cap, 'tokens', est_tokens, 'deadline', deadline, 'record', ARGV[2])
redis.call('ZADD', K.index, deadline, req.request_id)
redis.call('SET', K.marker, 'inflight:' .. req.call)

local rl, rr, rs = report(rpm_buckets, 0)
local tl, tr, ts = report(tpm_buckets, 0)
return {1, 'ok', 0, rl, rr, rs, tl, tr, ts, cap, amount, 0, 0}
