"""reserve.lua's 'settling' refusal, called directly on a real Redis (issue 12): what
tests/test_reserve_lua.py does not pin (requests per minute, tokens per minute).

A plain answer is settled from Envoy's access log a few milliseconds after its client got it, so
a client's next request may find the last one's cap still held. Asked to (`settling`), the
script refuses as 'settling' where money or tokens in flight would cut or refuse the request,
and the processor asks once more a moment later (downstream.Exchange.reserve).

Numbers as in tests/test_reserve_lua.py: 100 input tokens at $1/Mtok and up to 1,000 output
tokens at $2/Mtok, so a cap c costs 100 + 2c micro-USD; a request is 25 + c tokens per minute.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from extproc.devstack import RedisServer
from extproc.quota import Limits, ReserveResult
from tests.test_reserve_lua import BOUND, res, reserve, run


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    r = RedisServer().start()
    yield r
    r.stop()


@pytest.fixture
def sync(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    client.flushall()
    yield client


def reserve_settling(server: RedisServer, limits: Limits, rid: str) -> ReserveResult:
    record = {"request_id": rid, "workspace_id": "w", "record_id": f"u-{rid}"}
    return run(server, lambda q: q.reserve(res(rid, limits.prepaid), BOUND, limits, 60_000, record, settling=True))


def test_a_settling_refusal_spends_no_request_per_minute(server: RedisServer, sync: redis.Redis) -> None:
    limits = Limits(prepaid=True, monthly_budget_micro=None, rpm=2, tpm=None)
    sync.set("tollgate:{c:c}:balance", 2200)
    assert reserve(server, limits, "r1").status == "ok"
    assert reserve_settling(server, limits, "r2").reason == "settling"
    assert int(float(sync.hget("tollgate:{c:c}:rpm", "tokens") or 0)) == 1


def test_tokens_in_flight_turn_a_tokens_per_minute_refusal_into_a_settling_one(server: RedisServer, sync: redis.Redis) -> None:
    """tpm 1,500: r1 holds 25 + 1,000 tokens, so r2's 1,025 do not fit until r1 settles."""
    limits = Limits(prepaid=False, monthly_budget_micro=None, rpm=None, tpm=1500)
    assert reserve(server, limits, "r1").status == "ok"
    r2 = reserve_settling(server, limits, "r2")
    assert (r2.status, r2.reason) == ("refused", "settling")


def test_without_anything_in_flight_a_tokens_per_minute_refusal_is_final(server: RedisServer, sync: redis.Redis) -> None:
    """The bucket is empty and no request holds tokens: waiting for a settlement would only add
    a 50 ms sleep and a second reserve call to every refusal."""
    limits = Limits(prepaid=False, monthly_budget_micro=None, rpm=None, tpm=1500)
    sync.hset("tollgate:{c:c}:tpm", mapping={"tokens": "0", "ts": str(int(time.time() * 1000))})
    r1 = reserve_settling(server, limits, "r1")
    assert (r1.status, r1.reason) == ("refused", "tpm")
