-- Undo one reserve call whose reply never came (the round trip passed its deadline, or the
-- request was abandoned while it waited). Redis may have run that call, may run it later
-- (it was queued behind a stall), or never: each case must end with the request id free and
-- nothing held, so the client's retry with the same id is served.
--
-- KEYS: named K.<field> after keyspace.CancelKeys (store.Scripts prefixes `local K = {...}`).
-- ARGV: 1 the call's name (quota.reserve_args' `call`)  2 request id  3 tombstone ttl ms
-- Returns 1 when the call's reservation was released, 2 when it had not run yet; either way a
-- tombstone now stops the call from reserving if it still arrives. 0 when the id belongs to
-- something else (left alone).

local state = redis.call('GET', K.marker)
if state == 'inflight:' .. ARGV[1] then
  local r = redis.call('HMGET', K.reservation, 'amount', 'tokens')
  local amount = tonumber(r[1])
  if amount then
    redis.call('DECRBY', K.reserved, amount)
    redis.call('DECRBY', K.ws_reserved, amount)
    redis.call('DEL', K.reservation)
    redis.call('ZREM', K.index, ARGV[2])
    -- The call used no tokens: what its tokens-per-minute estimate took goes back (a bucket
    -- took at most its capacity, reserve.lua).
    for _, k in ipairs({K.key_tpm, K.ws_tpm, K.tpm}) do
      local b = redis.call('HMGET', k, 'tokens', 'cap')
      if b[1] then
        local back = math.min(tonumber(r[2]), tonumber(b[2]) or math.huge)
        redis.call('HSET', k, 'tokens', tostring(tonumber(b[1]) + back))
      end
    end
  end
  -- A tombstone, not a deleted marker: the client library may still deliver this very call
  -- again (redis-py's cluster client resends after a dropped connection; the resend can be
  -- on the wire past the deadline), and it must find the call cancelled, not a free id.
  redis.call('SET', K.marker, 'cancelled:' .. ARGV[1], 'PX', tonumber(ARGV[3]))
  return 1
end
if not state then
  redis.call('SET', K.marker, 'cancelled:' .. ARGV[1], 'PX', tonumber(ARGV[3]))
  return 2
end
return 0
