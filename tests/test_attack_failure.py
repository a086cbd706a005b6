"""A Redis that stops answering (SIGSTOP: connections stay open, nothing replies) against the
two-message path (issue 12): the request fails closed within a few seconds, nothing reaches a
provider unaccounted, and once Redis answers again the money is exact (no reply of the stall
is read as another request's, nothing stays reserved, a refused request id can be sent again)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.fakeprovider import FakeProvider, Reply
from extproc.quota import Account, month_of
from tests.conftest import Stack, post_raw, running_stack
from tests.test_attack_billing import records_of

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def rstack(fakes: dict[str, FakeProvider], policy_dir: Path) -> Iterator[Stack]:
    env = {"TOLLGATE_RESERVATION_GRACE_S": "1", "TOLLGATE_REAPER_INTERVAL_S": "0.3"}
    with running_stack(fakes, policy_dir, workers=1, env=env, name="stalled-redis") as s:
        yield s


@contextlib.contextmanager
def stalled(stack: Stack) -> Iterator[None]:
    pid = stack.redis.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def chat(stack: Stack, secret: str, rid: str | None = None) -> tuple[int, object]:
    body = json.dumps({"model": "legal_summary", "messages": MESSAGES}).encode()
    return post_raw(f"{stack.base_url}/chat/completions", body, secret, {"x-request-id": rid or uuid.uuid4().hex}, timeout=20)


def reserved(stack: Stack, customer: str) -> int:
    return int(stack.redis_sync().get(Account(customer, f"{customer}-ws", "").k("reserved")) or 0)


def spend(stack: Stack, customer: str) -> int:
    return int(stack.redis_sync().get(Account(customer, f"{customer}-ws", "").k(f"spend:{month_of(time.time())}")) or 0)


def wait_until(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_stalled_redis_refuses_a_known_key_quickly_without_a_provider(rstack: Stack, customer: str) -> None:
    _, secret = rstack.create_key(customer)
    assert chat(rstack, secret)[0] == 200  # the key is cached now: only the reservation needs Redis
    before = rstack.fakes["p3"].calls()
    with stalled(rstack):
        t0 = time.monotonic()
        status, answer = chat(rstack, secret)
        took = time.monotonic() - t0
    assert status == 503 and answer["error"]["code"] == "quota_unavailable", answer  # type: ignore[index]
    assert took < 5
    assert rstack.fakes["p3"].calls() == before


def test_stalled_redis_refuses_an_unknown_key_quickly_without_a_provider(rstack: Stack, customer: str) -> None:
    _, secret = rstack.create_key(customer)
    with stalled(rstack):
        t0 = time.monotonic()
        status, answer = chat(rstack, secret)
        took = time.monotonic() - t0
    assert status == 503 and answer["error"]["code"] == "quota_unavailable", answer  # type: ignore[index]
    assert took < 5
    assert rstack.fakes["p3"].calls() == 0


def test_request_id_refused_during_a_stall_can_be_sent_again(rstack: Stack, customer: str) -> None:
    """The reservation the stalled Redis ran late was never used: the client's retry with the
    same id is served, not refused as a duplicate."""
    _, secret = rstack.create_key(customer)
    assert chat(rstack, secret)[0] == 200
    rid = f"stall-{uuid.uuid4().hex}"
    with stalled(rstack):
        assert chat(rstack, secret, rid)[0] == 503
    status, answer = chat(rstack, secret, rid)
    assert status == 200, answer


def test_money_is_exact_after_a_stall(rstack: Stack, customer: str) -> None:
    """Replies the stall delayed are never read as later requests' replies: after it, every
    request is served and billed, and nothing stays reserved (late reservations expire)."""
    _, secret = rstack.create_key(customer)
    assert chat(rstack, secret)[0] == 200
    with stalled(rstack):
        assert chat(rstack, secret)[0] == 503
    for _ in range(5):
        assert chat(rstack, secret)[0] == 200
    wait_until(lambda: reserved(rstack, customer) == 0, 15, "money still reserved after the stall")
    served = [r for r in records_of(rstack, customer) if r["status"] == "200"]
    assert len(served) == 6
    assert spend(rstack, customer) == sum(int(r["cost_micro_usd"]) for r in served) > 0


def test_answer_served_during_a_stall_settles_once_when_redis_answers_again(rstack: Stack, customer: str) -> None:
    _, secret = rstack.create_key(customer)
    assert chat(rstack, secret)[0] == 200
    rstack.fakes["p3"].script(Reply(delay_s=1.0))
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(chat(rstack, secret, f"inflight-{customer}")[0]))
    t.start()
    wait_until(lambda: rstack.fakes["p3"].calls() >= 2, 5, "the request did not reach the provider")
    with stalled(rstack):
        t.join(timeout=15)
        time.sleep(0.5)
    assert out == [200]
    wait_until(lambda: reserved(rstack, customer) == 0, 15, "the answered request is still reserved")
    recs = [r for r in records_of(rstack, customer) if r["request_id"] == f"inflight-{customer}"]
    assert [r["status"] for r in recs] == ["200"] and int(recs[0]["cost_micro_usd"]) > 0
    first = [r for r in records_of(rstack, customer) if r["request_id"] != f"inflight-{customer}"]
    assert spend(rstack, customer) == sum(int(r["cost_micro_usd"]) for r in first + recs)
