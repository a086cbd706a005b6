"""Hostile and buggy providers against the two-message path (issue 12): every answer a provider
serves is billed, from usage both Envoy's json_to_metadata and the processor read the same way,
or from an estimate - never at 0 and never below what the provider reported.

Route `legal_summary` (one attempt, provider p3, model strong_reasoning) costs by hand
2 micro-USD per input token and 8 per output token."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from extproc.fakeprovider import Reply
from tests.conftest import Stack, post_raw

ROUTE = "legal_summary"


def chat_answer(usage: str, text: str = "hello there") -> str:
    """A chat completion whose `usage` is the given JSON text, exactly."""
    return ('{"id":"chatcmpl-x","object":"chat.completion","created":0,"model":"o3","choices":[{"index":0,'
            f'"message":{{"role":"assistant","content":{json.dumps(text)}}},"finish_reason":"stop"}}],"usage":{usage}}}')


def records_of(stack: Stack, customer: str, settle: bool = True) -> list[dict[str, str]]:
    """The customer's usage records once its answers have settled (`settle=False`: as now)."""
    if settle:
        stack.settled(customer)
    out = []
    for _, fields in stack.redis_sync().xrange("tollgate:usage"):
        rec = {k.decode(): v.decode() for k, v in fields.items()}
        if rec.get("customer_id") == customer and rec.get("kind") != "credit":
            out.append(rec)
    return out


