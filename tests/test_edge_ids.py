"""Request ids are scoped per customer: idempotency (409 only for the same customer) and
`tollgate explain` (one record per customer; `--customer` when an id is ambiguous).
Real Envoy, processor and Redis."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import Stack

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


def explain(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extproc.cli", "explain", *args, "--redis-url", stack.redis.url],
                          capture_output=True, text=True, timeout=30)


def serve(stack: Stack, customer: str, request_id: str) -> None:
    _, secret = stack.create_key(customer)
    stack.client(secret, default_headers={"x-request-id": request_id}).chat.completions.create(
        model="support_draft", messages=MESSAGES)


def test_another_customer_may_reuse_a_request_id(stack: Stack, customer: str) -> None:
    rid = f"shared-{customer}"
    serve(stack, customer, rid)
    serve(stack, customer + "-other", rid)  # no 409: a different customer
    assert stack.fakes["p1"].calls() == 2


def test_the_same_customer_reusing_a_served_id_is_still_409(stack: Stack, customer: str) -> None:
    rid = f"again-{customer}"
    serve(stack, customer, rid)
    with pytest.raises(openai.ConflictError):
        serve(stack, customer, rid)


def test_explain_with_customer_shows_that_customers_record(stack: Stack, customer: str) -> None:
    rid = f"explain-{customer}"
    serve(stack, customer, rid)
    serve(stack, customer + "-other", rid)
    for who in (customer, customer + "-other"):
        out = explain(stack, rid, "--customer", who, "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["customer_id"] == who


def test_explain_of_an_ambiguous_id_lists_the_customers_and_exits_1(stack: Stack, customer: str) -> None:
    rid = f"ambiguous-{customer}"
    serve(stack, customer, rid)
    serve(stack, customer + "-other", rid)
    out = explain(stack, rid)
    assert out.returncode == 1
    assert customer in out.stderr and customer + "-other" in out.stderr and "--customer" in out.stderr


def test_explain_of_an_id_one_customer_used_needs_no_customer(stack: Stack, customer: str) -> None:
    rid = f"single-{customer}"
    serve(stack, customer, rid)
    out = explain(stack, rid)
    assert out.returncode == 0, out.stderr
    assert f"customer {customer}," in out.stdout


def test_explain_json_gives_numbers_as_numbers(stack: Stack, customer: str) -> None:
    rid = f"json-{customer}"
    serve(stack, customer, rid)
    rec = json.loads(explain(stack, rid, "--json").stdout)
    for f in ("ts", "attempts", "status", "prompt_tokens", "completion_tokens", "cost_micro_usd", "retry_cost_micro_usd",
              "reserved_micro_usd", "latency_ms"):
        assert type(rec[f]) is int, f
    assert rec["status"] == 200 and rec["attempts"] == 1
    assert rec["stream"] is False
