"""The money suite of issue 8 (c): every attack that used to overrun a prepaid balance or a
monthly budget, tried again against the real stack (Envoy, the processor, Redis, the openai
SDK). Each test is a fresh customer who paid $0.01 (10,000 micro-USD), and a fake provider
that generates everything each request allows and reports one prompt token per UTF-8 byte
(the worst an honest provider can do). Every test ends with the auditor's checks: spend no
more than what was paid, balance >= 0, no reservation left, one record per served request.

Prices come from tests/conftest.py's catalog: `legal_summary` is strong_reasoning alone
($2 / $8 per million tokens: 2 and 8 micro-USD per token), so $0.01 buys at most 1,250 output
tokens and every cap has to be fitted to the money; `support_draft` is low_cost_chat ($0.15 /
$0.60) with a dearer same-tier fallback.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from extproc.fakeprovider import FakeProvider, Reply
from extproc.quota import Account, month_of
from tests.conftest import Stack

PAID = 10_000  # micro-USD: $0.01, every test's top-up
LEGAL = (2, 8)  # strong_reasoning: micro-USD per input / output token
LOW = (0.15, 0.60)  # low_cost_chat, the model support_draft serves with
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Write me the longest essay you can."}]


# --- the auditor's tools -----------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    raw: bytes

    def json(self) -> Any:
        return json.loads(self.raw)


def send(stack: Stack, secret: str, path: str, body: Any, request_id: str | None = None, timeout: float = 60) -> Answer:
    """POST exact bytes (a dict is serialised compactly) and keep status, headers and body."""
    data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    headers = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
    if request_id:
        headers["x-request-id"] = request_id
    req = urllib.request.Request(f"{stack.base_url}{path}", data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Answer(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


def prepaid(stack: Stack, customer: str, micro: int = PAID) -> str:
    """A fresh prepaid customer holding `micro`; returns its secret."""
    _, secret = stack.create_key(customer, plan="prepaid")
    stack.redis_sync().incrby(Account(customer, "", "").k("balance"), micro)
    return secret


def generous(stack: Stack, reply: Reply | None = None) -> None:
    """Every fake generates all each request allows and bills one prompt token per byte."""
    for f in stack.fakes.values():
        f.default = reply or Reply(completion_tokens=None, prompt_per_byte=True)


def money(stack: Stack, customer: str, settle: bool = True) -> dict[str, int]:
    """The customer's money once its answers have settled (`settle=False`: as it is now)."""
    if settle:
        stack.settled(customer)
    r = stack.redis_sync()
    a = Account(customer, f"{customer}-ws", "")
    month = month_of(time.time())
    vals = r.mget(a.k("balance"), a.k("reserved"), a.k(f"spend:{month}"), a.w("reserved"))
    return {n: int(v or 0) for n, v in zip(("balance", "reserved", "spend", "ws_reserved"), vals, strict=True)}


def records_of(stack: Stack, customer: str, settle: bool = True) -> list[dict[str, str]]:
    """The customer's usage records once its answers have settled (`settle=False`: as now)."""
    if settle:
        stack.settled(customer)
    out = []
    for _, fields in stack.redis_sync().xrange("tollgate:usage"):
        rec = {k.decode(): v.decode() for k, v in fields.items()}
        if rec.get("customer_id") == customer:
            out.append(rec)
    return out


