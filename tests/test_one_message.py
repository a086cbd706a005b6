"""One processor message per plain request, end to end (issue 12): Envoy prices and attributes a
plain answer itself (PRICE_LUA), the processor settles it from Envoy's access log, and every
other answer starts the answer processor. Envoy's own stats count the processor streams:
`http.tollgate.ext_proc.*` is the request-side filter, `http.tollgate.ext_proc.answer.*` the
answer processor.

The price agreement test runs its own stack with prices that are awkward on purpose (not whole
dollars, not whole micro-dollars per token) and random token counts: the cost header (Envoy's
Lua) and the record (the processor) must both equal the cost computed here by hand,
ceil((prompt x input + completion x output) / 1e6) micro-USD with prices in micro-USD per Mtok.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from extproc.fakeprovider import FakeProvider, Reply
from tests.conftest import Stack, catalog, running_stack
from tests.test_money_suite import records_of, send

MESSAGES = [{"role": "user", "content": "hi"}]
REQUEST_STREAMS, REQUEST_MESSAGES = "http.tollgate.ext_proc.streams_started", "http.tollgate.ext_proc.stream_msgs_sent"
ANSWER_STREAMS = "http.tollgate.ext_proc.answer.streams_started"


def counts(stack: Stack) -> tuple[int, int, int]:
    s = stack.envoy.stats()
    return s.get(REQUEST_STREAMS, 0), s.get(REQUEST_MESSAGES, 0), s.get(ANSWER_STREAMS, 0)


def delta(before: tuple[int, int, int], after: tuple[int, int, int]) -> tuple[int, int, int]:
    return after[0] - before[0], after[1] - before[1], after[2] - before[2]


def chat(stack: Stack, secret: str, route: str = "legal_summary", **extra: object) -> int:
    body = {"model": route, "messages": MESSAGES, "max_tokens": 20, **extra}
    return send(stack, secret, "/chat/completions", body, uuid.uuid4().hex).status


def test_a_plain_answer_costs_one_processor_message_and_no_answer_processor(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    before = counts(stack)
    assert [chat(stack, secret) for _ in range(5)] == [200] * 5
    assert delta(before, counts(stack)) == (5, 5, 0)


def test_a_plain_answer_on_a_fallback_chain_costs_one_message_too(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    before = counts(stack)
    assert [chat(stack, secret, "switch_all") for _ in range(3)] == [200] * 3
    assert delta(before, counts(stack)) == (3, 3, 0)


def test_a_planned_switch_after_a_500_is_priced_and_attributed_by_envoy_alone(stack: Stack, customer: str) -> None:
    """switch_all: low_cost_chat (p1) answers 500, attempt 2 (planned in advance) goes to
    low_cost_chat_backup (p2, $0.20 / $0.60 per Mtok) and serves 1,000 + 50 tokens:
    1000 x 0.20 + 50 x 0.60 = 200 + 30 = 230 micro-USD. No answer processor, and the record is
    the one the processor would write (both attempts, reason provider_5xx, kind fallback)."""
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(status=500))
    stack.fakes["p2"].script(Reply(prompt_tokens=1000, completion_tokens=50))
    before = counts(stack)
    rid = uuid.uuid4().hex
    answer = send(stack, secret, "/chat/completions", {"model": "switch_all", "messages": MESSAGES, "max_tokens": 100}, rid)
    assert answer.status == 200
    assert delta(before, counts(stack)) == (1, 1, 0)
    h = answer.headers
    assert (h["x-tollgate-cost-usd"], h["x-tollgate-attempts"], h["x-tollgate-fallback-reason"]) == ("0.000230", "2", "provider_5xx")
    assert (h["x-tollgate-final-model"], h["x-tollgate-provider"], h["x-tollgate-primary-model"]) == ("low_cost_chat_backup", "p2", "low_cost_chat")
    (rec,) = [r for r in records_of(stack, customer) if r["request_id"] == rid]
    assert (rec["cost_micro_usd"], rec["final_model"], rec["provider"], rec["attempts"]) == ("230", "low_cost_chat_backup", "p2", "2")
    assert (rec["fallback_reason"], rec["kind"], rec["status"]) == ("provider_5xx", "fallback", "200")
    assert [(a["model"], a["status"], a["reason"]) for a in json.loads(rec["attempt_list"])] == [
        ("low_cost_chat", 500, "provider_5xx"), ("low_cost_chat_backup", 200, "ok")]


def test_an_attempt_the_upstream_processor_set_up_starts_the_answer_processor(stack: Stack, customer: str) -> None:
    """retry_twice retries the same provider (a back-off only the processor waits): not planned."""
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(status=500))
    before = counts(stack)
    answer = send(stack, secret, "/chat/completions", {"model": "retry_twice", "messages": MESSAGES, "max_tokens": 20})
    assert answer.status == 200 and answer.headers["x-tollgate-attempts"] == "2"
    assert delta(before, counts(stack))[2] == 1


def test_a_stream_starts_the_answer_processor(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    before = counts(stack)
    events = stack.client(secret).chat.completions.create(model="legal_summary", messages=[{"role": "user", "content": "hi"}],
                                                          stream=True)
    assert sum(1 for _ in events) > 0
    assert delta(before, counts(stack))[2] == 1


def test_a_failed_answer_starts_the_answer_processor_which_rewrites_it(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(Reply(status=500))
    before = counts(stack)
    answer = send(stack, secret, "/chat/completions", {"model": "legal_summary", "messages": MESSAGES, "max_tokens": 20})
    assert answer.status == 502 and answer.json()["error"]["code"] == "upstream_unavailable"
    assert delta(before, counts(stack))[2] == 1
    assert "x-tollgate-answer" not in answer.headers


def test_an_answer_without_usage_starts_the_answer_processor_and_is_billed_from_an_estimate(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(Reply(usage=False))
    before = counts(stack)
    rid = uuid.uuid4().hex
    answer = send(stack, secret, "/chat/completions", {"model": "legal_summary", "messages": MESSAGES, "max_tokens": 20}, rid)
    assert answer.status == 200 and int(answer.headers["x-tollgate-cost-usd"].replace(".", "")) > 0
    assert delta(before, counts(stack))[2] == 1
    (rec,) = [r for r in records_of(stack, customer) if r["request_id"] == rid]
    assert rec["usage_source"] == "estimated"


def test_a_provider_cannot_forge_attribution_on_the_plain_path(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(Reply(headers={"x-tollgate-cost-usd": "0.000000", "x-tollgate-answer": "skip",
                                            "x-ratelimit-remaining-requests": "999", "openai-organization": "org-provider"}))
    before = counts(stack)
    answer = send(stack, secret, "/chat/completions", {"model": "legal_summary", "messages": MESSAGES, "max_tokens": 20})
    assert answer.status == 200 and delta(before, counts(stack))[2] == 0
    assert answer.headers["x-tollgate-cost-usd"] != "0.000000"
    assert "openai-organization" not in answer.headers and "x-tollgate-answer" not in answer.headers
    assert answer.headers.get("x-ratelimit-remaining-requests") != "999"


def test_the_balance_is_settled_moments_after_the_answer(stack: Stack, customer: str) -> None:
    """Settlement is asynchronous (the access log flushes every few milliseconds): the money
    lands shortly after the client has its answer, never later than the test's patience."""
    _, secret = stack.create_key(customer)
    rid = uuid.uuid4().hex
    answer = send(stack, secret, "/chat/completions", {"model": "legal_summary", "messages": MESSAGES, "max_tokens": 20}, rid)
    cost = int(answer.headers["x-tollgate-cost-usd"].replace(".", ""))
    deadline = time.monotonic() + 5
    while not [r for r in records_of(stack, customer) if r["request_id"] == rid]:
        assert time.monotonic() < deadline, "no record 5 s after the answer"
        time.sleep(0.01)
    (rec,) = [r for r in records_of(stack, customer) if r["request_id"] == rid]
    assert int(rec["cost_micro_usd"]) == cost > 0


