"""reserve.lua / finish.lua / expire.lua called directly on a real Redis, branch by branch.

Every number is worked out by hand from one request shape: 100 input tokens at $1/Mtok and up
to 1,000 output tokens at $2/Mtok, so an output cap of c costs ceil((100e6 + c * 2e6) / 1e6)
= 100 + 2c micro-USD; the smallest useful cap (16) costs 132.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar, cast

import pytest
import redis

from extproc.caps import CostBound
from extproc.devstack import RedisServer
from extproc.quota import RESERVATION_HINTS, Account, Limits, Quota, Reservation, ReserveResult, month_of, reserve_args
from extproc.store import redis_client

BOUND = CostBound(input_tokens=100, rate_tokens=25, output_tokens=1000, min_output_tokens=16, choices=1,
                  input_price=1_000_000, output_price=2_000_000)
T = TypeVar("T")


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    r = RedisServer().start()
    yield r
    r.stop()


@pytest.fixture
def sync(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    client.flushall()
    client.config_set("maxmemory", 0)
    yield client
    client.config_set("maxmemory", 0)


def run(server: RedisServer, fn: Callable[[Quota], Awaitable[T]]) -> T:
    async def go() -> T:
        client = redis_client(server.url)
        try:
            return await fn(Quota(client))
        finally:
            await client.aclose()

    return asyncio.run(go())


def res(rid: str = "r1", prepaid: bool = True, workspace: str = "w") -> Reservation:
    return Reservation(Account("c", workspace, "k"), rid, month_of(time.time()), prepaid)


def reserve(server: RedisServer, limits: Limits, rid: str = "r1", bound: CostBound = BOUND, workspace: str = "w",
            ttl_ms: int = 60_000, settling: bool = False) -> ReserveResult:
    record = {"request_id": rid, "workspace_id": workspace, "record_id": f"u-{rid}"}
    return run(server, lambda q: q.reserve(res(rid, limits.prepaid, workspace), bound, limits, ttl_ms, record, settling=settling))


def finish(server: RedisServer, rid: str, amount: int, cost: int, tokens: int, prepaid: bool = True) -> None:
    r = Reservation(Account("c", "w", "k"), rid, month_of(time.time()), prepaid, amount)
    record = {"request_id": rid, "record_id": f"u-{rid}"}
    run(server, lambda q: q.finish(r, cost, tokens, True, record))


PREPAID = Limits(prepaid=True, monthly_budget_micro=None, rpm=None, tpm=None)
POSTPAID = Limits(prepaid=False, monthly_budget_micro=None, rpm=None, tpm=None)


def num(sync: redis.Redis, key: str) -> int:
    return int(sync.get(key) or 0)


# --- prepaid balance -----------------------------------------------------------------------


def test_affordable_request_reserves_its_full_cap(server: RedisServer, sync: redis.Redis) -> None:
    sync.set("tollgate:{c:c}:balance", 5000)
    r = reserve(server, PREPAID)
    assert (r.status, r.cap, r.amount) == ("ok", 1000, 2100)
    assert num(sync, "tollgate:{c:c}:reserved") == 2100


def test_cap_shrinks_to_what_the_balance_affords(server: RedisServer, sync: redis.Redis) -> None:
    sync.set("tollgate:{c:c}:balance", 1000)
    r = reserve(server, PREPAID)
    assert (r.status, r.cap, r.amount) == ("ok", 450, 1000)  # 100 + 2 * 450


def test_balance_below_the_useful_minimum_is_refused_with_what_it_needs(server: RedisServer, sync: redis.Redis) -> None:
    sync.set("tollgate:{c:c}:balance", 131)
    r = reserve(server, PREPAID)
    assert (r.status, r.reason, r.need, r.available) == ("refused", "balance", 132, 131)
    assert num(sync, "tollgate:{c:c}:reserved") == 0


def test_empty_balance_is_refused_even_for_a_free_request(server: RedisServer, sync: redis.Redis) -> None:
    free = CostBound(1, 1, 0, 0, 1, 0, 0)
    assert reserve(server, PREPAID, bound=free).reason == "balance"


def test_money_in_flight_counts_against_the_balance(server: RedisServer, sync: redis.Redis) -> None:
    sync.set("tollgate:{c:c}:balance", 3000)
    assert reserve(server, PREPAID, "a").amount == 2100
    r = reserve(server, PREPAID, "b")
    assert (r.cap, r.amount) == (400, 900)  # 3000 - 2100 left: 100 + 2 * 400


def test_asked_to_wait_for_settlements_it_refuses_to_cut_a_cap_while_money_is_in_flight(server: RedisServer,
                                                                                        sync: redis.Redis) -> None:
    sync.set("tollgate:{c:c}:balance", 3000)
    assert reserve(server, PREPAID, "a").amount == 2100
    r = reserve(server, PREPAID, "b", settling=True)
    assert (r.status, r.reason) == ("refused", "settling")
    assert num(sync, "tollgate:{c:c}:reserved") == 2100  # nothing charged
    assert sync.get("tollgate:{c:c}:req:b") is None  # the id stays free for the second ask


def test_asked_to_wait_for_settlements_it_refuses_to_refuse_while_money_is_in_flight(server: RedisServer,
                                                                                      sync: redis.Redis) -> None:
    sync.set("tollgate:{c:c}:balance", 2200)
    assert reserve(server, PREPAID, "a").amount == 2100
    assert reserve(server, PREPAID, "b", settling=True).reason == "settling"  # 100 left < 132: would be "balance"
    assert reserve(server, PREPAID, "b").reason == "balance"


def test_asked_to_wait_for_settlements_one_micro_dollar_in_flight_is_enough_to_wait(server: RedisServer, sync: redis.Redis) -> None:
    sync.set("tollgate:{c:c}:balance", 1000)
    tiny = CostBound(input_tokens=1, rate_tokens=1, output_tokens=1, min_output_tokens=1, choices=1, input_price=1, output_price=1)
    assert reserve(server, PREPAID, "a", bound=tiny).amount == 1  # ceil((1 + 1) / 1e6)
    assert reserve(server, PREPAID, "b", settling=True).reason == "settling"  # 2100 > 999 left


def test_asked_to_wait_for_settlements_with_nothing_in_flight_it_cuts_the_cap_at_once(server: RedisServer,
                                                                                       sync: redis.Redis) -> None:
    sync.set("tollgate:{c:c}:balance", 1000)
    r = reserve(server, PREPAID, settling=True)
    assert (r.status, r.cap, r.amount) == ("ok", 450, 1000)


def test_asked_to_wait_for_settlements_an_affordable_cap_is_reserved_at_once(server: RedisServer, sync: redis.Redis) -> None:
    sync.set("tollgate:{c:c}:balance", 5000)
    assert reserve(server, PREPAID, "a").amount == 2100
    r = reserve(server, PREPAID, "b", settling=True)
    assert (r.status, r.cap, r.amount) == ("ok", 1000, 2100)


def test_a_settling_refusal_spends_no_request_per_minute(server: RedisServer, sync: redis.Redis) -> None:
    limits = Limits(prepaid=True, monthly_budget_micro=None, rpm=2, tpm=None)
    sync.set("tollgate:{c:c}:balance", 2200)
    assert reserve(server, limits, "r1").status == "ok"
    assert reserve(server, limits, "r2", settling=True).reason == "settling"
    assert int(float(sync.hget("tollgate:{c:c}:rpm", "tokens") or 0)) == 1


def test_tokens_in_flight_turn_a_tokens_per_minute_refusal_into_a_settling_one(server: RedisServer, sync: redis.Redis) -> None:
    """tpm 1,500: r1 holds 25 + 1,000 tokens, so r2's 1,025 do not fit until r1 settles."""
    limits = Limits(prepaid=False, monthly_budget_micro=None, rpm=None, tpm=1500)
    assert reserve(server, limits, "r1").status == "ok"
    r2 = reserve(server, limits, "r2", settling=True)
    assert (r2.status, r2.reason) == ("refused", "settling")