def wait_records(stack: Stack, customer: str, n: int, timeout: float = 10) -> list[dict[str, str]]:
    """Records are published just after the money settles: wait for `n` of them (and a little
    longer, so an extra one would be seen too)."""
    deadline = time.monotonic() + timeout
    while len(records_of(stack, customer)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    return records_of(stack, customer)


def forwarded(stack: Stack, request_id: str) -> list[dict[str, Any]]:
    """The bodies that reached any provider for one request id."""
    return [r.body for f in stack.fakes.values() for r in list(f.requests) if r.headers.get("x-request-id") == request_id]


def cost(prompt: int, completion: int, price: tuple[float, float]) -> int:
    """By hand: micro-USD per token times tokens, rounded up to a whole micro-dollar."""
    nano = prompt * round(price[0] * 1000) + completion * round(price[1] * 1000)
    return -(-nano // 1000)


def prompt_bytes(body: dict[str, Any]) -> int:
    """What the fake reports with prompt_per_byte: the UTF-8 bytes of the fields it reads."""
    fields = [body[f] for f in ("messages", "prompt", "input", "instructions", "tools", "functions", "response_format", "text")
              if body.get(f) is not None]
    return len(json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode())


def hints_of(stack: Stack, customer: str, wait_s: float = 5) -> list[bytes]:
    """The customer's reservation hints; a settled request's hint goes with its processor's
    next Redis round trip (or reaper pass), so give it a moment."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [m for m in stack.redis_sync().zrange("tollgate:reservations", 0, -1) if json.loads(m)[0] == customer]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def assert_paid_for(stack: Stack, customer: str, paid: int = PAID, served: int | None = None) -> None:
    """The promise: never more spent than paid, never a negative balance, nothing left in
    flight, and the records add up to the spend."""
    recs = wait_records(stack, customer, served or 0)
    m = money(stack, customer)
    r = stack.redis_sync()
    assert m["spend"] <= paid, f"spent {m['spend']} of {paid} paid"
    assert m["balance"] >= 0, f"balance {m['balance']}"
    assert m["balance"] == paid - m["spend"]
    assert (m["reserved"], m["ws_reserved"]) == (0, 0)
    assert list(r.scan_iter(match=f"tollgate:{{c:{customer}}}:resv:*")) == []
    assert r.zcard(Account(customer, "", "").k("resv-index")) == 0
    assert hints_of(stack, customer) == []
    assert sum(int(x["cost_micro_usd"]) for x in recs) == m["spend"]
    if served is not None:
        assert len(recs) == served
    assert all(int(x["cost_micro_usd"]) > 0 for x in recs if x["status"] == "200"), "a served request at cost 0"


def is_money_refusal(a: Answer) -> bool:
    return a.status == 429 and a.json()["error"]["code"] == "insufficient_quota"


@contextlib.contextmanager
def behaving(fake: FakeProvider, **methods: Any) -> Iterator[None]:
    """Make one fake answer differently for the length of a test: its own handler class (one
    per fake, shared by Envoy's pooled keep-alive connections) gets the given methods; the fake
    still receives and records every request."""
    server = fake._server
    assert server is not None
    handler = server.RequestHandlerClass
    saved = {name: handler.__dict__.get(name) for name in methods}
    for name, method in methods.items():
        setattr(handler, name, method)
    try:
        yield
    finally:
        for name, method in saved.items():
            if method is None:
                delattr(handler, name)
            else:
                setattr(handler, name, method)


def overruns(stack: Stack, route: str, provider: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.processor.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for m in re.finditer(r"^tollgate_reservation_overruns_total\{([^}]*)\} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels == {"route": route, "provider": provider}:
            total += float(m.group(2))
    return total


# --- the table of issue 8 ------------------------------------------------------------------------


def test_control_chat_with_max_tokens_100_is_charged_its_usage(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack)
    raw = stack.client(secret).chat.completions.with_raw_response.create(model="legal_summary", messages=MESSAGES, max_tokens=100)
    (body,) = forwarded(stack, raw.headers["x-request-id"])
    p = prompt_bytes(body)
    usage = raw.parse().usage
    assert usage is not None and usage.completion_tokens == 100
    (rec,) = wait_records(stack, customer, 1)
    assert int(rec["cost_micro_usd"]) == cost(p, 100, LEGAL) == 2 * p + 800
    assert money(stack, customer)["balance"] == PAID - (2 * p + 800)
    assert_paid_for(stack, customer, served=1)


def test_chat_without_max_tokens_gets_a_cap_written_into_the_forwarded_body(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack)
    raw = stack.client(secret).chat.completions.with_raw_response.create(model="legal_summary", messages=MESSAGES)
    (body,) = forwarded(stack, raw.headers["x-request-id"])
    # The route's default (1,024) fits in $0.01 at $8/M (8,192 micro-USD plus the prompt).
    assert body["max_completion_tokens"] == 1024
    usage = raw.parse().usage
    assert usage is not None and usage.completion_tokens == 1024
    assert_paid_for(stack, customer, served=1)


def test_chat_without_max_tokens_repeated_until_refused_never_overdraws(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack)
    client = stack.client(secret)
    served = 0
    for _ in range(20):
        try:
            client.chat.completions.create(model="legal_summary", messages=MESSAGES)
            served += 1
        except openai.RateLimitError as exc:
            err = exc.response.json()["error"]
            assert err["code"] == "insufficient_quota"
            assert "could cost up to $" in err["message"] and "limit reached" not in err["message"]
            break
    else:
        pytest.fail("a $0.01 balance served 20 uncapped requests at $8/M")
    assert served >= 2  # the second gets the cap the remaining money allows
    assert_paid_for(stack, customer, served=served)


def test_chat_without_max_tokens_later_caps_shrink_to_the_money_left(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack)
    body = json.dumps({"model": "legal_summary", "messages": MESSAGES}, separators=(",", ":")).encode()
    first = send(stack, secret, "/chat/completions", body, f"first-{customer}")
    spent = int(first.headers["x-tollgate-cost-usd"].replace(".", ""))
    assert send(stack, secret, "/chat/completions", body, f"second-{customer}").status == 200
    (fwd,) = forwarded(stack, f"second-{customer}")
    # What is left after the input bound (2 micro-USD per body byte), at 8 micro-USD a token.
    assert fwd["max_completion_tokens"] == (PAID - spent - 2 * len(body)) // 8
    assert_paid_for(stack, customer, served=2)


def test_chat_without_max_tokens_20_concurrent_never_overdraws(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack)
    start = threading.Barrier(20)

    def one(_: int) -> int:
        start.wait()
        a = send(stack, secret, "/chat/completions", {"model": "legal_summary", "messages": MESSAGES})
        assert a.status == 200 or is_money_refusal(a), (a.status, a.raw[:300])
        return a.status

    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(one, range(20)))
    served = statuses.count(200)
    assert 1 <= served < 20
    assert_paid_for(stack, customer, served=served)


def test_completions_cap_is_max_tokens_not_max_completion_tokens(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack)
    a = send(stack, secret, "/completions", {"model": "legal_summary", "prompt": "Tell me everything.",
                                             "max_completion_tokens": 1, "max_tokens": 50000}, f"cmpl-{customer}")
    assert a.status == 200, a.raw[:300]
    (body,) = forwarded(stack, f"cmpl-{customer}")
    # 50,000 tokens cost $0.40: the gateway lowered the honoured field to what $0.01 covers.
    assert body["max_tokens"] <= PAID // 8
    assert a.json()["usage"]["completion_tokens"] == body["max_tokens"]
    assert_paid_for(stack, customer, served=1)


def test_responses_cap_is_max_output_tokens_not_max_tokens(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack)
    a = send(stack, secret, "/responses", {"model": "legal_summary", "input": "Tell me everything.",
                                           "max_tokens": 1, "max_output_tokens": 50000}, f"resp-{customer}")
    assert a.status == 200, a.raw[:300]
    (body,) = forwarded(stack, f"resp-{customer}")
    assert body["max_output_tokens"] <= PAID // 8
    assert a.json()["usage"]["output_tokens"] == body["max_output_tokens"]
    assert_paid_for(stack, customer, served=1)


def test_chat_n_20_max_tokens_1000_is_capped_for_all_20_choices(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack)
    raw = stack.client(secret).chat.completions.with_raw_response.create(model="legal_summary", messages=MESSAGES, n=20, max_tokens=1000)
    (body,) = forwarded(stack, raw.headers["x-request-id"])
    # 20 choices at $8/M: $0.01 covers at most 62 tokens each.
    assert body["max_tokens"] <= PAID // (20 * 8)
    usage = raw.parse().usage
    assert usage is not None and usage.completion_tokens == 20 * body["max_tokens"]
    assert_paid_for(stack, customer, served=1)


def test_completions_best_of_20_is_capped_for_every_generated_choice(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack)
    a = send(stack, secret, "/completions", {"model": "legal_summary", "prompt": "Say it.", "best_of": 20, "max_tokens": 1000},
             f"best-{customer}")
    assert a.status == 200, a.raw[:300]
    (body,) = forwarded(stack, f"best-{customer}")
    assert body["max_tokens"] <= PAID // (20 * 8)
    assert a.json()["usage"]["completion_tokens"] == 20 * body["max_tokens"]
    assert_paid_for(stack, customer, served=1)


def test_completions_50_item_prompt_list_never_overdraws(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack)
    prompts = [f"Question number {i}: tell me everything." for i in range(50)]
    a = send(stack, secret, "/completions", {"model": "legal_summary", "prompt": prompts}, f"list-{customer}")
    assert a.status == 200 or is_money_refusal(a), a.raw[:300]
    assert_paid_for(stack, customer, served=1 if a.status == 200 else 0)


def _choices_per_prompt(self: Any, body: dict[str, Any]) -> tuple[int, int]:
    """OpenAI's /v1/completions: a list of prompts gets n (best_of) completions per prompt."""
    n, best_of = body.get("n"), body.get("best_of")
    shown = n if isinstance(n, int) else 1
    billed = max(shown, best_of if isinstance(best_of, int) else 1)
    prompt = body.get("prompt")
    if self.path == "/v1/completions" and isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return shown * len(prompt), billed * len(prompt)
    return shown, billed


def test_completions_prompt_list_is_reserved_per_prompt_like_openai_bills_it(stack: Stack, customer: str) -> None:
    """OpenAI answers a list of 50 prompts with 50 completions, each up to max_tokens: the
    bound must multiply the output cap by the number of prompts, as it does for n."""
    secret = prepaid(stack, customer)
    generous(stack)
    prompts = [f"Q{i}" for i in range(50)]
    with behaving(stack.fakes["p3"], _choices=_choices_per_prompt):
        a = send(stack, secret, "/completions", {"model": "legal_summary", "prompt": prompts, "max_tokens": 100}, f"plist-{customer}")
    assert a.status == 200 or is_money_refusal(a), a.raw[:300]
    # 50 x 100 tokens at $8/M is $0.04: only a cap of at most 25 tokens per prompt fits $0.01.
    assert_paid_for(stack, customer, served=1 if a.status == 200 else 0)


def test_300kb_of_instructions_is_refused_before_the_provider(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack)
    a = send(stack, secret, "/responses", {"model": "support_draft", "input": "hi", "instructions": "x" * 300_000})
    # 300,000 input tokens at most, at the dearest candidate's $0.20/M: $0.06 > $0.01.
    assert is_money_refusal(a), a.raw[:300]
    assert sum(f.calls() for f in stack.fakes.values()) == 0
    assert_paid_for(stack, customer, served=0)


def test_300kb_of_tools_is_refused_before_the_provider(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack)
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": "d" * 3000, "parameters": {"type": "object"}}}
             for i in range(100)]
    a = send(stack, secret, "/chat/completions", {"model": "support_draft", "messages": MESSAGES, "tools": tools})
    assert is_money_refusal(a), a.raw[:300]
    assert sum(f.calls() for f in stack.fakes.values()) == 0
    assert_paid_for(stack, customer, served=0)


def test_300kb_of_instructions_when_affordable_is_charged_within_the_reservation(stack: Stack, customer: str) -> None:
    paid = 100_000  # $0.10 covers the 300 KB prompt at $0.20/M
    secret = prepaid(stack, customer, paid)
    generous(stack)
    a = send(stack, secret, "/responses", {"model": "support_draft", "input": "hi", "instructions": "x" * 300_000}, f"big-{customer}")
    assert a.status == 200, a.raw[:300]
    (rec,) = wait_records(stack, customer, 1)
    assert int(rec["prompt_tokens"]) == len(json.dumps(["hi", "x" * 300_000], separators=(",", ":")))
    assert int(rec["cost_micro_usd"]) <= int(rec["reserved_micro_usd"]) and rec["overrun"] == "false"
    assert_paid_for(stack, customer, paid, served=1)


# --- the leaks of issue 8 -------------------------------------------------------------------------


def test_served_answer_without_usage_is_billed_an_estimate(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack, Reply(completion_tokens=50, prompt_per_byte=True, usage=False))
    a = send(stack, secret, "/chat/completions", {"model": "legal_summary", "messages": MESSAGES}, f"nousage-{customer}")
    assert a.status == 200 and "usage" not in a.json()
    (rec,) = wait_records(stack, customer, 1)
    assert rec["usage_source"] == "estimated"
    assert int(rec["cost_micro_usd"]) > 0 and int(rec["completion_tokens"]) > 0
    assert a.headers["x-tollgate-cost-usd"] != "0.000000"


def test_served_answer_without_usage_spends_its_request_id(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack, Reply(completion_tokens=50, prompt_per_byte=True, usage=False))
    body = {"model": "legal_summary", "messages": MESSAGES}
    assert send(stack, secret, "/chat/completions", body, f"once-{customer}").status == 200
    again = send(stack, secret, "/chat/completions", body, f"once-{customer}")
    assert again.status == 409 and again.json()["error"]["code"] == "duplicate_request"
    assert stack.fakes["p3"].calls() == 1


def test_served_answer_without_usage_never_overdraws(stack: Stack, customer: str) -> None:
    """The estimate from the text must stay within what the cap allowed: an honest provider
    kept to the cap, so billing it more than the reservation overdraws the balance."""
    secret = prepaid(stack, customer)
    generous(stack, Reply(completion_tokens=None, prompt_per_byte=True, usage=False))
    a = send(stack, secret, "/chat/completions", {"model": "legal_summary", "messages": MESSAGES}, f"nu-{customer}")
    assert a.status == 200
    assert_paid_for(stack, customer, served=1)


def _truncated_json(self: Any, status: int, obj: Any, extra: dict[str, str] | None = None, content_type: str = "application/json") -> None:
    """A provider whose 200 answers are cut short: invalid JSON (headers stay consistent)."""
    data = json.dumps(obj).encode()
    if status == 200 and self.path.startswith("/v1/"):
        data = data[: len(data) - 7]
    self.send_response(status)
    self.send_header("content-type", content_type)
    self.send_header("content-length", str(len(data)))
    for k, v in (extra or {}).items():
        self.send_header(k, v)
    self.end_headers()
    self.wfile.write(data)


def test_served_answer_with_malformed_json_is_billed_an_estimate(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack, Reply(completion_tokens=50, prompt_per_byte=True))
    with behaving(stack.fakes["p3"], _send_json=_truncated_json):
        a = send(stack, secret, "/chat/completions", {"model": "legal_summary", "messages": MESSAGES}, f"bad-{customer}")
    assert a.status == 200
    (rec,) = wait_records(stack, customer, 1)
    assert rec["usage_source"] == "estimated" and int(rec["cost_micro_usd"]) > 0


def test_served_answer_with_malformed_json_spends_its_request_id(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack, Reply(completion_tokens=50, prompt_per_byte=True))
    body = {"model": "legal_summary", "messages": MESSAGES}
    with behaving(stack.fakes["p3"], _send_json=_truncated_json):
        assert send(stack, secret, "/chat/completions", body, f"bad1-{customer}").status == 200
        again = send(stack, secret, "/chat/completions", body, f"bad1-{customer}")
    assert again.status == 409 and again.json()["error"]["code"] == "duplicate_request"
    assert stack.fakes["p3"].calls() == 1


def test_served_answer_with_malformed_json_never_overdraws(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack)
    with behaving(stack.fakes["p3"], _send_json=_truncated_json):
        a = send(stack, secret, "/chat/completions", {"model": "legal_summary", "messages": MESSAGES}, f"badx-{customer}")
    assert a.status == 200
    assert_paid_for(stack, customer, served=1)


def test_stream_without_usage_chunk_is_billed_from_its_text_not_per_event(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack, Reply(completion_tokens=200, prompt_per_byte=True, usage=False))
    body = json.dumps({"model": "legal_summary", "messages": MESSAGES, "stream": True}, separators=(",", ":")).encode()
    a = send(stack, secret, "/chat/completions", body, f"sse-{customer}")
    assert a.status == 200
    events = [line for line in a.raw.split(b"\n") if line.startswith(b"data: {")]
    assert len(events) == 200  # one word per event, no usage chunk
    (rec,) = wait_records(stack, customer, 1)
    # The text is "w0 w1 ... w199 ": 10 x 3 + 90 x 4 + 100 x 5 = 890 bytes -> 223 tokens at 4 bytes
    # a token; the prompt is estimated at 4 bytes a token of the body.
    assert rec["usage_source"] == "estimated"
    assert int(rec["completion_tokens"]) == 223
    assert int(rec["prompt_tokens"]) == -(-len(body) // 4)
    assert int(rec["cost_micro_usd"]) == cost(-(-len(body) // 4), 223, LEGAL)


def test_stream_without_usage_chunk_never_overdraws(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack, Reply(completion_tokens=None, prompt_per_byte=True, usage=False))
    a = send(stack, secret, "/chat/completions", {"model": "legal_summary", "messages": MESSAGES, "stream": True}, f"ssex-{customer}")
    assert a.status == 200
    assert_paid_for(stack, customer, served=1)


def test_responses_stream_with_a_completed_event_over_1_mib_is_billed_from_its_usage(stack: Stack, customer: str) -> None:
    paid = 500_000  # the 1.1 MB prompt itself costs ~$0.17 at $0.15/M
    secret = prepaid(stack, customer, paid)
    generous(stack, Reply(completion_tokens=20, prompt_per_byte=True))
    instructions = "x" * 1_150_000
    a = send(stack, secret, "/responses", {"model": "support_draft", "input": "hi", "instructions": instructions, "stream": True},
             f"big-sse-{customer}")
    assert a.status == 200
    completed = [line for line in a.raw.split(b"\n") if line.startswith(b"data: ") and b'"response.completed"' in line]
    assert len(completed) == 1 and len(completed[0]) > 1 << 20
    (rec,) = wait_records(stack, customer, 1)
    prompt = len(json.dumps(["hi", instructions], separators=(",", ":")))  # 1,150,009 bytes
    assert rec["usage_source"] == "provider"
    assert (int(rec["prompt_tokens"]), int(rec["completion_tokens"])) == (prompt, 20)
    assert int(rec["cost_micro_usd"]) == cost(prompt, 20, LOW)
    assert_paid_for(stack, customer, paid, served=1)


def test_dishonest_provider_above_the_cap_is_charged_in_full_and_flagged(stack: Stack, customer: str) -> None:
    """An honest provider cannot overdraw; one that ignores the cap is still charged what it
    billed (the money is owed to it), and the overrun is flagged and counted."""
    secret = prepaid(stack, customer)
    generous(stack, Reply(completion_tokens=3000, prompt_per_byte=True, honour_cap=False))
    before = overruns(stack, "legal_summary", "p3")
    a = send(stack, secret, "/chat/completions", {"model": "legal_summary", "messages": MESSAGES, "max_tokens": 10}, f"liar-{customer}")
    assert a.status == 200 and a.json()["usage"]["completion_tokens"] == 3000
    (rec,) = wait_records(stack, customer, 1)
    p = int(rec["prompt_tokens"])
    assert p == prompt_bytes(forwarded(stack, f"liar-{customer}")[0])
    assert int(rec["cost_micro_usd"]) == cost(p, 3000, LEGAL) == 2 * p + 24_000
    assert rec["overrun"] == "true" and int(rec["reserved_micro_usd"]) < int(rec["cost_micro_usd"])
    assert money(stack, customer)["spend"] == 2 * p + 24_000
    assert money(stack, customer)["reserved"] == 0
    deadline = time.monotonic() + 5
    while overruns(stack, "legal_summary", "p3") < before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert overruns(stack, "legal_summary", "p3") == before + 1


def test_honest_provider_is_never_flagged_as_overrun(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    generous(stack)
    a = send(stack, secret, "/chat/completions", {"model": "legal_summary", "messages": MESSAGES}, f"honest-{customer}")
    assert a.status == 200
    (rec,) = wait_records(stack, customer, 1)
    assert rec["overrun"] == "false" and int(rec["cost_micro_usd"]) <= int(rec["reserved_micro_usd"])


# --- a monthly budget instead of a prepaid balance --------------------------------------------------

BUDGET = 50_000  # $0.05


def budgeted(stack: Stack, customer: str) -> str:
    _, secret = stack.create_key(customer, plan="premium")
    out = subprocess.run([sys.executable, "-m", "extproc.cli", "limits", "set", "--customer", customer, "--monthly-usd", "0.05",
                          "--redis-url", stack.redis.url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return secret


def assert_within_budget(stack: Stack, customer: str, served: int) -> None:
    recs = wait_records(stack, customer, served)
    m = money(stack, customer)
    assert m["spend"] <= BUDGET, f"spent {m['spend']} of a {BUDGET} budget"
    assert (m["reserved"], m["ws_reserved"]) == (0, 0)
    assert list(stack.redis_sync().scan_iter(match=f"tollgate:{{c:{customer}}}:resv:*")) == []
    assert len(recs) == served and sum(int(x["cost_micro_usd"]) for x in recs) == m["spend"]


def test_monthly_budget_without_max_tokens_repeated_until_refused_is_never_exceeded(stack: Stack, customer: str) -> None:
    secret = budgeted(stack, customer)
    generous(stack)
    served = 0
    for _ in range(30):
        a = send(stack, secret, "/chat/completions", {"model": "legal_summary", "messages": MESSAGES})
        if a.status != 200:
            assert is_money_refusal(a), a.raw[:300]
            assert "monthly spend limit" in a.json()["error"]["message"]
            break
        served += 1
    else:
        pytest.fail("a $0.05 budget served 30 uncapped requests at $8/M")
    assert served >= 5  # $0.05 covers five full 1,024-token answers
    assert_within_budget(stack, customer, served)


def test_monthly_budget_without_max_tokens_20_concurrent_is_never_exceeded(stack: Stack, customer: str) -> None:
    secret = budgeted(stack, customer)
    generous(stack)
    start = threading.Barrier(20)

    def one(_: int) -> int:
        start.wait()
        a = send(stack, secret, "/chat/completions", {"model": "legal_summary", "messages": MESSAGES})
        assert a.status == 200 or is_money_refusal(a), (a.status, a.raw[:300])
        return a.status

    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(one, range(20)))
    assert 5 <= statuses.count(200) < 20
    assert_within_budget(stack, customer, statuses.count(200))


def test_stream_meter_finds_usage_in_an_event_over_1_mib_fed_in_small_pieces() -> None:
    """Envoy may hand a huge event over in one piece (the test above) or in many: in pieces the
    meter holds no more than a window of it and still finds its usage."""
    from extproc.stream import StreamMeter

    event = {"type": "response.completed", "response": {"instructions": "x" * 3_000_000, "output": [],
                                                        "usage": {"input_tokens": 7, "output_tokens": 9, "total_tokens": 16}}}
    raw = b"event: response.completed\ndata: " + json.dumps(event).encode() + b"\n\n"
    meter = StreamMeter()
    for i in range(0, len(raw), 16_384):
        assert meter.feed(raw[i:i + 16_384]) == raw[i:i + 16_384]
        assert len(meter._line) <= (1 << 20) + 16_384  # never the whole 3 MB line
    meter.finish()
    assert meter.usage is not None
    assert (meter.usage.prompt_tokens, meter.usage.completion_tokens) == (7, 9)


def read_stream(stack: Stack, secret: str, body: dict[str, Any], request_id: str) -> tuple[int, bool]:
    """Read an SSE answer line by line: (data events seen, whether it ended with [DONE])."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", stack.envoy.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"authorization": f"Bearer {secret}", "content-type": "application/json", "x-request-id": request_id})
    resp = conn.getresponse()
    assert resp.status == 200
    events, done = 0, False
    try:
        for line in resp:
            if line.startswith(b"data: {"):
                events += 1
            done = done or line.startswith(b"data: [DONE]")
    except http.client.IncompleteRead:
        pass
    finally:
        conn.close()
    return events, done


def test_stream_flowing_longer_than_the_provider_timeout_is_not_cut(stack: Stack, customer: str) -> None:
    """SPEC §1 Streaming: bounded by time to first byte and idle time, never cut while flowing.
    p3's timeout_s is 2; this stream flows for ~4 s with 50 ms between chunks."""
    secret = prepaid(stack, customer)
    stack.fakes["p3"].default = Reply(completion_tokens=80, chunk_delay_s=0.05, prompt_per_byte=True)
    events, done = read_stream(stack, secret, {"model": "legal_summary", "messages": MESSAGES, "stream": True}, f"long-{customer}")
    assert (events, done) == (80, True)


def test_long_stream_leaves_one_record_and_nothing_reserved_however_it_ends(stack: Stack, customer: str) -> None:
    secret = prepaid(stack, customer)
    stack.fakes["p3"].default = Reply(completion_tokens=80, chunk_delay_s=0.05, prompt_per_byte=True)
    events, _ = read_stream(stack, secret, {"model": "legal_summary", "messages": MESSAGES, "stream": True}, f"long2-{customer}")
    (rec,) = wait_records(stack, customer, 1)
    assert events > 0 and int(rec["completion_tokens"]) > 0 and int(rec["cost_micro_usd"]) > 0
    assert_paid_for(stack, customer, served=1)


def huge_answer(stack: Stack, customer: str, route: str) -> tuple[Answer, int]:
    """n=128 choices of 11,000 tokens ("[p1] w0 w1 ... w10999", 65,894 bytes each) make a JSON
    answer of ~8.4 MB, past Envoy's 8 MiB buffer. Returns the answer and the prompt tokens."""
    generous(stack, Reply(completion_tokens=11_000, prompt_per_byte=True))
    rid = f"huge-{customer}"
    a = send(stack, prepaid(stack, customer, HUGE_PAID), "/chat/completions",
             {"model": route, "messages": MESSAGES, "n": 128, "max_tokens": 11_000}, rid)
    return a, prompt_bytes(forwarded(stack, rid)[0])


HUGE_PAID = 1_000_000  # 1,408,000 tokens at $0.60/M is $0.8448


@pytest.mark.parametrize("route", ["support_draft", "legal_summary"])
def test_non_stream_answer_over_the_8_mib_buffer_reaches_the_client(stack: Stack, customer: str, route: str) -> None:
    if route == "legal_summary":  # at $8/M the answer costs $11.26
        stack.redis_sync().incrby(Account(customer, "", "").k("balance"), 99 * HUGE_PAID)
    a, _ = huge_answer(stack, customer, route)
    if a.status == 200:
        assert len(a.raw) > 8 * 1024 * 1024 and a.json()["usage"]["completion_tokens"] == 1_408_000
    else:  # the promise allows an OpenAI-shaped error instead
        assert set(a.json()["error"]) == {"message", "type", "param", "code"}, a.raw[:200]


@pytest.mark.parametrize("route", ["support_draft", "legal_summary"])
def test_non_stream_answer_over_the_8_mib_buffer_is_billed_from_its_usage(stack: Stack, customer: str, route: str) -> None:
    price = LOW if route == "support_draft" else LEGAL
    paid = HUGE_PAID if route == "support_draft" else 100 * HUGE_PAID
    if route == "legal_summary":
        stack.redis_sync().incrby(Account(customer, "", "").k("balance"), paid - HUGE_PAID)
    a, p = huge_answer(stack, customer, route)
    (rec,) = wait_records(stack, customer, 1)
    if rec["usage_source"] == "provider":  # it streamed through: billed from its usage
        assert a.status == 200 and (int(rec["prompt_tokens"]), int(rec["completion_tokens"])) == (p, 1_408_000), rec
        assert int(rec["cost_micro_usd"]) == cost(p, 1_408_000, price)
    else:  # Envoy overflowed first: a 502, and the provider's work billed at the cap (never less than its usage)
        assert (a.status, rec["usage_source"], rec["status"]) == (502, "reservation", "502"), rec
        assert int(rec["cost_micro_usd"]) == int(rec["reserved_micro_usd"]) >= cost(p, 1_408_000, price)
    assert_paid_for(stack, customer, paid, served=1)
