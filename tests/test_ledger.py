"""The durable ledger and its exporter (issue 13), against a real Redis and a real PostgreSQL
(started in a temporary directory) or SQLite: idempotent writes, exactly once across a
SIGKILL, XAUTOCLAIM of a dead consumer's entries, trimming only below what every group
committed, markers shortened once exported, unsettled records superseded by late ones."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from extproc.caps import CostBound
from extproc.devstack import RedisServer
from extproc.export import ExportConfig, Exporter, redis_sync_client
from extproc.ledger_rows import row_of
from extproc.ledger_store import open_store
from extproc.quota import UID_MARK_TTL_S, USAGE_STREAM, Account, Limits, Quota, Reservation, publish_args, uid_key
from extproc.store import redis_client
from tests.ledger_helpers import add_records, ledger_url, postgres, tollgate, tollgate_bg, usage_record, wait_for

__all__ = ["ledger_url", "postgres"]  # fixtures used by name


@pytest.fixture
def server() -> Iterator[RedisServer]:
    r = RedisServer().start()
    yield r
    r.stop()


def exporter(server: RedisServer, url: str, **cfg: object) -> Exporter:
    return Exporter(redis_sync_client(server.url), open_store(url), ExportConfig(**cfg))  # type: ignore[arg-type]


def test_schema_is_created_with_its_version(ledger_url: str) -> None:
    store = open_store(ledger_url)
    assert store.schema_version() == 1 and store.count() == 0
    store.close()
    again = open_store(ledger_url)  # opening a migrated store changes nothing
    assert again.schema_version() == 1
    again.close()


def test_writing_the_same_batch_twice_keeps_one_row_per_record(ledger_url: str) -> None:
    store = open_store(ledger_url)
    rows = [row_of(f"1-{i}", usage_record(i, cost=7)) for i in range(3)]
    store.write(rows)
    store.write(rows)
    assert store.count() == 3
    assert store.month_spend() == {("acme", rows[0].month): 21}


def test_money_and_attempt_list_are_stored_exactly(ledger_url: str) -> None:
    store = open_store(ledger_url)
    big = 9_007_199_254_740_993  # above 2**53: a float would round it
    store.write([row_of("1-0", usage_record(0, cost=big))])
    (line,) = store.report_lines("acme", row_of("1-0", usage_record(0)).month)
    assert line.cost_micro_usd == big
    rec = store.find_request("req-0")
    assert rec is not None and json.loads(rec["attempt_list"])[0]["reason"] == "ok"


def test_a_settled_record_replaces_the_unsettled_one_with_its_id(ledger_url: str) -> None:
    store = open_store(ledger_url)
    unsettled = row_of("1-0", usage_record(0, cost=0, status="unsettled"))
    settled = row_of("1-1", usage_record(0, cost=40, late="1"))
    store.write([unsettled])
    store.write([settled])
    assert store.count() == 1
    assert store.month_spend() == {("acme", settled.month): 40}


def test_an_unsettled_record_arriving_after_the_settled_one_changes_nothing(ledger_url: str) -> None:
    store = open_store(ledger_url)
    unsettled = row_of("1-0", usage_record(0, cost=0, status="unsettled"))
    settled = row_of("1-1", usage_record(0, cost=40, late="1"))
    store.write([settled])
    store.write([unsettled])  # published later by a drainer: must not undo the charge
    assert store.month_spend() == {("acme", settled.month): 40}


def test_export_once_writes_every_record_and_trims_the_stream(server: RedisServer, ledger_url: str) -> None:
    r = redis.Redis.from_url(server.url)
    add_records(r, 1200, cost=3)
    done = tollgate(server.url, "usage", "export", "--once", "--to", ledger_url, "--batch", "500", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["exported"] == 1200
    store = open_store(ledger_url)
    assert store.count() == 1200
    assert sum(store.month_spend().values()) == 3600
    assert r.xlen(USAGE_STREAM) == 0


def test_exporter_killed_between_commit_and_ack_exports_every_record_exactly_once(
        server: RedisServer, ledger_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(server.url)
    add_records(r, 300, cost=11)
    args = ["usage", "export", "--to", ledger_url, "--batch", "100", "--consumer", "exporter-0"]
    proc = tollgate_bg(server.url, *args, "--stall-after-commit", log=tmp_path / "export.log")
    store = open_store(ledger_url)
    wait_for(lambda: store.count() == 100, what="the first batch to be committed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Committed but never acknowledged: the batch is still pending in the group.
    assert r.xpending(USAGE_STREAM, "ledger")["pending"] == 100
    again = tollgate(server.url, *args, "--once")
    assert again.returncode == 0, again.stderr
    assert store.count() == 300
    assert sum(store.month_spend().values()) == 300 * 11
    assert r.xpending(USAGE_STREAM, "ledger")["pending"] == 0 and r.xlen(USAGE_STREAM) == 0


def test_entries_a_dead_consumer_left_pending_are_claimed_and_exported(server: RedisServer, ledger_url: str) -> None:
    r = redis.Redis.from_url(server.url)
    add_records(r, 50)
    r.xgroup_create(USAGE_STREAM, "ledger", id="0")
    r.xreadgroup("ledger", "dead-consumer", {USAGE_STREAM: ">"}, count=50)  # read, then "crashed"
    ex = exporter(server, ledger_url, consumer="survivor", claim_idle_ms=0)
    assert ex.run_once() == 50
    assert ex.store.count() == 50
    assert r.xpending(USAGE_STREAM, "ledger")["pending"] == 0


def test_entries_pending_less_than_the_claim_time_are_left_to_their_consumer(server: RedisServer, ledger_url: str) -> None:
    r = redis.Redis.from_url(server.url)
    add_records(r, 20)
    r.xgroup_create(USAGE_STREAM, "ledger", id="0")
    r.xreadgroup("ledger", "busy-consumer", {USAGE_STREAM: ">"}, count=20)
    ex = exporter(server, ledger_url, consumer="other", claim_idle_ms=60_000)
    assert ex.run_once() == 0
    assert r.xlen(USAGE_STREAM) == 20  # still pending in busy-consumer: not trimmed


def test_stream_is_trimmed_only_below_what_every_group_committed(server: RedisServer, ledger_url: str) -> None:
    r = redis.Redis.from_url(server.url)
    add_records(r, 30)
    r.xgroup_create(USAGE_STREAM, "second-ledger", id="0")  # another export that has done nothing yet
    first = exporter(server, ledger_url)
    assert first.run_once() == 30
    assert r.xlen(USAGE_STREAM) == 30
    r.xreadgroup("second-ledger", "c", {USAGE_STREAM: ">"}, count=10)
    ids = [i for i, _ in cast(list[Any], r.xrange(USAGE_STREAM))]
    r.xack(USAGE_STREAM, "second-ledger", *ids[:10])  # the second group committed the first 10
    assert first.trim() == 10
    assert cast(list[Any], r.xrange(USAGE_STREAM, count=1))[0][0] == ids[10]


def test_publish_markers_get_a_short_ttl_once_exported(server: RedisServer, ledger_url: str) -> None:
    r = redis.Redis.from_url(server.url)

    async def publish() -> None:
        client = redis_client(server.url)
        q = Quota(client)
        await q.scripts.eval("publish", *publish_args("rec-7", "req-7", "acme", json.dumps(usage_record(7))))
        await client.aclose()

    asyncio.run(publish())
    assert r.ttl(uid_key("rec-7")) > UID_MARK_TTL_S - 60
    exporter(server, ledger_url, marker_ttl_s=120).run_once()
    assert 0 < r.ttl(uid_key("rec-7")) <= 120


def test_an_expired_reservation_settled_late_is_in_the_ledger_once_at_its_cost(server: RedisServer, ledger_url: str) -> None:
    """Through the real scripts: reserve, the reaper's 'unsettled' record, then the late settle."""
    account = Account("late-co", "ws", "key_1")

    async def scenario() -> None:
        client = redis_client(server.url)
        q = Quota(client)
        res = Reservation(account, "req-late", "202611", False, 500)
        base = usage_record(1, customer="late-co", cost=0, request_id="req-late", record_id="rid-late", ts="1793491200000")
        bound = CostBound(input_tokens=100, rate_tokens=25, output_tokens=200, min_output_tokens=16, choices=1,
                          input_price=1_000_000, output_price=2_000_000)  # 100 + 2 x 200 = 500 micro-USD
        await q.reserve(res, bound, Limits(False, None, None, None), 1, base)
        await asyncio.sleep(1.1)  # the reaper's hint is due 1 s after the deadline
        assert await q.expire_overdue() == 1
        late = {**base, "cost_micro_usd": "321"}
        await q.finish(res, 321, 50, True, late)
        await client.aclose()

    asyncio.run(scenario())
    r = redis.Redis.from_url(server.url)
    statuses = sorted(f[b"status"].decode() for _, f in cast(list[Any], r.xrange(USAGE_STREAM)))
    assert statuses == ["200", "unsettled"]  # two records, one record_id
    ex = exporter(server, ledger_url)
    assert ex.run_once() == 2
    assert ex.store.count() == 1
    assert ex.store.month_spend() == {("late-co", "2026-11"): 321}