def test_without_anything_in_flight_a_tokens_per_minute_refusal_is_final(server: RedisServer, sync: redis.Redis) -> None:
    """The bucket is empty and no request holds tokens: waiting for a settlement would only add
    a 50 ms sleep and a second reserve call to every refusal."""
    limits = Limits(prepaid=False, monthly_budget_micro=None, rpm=None, tpm=1500)
    sync.hset("tollgate:{c:c}:tpm", mapping={"tokens": "0", "ts": str(int(time.time() * 1000))})
    r1 = reserve(server, limits, "r1", settling=True)
    assert (r1.status, r1.reason) == ("refused", "tpm")


def test_choices_multiply_the_output_price(server: RedisServer, sync: redis.Redis) -> None:
    three = CostBound(100, 25, 100, 16, 3, 1_000_000, 2_000_000)
    assert reserve(server, POSTPAID, bound=three).amount == 700  # 100 + 3 * 100 * 2


# --- monthly budgets -----------------------------------------------------------------------


def test_customer_budget_counts_settled_spend_and_money_in_flight(server: RedisServer, sync: redis.Redis) -> None:
    limits = Limits(prepaid=False, monthly_budget_micro=4000, rpm=None, tpm=None)
    sync.set(f"tollgate:{{c:c}}:spend:{month_of(time.time())}", 1000)
    assert reserve(server, limits, "a").amount == 2100
    r = reserve(server, limits, "b")
    assert (r.cap, r.amount) == (400, 900)  # 4000 - 1000 spent - 2100 in flight


