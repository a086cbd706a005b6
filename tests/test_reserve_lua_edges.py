"""reserve.lua / finish.lua at their boundaries, on a real Redis: exact waits and rate headers
from buckets frozen at a known level (a `ts` in the future: no refill), zero limits, the
smallest charge and refund, expiries and when a request id is spent. Numbers worked by hand;
the request shape is test_reserve_lua's (an output cap of c costs 100 + 2c micro-USD, and its
tokens-per-minute estimate is 25 + 1,000 = 1,025 tokens)."""

from __future__ import annotations

import time

import redis

from extproc.caps import CostBound
from extproc.devstack import RedisServer
from extproc.quota import Account, Limits, RateInfo, Reservation, ReserveResult, month_of
from tests.test_reserve_lua import POSTPAID, PREPAID, num, reserve, run, server, sync

__all__ = ["server", "sync"]  # fixtures used by name

KEY_RPM, WS_RPM, CUST_RPM = "tollgate:{c:c}:key:k:rpm", "tollgate:{c:c}:ws:w:rpm", "tollgate:{c:c}:rpm"


def freeze(sync: redis.Redis, key: str, tokens: float) -> None:
    """A bucket holding exactly `tokens`, last touched in the future: it does not refill."""
    sync.hset(key, mapping={"tokens": str(tokens), "ts": str(int(time.time() * 1000) + 10**9)})


def settle(server: RedisServer, rid: str, cost: int, tokens: int, served: bool, prepaid: bool = False) -> None:
    r = Reservation(Account("c", "w", "k"), rid, month_of(time.time()), prepaid, 0)
    run(server, lambda q: q.finish(r, cost, tokens, served, {"request_id": rid, "record_id": f"u-{rid}"}))


def rpm(limit: int | None, key_rpm: int | None = None) -> Limits:
    return Limits(prepaid=False, monthly_budget_micro=None, rpm=limit, tpm=None, key_rpm=key_rpm)


# --- reserve.lua ---------------------------------------------------------------------------


def test_a_duplicate_reports_nothing_but_its_status(server: RedisServer, sync: redis.Redis) -> None:
    reserve(server, POSTPAID)
    settle(server, "r1", 5, 5, served=True)
    assert reserve(server, POSTPAID) == ReserveResult("duplicate", "duplicate", 0, RateInfo(-1, -1, 0, -1, -1, 0))


def test_no_limits_report_no_rate_figures(server: RedisServer, sync: redis.Redis) -> None:
    assert reserve(server, POSTPAID).rate == RateInfo(-1, -1, 0, -1, -1, 0)


def test_a_zero_requests_per_minute_override_refuses_every_request(server: RedisServer, sync: redis.Redis) -> None:
    assert reserve(server, rpm(None, key_rpm=0)).reason == "rpm"


def test_an_empty_bucket_of_one_request_a_minute_waits_a_full_minute(server: RedisServer, sync: redis.Redis) -> None:
    freeze(sync, KEY_RPM, 0)
    r = reserve(server, rpm(1))
    assert (r.reason, r.retry_after_ms) == ("rpm", 60_000)


def test_the_wait_is_rounded_up_to_the_next_millisecond(server: RedisServer, sync: redis.Redis) -> None:
    freeze(sync, KEY_RPM, 0.5)  # half a request short at 7 a minute: 0.5 x 60,000 / 7 = 4,285.7 ms
    assert reserve(server, rpm(7)).retry_after_ms == 4_286


def test_rate_figures_report_the_tightest_bucket(server: RedisServer, sync: redis.Redis) -> None:
    """Key: 4.5 of 10 left; workspace and customer: 50 of 100. After one request the key has
    3.5: limit 10, remaining 3 (rounded down), full again in 6.5 / (10 per 60,000 ms) = 39,000 ms."""
    freeze(sync, KEY_RPM, 4.5)
    freeze(sync, WS_RPM, 50)
    freeze(sync, CUST_RPM, 50)
    r = reserve(server, rpm(100, key_rpm=10))
    assert (r.rate.rpm_limit, r.rate.rpm_remaining, r.rate.rpm_reset_ms) == (10, 3, 39_000)


