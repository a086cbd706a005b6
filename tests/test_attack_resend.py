"""A reserve call whose reply is lost after Redis ran it (the CI failure on the cluster race):
a TCP proxy of our own (tests/dropproxy.py) sits between the processor and the Redis that
owns the customer's slot, lets reserve.lua's EVALSHA through and closes the connection
before its reply comes back, once.

redis-py 8.1 decides what happens next. Its cluster client (`RedisCluster.execute_command`)
sends the same command again after a ConnectionError, up to 10 times: the script must answer
the resend of its own call `ok` again, not 409 duplicate_request, and reserve once. Its
single-Redis client, as `store.redis_client` builds it (`from_url`: the connections' Retry
has 0 retries), never resends: the request fails closed (503 quota_unavailable) and the
cancel chore frees the money and the request id at once, not the reaper a minute later.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from extproc.credits import Credit, add_credit, reference_key
from extproc.devstack import Processor, RedisClusterServer, RedisServer
from extproc.fakeprovider import FakeProvider, Reply
from extproc.quota import Account, month_of
from extproc.store import load_script, redis_client, text
from tests.conftest import Stack, post_raw, running_stack
from tests.dropproxy import DropProxy
from tests.test_attack_billing import records_of

RESERVE_SHA = hashlib.sha1(load_script("reserve").encode()).hexdigest().encode()
CREDIT_SHA = hashlib.sha1(load_script("credit").encode()).hexdigest().encode()
CANCEL_SHA = hashlib.sha1(load_script("cancel").encode()).hexdigest().encode()
MESSAGES = [{"role": "user", "content": "Summarise the contract in one line."}]


@dataclass
class Proxied:
    """The stack's Redis seen through the proxy: `url` is what the processor dials, `direct`
    a client of the real Redis that owns the test customers' slot (never through the proxy)."""

    url: str
    proxy: DropProxy
    direct: redis.Redis
    servers: list[Any]

    def stop(self) -> None:
        self.proxy.stop()
        for s in self.servers:
            s.stop()


def cmd(r: redis.Redis, *args: Any) -> Any:
    """A raw Redis command (redis-py leaves `execute_command` untyped)."""
    return r.execute_command(*args)  # type: ignore[no-untyped-call]


def _announce(node_port: int, proxy_port: int, ports: list[int]) -> None:
    """Make the cluster tell clients to reach `node_port` at `proxy_port` (Redis's own
    cluster-announce-port; the bus keeps its real port), and wait until every node says so."""
    r = redis.Redis(port=node_port)
    r.config_set("cluster-announce-bus-port", node_port + 10000)
    r.config_set("cluster-announce-port", proxy_port)
    deadline = time.monotonic() + 30
    while True:
        told = [{int(n[1]) for s in cmd(redis.Redis(port=p), "CLUSTER SLOTS") for n in s[2:3]} for p in ports]
        if all(proxy_port in t and node_port not in t for t in told):
            return
        assert time.monotonic() < deadline, f"the cluster does not announce the proxy: {told}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster_proxied(fakes: dict[str, FakeProvider], policy_dir: Path) -> Iterator[Stack]:
    cluster = RedisClusterServer(3).start()
    ports = [n.port for n in cluster.nodes]
    proxy = DropProxy(ports[1]).start()
    _announce(ports[1], proxy.port, ports)
    # The processor starts from another node and learns the proxied address from the cluster.
    proxied = Proxied(f"redis+cluster://127.0.0.1:{ports[0]}/0", proxy, redis.Redis(port=ports[1]), [cluster])
    with running_stack(fakes, policy_dir, workers=1, redis_server=proxied, name="resend-cluster") as s:
        yield s


def _single_proxied(fakes: dict[str, FakeProvider], policy_dir: Path, workers: int, env: dict[str, str], name: str) -> Iterator[Stack]:
    """A stack whose processors reach one Redis through a DropProxy."""
    server = RedisServer().start()
    proxy = DropProxy(server.port).start()
    proxied = Proxied(f"redis://127.0.0.1:{proxy.port}/0", proxy, redis.Redis(port=server.port), [server])
    with running_stack(fakes, policy_dir, workers=workers, redis_server=proxied, env=env, name=name) as s:
        yield s