def test_customer_budget_override_replaces_the_plans(server: RedisServer, sync: redis.Redis) -> None:
    sync.hset("tollgate:{c:c}:limits", "monthly_budget_micro", 300)
    r = reserve(server, Limits(prepaid=False, monthly_budget_micro=1_000_000, rpm=None, tpm=None))
    assert (r.cap, r.amount) == (100, 300)


def test_workspace_budget_counts_its_own_spend_and_money_in_flight(server: RedisServer, sync: redis.Redis) -> None:
    sync.hset("tollgate:{c:c}:ws:w:limits", "monthly_budget_micro", 2600)
    sync.set(f"tollgate:{{c:c}}:ws:w:spend:{month_of(time.time())}", 200)
    assert reserve(server, POSTPAID, "a").amount == 2100
    r = reserve(server, POSTPAID, "b")
    assert (r.cap, r.amount) == (100, 300)  # 2600 - 200 spent - 2100 in flight
    r = reserve(server, POSTPAID, "c")
    assert (r.status, r.reason, r.need, r.available) == ("refused", "budget", 132, 0)


def test_another_workspace_is_not_held_to_that_budget(server: RedisServer, sync: redis.Redis) -> None:
    sync.hset("tollgate:{c:c}:ws:w:limits", "monthly_budget_micro", 0)
    assert reserve(server, POSTPAID, "a", workspace="other").amount == 2100


# --- rate limits ---------------------------------------------------------------------------


def test_requests_per_minute_refuse_with_a_wait(server: RedisServer, sync: redis.Redis) -> None:
    limits = Limits(prepaid=False, monthly_budget_micro=None, rpm=1, tpm=None)
    assert reserve(server, limits, "a").status == "ok"
    r = reserve(server, limits, "b")
    assert (r.status, r.reason) == ("refused", "rpm") and 0 < r.retry_after_ms <= 60_000


def test_tokens_per_minute_charge_the_cheap_estimate_plus_the_output_cap(server: RedisServer, sync: redis.Redis) -> None:
    reserve(server, Limits(prepaid=False, monthly_budget_micro=None, rpm=None, tpm=10_000))
    assert float(sync.hget("tollgate:{c:c}:key:k:tpm", "tokens") or 0) == 10_000 - (25 + 1000)


def test_settling_refunds_unused_tokens_per_minute(server: RedisServer, sync: redis.Redis) -> None:
    reserve(server, Limits(prepaid=False, monthly_budget_micro=None, rpm=None, tpm=10_000))
    finish(server, "r1", 2100, 350, 125, prepaid=False)
    for key in ("tollgate:{c:c}:key:k:tpm", "tollgate:{c:c}:ws:w:tpm", "tollgate:{c:c}:tpm"):
        assert float(sync.hget(key, "tokens") or 0) == 10_000 - 125, key


