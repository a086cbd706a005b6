"""Shared parts of the billing tests: a real PostgreSQL per session, a fresh ledger per test
(PostgreSQL database or SQLite file), the `tollgate` command, hand-made stream records."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from extproc.devstack import PostgresServer

_db_counter = itertools.count()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    pg = PostgresServer().start()
    yield pg
    pg.stop()


def fresh_postgres_url(pg: PostgresServer) -> str:
    name = f"ledger_{os.getpid()}_{next(_db_counter)}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return pg.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty ledger of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"  # tmp_path is absolute: sqlite:////tmp/...
    return fresh_postgres_url(request.getfixturevalue("postgres"))


def tollgate(redis_url: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extproc.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TOLLGATE_REDIS_URL": redis_url, **(env or {})})


def tollgate_bg(redis_url: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "extproc.cli", *args], stdout=out, stderr=out,
                            env={**os.environ, "TOLLGATE_REDIS_URL": redis_url})


def usage_record(i: int, customer: str = "acme", cost: int = 5, **extra: str) -> dict[str, str]:
    """A usage record with the fields the processor writes (SPEC §6), numbered i."""
    rec = {
        "record_id": f"rec-{i}", "request_id": f"req-{i}", "ts": str(int(time.time() * 1000)), "customer_id": customer,
        "workspace_id": f"{customer}-ws", "api_key_id": "key_x", "plan": "premium", "route": "support_draft",
        "primary_model": "low_cost_chat", "final_model": "low_cost_chat", "provider": "p1", "attempts": "1",
        "fallback_reason": "none", "status": "200", "prompt_tokens": "10", "completion_tokens": "4",
        "cost_micro_usd": str(cost), "retry_cost_micro_usd": "0", "fallback_cost_micro_usd": "0", "kind": "normal",
        "stream": "false", "latency_ms": "3", "prepaid": "false",
        "attempt_list": json.dumps([{"model": "low_cost_chat", "provider": "p1", "status": 200, "reason": "ok"}]),
    }
    rec.update(extra)
    return rec


def add_records(redis: Any, n: int, start: int = 0, **kw: Any) -> None:
    pipe = redis.pipeline(transaction=False)
    for i in range(start, start + n):
        pipe.xadd("tollgate:usage", usage_record(i, **kw))
    pipe.execute()


def wait_for(cond: Any, timeout_s: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