@pytest.fixture(scope="module")
def single_proxied(fakes: dict[str, FakeProvider], policy_dir: Path) -> Iterator[Stack]:
    # The reaper (which also runs queued chores) is a minute away: only the cancel sent at once frees anything.
    yield from _single_proxied(fakes, policy_dir, 2, {"TOLLGATE_REAPER_INTERVAL_S": "60"}, "resend-single")


@pytest.fixture(scope="module")
def reaped_proxied(fakes: dict[str, FakeProvider], policy_dir: Path) -> Iterator[Stack]:
    env = {"TOLLGATE_RESERVATION_GRACE_S": "1", "TOLLGATE_REAPER_INTERVAL_S": "0.3"}
    yield from _single_proxied(fakes, policy_dir, 1, env, "resend-reaped")


def owned_customer(stack: Stack, base: str) -> str:
    """A customer whose hash slot the proxied Redis owns (on one Redis: any)."""
    direct: redis.Redis = stack.redis.direct
    for i in range(10_000):
        name = f"{base}-{i}"
        if not stack.redis.url.startswith("redis+cluster://"):
            return name
        slot = key_slot(Account(name, "", "").k("reserved").encode())
        if _owns(direct, slot):
            return name
    raise AssertionError("no customer name lands on the proxied node")


def _owns(direct: redis.Redis, slot: int) -> bool:
    me = text(cmd(direct, "CLUSTER MYID"))
    for lo, hi, master, *_ in cmd(direct, "CLUSTER SLOTS"):
        if int(lo) <= slot <= int(hi):
            return text(master[2]) == me
    return False


def chat(stack: Stack, secret: str, rid: str) -> tuple[int, Any]:
    body = json.dumps({"model": "legal_summary", "messages": MESSAGES}).encode()
    return post_raw(f"{stack.base_url}/chat/completions", body, secret, {"x-request-id": rid}, timeout=20)


def marker(stack: Stack, customer: str, rid: str) -> bytes | None:
    value: bytes | None = stack.redis.direct.get(Account(customer, "", "").k(f"req:{rid}"))
    return value


def reserved(stack: Stack, customer: str) -> int:
    return int(stack.redis.direct.get(Account(customer, "", "").k("reserved")) or 0)


def spend(stack: Stack, customer: str) -> int:
    return int(stack.redis.direct.get(Account(customer, "", "").k(f"spend:{month_of(time.time())}")) or 0)


def wait_until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def settled(stack: Stack, customer: str) -> None:
    """Plain answers are settled from Envoy's access log moments after the client has them."""
    wait_until(lambda: reserved(stack, customer) == 0, 5, "an answer was never settled")


def lose_the_reserve_reply(stack: Stack, customer: str, rid: str) -> None:
    stack.redis.proxy.arm(RESERVE_SHA, lambda: marker(stack, customer, rid) is not None)


def test_cluster_resend_of_a_reserve_whose_reply_was_lost_is_served_once(cluster_proxied: Stack, customer: str) -> None:
    stack, proxy = cluster_proxied, cluster_proxied.redis.proxy
    who = owned_customer(stack, customer)
    _, secret = stack.create_key(who)
    assert chat(stack, secret, uuid.uuid4().hex)[0] == 200  # the key is cached: only the reservation crosses now
    settled(stack, who)
    proxy.watch(RESERVE_SHA)
    calls, sent, dropped = stack.fakes["p3"].calls(), proxy.forwarded[RESERVE_SHA], proxy.dropped
    spent = spend(stack, who)
    rid = f"resend-{uuid.uuid4().hex}"
    lose_the_reserve_reply(stack, who, rid)
    stack.fakes["p3"].script(Reply(delay_s=1.0))
    out: list[tuple[int, Any]] = []
    t = threading.Thread(target=lambda: out.append(chat(stack, secret, rid)))
    t.start()
    wait_until(lambda: stack.fakes["p3"].calls() == calls + 1, 5, "the request never reached the provider")
    # While the provider works, the money stays held by the call that reserved it.
    assert reserved(stack, who) > 0 and (marker(stack, who, rid) or b"").startswith(b"inflight:")
    t.join(timeout=20)

    status, answer = out[0]
    assert status == 200, answer
    assert proxy.dropped == dropped + 1 and proxy.forwarded[RESERVE_SHA] == sent + 2  # redis-py sent the same call again
    assert stack.fakes["p3"].calls() == calls + 1
    wait_until(lambda: reserved(stack, who) == 0, 5, "money still reserved after the request ended")
    recs = [r for r in records_of(stack, who) if r["request_id"] == rid]
    assert [r["status"] for r in recs] == ["200"]
    assert spend(stack, who) - spent == int(recs[0]["cost_micro_usd"]) > 0
    assert marker(stack, who, rid) == b"settled"


