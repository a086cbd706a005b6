"""store.GroupCommit against a real Redis: concurrent batches share one round trip, and each
caller still gets its own replies and its own errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import REGISTRY
from redis.exceptions import ResponseError

from extproc.store import Scripts, redis_client


def test_batches_submitted_together_go_in_one_round_trip(redis_url: str) -> None:
    async def run() -> tuple[list[list[Any]], int]:
        client = redis_client(redis_url, deadline_only=True)
        scripts = Scripts(client)
        try:
            replies = await asyncio.gather(*(scripts.batch(lambda c, i=i: c.set(f"gc:{i}", i), lambda c, i=i: c.get(f"gc:{i}"))
                                             for i in range(50)))
            return replies, scripts.group.batches
        finally:
            await client.aclose()

    replies, batches = asyncio.run(run())
    assert batches == 1
    assert replies[7] == [True, b"7"] and replies[49] == [True, b"49"]


def test_one_callers_error_does_not_fail_the_others(redis_url: str) -> None:
    async def run() -> list[Any]:
        client = redis_client(redis_url, deadline_only=True)
        scripts = Scripts(client)
        try:
            await client.set("gc:text", "not a number")
            replies = await asyncio.gather(scripts.batch(lambda c: c.incr("gc:text")), scripts.batch(lambda c: c.incr("gc:n")),
                                           return_exceptions=True)
            return list(replies)
        finally:
            await client.aclose()

    failed, ok = asyncio.run(run())
    assert isinstance(failed, ResponseError)
    assert ok == [1]


def test_a_tolerated_chore_failure_is_returned_not_raised(redis_url: str) -> None:
    async def run() -> list[Any]:
        client = redis_client(redis_url, deadline_only=True)
        scripts = Scripts(client)
        try:
            await client.set("gc:text2", "x")
            return await scripts.batch(lambda c: c.incr("gc:text2"), lambda c: c.set("gc:after", 1), tolerate=1)
        finally:
            await client.aclose()

    chore, after = asyncio.run(run())
    assert isinstance(chore, ResponseError) and after is True


def test_a_redis_that_does_not_answer_fails_each_caller_within_the_deadline(redis_url: str) -> None:
    """A stalled Redis (here: a port that accepts but never answers) fails the batch with a
    RedisError after the deadline instead of holding the request."""
    import socket
    import time

    from redis.exceptions import RedisError

    from extproc import config

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]

    async def run() -> float:
        client = redis_client(f"redis://127.0.0.1:{port}", deadline_only=True)
        scripts = Scripts(client)
        started = time.monotonic()
        try:
            with pytest.raises(RedisError):
                await scripts.batch(lambda c: c.get("x"))
            return time.monotonic() - started
        finally:
            await client.aclose()

    try:
        took = asyncio.run(run())
    finally:
        listener.close()
    assert took < config.REDIS_DEADLINE_S + 1.5


def test_script_sets_on_one_client_share_round_trips(redis_url: str) -> None:
    """Health and quota keep their own scripts but one client: a failed attempt's health note
    and its request's settlement, submitted together, go in one round trip."""
    def round_trips() -> float:
        return REGISTRY.get_sample_value("tollgate_redis_round_trips_total") or 0.0

    async def run() -> list[list[Any]]:
        client = redis_client(redis_url, deadline_only=True)
        health, money = Scripts(client, "health_note"), Scripts(client, "publish")
        try:
            return list(await asyncio.gather(health.batch(lambda c: c.set("gc:health", 1)), money.batch(lambda c: c.set("gc:money", 2))))
        finally:
            await client.aclose()

    before = round_trips()
    assert asyncio.run(run()) == [[True], [True]]
    assert round_trips() - before == 1


def test_scripts_lost_by_redis_are_loaded_again_for_every_set_sharing_the_client(redis_url: str) -> None:
    async def run() -> Any:
        client = redis_client(redis_url, deadline_only=True)
        first, second = Scripts(client, "hint_done"), Scripts(client, "health_note")
        try:
            await client.script_flush()
            keys = ["gc:open", "gc:probe", "gc:b0", "gc:c0"]
            (opened,) = await second.batch(lambda c: second.call(c, "health_note", keys, [1, "ok", 1, "", "", 5, "0.5", 2, 30, 33]))
            return opened, await client.script_exists(first.sha["hint_done"])
        finally:
            await client.aclose()

    opened, exists = asyncio.run(run())
    assert opened == 0 and exists == [True]
