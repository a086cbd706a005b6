"""Quotas and billing (issue 3), through real Envoy, real Redis and the openai SDK: reserve
before the upstream call, settle from usage, release on failure, lose nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from extproc.devstack import Processor, RedisServer
from extproc.fakeprovider import FakeProvider, Reply
from extproc.quota import Account, month_of
from tests.conftest import Stack, post_raw, running_stack

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Classify this ticket: my invoice is wrong."}]


def tollgate(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extproc.cli", *args, "--redis-url", stack.redis.url],
                          capture_output=True, text=True, timeout=60)


def money(stack: Stack, customer: str, workspace: str | None = None, settle: bool = True) -> dict[str, int]:
    """The customer's money once its answers have settled (`settle=False`: as it is now)."""
    if settle:
        stack.settled(customer)
    r = stack.redis_sync()
    a = Account(customer, workspace or f"{customer}-ws", "")
    month = month_of(time.time())
    vals = r.mget(a.k("balance"), a.k("reserved"), a.k(f"spend:{month}"), a.w("reserved"), a.w(f"spend:{month}"))
    names = ("balance", "reserved", "spend", "ws_reserved", "ws_spend")
    return {n: int(v or 0) for n, v in zip(names, vals, strict=True)}


def records_of(stack: Stack, customer: str, settle: bool = True) -> list[dict[str, Any]]:
    """The customer's usage records once its answers have settled (`settle=False`: as now)."""
    if settle:
        stack.settled(customer)
    out = []
    for _, fields in stack.redis_sync().xrange("tollgate:usage"):
        rec = {k.decode(): v.decode() for k, v in fields.items()}
        if rec["customer_id"] == customer and rec.get("kind") != "credit":  # usage records (credits share the stream)
            out.append(rec)
    return out


def reservations_of(stack: Stack, customer: str) -> list[str]:
    """The customer's reservation hints (what the reaper looks at)."""
    return [m.decode() for m in stack.redis_sync().zrange("tollgate:reservations", 0, -1) if json.loads(m)[0] == customer]