def test_single_redis_lost_reserve_reply_fails_closed_and_frees_the_id_at_once(single_proxied: Stack, customer: str) -> None:
    stack, proxy = single_proxied, single_proxied.redis.proxy
    _, secret = stack.create_key(customer)
    assert chat(stack, secret, uuid.uuid4().hex)[0] == 200
    settled(stack, customer)
    proxy.watch(RESERVE_SHA)
    calls, sent, dropped = stack.fakes["p3"].calls(), proxy.forwarded[RESERVE_SHA], proxy.dropped
    rid = f"lost-{uuid.uuid4().hex}"
    lose_the_reserve_reply(stack, customer, rid)

    status, answer = chat(stack, secret, rid)

    assert status == 503 and answer["error"]["code"] == "quota_unavailable", answer
    assert proxy.dropped == dropped + 1 and proxy.forwarded[RESERVE_SHA] == sent + 1  # never resent
    assert stack.fakes["p3"].calls() == calls
    # The cancel chore, not the reaper (a minute's grace away): the money and the id are free now.
    wait_until(lambda: reserved(stack, customer) == 0 and (marker(stack, customer, rid) or b"").startswith(b"cancelled:"), 1.5,
               "the lost call's reservation was not cancelled")
    assert [r for r in records_of(stack, customer) if r["request_id"] == rid] == []


def for_s(seconds: float) -> Any:
    """A check that passes `seconds` after it is first asked."""
    start: list[float] = []

    def passed() -> bool:
        start[:] = start or [time.monotonic()]
        return time.monotonic() - start[0] >= seconds
    return passed


def test_single_redis_retry_at_once_is_served_whichever_worker_takes_it(single_proxied: Stack, customer: str) -> None:
    """The client retries the moment it gets the 503, and Envoy may hand the retry to the other
    worker, which never had the cancel chore: the 503 must go out only once the cancel reached
    Redis. The cancel is slowed (100 ms in the network) so that a 503 sent before it would let
    the retry overtake it; six rounds, so the retry reaches the other worker in some of them."""
    stack, proxy = single_proxied, single_proxied.redis.proxy
    _, secret = stack.create_key(customer)
    assert chat(stack, secret, uuid.uuid4().hex)[0] == 200
    settled(stack, customer)
    spent, rids = spend(stack, customer), []
    for _ in range(6):
        rid = f"again-{uuid.uuid4().hex}"
        lose_the_reserve_reply(stack, customer, rid)
        proxy.hold(CANCEL_SHA, for_s(0.1))
        assert chat(stack, secret, rid)[0] == 503

        status, answer = chat(stack, secret, rid)  # the client's retry, same id, at once

        assert status == 200, answer
        rids.append(rid)
    settled(stack, customer)
    recs = [r for r in records_of(stack, customer) if r["request_id"] in rids]
    assert sorted(r["request_id"] for r in recs) == sorted(rids) and {r["status"] for r in recs} == {"200"}
    assert spend(stack, customer) - spent == sum(int(r["cost_micro_usd"]) for r in recs) > 0
    wait_until(lambda: reserved(stack, customer) == 0, 5, "money still reserved after the retries ended")


