"""Timeouts fit generation (issue 10): streams are bounded by silence, never by length;
non-stream attempts get time for their output cap. Real Envoy, processor, Redis, fake providers."""

from __future__ import annotations

import time

import openai
import pytest

from extproc.fakeprovider import Reply
from extproc.quota import request_key
from tests.conftest import Stack
from tests.test_fallback import MESSAGES, call, record


def wait_record(stack: Stack, request_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while not stack.redis_sync().hlen(request_key(request_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return record(stack, request_id)


def stream_words(stack: Stack, secret: str, route: str) -> tuple[list[str], str]:
    client = stack.client(secret)
    with client.chat.completions.with_streaming_response.create(model=route, messages=MESSAGES, stream=True) as resp:
        rid = resp.headers["x-request-id"]
        words = [c.choices[0].delta.content or "" for c in resp.parse() if c.choices]
    return words, rid


@pytest.mark.parametrize("route", ["legal_summary", "support_draft"])  # one attempt; a fallback chain
def test_a_healthy_6s_stream_on_a_2s_provider_is_not_cut(stack: Stack, customer: str, route: str) -> None:
    _, secret = stack.create_key(customer)
    provider = "p3" if route == "legal_summary" else "p1"
    stack.fakes[provider].script(Reply(completion_tokens=13, chunk_delay_s=0.5))  # 12 gaps x 0.5 s = 6 s
    started = time.monotonic()
    words, rid = stream_words(stack, secret, route)
    assert time.monotonic() - started >= 6
    assert len(words) == 13
    rec = wait_record(stack, rid)
    assert (rec["status"], rec["completion_tokens"], rec["usage_source"]) == ("200", "13", "provider")


def test_a_stream_that_stalls_longer_than_the_idle_timeout_is_cut_billed_and_recorded(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    # p3's idle timeout is its timeout_s, 2 s: three chunks, then 10 s of silence.
    stack.fakes["p3"].script(Reply(completion_tokens=4, chunk_delay_s=10))
    client = stack.client(secret)
    started = time.monotonic()
    words: list[str] = []
    with pytest.raises(openai.APIError) as cut, \
            client.chat.completions.with_streaming_response.create(model="legal_summary", messages=MESSAGES, stream=True) as resp:
        rid = resp.headers["x-request-id"]
        words.extend(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
    assert cut.value is not None
    assert time.monotonic() - started < 6  # cut after ~2 s of silence, not after 30 s
    assert words == ["w0 "]
    rec = wait_record(stack, rid)
    assert rec["status"] == "504"
    assert rec["usage_source"] == "estimated" and rec["completion_tokens"] == "1"  # billed for what went out
    assert int(str(rec["cost_micro_usd"])) > 0
    assert [a["reason"] for a in rec["attempt_list"]] == ["timeout"]  # type: ignore[attr-defined]


def test_a_non_stream_attempt_gets_time_for_its_output_cap(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    # p3: timeout_s 2, tokens_per_s 10000: max_tokens 20000 adds 2 s, so a 3 s answer is in time...
    stack.fakes["p3"].script(Reply(delay_s=3))
    assert call(stack, secret, "legal_summary", max_tokens=20000).status == 200
    # ...while the same answer to a small request times out (budget 2.001 s).
    stack.fakes["p3"].script(Reply(delay_s=3))
    res = call(stack, secret, "legal_summary", max_tokens=10)
    assert res.status == 504 and res.headers["x-tollgate-fallback-reason"] == "timeout"


def test_a_stream_waits_for_its_first_byte_no_longer_than_its_ttfb_timeout(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(Reply(delay_s=3))  # no first byte within p3's 2 s
    client = stack.client(secret)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="legal_summary", messages=MESSAGES, stream=True, max_tokens=20000)
    assert exc.value.status_code == 504
    assert time.monotonic() - started < 2.9  # the stream's budget does not grow with max_tokens
