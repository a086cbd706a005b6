"""Settlement of the answers Envoy served alone, from its gRPC access log.

A plain answer (200 JSON of attempt 1, usage readable) never reaches a processor: Envoy's
PRICE_LUA prices it and sets the attribution headers from what the downstream processor left
in metadata (NS_FAST), and Envoy's access log (`envoy_config.settlement_log`) sends one entry
per finished request, in batches, to this service. An entry carries the request's metadata:
the downstream processor's snapshot (NS_EXCHANGE), the usage json_to_metadata read, and what
PRICE_LUA did. From those the request is finished exactly as its own processor would have
finished it (`downstream.Exchange.resume`, then `finish` or `close`): the same price, record,
metrics and settlement; the settlements of a batch share Redis round trips (store.GroupCommit).

Who settles what, so nothing is settled twice and nothing is lost:
  - PRICE_LUA priced it (FAST_COST): here, from the entry;
  - PRICE_LUA handed it to the answer processor (FAST_HANDED): that processor; not here;
  - neither (the client left before the answer's headers): here, as the processor's `close`
    would (nothing served is billed 0; a provider's 2xx whose body never got through, at its
    reservation); but a 200 whose usage Envoy read is billed from it even so (the Lua failing
    must not make an answer free);
  - no entry at all (Envoy died, the processor was down when the batch came): the reaper
    records the reservation as `unsettled`, as for any request whose processor died.
A settlement is applied once even if its entry came twice: the reservation's marker and the
record id make `finish.lua` and the record write idempotent.
"""

from __future__ import annotations

import json
import logging
import time

from extproc.accesslog import LogEntry
from extproc.contract import FAST_COST, FAST_HANDED, NS_ATTEMPTS, NS_EXCHANGE, NS_FAST, NS_USAGE, SNAPSHOT_KEY, AttemptsNote
from extproc.downstream import Exchange
from extproc.gateway import Gateway
from extproc.payload import usage_from_metadata

log = logging.getLogger("tollgate.settlement_log")

# The metadata a settlement reads (the entry carries every namespace; only these are converted).
NAMESPACES = frozenset({NS_EXCHANGE, NS_FAST, NS_USAGE, NS_ATTEMPTS})


async def settle_entry(gw: Gateway, entry: LogEntry) -> None:
    """Finish the request one access-log entry describes, if it is this service's to finish."""
    raw = entry.metadata.get(NS_EXCHANGE, {}).get(SNAPSHOT_KEY)
    fast = entry.metadata.get(NS_FAST, {})
    if not isinstance(raw, str) or FAST_HANDED in fast:
        return
    ex = Exchange.resume(gw, json.loads(raw))
    if ex is None:
        log.warning("request %s: its route or model left the policy; the reaper will record it", entry.request_id)
        return
    if entry.duration_us:  # the record's latency is the request's, not until this entry came
        ex.started = time.monotonic() - entry.duration_us / 1e6
    usage = usage_from_metadata(entry.metadata.get(NS_USAGE, {}), ex.generates())
    if FAST_COST not in fast and not (entry.response_code == 200 and usage is not None):
        # The client left before the answer's headers. If the provider had answered 2xx (its
        # body was on its way), it did the work: `close` bills it as a lost answer.
        ex.upstream_status = entry.response_code
        await ex.close()
        return
    if FAST_COST not in fast:  # a 200 with usage the Lua did not price (it failed?): billed all the same
        log.error("request %s: a 200 answer with usage was not priced by Envoy's Lua; settled from its usage", entry.request_id)
    ex.upstream_status = 200
    # Attempt 1, or an attempt 2 PLANNED_LUA set up: its notes say which model served.
    ex.learn_attempts(AttemptsNote.from_struct(entry.metadata.get(NS_ATTEMPTS, {})) if ex.chained else AttemptsNote(), None)
    cost = await ex.finish(usage)
    lua_cost = fast.get(FAST_COST)
    if lua_cost is not None and int(lua_cost) != cost:  # PRICE_LUA and Price.cost_micro must agree to the micro-dollar
        log.error("request %s: Envoy priced %s, the processor %s micro-USD", entry.request_id, lua_cost, cost)