def test_cluster_resend_delayed_past_the_cancel_does_not_reserve_again(cluster_proxied: Stack, customer: str) -> None:
    """The lost reply's resend is held in the network past the request's deadline: the request
    fails closed, its cancel releases what the first delivery reserved, and the resend, when it
    finally reaches Redis, must not reserve again (nobody would ever settle or cancel that)."""
    stack, proxy = cluster_proxied, cluster_proxied.redis.proxy
    who = owned_customer(stack, customer)
    _, secret = stack.create_key(who)
    assert chat(stack, secret, uuid.uuid4().hex)[0] == 200
    settled(stack, who)
    calls, held = stack.fakes["p3"].calls(), proxy.held
    rid = f"late-{uuid.uuid4().hex}"

    def cancelled() -> bool:
        m = marker(stack, who, rid)
        return m is None or m.startswith(b"cancelled:")

    proxy.arm(RESERVE_SHA, lambda: marker(stack, who, rid) is not None, then_hold_until=cancelled)
    status, answer = chat(stack, secret, rid)

    assert status == 503 and answer["error"]["code"] == "quota_unavailable", answer
    wait_until(lambda: proxy.held == held + 1, 10, "the resend was never held and forwarded")
    time.sleep(0.3)  # the held resend has reached Redis
    assert reserved(stack, who) == 0
    assert stack.redis.direct.zcard(Account(who, "", "").k("resv-index")) == 0
    assert stack.fakes["p3"].calls() == calls
    status, answer = chat(stack, secret, rid)  # the client's retry, same id
    assert status == 200, answer
    settled(stack, who)
    assert [r["status"] for r in records_of(stack, who) if r["request_id"] == rid] == ["200"]


def test_a_lost_reply_whose_cancel_died_with_the_processor_is_reaped(reaped_proxied: Stack, customer: str) -> None:
    """The cancel chore lives in the processor's memory: if the processor dies before it ran,
    the reservation it undoes is an orphan, and the reaper (of a new processor) must still turn
    it into an 'unsettled' record and release its money."""
    stack, proxy = reaped_proxied, reaped_proxied.redis.proxy
    _, secret = stack.create_key(customer)
    assert chat(stack, secret, uuid.uuid4().hex)[0] == 200
    settled(stack, customer)
    rid = f"orphan-{uuid.uuid4().hex}"
    proxy.refused.add(CANCEL_SHA)  # every attempt to send the cancel breaks its connection
    lose_the_reserve_reply(stack, customer, rid)
    assert chat(stack, secret, rid)[0] == 503
    time.sleep(0.5)  # the cancel was tried (at once, and by the reaper's flush) and failed
    assert reserved(stack, customer) > 0 and (marker(stack, customer, rid) or b"").startswith(b"inflight:")
    old = stack.processor
    assert old.proc is not None
    os.kill(old.proc.pid, signal.SIGKILL)
    old.proc.wait()
    proxy.refused.discard(CANCEL_SHA)

    stack.processor = Processor(old.policy, old.redis_url, port=old.port, metrics_port=old.metrics_port, env=old.env).start()

    wait_until(lambda: [r["status"] for r in records_of(stack, customer) if r["request_id"] == rid] == ["unsettled"], 20,
               "the orphan reservation was never reaped")
    assert reserved(stack, customer) == 0
    assert stack.redis.direct.zcard(Account(customer, "", "").k("resv-index")) == 0
    assert marker(stack, customer, rid) == b"unsettled"


def test_a_client_gone_while_its_reserve_waits_leaves_nothing_reserved(single_proxied: Stack, customer: str) -> None:
    """The caller is cancelled (its client left) while the reserve call is on its way: the call
    still runs, and the cancel sent after it releases it at once, not the reaper a minute later."""
    stack, proxy = single_proxied, single_proxied.redis.proxy
    _, secret = stack.create_key(customer)
    assert chat(stack, secret, uuid.uuid4().hex)[0] == 200
    settled(stack, customer)
    calls, held = stack.fakes["p3"].calls(), proxy.held
    rid = f"gone-{uuid.uuid4().hex}"
    release_at = time.monotonic() + 1.2  # after the client left, before the 2 s Redis deadline
    proxy.hold(RESERVE_SHA, lambda: time.monotonic() >= release_at)
    body = json.dumps({"model": "legal_summary", "messages": MESSAGES}).encode()
    with pytest.raises(OSError):  # urllib's timeout: the client hangs up
        post_raw(f"{stack.base_url}/chat/completions", body, secret, {"x-request-id": rid}, timeout=0.4)

    wait_until(lambda: proxy.held == held + 1, 5, "the reserve was never forwarded")
    wait_until(lambda: marker(stack, customer, rid) is not None and reserved(stack, customer) == 0, 3,
               "the abandoned request's reservation was not released")
    assert (marker(stack, customer, rid) or b"").startswith(b"cancelled:")
    assert stack.fakes["p3"].calls() == calls
    assert [r for r in records_of(stack, customer) if r["request_id"] == rid] == []


