"""health.py on a real Redis (no Envoy): window keys, the circuit view, and the round trips
that count attempts, open a circuit and read every circuit back. Numbers worked out by hand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest
import redis

from extproc.devstack import RedisServer
from extproc.health import Circuits, Health, bucket_keys
from extproc.policy.model import Policy, Provider
from extproc.store import RedisLike, redis_client

T = TypeVar("T")
P1 = Provider("p1", "127.0.0.1", 1, False, circuit_failures=2, circuit_failure_rate="0.5", circuit_customers=2,
              circuit_window_s=25, circuit_cooldown_s=30)
P2 = Provider("p2", "127.0.0.1", 2, False)
POLICY = Policy(tiers=("low",), providers={"p1": P1, "p2": P2}, models={}, plans={}, routes={})


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
    client.close()


def run(server: RedisServer, fn: Callable[[Health], Awaitable[T]]) -> T:
    async def main() -> T:
        client: RedisLike = redis_client(server.url)
        try:
            return await fn(Health(client, POLICY))
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_window_keys_of_a_100s_window_are_ten_10s_buckets_current_first() -> None:
    keys = bucket_keys("p1", 100, 1000.0)  # bucket size 10 s: now is bucket 100
    assert keys[:10] == [f"tollgate:health:{{p:p1}}:n:{b}" for b in range(100, 90, -1)]
    assert keys[10:] == [f"tollgate:health:{{p:p1}}:c:{b}" for b in range(100, 90, -1)]


def test_window_not_a_multiple_of_the_bucket_rounds_the_bucket_count_up() -> None:
    keys = bucket_keys("p1", 25, 1000.0)  # size 2 s, ceil(25 / 2) = 13 buckets, now is bucket 500
    assert keys[:13] == [f"tollgate:health:{{p:p1}}:n:{b}" for b in range(500, 487, -1)]
    assert len(keys) == 26


def test_window_shorter_than_ten_seconds_uses_one_second_buckets() -> None:
    keys = bucket_keys("p1", 5, 7.5)  # size max(1, 0) = 1 s: 5 buckets, now is bucket 7
    assert keys[:5] == [f"tollgate:health:{{p:p1}}:n:{b}" for b in (7, 6, 5, 4, 3)]


def test_after_first_skips_unhealthy_and_probing_providers() -> None:
    c = Circuits(unhealthy=frozenset({"a"}), probing=frozenset({"b"}))
    assert c.after_first == frozenset({"a", "b"})


def test_an_open_circuit_is_unhealthy_and_says_what_opened_it(server: RedisServer) -> None:
    async def go(h: Health) -> Circuits:
        h.open = {"p1": "timeout"}
        return h.view()

    view = run(server, go)
    assert (view.unhealthy, dict(view.opened_by), view.probing) == (frozenset({"p1"}), {"p1": "timeout"}, frozenset())


def test_a_half_open_circuit_lets_one_probe_through_then_skips_within_the_second(server: RedisServer) -> None:
    async def go(h: Health) -> tuple[Circuits, Circuits]:
        h.half_open = {"p2": "provider_5xx"}
        return h.view(), h.view()

    first, second = run(server, go)
    assert (first.probing, first.unhealthy) == (frozenset({"p2"}), frozenset())
    assert (second.probing, second.unhealthy) == (frozenset(), frozenset({"p2"}))


def test_successes_are_flushed_as_one_count_per_provider(server: RedisServer, sync: redis.Redis) -> None:
    async def go(h: Health) -> None:
        for _ in range(3):
            h.record_success("p1")
        await h.refresh()

    run(server, go)
    (key,) = sync.keys("tollgate:health:{p:p1}:n:*")
    assert sync.hgetall(key) == {b"ok": b"3"}


def test_one_failure_counts_once_and_opens_nothing(server: RedisServer, sync: redis.Redis) -> None:
    async def go(h: Health) -> dict[str, str]:
        await h.record_failure("p1", "acme", "provider_5xx")
        return h.open

    assert run(server, go) == {}
    (key,) = sync.keys("tollgate:health:{p:p1}:n:*")
    assert sync.hgetall(key) == {b"fail": b"1"}
    assert 26_000 < sync.pttl(key) <= 27_000  # the window (25 s) plus one bucket (25 // 10 = 2 s)


def test_failures_from_two_customers_open_the_circuit_for_the_cooldown(server: RedisServer, sync: redis.Redis) -> None:
    async def go(h: Health) -> dict[str, str]:
        await h.record_failure("p1", "acme", "provider_5xx")
        await h.record_failure("p1", "globex", "provider_5xx")
        return h.open

    assert run(server, go) == {"p1": "provider_5xx"}
    assert sync.get("tollgate:health:{p:p1}:open") == b"provider_5xx"
    assert 29_000 < sync.pttl("tollgate:health:{p:p1}:open") <= 30_000
    assert 56_000 < sync.pttl("tollgate:health:{p:p1}:probe") <= 57_000  # cooldown 30 + window 25 + bucket 2


def test_refresh_reads_open_and_half_open_circuits_of_every_provider(server: RedisServer, sync: redis.Redis) -> None:
    sync.set("tollgate:health:{p:p1}:probe", "timeout")
    sync.set("tollgate:health:{p:p2}:open", "connect_failure")
    sync.set("tollgate:health:{p:p2}:probe", "connect_failure")

    async def go(h: Health) -> tuple[dict[str, str], dict[str, str]]:
        h.record_success("p2")  # its script reply comes first in the same round trip (p2 stays open)
        await h.refresh()
        return h.open, h.half_open

    assert run(server, go) == ({"p2": "connect_failure"}, {"p1": "timeout"})


def test_the_background_loop_keeps_refreshing(server: RedisServer, sync: redis.Redis) -> None:
    async def go(h: Health) -> dict[str, str]:
        task = asyncio.create_task(h.run(interval_s=0.05))
        await asyncio.sleep(0.2)
        sync.set("tollgate:health:{p:p2}:open", "timeout")
        deadline = time.monotonic() + 2
        while not h.open and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()
        return h.open

    assert run(server, go) == {"p2": "timeout"}


def test_an_opened_circuit_keeps_its_probe_mark_for_cooldown_plus_window_plus_a_bucket(
        server: RedisServer, sync: redis.Redis) -> None:
    """p1: window 25 s in buckets of 25 // 10 = 2 s, cooldown 30 s: the probe mark lives
    30 + 25 + 2 = 57 s (whole seconds: Redis refuses a fractional expiry)."""
    async def go(h: Health) -> None:
        await h.record_failure("p1", "cust-a", "provider_5xx")
        await h.record_failure("p1", "cust-b", "provider_5xx")

    run(server, go)
    assert sync.exists("tollgate:health:{p:p1}:open") == 1
    assert 50 < sync.ttl("tollgate:health:{p:p1}:probe") <= 57
