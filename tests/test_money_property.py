"""The money property test of issue 8 (d): random valid and invalid bodies, thrown at the real
gateway (Envoy, the processor, Redis) by a fresh customer per example, and after each example
the invariants that make the money promise:

- a prepaid balance never goes below 0, and spend never exceeds what was topped up;
- a monthly spend never exceeds the budget;
- once idle, nothing is reserved (`reserved` == 0, no `resv:` keys, no index entry, no hint);
- exactly one usage record per request that reached a provider (the fakes record what they
  received, by x-request-id), none for a request that did not;
- no served (200) request at cost 0, and the records add up to the spend.

The providers are honest (they keep to the cap the gateway writes) and generate everything
the cap allows, billing one prompt token per byte. Examples are derandomized and the database
is off, so CI runs the same bounded set every time (well under two minutes).
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from extproc.fakeprovider import Reply
from extproc.quota import Account
from tests.conftest import Stack
from tests.test_money_suite import Answer, forwarded, hints_of, money, records_of, send

ROUTES = ("legal_summary", "support_draft", "embeddings")
PATHS = ("/chat/completions", "/completions", "/responses", "/embeddings")
CAP_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")

# Caps in every field: absent, tiny, ordinary, huge (all valid: the gateway must fit them).
cap_value = st.one_of(st.none(), st.none(), st.integers(1, 20), st.integers(1, 5000), st.sampled_from([10**6, 2**31, 2**53 + 1, 10**30]))
choice_value = st.one_of(st.none(), st.none(), st.integers(1, 4), st.integers(1, 128))
# What a broken body gets wrong (one thing at a time).
DEFECTS = ("truncated", "garbage", "array", "no-model", "bad-cap", "bad-choices", "bad-stream")
bad_cap = st.sampled_from([0, -1, True, 1.5, "100", 1e400])
bad_choices = st.sampled_from([0, 129, 10**9, True, "2", -3])
text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
padding = st.sampled_from([0, 0, 0, 100, 5_000, 30_000])


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """One request body: mostly valid for its endpoint, sometimes broken in one way."""
    path = draw(st.sampled_from(PATHS))
    # The embeddings model costs nothing per output token, so on a chat path the gateway may
    # let it generate a million tokens per choice (free, but the fake would hold them all).
    route = "embeddings" if path == "/embeddings" else draw(st.sampled_from(ROUTES[:2]))
    body: dict[str, Any] = {"model": route}
    pad = "p" * draw(padding)
    if path == "/chat/completions":
        body["messages"] = [{"role": "user", "content": draw(text) + pad}]
    elif path == "/completions":
        body["prompt"] = draw(st.one_of(text.map(lambda t: t + pad), st.lists(text, min_size=1, max_size=60)))
    elif path == "/responses":
        body["input"] = draw(text) + pad
        if draw(st.booleans()):
            body["instructions"] = draw(text)
    else:
        body["input"] = draw(st.one_of(text.map(lambda t: t or "x"), st.lists(text.map(lambda t: t or "x"), min_size=1, max_size=5)))
    if draw(st.integers(0, 4)) == 0:
        body["tools"] = [{"type": "function", "function": {"name": "f", "description": pad or "d", "parameters": {"type": "object"}}}]
    # Embeddings have no output cap; the fake would try to generate a cap sent there anyway.
    for f in CAP_FIELDS if path != "/embeddings" else ():
        v = draw(cap_value)
        if v is not None:
            body[f] = v
    for f in ("n", "best_of"):
        v = draw(choice_value)
        if v is not None:
            body[f] = v
    if path != "/embeddings" and draw(st.booleans()):
        body["stream"] = draw(st.booleans())
        if draw(st.booleans()):
            body["stream_options"] = {"include_usage": draw(st.booleans())}
    defect = draw(st.one_of(st.just(None), st.just(None), st.just(None), st.sampled_from(DEFECTS)))
    if defect == "bad-cap":
        body[draw(st.sampled_from(CAP_FIELDS))] = draw(bad_cap)
    elif defect == "bad-choices":
        body[draw(st.sampled_from(["n", "best_of"]))] = draw(bad_choices)
    elif defect == "bad-stream":
        body["stream"] = draw(st.sampled_from(["yes", 1, None])) if path != "/embeddings" else True
    elif defect == "no-model":
        del body["model"]
    raw = json.dumps(body, ensure_ascii=draw(st.booleans()), separators=(",", ":")).encode()
    if defect == "truncated":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif defect == "garbage":
        raw = draw(st.binary(min_size=1, max_size=64))
    elif defect == "array":
        raw = b"[" + raw + b"]"
    return path.encode() + b"\n" + raw


@dataclass(frozen=True)
class Plan:
    prepaid: bool
    micro: int  # the top-up, or the monthly budget


plans = st.builds(Plan, st.booleans(), st.sampled_from([0, 1, 300, 2_000, 10_000, 20_000]))
replies = st.builds(Reply, completion_tokens=st.one_of(st.none(), st.none(), st.integers(0, 400)), prompt_per_byte=st.just(True),
                    status=st.sampled_from([200] * 8 + [500, 429]))

_made = 0


def customer_for(stack: Stack, plan: Plan) -> tuple[str, str]:
    """A fresh customer with the example's money: a prepaid top-up, or a monthly budget."""
    global _made
    _made += 1
    customer = f"prop-{uuid.uuid4().hex[:10]}-{_made}"
    r = stack.redis_sync()
    if plan.prepaid:
        _, secret = stack.create_key(customer, plan="prepaid")
        r.incrby(Account(customer, "", "").k("balance"), plan.micro)
    else:
        _, secret = stack.create_key(customer, plan="premium")
        r.hset(Account(customer, "", "").k("limits"), "monthly_budget_micro", plan.micro)
    return customer, secret