def test_a_cancel_held_up_by_an_outage_still_wins_over_the_reaper(reaped_proxied: Stack, customer: str) -> None:
    """Redis is out of reach from the moment the reserve reply is lost until the reservation is
    overdue: when it is back, this processor's queued cancel must undo the call before its
    reaper turns it into an 'unsettled' record, which would spend the request id for the whole
    idempotency window although the processor knows nothing went upstream."""
    stack, proxy = reaped_proxied, reaped_proxied.redis.proxy
    _, secret = stack.create_key(customer)
    assert chat(stack, secret, uuid.uuid4().hex)[0] == 200
    settled(stack, customer)
    rid = f"outage-{uuid.uuid4().hex}"
    proxy.refused.add(CANCEL_SHA)
    lose_the_reserve_reply(stack, customer, rid)
    assert chat(stack, secret, rid)[0] == 503
    proxy.refused.add(b"")  # nothing gets through now
    deadline = int(stack.redis.direct.hget(Account(customer, "", "").k(f"resv:{rid}"), "deadline") or 0)
    assert deadline > 0
    wait_until(lambda: time.time() * 1000 > deadline + 1000, 10, "the reservation never became overdue")
    proxy.refused.clear()

    wait_until(lambda: reserved(stack, customer) == 0, 5, "nothing released the lost call's reservation")
    assert (marker(stack, customer, rid) or b"").startswith(b"cancelled:")
    assert [r for r in records_of(stack, customer) if r["request_id"] == rid] == []
    assert chat(stack, secret, rid)[0] == 200


def test_cluster_resent_credit_is_reported_as_credited_once(cluster_proxied: Stack, customer: str) -> None:
    """The same resend on the tools' client (CLI `balance add`, the admin API): credit.lua
    answers the resend of its own call 'already credited'. The money is right, but telling the
    operator "nothing changed" invites a second top-up under a new reference."""
    stack, proxy = cluster_proxied, cluster_proxied.redis.proxy
    who = owned_customer(stack, customer)
    ref = f"pay-{uuid.uuid4().hex}"
    stack.redis.direct.script_load(load_script("credit"))  # the lost reply is the credit's, not a NOSCRIPT
    proxy.watch(CREDIT_SHA)
    sent = proxy.forwarded[CREDIT_SHA]
    proxy.arm(CREDIT_SHA, lambda: stack.redis.direct.exists(reference_key(who, ref)) == 1)

    async def top_up() -> Credit:
        client = redis_client(stack.redis.url)
        try:
            return await add_credit(client, who, 2_500_000, ref, source="cli")
        finally:
            await client.aclose()

    credit = asyncio.run(top_up())

    assert proxy.forwarded[CREDIT_SHA] == sent + 2  # sent, reply lost, sent again
    assert credit.credited and credit.balance_micro == 2_500_000
    assert int(stack.redis.direct.get(Account(who, "", "").k("balance")) or 0) == 2_500_000


def test_a_reserve_answered_after_the_deadline_is_released_and_never_forwarded(single_proxied: Stack, customer: str) -> None:
    """Redis ran the reserve at once but its answer comes after the 2 s deadline: the request
    fails closed without reaching the provider, and the money the call holds is released, not
    billed and not left to the reaper; the client's retry with the same id is served once."""
    stack, proxy = single_proxied, single_proxied.redis.proxy
    _, secret = stack.create_key(customer)
    assert chat(stack, secret, uuid.uuid4().hex)[0] == 200
    settled(stack, customer)
    calls, spent = stack.fakes["p3"].calls(), spend(stack, customer)
    rid = f"slow-{uuid.uuid4().hex}"
    proxy.slow_reply(RESERVE_SHA, 3.0)
    t0 = time.monotonic()
    status, answer = chat(stack, secret, rid)

    assert status == 503 and answer["error"]["code"] == "quota_unavailable", answer
    assert 2.0 <= time.monotonic() - t0 < 3.0
    assert reserved(stack, customer) == 0 and (marker(stack, customer, rid) or b"").startswith(b"cancelled:")
    assert stack.fakes["p3"].calls() == calls and spend(stack, customer) == spent
    assert chat(stack, secret, rid)[0] == 200
    settled(stack, customer)
    recs = [r for r in records_of(stack, customer) if r["request_id"] == rid]
    assert [r["status"] for r in recs] == ["200"]
    assert spend(stack, customer) - spent == int(recs[0]["cost_micro_usd"]) > 0