# --- settling ------------------------------------------------------------------------------


def test_settle_charges_the_real_cost_and_releases_the_rest(server: RedisServer, sync: redis.Redis) -> None:
    sync.set("tollgate:{c:c}:balance", 5000)
    reserve(server, PREPAID)
    finish(server, "r1", 2100, 350, 300)
    assert num(sync, "tollgate:{c:c}:balance") == 4650
    assert num(sync, "tollgate:{c:c}:reserved") == 0
    assert num(sync, f"tollgate:{{c:c}}:spend:{month_of(time.time())}") == 350


def test_a_provider_above_the_cap_is_still_charged_in_full(server: RedisServer, sync: redis.Redis) -> None:
    sync.set("tollgate:{c:c}:balance", 1000)
    reserve(server, PREPAID)
    finish(server, "r1", 1000, 1500, 900)
    assert num(sync, "tollgate:{c:c}:balance") == -500


def test_a_served_request_id_is_a_duplicate(server: RedisServer, sync: redis.Redis) -> None:
    reserve(server, POSTPAID)
    finish(server, "r1", 2100, 1, 1, prepaid=False)
    assert reserve(server, POSTPAID).status == "duplicate"


def raw_reserve(server: RedisServer, call: str) -> list[Any]:
    """One reserve.lua call as a Redis client sends it (prepaid, r1), named `call`."""
    a = Account("c", "w", "k")
    args = reserve_args(BOUND, PREPAID, 60_000, "r1", call)
    keys = a.reserve_keys("r1", month_of(time.time())).as_list()
    return run(server, lambda q: q.scripts.eval("reserve", keys, [json.dumps(args), json.dumps({"request_id": "r1"})]))


def test_a_resent_reserve_call_is_answered_again_and_charged_once(server: RedisServer, sync: redis.Redis) -> None:
    """A client library resending the same call after a lost reply (redis-py's cluster client
    retries on a dropped connection) must not turn the request into a 409 or reserve twice."""
    sync.set("tollgate:{c:c}:balance", 5000)
    first, again = raw_reserve(server, "call-a"), raw_reserve(server, "call-a")
    assert (int(first[0]), int(first[9]), int(first[10])) == (1, 1000, 2100)
    # the whole reply: ok, no wait, no rate limits to report (-1), cap 1000, 2100 micro-USD
    assert again == [1, b"ok", 0, -1, -1, 0, -1, -1, 0, 1000, 2100, 0, 0]
    assert num(sync, "tollgate:{c:c}:reserved") == 2100


def test_another_call_with_the_same_request_id_is_a_duplicate(server: RedisServer, sync: redis.Redis) -> None:
    sync.set("tollgate:{c:c}:balance", 5000)
    raw_reserve(server, "call-a")
    assert int(raw_reserve(server, "call-b")[0]) == -1
    assert num(sync, "tollgate:{c:c}:reserved") == 2100


def cancel(server: RedisServer, call: str) -> int:
    keys = Account("c", "w", "k").cancel_keys("r1").as_list()
    return int(run(server, lambda q: q.scripts.eval("cancel", keys, [call, "r1", 60_000])))


def test_cancelling_a_call_that_ran_releases_its_money_and_frees_the_id(server: RedisServer, sync: redis.Redis) -> None:
    sync.set("tollgate:{c:c}:balance", 5000)
    raw_reserve(server, "call-a")
    assert cancel(server, "call-a") == 1
    assert num(sync, "tollgate:{c:c}:reserved") == 0
    assert not sync.exists("tollgate:{c:c}:resv:r1") and sync.zcard("tollgate:{c:c}:resv-index") == 0
    assert int(raw_reserve(server, "call-b")[0]) == 1