def test_rate_figures_report_the_tightest_bucket_when_it_comes_last(server: RedisServer, sync: redis.Redis) -> None:
    """The same figures when the customer's bucket (its own override: 10 a minute) is the
    tight one and the key's and workspace's (100) are looser."""
    sync.hset("tollgate:{c:c}:limits", "rpm", 10)
    freeze(sync, KEY_RPM, 50)
    freeze(sync, WS_RPM, 50)
    freeze(sync, CUST_RPM, 4.5)
    r = reserve(server, rpm(100))
    assert (r.rate.rpm_limit, r.rate.rpm_remaining, r.rate.rpm_reset_ms) == (10, 3, 39_000)


def test_a_zero_monthly_budget_refuses_every_request(server: RedisServer, sync: redis.Redis) -> None:
    r = reserve(server, Limits(prepaid=False, monthly_budget_micro=0, rpm=None, tpm=None))
    assert (r.status, r.reason) == ("refused", "budget")


def test_a_reservation_is_due_its_ttl_from_now(server: RedisServer, sync: redis.Redis) -> None:
    reserve(server, POSTPAID, ttl_ms=60_000)
    seconds, micros = sync.time()
    now_ms = seconds * 1000 + micros // 1000
    assert 59_000 < int(sync.hget("tollgate:{c:c}:resv:r1", "deadline") or 0) - now_ms <= 60_000


# --- finish.lua ----------------------------------------------------------------------------


def test_a_single_unused_token_is_refunded(server: RedisServer, sync: redis.Redis) -> None:
    reserve(server, Limits(prepaid=False, monthly_budget_micro=None, rpm=None, tpm=10_000))
    settle(server, "r1", 350, 1_024, served=True)  # the estimate took 1,025
    assert float(sync.hget("tollgate:{c:c}:key:k:tpm", "tokens") or 0) == 10_000 - 1_024


def test_a_cost_of_one_micro_dollar_is_charged(server: RedisServer, sync: redis.Redis) -> None:
    sync.set("tollgate:{c:c}:balance", 5000)
    reserve(server, PREPAID)
    settle(server, "r1", 1, 10, served=True, prepaid=True)
    assert num(sync, "tollgate:{c:c}:balance") == 4999
    assert num(sync, f"tollgate:{{c:c}}:spend:{month_of(time.time())}") == 1


def test_month_spend_is_kept_for_400_days(server: RedisServer, sync: redis.Redis) -> None:
    reserve(server, POSTPAID)
    settle(server, "r1", 5, 10, served=True)
    month = month_of(time.time())
    for key in (f"tollgate:{{c:c}}:spend:{month}", f"tollgate:{{c:c}}:ws:w:spend:{month}"):
        assert 400 * 86_400_000 - 1_000 < sync.pttl(key) <= 400 * 86_400_000, key


def test_a_request_that_served_nothing_and_cost_nothing_frees_its_id(server: RedisServer, sync: redis.Redis) -> None:
    reserve(server, POSTPAID)
    settle(server, "r1", 0, 0, served=False)
    assert reserve(server, POSTPAID).status == "ok"


def test_a_request_that_served_nothing_but_cost_something_spends_its_id(server: RedisServer, sync: redis.Redis) -> None:
    reserve(server, POSTPAID)
    settle(server, "r1", 1, 0, served=False)
    assert reserve(server, POSTPAID).status == "duplicate"


ONE_MICRO = CostBound(input_tokens=1, rate_tokens=1, output_tokens=0, min_output_tokens=0, choices=1,
                      input_price=1_000_000, output_price=0)  # 1 token at $1/Mtok: exactly 1 micro-USD


def test_a_balance_of_exactly_the_cost_is_enough(server: RedisServer, sync: redis.Redis) -> None:
    sync.set("tollgate:{c:c}:balance", 1)
    r = reserve(server, PREPAID, bound=ONE_MICRO)
    assert (r.status, r.amount) == ("ok", 1)


def test_a_request_larger_than_the_tokens_per_minute_bucket_is_admitted_into_a_full_bucket(
        server: RedisServer, sync: redis.Redis) -> None:
    """25 prompt + 1,000 output tokens against 100 a minute: it needs at most the whole bucket
    (else it could never be served), and a full bucket has it."""
    r = reserve(server, Limits(prepaid=False, monthly_budget_micro=None, rpm=None, tpm=100))
    assert r.status == "ok"