# --- Envoy's price and the processor's agree ----------------------------------------------------

RNG = random.Random(1224)
# micro-USD per million tokens: awkward values, one below a million (0.999999 $/Mtok).
PRICES = {"odd_one": (2_999_999, 15_000_001), "odd_two": (999_999, 123_456_789), "odd_three": (RNG.randrange(1, 10**9), RNG.randrange(1, 10**9))}


@pytest.fixture(scope="module")
def priced_stack(fakes: dict[str, FakeProvider]) -> Iterator[Stack]:
    doc = catalog(fakes)
    for i, (name, (pin, pout)) in enumerate(PRICES.items()):
        doc["models"][name] = {"provider": f"p{i + 1}", "upstream_model": f"{name}-1", "tier": "standard",
                               "price": {"input_per_mtok_usd": f"{pin / 1e6:.6f}", "output_per_mtok_usd": f"{pout / 1e6:.6f}"}}
        doc["routes"].append({"route": name, "primary_model": name, "fallback": {"max_attempts": 2 if i else 1}})
    policy_dir = Path(tempfile.mkdtemp(prefix="tollgate-priced-"))
    (policy_dir / "00-catalog.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    with running_stack(fakes, policy_dir, workers=1, name="priced") as s:
        yield s


def by_hand(prompt: int, completion: int, prices: tuple[int, int]) -> int:
    nano = prompt * prices[0] + completion * prices[1]
    return (nano + 999_999) // 1_000_000


@pytest.mark.parametrize("model", list(PRICES))
def test_envoys_price_and_the_processors_agree_on_random_counts(priced_stack: Stack, customer: str, model: str) -> None:
    _, secret = priced_stack.create_key(customer, plan="starter_down")
    fake = priced_stack.fakes[f"p{list(PRICES).index(model) + 1}"]
    sent: dict[str, int] = {}
    for _ in range(25):
        prompt, completion = RNG.randrange(0, 2_000_000), RNG.randrange(0, 5000)
        fake.script(Reply(prompt_tokens=prompt, completion_tokens=completion))
        rid = uuid.uuid4().hex
        answer = send(priced_stack, secret, "/chat/completions", {"model": model, "messages": MESSAGES, "max_tokens": 5000}, rid)
        assert answer.status == 200, answer.raw
        expected = by_hand(prompt, completion, PRICES[model])
        assert answer.headers["x-tollgate-cost-usd"] == f"{expected // 10**6}.{expected % 10**6:06d}", (prompt, completion)
        sent[rid] = expected
    deadline = time.monotonic() + 5
    while len(recs := {r["request_id"]: int(r["cost_micro_usd"]) for r in records_of(priced_stack, customer)}) < len(sent):
        assert time.monotonic() < deadline, "records missing"
        time.sleep(0.02)
    assert recs == sent


def test_counts_too_large_for_envoys_arithmetic_are_priced_by_the_processor(priced_stack: Stack, customer: str) -> None:
    _, secret = priced_stack.create_key(customer, plan="starter_down")
    prompt = 3 * 10**9  # above the Lua's exact range
    priced_stack.fakes["p1"].script(Reply(prompt_tokens=prompt, completion_tokens=7))
    before = priced_stack.envoy.stats().get(ANSWER_STREAMS, 0)
    answer = send(priced_stack, secret, "/chat/completions", {"model": "odd_one", "messages": MESSAGES, "max_tokens": 50})
    expected = by_hand(prompt, 7, PRICES["odd_one"])
    assert answer.headers["x-tollgate-cost-usd"] == f"{expected // 10**6}.{expected % 10**6:06d}"
    assert priced_stack.envoy.stats().get(ANSWER_STREAMS, 0) == before + 1
    json.loads(answer.raw)
