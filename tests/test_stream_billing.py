"""Streams and large answers as OpenAI clients see them, and what they are billed (SPEC §1
"Streaming", §1.4), through real Envoy, Redis and the openai SDK."""

from __future__ import annotations

import json
import time
from typing import Any

from openai.types.chat import ChatCompletionMessageParam

from extproc.fakeprovider import Reply
from tests.conftest import Stack, post_raw
from tests.test_quota import records_of

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]


def one_record(stack: Stack, customer: str) -> dict[str, Any]:
    """The customer's only usage record (published just after the reply: wait for it)."""
    deadline = time.monotonic() + 20
    while not (recs := records_of(stack, customer)) and time.monotonic() < deadline:
        time.sleep(0.05)
    (rec,) = recs
    return rec


def test_the_standard_streaming_loop_reads_choices_of_every_chunk(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].default = Reply(completion_tokens=4)
    text = ""
    for chunk in stack.client(secret).chat.completions.create(model="support_draft", messages=MESSAGES, stream=True):
        text += chunk.choices[0].delta.content or ""  # IndexError if a usage-only chunk came through
        assert chunk.usage is None
    assert text.split() == ["[p1]", "w0", "w1", "w2", "w3"] or text.split() == ["w0", "w1", "w2", "w3"]


def test_a_completions_stream_loop_reads_choices_of_every_chunk(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].default = Reply(completion_tokens=3)
    chunks = list(stack.client(secret).completions.create(model="support_draft", prompt="Say hi", stream=True))
    assert [c.choices[0].text for c in chunks] == ["w0 ", "w1 ", "w2 "]


def test_a_client_that_asks_for_the_usage_chunk_gets_it(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].default = Reply(completion_tokens=2, prompt_tokens=11)
    chunks = list(stack.client(secret).chat.completions.create(model="support_draft", messages=MESSAGES, stream=True,
                                                               stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (11, 2)


def test_a_stream_is_billed_from_the_usage_chunk_the_client_did_not_see(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].default = Reply(completion_tokens=5, prompt_tokens=1000)
    list(stack.client(secret).chat.completions.create(model="support_draft", messages=MESSAGES, stream=True))
    rec = one_record(stack, customer)
    # low_cost_chat: (1,000 x 150,000 + 5 x 600,000) micro-USD per Mtok = 153,000,000 / 1e6 = 153 micro-USD
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["cost_micro_usd"], rec["usage_source"]) == ("1000", "5", "153", "provider")


def test_a_stream_without_usage_is_billed_from_its_text_not_per_event(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].default = Reply(completion_tokens=40, usage=False)
    list(stack.client(secret).chat.completions.create(model="support_draft", messages=MESSAGES, stream=True))
    rec = one_record(stack, customer)
    # 40 deltas "w0 ".."w39 ": 10 x 3 bytes + 30 x 4 bytes = 150 bytes of text -> ceil(150 / 4) = 38 tokens
    assert (rec["completion_tokens"], rec["usage_source"]) == ("38", "estimated")


def test_responses_stream_is_billed_from_response_completed(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].default = Reply(completion_tokens=3, prompt_tokens=21)
    events = list(stack.client(secret).responses.create(model="support_draft", input="hi", stream=True))
    assert [e.type for e in events] == ["response.created", *["response.output_text.delta"] * 3, "response.completed"]
    rec = one_record(stack, customer)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["stream"]) == ("21", "3", "true")


def test_a_json_answer_larger_than_the_buffer_is_delivered_or_refused_in_openai_shape_and_billed(stack: Stack, customer: str) -> None:
    """100 choices of 20,000 words: ~12 MB, more than Envoy's 8 MiB buffer. Whether Envoy can
    still switch the answer to streaming depends on how fast the provider sends it: the client
    gets the answer (billed from its usage) or a 502 in OpenAI's shape (billed at the cap)."""
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].default = Reply(completion_tokens=20_000, prompt_tokens=10)
    body = json.dumps({"model": "support_draft", "messages": MESSAGES, "n": 100, "max_tokens": 20_000}).encode()
    status, answer = post_raw(f"{stack.base_url}/chat/completions", body, secret, timeout=60)
    rec = one_record(stack, customer)
    if status == 200:
        assert len(answer["choices"]) == 100
        # (10 x 150,000 + 2,000,000 x 600,000) / 1e6 = 1,200,001.5 -> rounded up: 1,200,002 micro-USD
        assert (rec["completion_tokens"], rec["cost_micro_usd"], rec["status"]) == ("2000000", "1200002", "200")
    else:
        assert status == 502 and answer["error"]["code"] == "upstream_unavailable"
        assert (rec["status"], rec["usage_source"]) == ("502", "reservation")
        assert rec["cost_micro_usd"] == rec["reserved_micro_usd"] and int(rec["cost_micro_usd"]) >= 1_200_002


def test_an_answer_without_usage_is_billed_an_estimate_and_its_id_counts_as_served(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].default = Reply(completion_tokens=4, usage=False)
    body = json.dumps({"model": "support_draft", "messages": MESSAGES}).encode()
    status, _ = post_raw(f"{stack.base_url}/chat/completions", body, secret, headers={"x-request-id": f"{customer}-once"})
    assert status == 200
    rec = one_record(stack, customer)
    # content "[p1] w0 w1 w2 w3" = 16 bytes -> 4 tokens
    assert (rec["completion_tokens"], rec["usage_source"]) == ("4", "estimated") and int(rec["cost_micro_usd"]) > 0
    again, err = post_raw(f"{stack.base_url}/chat/completions", body, secret, headers={"x-request-id": f"{customer}-once"})
    assert again == 409 and err["error"]["code"] == "duplicate_request"