def fire(stack: Stack, secret: str, customer: str, raws: list[bytes], together: bool) -> dict[str, Answer]:
    """Send every body (one after another, or all at once) under its own request id."""
    def one(i: int) -> tuple[str, Answer]:
        path, _, raw = raws[i].partition(b"\n")
        rid = f"{customer}-{i}"
        return rid, send(stack, secret, path.decode(), raw, rid)

    if together and len(raws) > 1:
        with ThreadPoolExecutor(len(raws)) as pool:
            return dict(pool.map(one, range(len(raws))))
    return dict(one(i) for i in range(len(raws)))


def check_invariants(stack: Stack, customer: str, plan: Plan, answers: dict[str, Answer]) -> None:
    reached = {rid for rid in answers if forwarded(stack, rid)}
    deadline = time.monotonic() + 10
    while {x["request_id"] for x in records_of(stack, customer)} != reached and time.monotonic() < deadline:
        time.sleep(0.05)
    recs = records_of(stack, customer)
    for rid, a in answers.items():
        mine = [x for x in recs if x["request_id"] == rid]
        assert len(mine) == (1 if rid in reached else 0), (rid, a.status, mine)
        if a.status == 200:
            assert rid in reached, f"{rid}: 200 without reaching a provider"
            assert int(mine[0]["cost_micro_usd"]) > 0, f"{rid}: served at cost 0"
        else:
            body = json.loads(a.raw)
            assert set(body["error"]) == {"message", "type", "param", "code"}
    m = money(stack, customer)
    for a in answers.values():
        event(f"status {a.status}")
    if plan.micro:
        target(m["spend"] / plan.micro, label="share of the money spent")
    r = stack.redis_sync()
    assert (m["reserved"], m["ws_reserved"]) == (0, 0)
    assert list(r.scan_iter(match=f"tollgate:{{c:{customer}}}:resv:*")) == []
    assert r.zcard(Account(customer, "", "").k("resv-index")) == 0
    assert hints_of(stack, customer) == []
    assert sum(int(x["cost_micro_usd"]) for x in recs) == m["spend"]
    assert m["spend"] <= plan.micro, f"spent {m['spend']} of {plan.micro}"
    if plan.prepaid:
        assert m["balance"] >= 0 and m["balance"] == plan.micro - m["spend"]


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=plans, reply=replies, raws=st.lists(bodies(), min_size=1, max_size=4), together=st.booleans())
def test_random_bodies_never_break_the_money_invariants(stack: Stack, plan: Plan, reply: Reply, raws: list[bytes], together: bool) -> None:
    for f in stack.fakes.values():
        f.default = reply
    customer, secret = customer_for(stack, plan)
    answers = fire(stack, secret, customer, raws, together)
    check_invariants(stack, customer, plan, answers)


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=plans, raws=st.lists(bodies(), min_size=1, max_size=3), completion=st.one_of(st.none(), st.integers(0, 400)))
def test_answers_without_usage_never_break_the_money_invariants(stack: Stack, plan: Plan, raws: list[bytes], completion: int | None) -> None:
    """The same, with providers that answer without `usage` (billed from an estimate)."""
    for f in stack.fakes.values():
        f.default = Reply(completion_tokens=completion, prompt_per_byte=True, usage=False)
    customer, secret = customer_for(stack, plan)
    answers = fire(stack, secret, customer, raws, together=False)
    check_invariants(stack, customer, plan, answers)