def the_record(stack: Stack, customer: str, timeout: float = 10) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while not (recs := records_of(stack, customer)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(recs) == 1, recs
    return recs[0]


def ask(stack: Stack, customer: str, reply: Reply, **extra: Any) -> tuple[int, Any, dict[str, str]]:
    """One chat request answered by `reply`: (status, body, its usage record)."""
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(reply)
    body = json.dumps({"model": ROUTE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, **extra}).encode()
    status, answer = post_raw(f"{stack.base_url}/chat/completions", body, secret, {"x-request-id": uuid.uuid4().hex})
    return status, answer, the_record(stack, customer)


def billed_as_reported(rec: dict[str, str], prompt: int, completion: int) -> None:
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (str(prompt), str(completion))
    assert rec["cost_micro_usd"] == str(2 * prompt + 8 * completion)
    assert rec["usage_source"] == "provider"


def billed_an_estimate(rec: dict[str, str]) -> None:
    assert rec["usage_source"] == "estimated", rec
    assert int(rec["cost_micro_usd"]) > 0
    assert int(rec["completion_tokens"]) > 0


# --- usage values json_to_metadata and Python could read differently --------------------------

def test_usage_given_as_strings_is_billed_from_an_estimate(stack: Stack, customer: str) -> None:
    """Envoy's NUMBER type would turn "0" into 0 while Python refuses strings: no reading of
    them may bill a served answer at 0."""
    status, _, rec = ask(stack, customer, Reply(raw_body=chat_answer('{"prompt_tokens":"0","completion_tokens":"0"}')))
    assert status == 200
    billed_an_estimate(rec)


def test_usage_given_as_booleans_is_billed_from_an_estimate(stack: Stack, customer: str) -> None:
    """`true` is not a count (Python's bool is an int, Envoy's NUMBER makes it 1)."""
    status, _, rec = ask(stack, customer, Reply(raw_body=chat_answer('{"prompt_tokens":true,"completion_tokens":true}')))
    assert status == 200
    billed_an_estimate(rec)


def test_fractional_usage_is_billed_from_an_estimate(stack: Stack, customer: str) -> None:
    status, _, rec = ask(stack, customer, Reply(raw_body=chat_answer('{"prompt_tokens":7.5,"completion_tokens":3.5}')))
    assert status == 200
    billed_an_estimate(rec)


def test_negative_usage_is_billed_from_an_estimate(stack: Stack, customer: str) -> None:
    """A negative count is no count: clamping it to 0 would bill the answer below its usage."""
    status, _, rec = ask(stack, customer, Reply(raw_body=chat_answer('{"prompt_tokens":-1000,"completion_tokens":-5}')))
    assert status == 200
    billed_an_estimate(rec)


def test_usage_beyond_exact_floats_is_billed_from_an_estimate(stack: Stack, customer: str) -> None:
    status, _, rec = ask(stack, customer, Reply(raw_body=chat_answer('{"prompt_tokens":1e30,"completion_tokens":1e30}')))
    assert status == 200
    billed_an_estimate(rec)


def test_integer_usage_beyond_exact_floats_is_billed_from_an_estimate(stack: Stack, customer: str) -> None:
    """Envoy reads 10**30 as an inexact double, Python as an exact int: neither may bill it."""
    status, _, rec = ask(stack, customer, Reply(raw_body=chat_answer('{"prompt_tokens":1' + "0" * 30 + ',"completion_tokens":1}')))
    assert status == 200
    billed_an_estimate(rec)


def test_null_prompt_tokens_are_billed_from_an_estimate(stack: Stack, customer: str) -> None:
    status, _, rec = ask(stack, customer, Reply(raw_body=chat_answer('{"prompt_tokens":null,"completion_tokens":5}')))
    assert status == 200
    billed_an_estimate(rec)


def test_duplicated_usage_key_is_billed_from_the_one_the_client_reads(stack: Stack, customer: str) -> None:
    """`{"usage":{small},...,"usage":{real}}`: the client's JSON parser (Python's, the SDK's)
    keeps the last copy; the bill must follow what the client sees, not a decoy."""
    raw = chat_answer('{"prompt_tokens":1,"completion_tokens":1}')[:-1] + ',"usage":{"prompt_tokens":40,"completion_tokens":30}}'
    status, answer, rec = ask(stack, customer, Reply(raw_body=raw))
    assert status == 200 and answer["usage"]["completion_tokens"] == 30
    billed_as_reported(rec, 40, 30)


def test_usage_without_completion_tokens_bills_the_generated_text(stack: Stack, customer: str) -> None:
    """A chat answer with text but usage naming only its prompt: 0 output tokens would serve
    the text for free."""
    status, _, rec = ask(stack, customer, Reply(raw_body=chat_answer('{"prompt_tokens":40}', text="word " * 200)))
    assert status == 200
    assert int(rec["completion_tokens"]) > 0
    assert int(rec["cost_micro_usd"]) > 2 * 40


def test_usage_only_under_response_is_read(stack: Stack, customer: str) -> None:
    raw = ('{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}],'
           '"response":{"usage":{"prompt_tokens":11,"completion_tokens":13}}}')
    status, _, rec = ask(stack, customer, Reply(raw_body=raw))
    assert status == 200
    billed_as_reported(rec, 11, 13)


# --- how the answer is framed ----------------------------------------------------------------

FRAMINGS = {
    "charset": Reply(content_type="application/json; charset=utf-8"),
    "upper_case": Reply(content_type="Application/JSON"),
    "text_json": Reply(content_type="text/json"),
    "no_content_type": Reply(content_type=""),
    "chunked": Reply(chunked=True),
    "chunked_no_content_type": Reply(chunked=True, content_type=""),
}


@pytest.mark.parametrize("framing", sorted(FRAMINGS))
def test_answer_framing_does_not_change_the_bill(stack: Stack, customer: str, framing: str) -> None:
    """The fake reports 8 completion tokens and about a quarter of the prompt's characters."""
    status, answer, rec = ask(stack, customer, FRAMINGS[framing])
    assert status == 200
    billed_as_reported(rec, answer["usage"]["prompt_tokens"], 8)


def test_gzip_answer_is_billed_not_free(stack: Stack, customer: str) -> None:
    """Neither Envoy nor the processor reads a gzip body's usage: it is billed from an
    estimate, within the reservation."""
    status, _, rec = ask(stack, customer, Reply(gzip=True))
    assert status == 200
    assert int(rec["cost_micro_usd"]) > 0
    assert int(rec["cost_micro_usd"]) <= int(rec["reserved_micro_usd"])


# --- answers larger than Envoy's buffer ------------------------------------------------------

def test_oversized_answer_from_a_provider_ignoring_the_cap_is_delivered_and_billed_from_its_usage(stack: Stack, customer: str) -> None:
    """max_tokens 50 looks small, so the processor did not flag the answer as big; the
    provider ignores the cap and sends > 8 MiB with its content-length. Provider routes let
    Envoy buffer an answer up to 64 MiB (config.ANSWER_BUFFER_LIMIT_BYTES), so json_to_metadata
    reads its usage instead of overflowing where the processor would never see it."""
    status, answer, rec = ask(stack, customer, Reply(honour_cap=False, completion_tokens=1_200_000))
    assert status == 200
    billed_as_reported(rec, answer["usage"]["prompt_tokens"], 1_200_000)
    assert rec["overrun"] == "true"


def test_oversized_chunked_json_answer_from_a_provider_ignoring_the_cap_is_delivered_and_billed_from_its_usage(
        stack: Stack, customer: str) -> None:
    """The same answer in chunked encoding (no content-length): within the 64 MiB a provider
    route lets Envoy buffer, json_to_metadata reads its usage. (Beyond it, the overflow would
    still be lost to the processor: see the README's money notes.)"""
    status, answer, rec = ask(stack, customer, Reply(honour_cap=False, completion_tokens=1_200_000, chunked=True))
    assert status == 200
    billed_as_reported(rec, answer["usage"]["prompt_tokens"], 1_200_000)
    assert rec["overrun"] == "true"


def test_oversized_chunked_answer_without_content_type_is_delivered_and_billed_from_its_usage(stack: Stack, customer: str) -> None:
    """No content type (json_to_metadata skips it) and no content-length: asking Envoy to
    buffer it whole for its usage would overflow (a 502, a 504 or a reset, by timing); it is
    metered as it passes instead."""
    status, answer, rec = ask(stack, customer, Reply(honour_cap=False, completion_tokens=1_200_000, chunked=True, content_type=""))
    assert status == 200
    billed_as_reported(rec, answer["usage"]["prompt_tokens"], 1_200_000)


def test_big_answer_without_content_type_streams_through_and_is_billed_from_usage(stack: Stack, customer: str) -> None:
    """max_tokens large enough that the answer may exceed the buffer: the processor meters it
    chunk by chunk even when the provider names no content type and no length."""
    reply = Reply(completion_tokens=600_000, chunked=True, content_type="")
    status, answer, rec = ask(stack, customer, reply, max_tokens=600_000, n=2)  # 2 x ~4.7 MB
    assert status == 200 and len(answer["choices"]) == 2
    billed_as_reported(rec, answer["usage"]["prompt_tokens"], 1_200_000)


def test_answer_whose_body_outlasts_the_time_budget_is_not_served_free(stack: Stack, customer: str) -> None:
    """The provider sends its 200 headers at once, then the JSON body slowly (3 s, past p3's
    2 s budget) while json_to_metadata holds the headers: whatever the client gets, a
    provider that answered is never billed 0 with nothing reserved left."""
    status, answer, rec = ask(stack, customer, Reply(chunked=True, chunk_delay_s=1.0))
    if status == 200:
        billed_as_reported(rec, answer["usage"]["prompt_tokens"], 8)
    else:
        assert set(answer["error"]) == {"message", "type", "param", "code"}
        assert int(rec["cost_micro_usd"]) > 0, rec


def test_client_leaving_after_the_provider_answered_is_billed_at_the_reservation(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(Reply(chunked=True, chunk_delay_s=1.0))
    body = json.dumps({"model": ROUTE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}).encode()
    with pytest.raises(OSError):  # the client gives up 1.5 s in: headers were sent at once, the body takes 3 s
        post_raw(f"{stack.base_url}/chat/completions", body, secret, {"x-request-id": uuid.uuid4().hex}, timeout=1.5)
    rec = the_record(stack, customer)
    assert int(rec["cost_micro_usd"]) == int(rec["reserved_micro_usd"]) > 0, rec