def test_a_ledger_password_never_appears_in_what_the_store_prints() -> None:
    from extproc.ledger_store import redact

    assert redact("postgresql://billing:s3cr3t@db.internal:5432/ledger") == "postgresql://billing:***@db.internal:5432/ledger"
    assert redact("postgresql://billing@db/ledger") == "postgresql://billing@db/ledger"


def test_an_unsupported_ledger_url_is_refused_with_exit_1(server: RedisServer) -> None:
    out = tollgate(server.url, "usage", "export", "--once", "--to", "mysql://user:pw@db/ledger")
    assert out.returncode == 1 and "unsupported ledger URL" in out.stderr and "pw" not in out.stderr


def test_two_processes_opening_a_new_sqlite_ledger_at_once_both_get_its_schema(tmp_path: Path) -> None:
    """The demo's exporter and a `usage report` may open a fresh ledger at the same moment:
    neither may fail with "table already exists" (it stopped the exporter once)."""
    import threading

    from extproc.ledger_store import migrations, open_store

    def open_it(url: str, start: threading.Barrier, errors: list[BaseException]) -> None:
        start.wait()
        try:
            open_store(url).conn.close()
        except BaseException as exc:
            errors.append(exc)

    for attempt in range(15):
        url = f"sqlite:///{tmp_path}/race-{attempt}.db"
        start = threading.Barrier(4)
        errors: list[BaseException] = []
        threads = [threading.Thread(target=open_it, args=(url, start, errors)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        store = open_store(url, migrate=False)
        assert store.schema_version() == len(migrations("sqlite"))
        store.conn.close()
