"""Routing vs fallback (issue 4): every policy verb and event, enforced by Envoy retries across
providers, through real Envoy, the real processor, real Redis and the openai SDK."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import openai
from openai.types.chat import ChatCompletionMessageParam

from extproc.fakeprovider import Reply
from extproc.quota import request_key
from tests.conftest import Stack

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Summarise this support ticket."}]


@dataclass
class Result:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def request_id(self) -> str:
        return self.headers["x-request-id"]


def call(stack: Stack, secret: str, route: str, **kw: Any) -> Result:
    client = stack.client(secret)
    try:
        raw = client.chat.completions.with_raw_response.create(model=route, messages=MESSAGES, **kw)
        return Result(raw.status_code, dict(raw.headers), raw.parse())
    except openai.APIStatusError as exc:
        return Result(exc.status_code, dict(exc.response.headers), exc.response.json())


def record(stack: Stack, request_id: str) -> dict[str, Any]:
    """The request's usage record. A stream's is written when the stream ends at the gateway,
    which the client (having read `[DONE]`) may see a moment earlier: wait for it."""
    r = stack.redis_sync()
    deadline = time.monotonic() + 5
    while (entry_id := next(iter(r.hvals(request_key(request_id))), None)) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert entry_id is not None, f"no usage record for {request_id}"
    ((_, fields),) = r.xrange("tollgate:usage", min=entry_id, max=entry_id)
    rec: dict[str, Any] = {k.decode(): v.decode() for k, v in fields.items()}
    rec["attempt_list"] = json.loads(rec["attempt_list"])
    return rec


def metric(stack: Stack, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.processor.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def models_received(stack: Stack, name: str) -> list[str]:
    return [r.body["model"] for r in stack.fakes[name].requests]


# --- the seed template: retry_once_then_switch on 5xx, switch on 429, max_attempts 2 ------------


def test_5xx_retries_the_same_provider_once_and_recovers(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(status=500))
    before = metric(stack, "tollgate_spend_usd_total", route="support_draft", kind="retry")
    res = call(stack, secret, "support_draft")
    assert res.status == 200
    assert models_received(stack, "p1") == ["gpt-4o-mini", "gpt-4o-mini"]
    assert stack.fakes["p2"].calls() == 0
    h = res.headers
    assert (h["x-tollgate-attempts"], h["x-tollgate-fallback-reason"]) == ("2", "provider_5xx")
    assert h["x-tollgate-primary-model"] == h["x-tollgate-final-model"] == "low_cost_chat"
    assert stack.fakes["p1"].requests[1].headers["authorization"] == "Bearer sk-provider-one"
    rec = record(stack, res.request_id)
    assert [(a["model"], a["reason"]) for a in rec["attempt_list"]] == [("low_cost_chat", "provider_5xx"), ("low_cost_chat", "ok")]
    assert rec["retry_cost_micro_usd"] == rec["cost_micro_usd"] != "0"
    assert metric(stack, "tollgate_spend_usd_total", route="support_draft", kind="retry") > before


def test_5xx_twice_hits_max_attempts_and_fails_with_upstream_unavailable(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(status=500), Reply(status=503))
    res = call(stack, secret, "support_draft")
    assert res.status == 502
    assert res.body["error"]["code"] == "upstream_unavailable"
    assert stack.fakes["p1"].calls() == 2 and stack.fakes["p2"].calls() == 0  # the cap holds
    assert (res.headers["x-tollgate-attempts"], res.headers["x-tollgate-fallback-reason"]) == ("2", "provider_5xx")
    rec = record(stack, res.request_id)
    assert (rec["status"], rec["cost_micro_usd"], rec["attempts"]) == ("502", "0", "2")


def test_rate_limit_switches_to_the_same_price_tier_on_another_provider(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(status=429))
    before = metric(stack, "tollgate_fallbacks_total", route="support_draft", from_model="low_cost_chat",
                    to_model="low_cost_chat_backup", reason="rate_limit")
    res = call(stack, secret, "support_draft")
    assert res.status == 200
    assert models_received(stack, "p1") == ["gpt-4o-mini"]
    assert models_received(stack, "p2") == ["small-chat-v2"]
    assert stack.fakes["p2"].requests[0].headers["authorization"] == "Bearer sk-provider-two"
    h = res.headers
    assert (h["x-tollgate-final-model"], h["x-tollgate-provider"], h["x-tollgate-attempts"]) == ("low_cost_chat_backup", "p2", "2")
    assert h["x-tollgate-fallback-reason"] == "rate_limit"
    assert res.body.model == "small-chat-v2"
    rec = record(stack, res.request_id)
    assert (rec["primary_model"], rec["final_model"], rec["provider"]) == ("low_cost_chat", "low_cost_chat_backup", "p2")
    assert rec["fallback_cost_micro_usd"] == rec["cost_micro_usd"] and rec["retry_cost_micro_usd"] == "0"
    # priced at the model that served: $0.20 / $0.60 per million
    usage = res.body.usage
    assert int(rec["cost_micro_usd"]) == -(-(usage.prompt_tokens * 200_000 + usage.completion_tokens * 600_000) // 10**6)
    assert metric(stack, "tollgate_fallbacks_total", route="support_draft", from_model="low_cost_chat",
                  to_model="low_cost_chat_backup", reason="rate_limit") == before + 1


def test_seed_template_does_not_fall_back_on_an_event_it_does_not_name(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(delay_s=3))  # longer than p1's 2 s timeout
    res = call(stack, secret, "support_draft")
    assert res.status == 504 and res.body["error"]["code"] == "upstream_unavailable"
    assert stack.fakes["p2"].calls() == 0
    assert res.headers["x-tollgate-fallback-reason"] == "timeout"


# --- each event and verb --------------------------------------------------------------------------


def test_on_timeout_switches_provider(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(delay_s=3))
    res = call(stack, secret, "switch_all")
    assert res.status == 200
    assert (res.headers["x-tollgate-fallback-reason"], res.headers["x-tollgate-final-model"]) == ("timeout", "low_cost_chat_backup")
    assert stack.fakes["p2"].calls() == 1
    assert record(stack, res.request_id)["attempt_list"][0]["reason"] == "timeout"


def test_on_connect_failure_switches_provider(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    res = call(stack, secret, "dead_primary")
    assert res.status == 200
    assert (res.headers["x-tollgate-fallback-reason"], res.headers["x-tollgate-final-model"]) == ("connect_failure", "low_cost_chat")
    assert models_received(stack, "p1") == ["gpt-4o-mini"]
    rec = record(stack, res.request_id)
    assert [a["provider"] for a in rec["attempt_list"]] == ["dead", "p1"]


def test_connection_dropped_mid_request_is_a_connect_failure(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(close=True))
    res = call(stack, secret, "switch_all")
    assert res.status == 200 and res.headers["x-tollgate-fallback-reason"] == "connect_failure"
    assert stack.fakes["p2"].calls() == 1


def test_switch_same_price_tier_on_5xx_goes_straight_to_another_provider(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(status=502))
    res = call(stack, secret, "switch_all")
    assert res.status == 200
    assert stack.fakes["p1"].calls() == 1 and models_received(stack, "p2") == ["small-chat-v2"]


def test_retry_same_repeats_the_primary_count_times(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(status=500), Reply(status=500))
    res = call(stack, secret, "retry_twice")
    assert res.status == 200 and res.headers["x-tollgate-attempts"] == "3"
    assert models_received(stack, "p1") == ["gpt-4o-mini"] * 3
    assert stack.fakes["p2"].calls() == 0


def test_max_attempts_caps_retry_same(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].default = Reply(status=500)
    res = call(stack, secret, "retry_twice")
    assert res.status == 502
    assert stack.fakes["p1"].calls() == 3  # max_attempts: 3, whatever the count would allow


def test_downgrade_moves_to_a_cheaper_tier_and_is_recorded(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, plan="starter_down")
    stack.fakes["p2"].script(Reply(status=500))
    res = call(stack, secret, "downgrade_route")
    assert res.status == 200
    assert (res.headers["x-tollgate-primary-model"], res.headers["x-tollgate-final-model"]) == ("standard_chat", "low_cost_chat")
    assert models_received(stack, "p2") == ["mid-chat-v1"] and models_received(stack, "p1") == ["gpt-4o-mini"]
    rec = record(stack, res.request_id)
    assert rec["fallback_reason"] == "provider_5xx" and "downgrade" in rec["rule"]


def test_downgrade_outside_the_plan_fails_closed_with_reason_policy(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, plan="premium_no_down")
    stack.fakes["p2"].script(Reply(status=500))
    res = call(stack, secret, "downgrade_route")
    assert res.status == 502 and res.body["error"]["code"] == "upstream_unavailable"
    assert res.headers["x-tollgate-fallback-reason"] == "policy"
    assert stack.fakes["p1"].calls() == 0


def test_upgrade_within_the_cost_multiplier(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, plan="premium")
    stack.fakes["p2"].script(Reply(status=500))
    res = call(stack, secret, "upgrade_route")
    assert res.status == 200
    # strong_reasoning costs 5x standard_chat (over the plan's 3x); premium_lite 2.5x
    assert res.headers["x-tollgate-final-model"] == "premium_lite"
    assert models_received(stack, "p3") == ["o3-lite"]


def test_upgrade_is_refused_when_the_plan_does_not_allow_it(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, plan="premium_no_down")
    stack.fakes["p2"].script(Reply(status=500))
    res = call(stack, secret, "upgrade_route")
    assert res.status == 502 and res.headers["x-tollgate-fallback-reason"] == "policy"
    assert stack.fakes["p3"].calls() == 0


def test_fail_closed_route_never_reaches_a_second_provider(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(Reply(status=500))
    res = call(stack, secret, "legal_summary")
    assert res.status == 502 and res.body["error"]["code"] == "upstream_unavailable"
    assert stack.fakes["p3"].calls() == 1
    assert sum(stack.fakes[n].calls() for n in ("p1", "p2", "p4")) == 0
    assert res.headers["x-tollgate-attempts"] == "1"


def test_client_error_from_a_provider_is_passed_through_without_fallback(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(status=400))
    res = call(stack, secret, "switch_all")
    assert res.status == 400
    assert stack.fakes["p2"].calls() == 0


# --- streaming, health, load, explain ----------------------------------------------------------------


def test_streaming_falls_back_before_the_first_byte_and_bills_the_usage_chunk(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(status=429))
    stack.fakes["p2"].script(Reply(completion_tokens=4, chunk_delay_s=0.3, prompt_tokens=100))
    client = stack.client(secret)
    with client.chat.completions.with_streaming_response.create(model="support_draft", messages=MESSAGES, stream=True) as resp:
        assert resp.headers["x-tollgate-final-model"] == "low_cost_chat_backup"
        arrivals = [time.monotonic() for _ in resp.parse()]
        rid = resp.headers["x-request-id"]
    assert arrivals[-1] - arrivals[0] >= 0.6  # chunks at the provider's pace
    assert stack.fakes["p2"].requests[0].body["stream_options"] == {"include_usage": True}
    deadline = time.monotonic() + 5
    while not stack.redis_sync().hlen(request_key(rid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    rec = record(stack, rid)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["final_model"]) == ("100", "4", "low_cost_chat_backup")
    assert rec["cost_micro_usd"] == str(-(-(100 * 200_000 + 4 * 600_000) // 10**6))


def test_failing_provider_opens_its_circuit_and_is_skipped_then_tried_again(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    _, other = stack.create_key(customer + "-other")
    stack.fakes["p4"].default = Reply(status=500)
    for s in (secret, other):  # two failures from two customers open p4's circuit (failures 2, cooldown 2 s)
        assert call(stack, s, "flaky").status == 200
    assert stack.fakes["p4"].calls() == 2
    time.sleep(1.5)  # every processor refreshes open circuits each second
    res = call(stack, secret, "flaky")
    assert res.status == 200
    assert stack.fakes["p4"].calls() == 2  # skipped: no call to the open circuit
    assert res.headers["x-tollgate-fallback-reason"] == "provider_unhealthy"
    assert res.headers["x-tollgate-attempts"] == "1"
    assert record(stack, res.request_id)["attempt_list"][0] == {"model": "flaky_chat", "provider": "p4", "status": 0,
                                                                  "reason": "provider_unhealthy"}
    stack.fakes["p4"].default = Reply()
    time.sleep(2.5)  # after the cooldown the provider is tried again
    res = call(stack, secret, "flaky")
    assert res.status == 200 and res.headers["x-tollgate-final-model"] == "flaky_chat"
    assert stack.fakes["p4"].calls() == 3


def test_under_load_every_request_is_served_by_the_fallback(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].default = Reply(status=429)
    client = stack.client(secret)

    def one(_: int) -> tuple[int, str]:
        raw = client.chat.completions.with_raw_response.create(model="support_draft", messages=MESSAGES)
        return raw.status_code, raw.headers["x-tollgate-final-model"]

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(256)))
    assert results == [(200, "low_cost_chat_backup")] * 256
    assert stack.fakes["p2"].calls() == 256
    overflow = {k: v for k, v in stack.envoy.stats().items() if "retry_overflow" in k and v}
    assert overflow == {}


def test_explain_tells_which_model_was_intended_what_failed_and_what_it_cost(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(status=429))
    res = call(stack, secret, "support_draft")
    out = subprocess.run([sys.executable, "-m", "extproc.cli", "explain", res.request_id, "--redis-url", stack.redis.url],
                         capture_output=True, text=True, check=True).stdout
    assert "intended model : low_cost_chat" in out
    assert "served by      : low_cost_chat_backup on p2 instead of low_cost_chat" in out
    assert "1. low_cost_chat on p1 -> 429 (failed: rate_limit)" in out
    assert "on_rate_limit: switch_same_price_tier" in out
    assert "cost           : $0.0" in out


def upstream_messages(stack: Stack) -> float:
    return metric(stack, "tollgate_decision_seconds_count", phase="upstream_request_headers")


def test_the_first_attempt_costs_no_per_attempt_message(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    before = upstream_messages(stack)
    for _ in range(3):
        assert call(stack, secret, "support_draft").status == 200
    assert upstream_messages(stack) == before


def test_a_switch_after_a_429_costs_no_per_attempt_message(stack: Stack, customer: str) -> None:
    """The seed's on_rate_limit switches provider: attempt 2 was planned with attempt 1."""
    _, secret = stack.create_key(customer)
    before = upstream_messages(stack)
    stack.fakes["p1"].script(Reply(status=429))
    res = call(stack, secret, "support_draft")
    assert (res.headers["x-tollgate-attempts"], res.headers["x-tollgate-final-model"]) == ("2", "low_cost_chat_backup")
    assert upstream_messages(stack) == before