def hints_settle(stack: Stack, customer: str, within_s: float = 5) -> list[str]:
    """The hints left once clean-ups ran: a settled request's hint goes with the processor's
    next Redis round trip (or its reaper pass, every 2 s), not at once."""
    deadline = time.monotonic() + within_s
    while (left := reservations_of(stack, customer)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# A fixed body, so the reservation can be computed by hand: its bytes bound the prompt.
RACE_BODY = b'{"model":"ROUTE","messages":[{"role":"user","content":"Classify my ticket."}],"max_tokens":16}'


def race_body(route: str) -> bytes:
    return RACE_BODY.replace(b"ROUTE", route.encode())


def race(stack: Stack, customer: str, route: str, price: tuple[int, int], k: int, n: int) -> tuple[list[int], int]:
    """n concurrent requests from a prepaid customer whose balance covers exactly k reservations;
    the provider reports exactly what was reserved (one prompt token per body byte, 16 out)."""
    _, secret = stack.create_key(customer, plan="prepaid")
    body = race_body(route)
    prompt = len(body)
    cost = -(-(prompt * price[0] + 16 * price[1]) // 1_000_000)
    for f in stack.fakes.values():
        f.default = Reply(prompt_tokens=prompt, completion_tokens=16)
    assert tollgate(stack, "balance", "add", "--customer", customer, "--usd", f"{k * cost / 1e6:.6f}").returncode == 0
    start = threading.Barrier(n)

    def one(_: int) -> int:
        start.wait()
        status, reply = post_raw(f"{stack.base_url}/chat/completions", body, secret)
        if status != 200:
            assert reply["error"]["code"] == "insufficient_quota"
        return status

    with ThreadPoolExecutor(n) as pool:
        statuses = list(pool.map(one, range(n)))
    return statuses, cost


def assert_nothing_left_over(stack: Stack, customer: str, served: int, cost: int) -> None:
    m = money(stack, customer)
    assert m["spend"] == served * cost
    assert m["reserved"] == 0 and m["ws_reserved"] == 0
    assert hints_settle(stack, customer) == []
    recs = records_of(stack, customer)
    assert len(recs) == served and len({r["request_id"] for r in recs}) == served
    assert all(r["status"] == "200" and int(r["cost_micro_usd"]) == cost for r in recs)


def test_race_concurrent_requests_are_served_exactly_up_to_the_balance(stack: Stack, customer: str) -> None:
    """legal_summary has one model, so the reservation equals the real cost: exactly k pass."""
    k, n = 5, 50
    statuses, cost = race(stack, customer, "legal_summary", (2_000_000, 8_000_000), k, n)  # strong_reasoning's price
    assert statuses.count(200) == k and statuses.count(429) == n - k
    assert stack.fakes["p3"].calls() == k
    assert money(stack, customer)["balance"] == 0  # settled spend equals the balance, never more
    assert_nothing_left_over(stack, customer, k, cost)


def test_race_with_fallback_reservations_never_overspends(stack: Stack, customer: str) -> None:
    """support_draft may fall back to a dearer model, so each request reserves more than it
    costs: at most k pass, and the customer is never charged beyond the balance."""
    k, n = 5, 50
    statuses, cost = race(stack, customer, "support_draft", (150_000, 600_000), k, n)  # low_cost_chat's price
    served = statuses.count(200)
    assert 1 <= served <= k and statuses.count(429) == n - served
    assert stack.fakes["p1"].calls() == served
    assert money(stack, customer)["balance"] >= 0
    assert_nothing_left_over(stack, customer, served, cost)


def test_usage_record_has_every_field_of_the_spec(stack: Stack, customer: str) -> None:
    key_id, secret = stack.create_key(customer, plan="starter")
    raw = stack.client(secret).chat.completions.with_raw_response.create(model="support_draft", messages=MESSAGES)
    rid = raw.headers["x-request-id"]
    stack.settled(customer)
    (rec,) = records_of(stack, customer)
    for f in ("request_id", "ts", "route", "customer_id", "workspace_id", "api_key_id", "plan", "primary_model", "final_model",
              "provider", "attempts", "fallback_reason", "status", "prompt_tokens", "completion_tokens", "cost_micro_usd",
              "retry_cost_micro_usd", "stream", "latency_ms", "attempt_list"):
        assert f in rec, f
    assert (rec["request_id"], rec["api_key_id"], rec["plan"], rec["status"]) == (rid, key_id, "starter", "200")
    assert rec["cost_micro_usd"] == str(int(raw.headers["x-tollgate-cost-usd"].replace(".", "")))
    assert json.loads(rec["attempt_list"]) == [{"model": "low_cost_chat", "provider": "p1", "status": 200, "reason": "ok"}]
    assert secret not in json.dumps(rec)


def test_streamed_completion_is_billed_from_its_usage_chunk(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].default = Reply(prompt_tokens=1000, completion_tokens=50)
    stream = stack.client(secret).chat.completions.create(model="support_draft", messages=MESSAGES, stream=True)
    assert sum(1 for _ in stream) > 1
    deadline = time.monotonic() + 5
    while not records_of(stack, customer) and time.monotonic() < deadline:
        time.sleep(0.05)
    (rec,) = records_of(stack, customer)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["stream"]) == ("1000", "50", "true")
    assert rec["cost_micro_usd"] == str(1000 * 150_000 // 10**6 + 50 * 600_000 // 10**6)  # 150 + 30
    assert money(stack, customer)["spend"] == 180


def test_failed_request_releases_its_reservation(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(Reply(status=500))
    with pytest.raises(openai.InternalServerError):
        stack.client(secret).chat.completions.create(model="legal_summary", messages=MESSAGES)
    m = money(stack, customer)
    assert (m["reserved"], m["spend"]) == (0, 0)
    (rec,) = records_of(stack, customer)
    assert (rec["status"], rec["cost_micro_usd"]) == ("502", "0")  # what the client got; the provider's 500 is in attempt_list


def test_connect_failure_releases_its_reservation(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(Reply(close=True))
    with pytest.raises(openai.APIStatusError):
        stack.client(secret).chat.completions.create(model="legal_summary", messages=MESSAGES)
    assert money(stack, customer)["reserved"] == 0
    assert hints_settle(stack, customer) == []


def test_replayed_request_id_is_not_billed_twice(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    client = stack.client(secret, default_headers={"x-request-id": f"replay-{customer}"})
    client.chat.completions.create(model="support_draft", messages=MESSAGES)
    spent = money(stack, customer)["spend"]
    with pytest.raises(openai.ConflictError) as info:
        client.chat.completions.create(model="support_draft", messages=MESSAGES)
    assert info.value.response.json()["error"]["code"] == "duplicate_request"
    assert stack.fakes["p1"].calls() == 1
    assert money(stack, customer)["spend"] == spent
    assert len(records_of(stack, customer)) == 1


def test_request_id_of_a_failed_request_may_be_retried(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    client = stack.client(secret, default_headers={"x-request-id": f"retry-{customer}"})
    stack.fakes["p3"].script(Reply(status=500))
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="legal_summary", messages=MESSAGES)
    client.chat.completions.create(model="legal_summary", messages=MESSAGES)
    assert [r["status"] for r in records_of(stack, customer)] == ["502", "200"]


def test_monthly_budget_exhausted_is_429_insufficient_quota_without_upstream_call(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, plan="tiny_budget")
    with pytest.raises(openai.RateLimitError) as info:
        stack.client(secret).chat.completions.create(model="support_draft", messages=MESSAGES)
    assert info.value.response.json()["error"]["code"] == "insufficient_quota"
    assert "retry-after" not in info.value.response.headers
    assert info.value.response.headers["x-tollgate-attempts"] == "0"
    assert info.value.response.headers["x-tollgate-fallback-reason"] == "budget"
    assert sum(f.calls() for f in stack.fakes.values()) == 0


def test_prepaid_customer_without_balance_is_refused(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, plan="prepaid")
    with pytest.raises(openai.RateLimitError) as info:
        stack.client(secret).chat.completions.create(model="support_draft", messages=MESSAGES)
    assert info.value.response.json()["error"]["code"] == "insufficient_quota"
    assert stack.fakes["p1"].calls() == 0


def test_workspace_monthly_limit_refuses_only_that_workspace(stack: Stack, customer: str) -> None:
    _, capped = stack.create_key(customer, workspace="capped")
    _, free = stack.create_key(customer, workspace="free")
    out = tollgate(stack, "limits", "set", "--customer", customer, "--workspace", "capped", "--monthly-usd", "0.00001")
    assert out.returncode == 0, out.stderr
    with pytest.raises(openai.RateLimitError) as info:
        stack.client(capped).chat.completions.create(model="support_draft", messages=MESSAGES)
    assert info.value.response.json()["error"]["code"] == "insufficient_quota"
    assert stack.fakes["p1"].calls() == 0
    stack.client(free).chat.completions.create(model="support_draft", messages=MESSAGES)
    assert stack.fakes["p1"].calls() == 1


def test_requests_per_minute_limit_is_429_rate_limit_exceeded_with_retry_after(stack: Stack, customer: str) -> None:
    out = tollgate(stack, "keys", "create", "--customer", customer, "--workspace", "w", "--plan", "premium", "--rpm", "2", "--json")
    secret = json.loads(out.stdout)["secret"]
    client = stack.client(secret)
    raw = client.chat.completions.with_raw_response.create(model="support_draft", messages=MESSAGES)
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    client.chat.completions.create(model="support_draft", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="support_draft", messages=MESSAGES)
    err = info.value.response
    assert err.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(err.headers["retry-after"]) >= 1
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    assert stack.fakes["p1"].calls() == 2


def test_customer_requests_per_minute_limit_spans_all_its_keys_and_workspaces(stack: Stack, customer: str) -> None:
    _, first = stack.create_key(customer, workspace="one")
    _, second = stack.create_key(customer, workspace="two")
    assert tollgate(stack, "limits", "set", "--customer", customer, "--rpm", "3").returncode == 0
    for secret in (first, second, first):
        stack.client(secret).chat.completions.create(model="support_draft", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as info:
        stack.client(second).chat.completions.create(model="support_draft", messages=MESSAGES)
    assert info.value.response.json()["error"]["code"] == "rate_limit_exceeded"
    assert stack.fakes["p1"].calls() == 3


def test_tokens_per_minute_limit_is_429_rate_limit_exceeded(stack: Stack, customer: str) -> None:
    out = tollgate(stack, "keys", "create", "--customer", customer, "--workspace", "w", "--plan", "premium", "--tpm", "1000", "--json")
    client = stack.client(json.loads(out.stdout)["secret"])
    stack.fakes["p1"].default = Reply(completion_tokens=900)
    client.chat.completions.create(model="support_draft", messages=MESSAGES, max_tokens=950)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="support_draft", messages=MESSAGES, max_tokens=950)
    assert info.value.response.json()["error"]["code"] == "rate_limit_exceeded"
    assert "x-ratelimit-remaining-tokens" in info.value.response.headers
    assert stack.fakes["p1"].calls() == 1


def test_quota_rejections_and_spend_are_in_the_metrics(stack: Stack, customer: str) -> None:
    import urllib.request

    _, secret = stack.create_key(customer, plan="tiny_budget")
    with pytest.raises(openai.RateLimitError):
        stack.client(secret).chat.completions.create(model="support_draft", messages=MESSAGES)
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.processor.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'tollgate_quota_rejections_total{reason="budget",route="support_draft"}' in text
    assert 'tollgate_spend_usd_total{kind="normal",model="low_cost_chat",provider="p1",route="support_draft"}' in text


def test_balance_and_explain_commands(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, plan="prepaid")
    assert tollgate(stack, "balance", "add", "--customer", customer, "--usd", "1.5").returncode == 0
    raw = stack.client(secret).chat.completions.with_raw_response.create(model="support_draft", messages=MESSAGES)
    shown = json.loads(tollgate(stack, "balance", "show", "--customer", customer, "--json").stdout)
    cost = int(raw.headers["x-tollgate-cost-usd"].replace(".", ""))
    assert shown["balance_micro"] == 1_500_000 - cost and shown["reserved_micro"] == 0
    explained = tollgate(stack, "explain", raw.headers["x-request-id"])
    assert explained.returncode == 0
    assert "intended model : low_cost_chat" in explained.stdout and "no model change" in explained.stdout
    tail = tollgate(stack, "usage", "tail", "-n", "50", "--json")
    assert any(json.loads(line)["request_id"] == raw.headers["x-request-id"] for line in tail.stdout.splitlines())
    assert tollgate(stack, "explain", "no-such-request").returncode == 1


def test_redis_down_fails_closed_and_recovers_without_restart(fakes: dict[str, FakeProvider], policy_dir: Path, customer: str) -> None:
    redis = RedisServer(durable=True).start()
    with running_stack(fakes, policy_dir, workers=1, redis_server=redis, name="redis-down") as s:
        _, secret = s.create_key(customer)
        client = s.client(secret)
        client.chat.completions.create(model="support_draft", messages=MESSAGES)
        redis.stop()
        for _ in range(3):
            with pytest.raises(openai.APIStatusError) as info:
                client.chat.completions.create(model="support_draft", messages=MESSAGES)
            assert info.value.status_code == 503
            assert info.value.response.json()["error"]["code"] == "quota_unavailable"
        assert fakes["p1"].calls() == 1
        redis.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                client.chat.completions.create(model="support_draft", messages=MESSAGES)
                break
            except openai.APIStatusError:
                assert time.monotonic() < deadline, "service did not resume after Redis came back"
                time.sleep(0.3)
        assert fakes["p1"].calls() == 2


def test_processor_killed_mid_request_leaves_an_unsettled_record(fakes: dict[str, FakeProvider], policy_dir: Path, customer: str) -> None:
    env = {"TOLLGATE_RESERVATION_GRACE_S": "1", "TOLLGATE_REAPER_INTERVAL_S": "0.3"}
    with running_stack(fakes, policy_dir, workers=1, env=env, name="killed") as s:
        _, secret = s.create_key(customer)
        fakes["p1"].script(Reply(delay_s=1.5))
        client = s.client(secret, default_headers={"x-request-id": f"killed-{customer}"})
        failures: list[Exception] = []

        def doomed() -> None:
            try:
                client.chat.completions.create(model="support_draft", messages=MESSAGES)
            except openai.APIError as exc:
                failures.append(exc)

        t = threading.Thread(target=doomed)
        t.start()
        deadline = time.monotonic() + 5
        while not reservations_of(s, customer):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert s.processor.proc is not None
        os.kill(s.processor.proc.pid, signal.SIGKILL)
        s.processor.proc.wait()
        t.join()
        assert len(failures) == 1  # the client saw an error, not a silent success
        # A new processor (same port) sweeps the orphaned reservation once it is overdue.
        s.processor = Processor(s.processor.policy, s.redis.url, port=s.processor.port, metrics_port=s.processor.metrics_port,
                                env={**env}).start()
        deadline = time.monotonic() + 20
        while not records_of(s, customer, settle=False):
            assert time.monotonic() < deadline, "no unsettled record"
            time.sleep(0.2)
        (rec,) = records_of(s, customer)
        assert rec["status"] == "unsettled" and rec["request_id"] == f"killed-{customer}"
        assert int(rec["reserved_micro_usd"]) > 0
        assert money(s, customer)["reserved"] == 0
        assert hints_settle(s, customer) == []


def test_stream_abandoned_by_the_client_is_billed_from_the_chunks_that_went_out(stack: Stack, customer: str) -> None:
    import http.client

    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(completion_tokens=40, chunk_delay_s=0.2))
    body = json.dumps({"model": "support_draft", "messages": MESSAGES, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", stack.envoy.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"authorization": f"Bearer {secret}",
                                                                      "content-type": "application/json"})
    resp = conn.getresponse()
    rid = resp.headers["x-request-id"]
    seen = 0
    while seen < 3:
        if resp.readline().startswith(b"data:"):
            seen += 1
    conn.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 15
    while not [r for r in records_of(stack, customer) if r["request_id"] == rid]:
        assert time.monotonic() < deadline, "the abandoned stream left no record"
        time.sleep(0.1)
    (rec,) = records_of(stack, customer)
    assert rec["usage_source"] == "estimated" and rec["status"] == "499"
    assert 3 <= int(rec["completion_tokens"]) < 40 and int(rec["cost_micro_usd"]) > 0
    assert money(stack, customer)["reserved"] == 0
