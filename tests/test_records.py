"""Usage records are published exactly once, even when a processor stops between settling
and publishing (against a real Redis)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis

from extproc.devstack import RedisServer
from extproc.quota import OUTBOX_HINTS, USAGE_STREAM, Account, Quota
from extproc.records import find
from extproc.store import redis_client


@pytest.fixture
def server() -> Iterator[RedisServer]:
    r = RedisServer().start()
    yield r
    r.stop()


def run(coro_fn, url: str):  # type: ignore[no-untyped-def]
    async def main() -> Any:
        client = redis_client(url)
        try:
            return await coro_fn(Quota(client), client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def orphan(sync: redis.Redis, customer: str, uid: str, request_id: str, age_ms: int) -> None:
    """What a processor leaves when it dies right after settling: a record in the outbox."""
    record = {"request_id": request_id, "record_id": uid, "customer_id": customer, "cost_micro_usd": "42"}
    sync.hset(Account(customer, "", "").k("outbox"), uid, json.dumps(record))
    sync.zadd(OUTBOX_HINTS, {customer: int(time.time() * 1000) - age_ms}, nx=True)


def test_drainer_publishes_a_record_left_in_an_outbox_exactly_once(server: RedisServer) -> None:
    sync = redis.Redis.from_url(server.url)
    orphan(sync, "acme", "uid-1", "req-1", age_ms=10_000)
    assert run(lambda q, c: q.drain_outboxes(), server.url) == 1
    assert run(lambda q, c: q.drain_outboxes(), server.url) == 0
    entries = cast(list[Any], sync.xrange(USAGE_STREAM))
    assert len(entries) == 1 and entries[0][1][b"cost_micro_usd"] == b"42"
    assert sync.hlen(Account("acme", "", "").k("outbox")) == 0 and sync.zcard(OUTBOX_HINTS) == 0
    assert run(lambda q, c: find(c, "req-1"), server.url)["record_id"] == "uid-1"


def test_a_recent_outbox_is_left_to_the_processor_that_is_publishing_it(server: RedisServer) -> None:
    sync = redis.Redis.from_url(server.url)
    orphan(sync, "acme", "uid-2", "req-2", age_ms=0)
    assert run(lambda q, c: q.drain_outboxes(older_than_ms=5000), server.url) == 0
    assert sync.xlen(USAGE_STREAM) == 0


def test_a_busy_customers_hint_keeps_its_oldest_time_so_it_is_drained(server: RedisServer) -> None:
    sync = redis.Redis.from_url(server.url)
    orphan(sync, "busy", "uid-old", "req-old", age_ms=10_000)
    orphan(sync, "busy", "uid-new", "req-new", age_ms=0)  # a later write does not renew the hint
    assert run(lambda q, c: q.drain_outboxes(), server.url) == 2
    assert sync.xlen(USAGE_STREAM) == 2


def test_publishing_the_same_record_twice_appends_it_once(server: RedisServer) -> None:
    sync = redis.Redis.from_url(server.url)
    orphan(sync, "acme", "uid-3", "req-3", age_ms=10_000)
    run(lambda q, c: q.drain_outboxes(), server.url)
    orphan(sync, "acme", "uid-3", "req-3", age_ms=10_000)  # the same record again (a retried settle)
    run(lambda q, c: q.drain_outboxes(), server.url)
    assert sync.xlen(USAGE_STREAM) == 1