def test_a_retry_on_the_same_provider_costs_one_per_attempt_message(stack: Stack, customer: str) -> None:
    """The seed's on_provider_5xx retries the primary once: that retry waits a back-off, which
    only the per-attempt processor does, so it is not planned."""
    _, secret = stack.create_key(customer)
    before = upstream_messages(stack)
    stack.fakes["p1"].script(Reply(status=500))
    res = call(stack, secret, "support_draft")
    assert (res.headers["x-tollgate-attempts"], res.headers["x-tollgate-final-model"]) == ("2", "low_cost_chat")
    assert upstream_messages(stack) == before + 1


def test_a_client_cannot_mark_its_retry_as_planned(stack: Stack, customer: str) -> None:
    """x-tollgate-planned from a client would skip the per-attempt processor on the seed's
    same-provider retry (sending it to the relay with no target). It is dropped at the door
    (early header mutation), again by the planned-retry Lua on every attempt, and by attempt
    1's provider gate (upstream header changes persist into later attempts): this test fails
    only if all three let it through."""
    _, secret = stack.create_key(customer)
    before = upstream_messages(stack)
    stack.fakes["p1"].script(Reply(status=500))
    res = call(stack, secret, "support_draft", extra_headers={"x-tollgate-planned": "1"})
    assert (res.status, res.headers["x-tollgate-attempts"], res.headers["x-tollgate-final-model"]) == (200, "2", "low_cost_chat")
    assert upstream_messages(stack) == before + 1
    assert "x-tollgate-planned" not in stack.fakes["p1"].requests[-1].headers


