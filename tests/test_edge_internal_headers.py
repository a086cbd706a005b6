"""Internal headers across the gateway's edges, end to end through Envoy and the processor:
a client's `x-envoy-*` control headers never steer Envoy nor reach a provider, a provider's
`x-tollgate-*` headers never reach the client, and a rate-limit refusal's Retry-After is the
wait rounded up (whichever filter does the stripping)."""

from __future__ import annotations

import json
import time

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from extproc.fakeprovider import Reply
from tests.conftest import Stack
from tests.test_quota import tollgate

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
# Envoy's router obeys these on a request from a trusted (here: loopback) client.
ENVOY_CONTROL = {"x-envoy-max-retries": "3", "x-envoy-retry-on": "5xx,reset", "x-envoy-upstream-rq-timeout-ms": "50",
                 "x-envoy-upstream-rq-per-try-timeout-ms": "50", "x-envoy-hedge-on-per-try-timeout": "true"}


def test_client_envoy_retry_headers_do_not_make_envoy_retry(stack: Stack, customer: str) -> None:
    """legal_summary fails closed on a 5xx after one attempt; the client's retry headers
    would give it four."""
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(Reply(status=500))  # then the default: 200
    client = stack.client(secret, default_headers=ENVOY_CONTROL)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="legal_summary", messages=MESSAGES)
    assert info.value.status_code == 502
    assert stack.fakes["p3"].calls() == 1


def test_client_envoy_timeout_headers_do_not_cut_a_slow_answer(stack: Stack, customer: str) -> None:
    """A 50 ms timeout from the client would turn this 300 ms answer into a 504."""
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(Reply(delay_s=0.3))
    raw = stack.client(secret, default_headers=ENVOY_CONTROL).chat.completions.with_raw_response.create(
        model="legal_summary", messages=MESSAGES)
    assert raw.status_code == 200
    assert stack.fakes["p3"].calls() == 1


def test_client_envoy_headers_never_reach_the_provider(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.client(secret, default_headers=ENVOY_CONTROL).chat.completions.create(model="legal_summary", messages=MESSAGES)
    (received,) = stack.fakes["p3"].requests
    assert [k for k in received.headers if k.startswith("x-envoy-")] == []


def test_provider_sent_tollgate_headers_never_reach_the_client(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(Reply(headers={"x-tollgate-debug": "provider-says", "x-tollgate-customer": "someone-else"}))
    raw = stack.client(secret).chat.completions.with_raw_response.create(model="legal_summary", messages=MESSAGES)
    assert "x-tollgate-debug" not in raw.headers
    assert raw.headers["x-tollgate-customer"] == customer


def test_retry_after_is_the_wait_rounded_up_to_whole_seconds(stack: Stack, customer: str) -> None:
    """One request a minute: a second request t ms later must wait 60,000 - t ms, which is
    60 whole seconds for any 0 < t < 1,000 (rounded down it would say 59)."""
    out = tollgate(stack, "keys", "create", "--customer", customer, "--workspace", "w", "--plan", "premium", "--rpm", "1", "--json")
    client = stack.client(json.loads(out.stdout)["secret"])
    started = time.monotonic()
    client.chat.completions.create(model="support_draft", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="support_draft", messages=MESSAGES)
    if time.monotonic() - started >= 0.9:
        pytest.skip("the machine was too slow: the two requests were not within one second")
    assert info.value.response.headers["retry-after"] == "60"