def test_a_call_delivered_again_after_its_cancel_released_it_does_not_reserve(server: RedisServer, sync: redis.Redis) -> None:
    """redis-py's cluster client may resend a call whose reply it lost, and that resend can
    reach Redis after the call was cancelled: it must find the call cancelled, not a free id."""
    sync.set("tollgate:{c:c}:balance", 5000)
    raw_reserve(server, "call-a")
    assert cancel(server, "call-a") == 1
    assert int(raw_reserve(server, "call-a")[0]) == -1
    assert num(sync, "tollgate:{c:c}:reserved") == 0
    assert not sync.exists("tollgate:{c:c}:resv:r1")


def test_a_call_cancelled_before_it_ran_does_not_reserve_when_it_arrives(server: RedisServer, sync: redis.Redis) -> None:
    sync.set("tollgate:{c:c}:balance", 5000)
    assert cancel(server, "call-a") == 2
    assert int(raw_reserve(server, "call-a")[0]) == -1
    assert num(sync, "tollgate:{c:c}:reserved") == 0


def test_a_retry_passes_the_tombstone_and_the_late_call_then_finds_the_id_taken(server: RedisServer, sync: redis.Redis) -> None:
    sync.set("tollgate:{c:c}:balance", 5000)
    cancel(server, "call-a")
    assert int(raw_reserve(server, "call-b")[0]) == 1
    assert int(raw_reserve(server, "call-a")[0]) == -1
    assert num(sync, "tollgate:{c:c}:reserved") == 2100


def test_cancel_leaves_a_served_request_alone(server: RedisServer, sync: redis.Redis) -> None:
    sync.set("tollgate:{c:c}:balance", 5000)
    raw_reserve(server, "call-a")
    assert cancel(server, "call-other") == 0
    assert num(sync, "tollgate:{c:c}:reserved") == 2100


def test_a_refused_settlement_keeps_the_reservation_and_its_hint(server: RedisServer, sync: redis.Redis) -> None:
    """A Redis that refuses writes (maxmemory) fails `finish`: nothing is lost, the reaper
    still finds the reservation by its hint."""
    reserve(server, POSTPAID)
    sync.config_set("maxmemory", 1)  # every write that may grow memory is refused: OOM
    with pytest.raises(redis.exceptions.ResponseError):
        finish(server, "r1", 2100, 350, 300, prepaid=False)
    sync.config_set("maxmemory", 0)
    assert sync.exists("tollgate:{c:c}:resv:r1")
    assert [json.loads(m) for m in cast(list[bytes], sync.zrange(RESERVATION_HINTS, 0, -1))] == [["c", "w", "r1"]]
    assert num(sync, "tollgate:{c:c}:reserved") == 2100


def test_reaper_turns_an_overdue_reservation_into_one_unsettled_record(server: RedisServer, sync: redis.Redis) -> None:
    reserve(server, POSTPAID, ttl_ms=1)
    time.sleep(1.1)  # past the hint's deadline (ttl + 1 s)
    assert run(server, lambda q: q.expire_overdue()) == 1
    entries = cast(list[Any], sync.xrange("tollgate:usage"))
    assert [e[1][b"status"] for e in entries] == [b"unsettled"]
    assert num(sync, "tollgate:{c:c}:reserved") == 0 and sync.zcard(RESERVATION_HINTS) == 0


def test_a_reservation_whose_hint_was_lost_is_found_by_the_sweep(server: RedisServer, sync: redis.Redis) -> None:
    reserve(server, POSTPAID, ttl_ms=1)
    sync.delete(RESERVATION_HINTS)
    time.sleep(0.05)
    assert run(server, lambda q: q.sweep_orphans(0)) == 1
    time.sleep(1.0)
    assert run(server, lambda q: q.expire_overdue()) == 1
    assert num(sync, "tollgate:{c:c}:reserved") == 0


def test_extend_moves_a_live_reservations_deadline(server: RedisServer, sync: redis.Redis) -> None:
    reserve(server, POSTPAID, ttl_ms=1)
    r = Reservation(Account("c", "w", "k"), "r1", month_of(time.time()), False, 2100)
    assert run(server, lambda q: q.extend(r, 60_000)) is True
    time.sleep(1.1)
    assert run(server, lambda q: q.expire_overdue()) == 0  # not due any more
    assert num(sync, "tollgate:{c:c}:reserved") == 2100