def test_a_planned_second_attempt_that_fails_is_classified_by_the_third(stack: Stack, customer: str) -> None:
    """switch_all (3 attempts, two models): p1's 500 switches to p2 without a processor
    message; p2's 500 reaches the per-attempt processor, which finds no candidate left and
    ends the chain. Both failures are in the record, each with its own provider and status."""
    _, secret = stack.create_key(customer)
    before = upstream_messages(stack)
    stack.fakes["p1"].script(Reply(status=500))
    stack.fakes["p2"].script(Reply(status=503))
    res = call(stack, secret, "switch_all")
    assert res.status == 502 and res.headers["x-tollgate-attempts"] == "2"
    assert upstream_messages(stack) == before + 1
    rec = record(stack, res.request_id)
    assert [(a["provider"], a["status"], a["reason"]) for a in rec["attempt_list"]] == [
        ("p1", 500, "provider_5xx"), ("p2", 503, "provider_5xx")]


# --- truthful attribution (issue 10) ---------------------------------------------------------------


def test_a_same_model_retry_is_counted_as_a_retry_not_as_a_model_change(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(status=500))
    fallbacks = metric(stack, "tollgate_fallbacks_total", route="support_draft", from_model="low_cost_chat", to_model="low_cost_chat")
    retries = metric(stack, "tollgate_retries_total", route="support_draft", model="low_cost_chat", reason="provider_5xx")
    assert call(stack, secret, "support_draft").status == 200
    assert metric(stack, "tollgate_retries_total", route="support_draft", model="low_cost_chat", reason="provider_5xx") == retries + 1
    assert metric(stack, "tollgate_fallbacks_total", route="support_draft", from_model="low_cost_chat",
                  to_model="low_cost_chat") == fallbacks == 0


def test_record_status_and_metric_code_are_what_the_client_received(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(Reply(status=500))  # legal_summary fails closed: the gateway answers 502
    before = metric(stack, "tollgate_requests_total", route="legal_summary", code="502")
    before_500 = metric(stack, "tollgate_requests_total", route="legal_summary", code="500")
    res = call(stack, secret, "legal_summary")
    assert res.status == 502 and res.body["error"]["code"] == "upstream_unavailable"
    rec = record(stack, res.request_id)
    assert rec["status"] == "502"
    assert [(a["status"], a["reason"]) for a in rec["attempt_list"]] == [(500, "provider_5xx")]  # what the provider said
    assert metric(stack, "tollgate_requests_total", route="legal_summary", code="502") == before + 1
    assert metric(stack, "tollgate_requests_total", route="legal_summary", code="500") == before_500
