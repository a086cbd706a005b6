"""The money cap's pure parts (SPEC §1.4): what a request may cost, what the provider is told,
what a stream or an answer without usage is billed. Every expected number is worked out by
hand in the test, never by calling the function under test."""

from __future__ import annotations

import json

from extproc import payload
from extproc.caps import cost_bound, write_cap
from extproc.errors import ApiError
from extproc.policy.model import Model, Price
from extproc.stream import StreamMeter

CHEAP = Model("cheap", "p1", "c-1", "low", Price(150_000, 600_000))  # $0.15 / $0.60 per Mtok
DEAR_IN = Model("dear_in", "p2", "d-1", "low", Price(400_000, 500_000))
LIMITED = Model("limited", "p3", "l-1", "low", Price(150_000, 600_000), context_window=1000, max_output_tokens=300)


def bound_of(path: str, body: dict[str, object], candidates: list[Model], default_output: int = 1024) -> tuple[int, int, int, int]:
    raw = json.dumps(body).encode()
    b = cost_bound(path, body, len(raw), default_output, candidates)
    return b.input_tokens, b.output_tokens, b.choices, len(raw)


# --- output: the field each endpoint's provider honours ------------------------------------


def test_chat_reads_max_completion_tokens_before_max_tokens() -> None:
    _, out, _, _ = bound_of("/v1/chat/completions", {"max_completion_tokens": 7, "max_tokens": 9000}, [CHEAP])
    assert out == 7


def test_completions_read_max_tokens_not_max_completion_tokens() -> None:
    _, out, _, _ = bound_of("/v1/completions", {"max_completion_tokens": 1, "max_tokens": 50000}, [CHEAP])
    assert out == 50000


def test_responses_read_max_output_tokens_not_max_tokens() -> None:
    _, out, _, _ = bound_of("/v1/responses", {"max_tokens": 1, "max_output_tokens": 50000}, [CHEAP])
    assert out == 50000


def test_no_cap_sent_means_the_routes_default() -> None:
    _, out, _, _ = bound_of("/v1/chat/completions", {"messages": []}, [CHEAP], default_output=256)
    assert out == 256


def test_a_models_max_output_tokens_lowers_the_cap() -> None:
    _, out, _, _ = bound_of("/v1/chat/completions", {"max_tokens": 5000}, [CHEAP, LIMITED])
    assert out == 300


def test_n_and_best_of_multiply_the_output() -> None:
    assert bound_of("/v1/chat/completions", {"n": 20}, [CHEAP])[2] == 20
    assert bound_of("/v1/completions", {"n": 2, "best_of": 5}, [CHEAP])[2] == 5


def test_each_prompt_of_a_completions_list_gets_its_own_choices() -> None:
    assert bound_of("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2}, [CHEAP])[2] == 6
    assert bound_of("/v1/completions", {"prompt": [[1, 2], [3]]}, [CHEAP])[2] == 2
    assert bound_of("/v1/completions", {"prompt": [1, 2, 3]}, [CHEAP])[2] == 1  # one tokenised prompt


def test_embeddings_have_no_output() -> None:
    _, out, _, _ = bound_of("/v1/embeddings", {"input": "hello", "max_tokens": 50}, [CHEAP])
    assert out == 0


# --- input: every byte counts --------------------------------------------------------------


def test_input_bound_is_the_whole_body_in_bytes() -> None:
    body: dict[str, object] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "instructions": "x" * 1000, "tools": [{"a": "é" * 10}]}
    inp, _, _, size = bound_of("/v1/chat/completions", body, [CHEAP])
    assert inp == size  # instructions and tools are in it, not only messages


def test_every_image_part_adds_its_ceiling() -> None:
    body: dict[str, object] = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                       {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                                                       {"type": "image_url", "image_url": {"url": "https://x/z.png"}}]}]}
    inp, _, _, size = bound_of("/v1/chat/completions", body, [CHEAP])
    assert inp == size + 2 * 2048


def test_context_window_caps_the_input_bound() -> None:
    inp, _, _, _ = bound_of("/v1/chat/completions", {"messages": [{"content": "x" * 5000}]}, [LIMITED])
    assert inp == 1000


def test_context_the_body_does_not_carry_counts_a_whole_context_window() -> None:
    """previous_response_id: the provider bills the earlier conversation too."""
    inp, _, _, size = bound_of("/v1/responses", {"input": "more", "previous_response_id": "resp_1"}, [CHEAP])
    assert inp == size + 128_000
    inp, _, _, _ = bound_of("/v1/responses", {"input": "more", "previous_response_id": "resp_1"}, [LIMITED])
    assert inp == 1000  # its own window: at most 1,000


def test_tools_the_provider_runs_count_a_whole_context_but_functions_do_not() -> None:
    inp, _, _, size = bound_of("/v1/responses", {"input": "q", "tools": [{"type": "web_search_preview"}]}, [CHEAP])
    assert inp == size + 128_000
    inp, _, _, size = bound_of("/v1/responses", {"input": "q", "tools": [{"type": "function", "name": "f"}]}, [CHEAP])
    assert inp == size


def test_input_bound_is_the_largest_over_candidates() -> None:
    """One candidate has a window of 1,000, the other none: the other's bound wins."""
    inp, _, _, size = bound_of("/v1/chat/completions", {"messages": [{"content": "x" * 5000}]}, [LIMITED, CHEAP])
    assert inp == size


def test_reservation_is_priced_at_the_dearest_price_of_each_kind() -> None:
    raw = b'{"max_tokens": 100}'  # 19 bytes
    b = cost_bound("/v1/chat/completions", json.loads(raw), 19, 1024, [CHEAP, DEAR_IN])
    # 19 input tokens x 400,000 + 100 output tokens x 600,000 = 67,600,000 micro-USD per Mtok
    assert b.cost_micro(100) == 68  # ceil(67.6)


# --- writing the cap into the forwarded body -----------------------------------------------


def test_cap_is_written_into_the_honoured_field_when_none_was_sent() -> None:
    body: dict[str, object] = {"messages": []}
    write_cap("/v1/chat/completions", body, 40)
    assert body == {"messages": [], "max_completion_tokens": 40}


def test_cap_replaces_a_larger_value_and_lowers_every_other_cap_field() -> None:
    body: dict[str, object] = {"max_completion_tokens": 1, "max_tokens": 50000}
    write_cap("/v1/completions", body, 30)
    assert body == {"max_completion_tokens": 1, "max_tokens": 30}


def test_responses_cap_goes_to_max_output_tokens() -> None:
    body: dict[str, object] = {"max_tokens": 1, "max_output_tokens": 50000}
    write_cap("/v1/responses", body, 12)
    assert body == {"max_tokens": 1, "max_output_tokens": 12}


def test_rewritten_body_carries_the_cap() -> None:
    parsed = payload.parse_request("/v1/chat/completions", b'{"model":"r","messages":[{"role":"user","content":"x"}]}')
    assert not isinstance(parsed, ApiError)
    body = json.loads(payload.rewrite_body(parsed, "/v1/chat/completions", "up", 77))
    assert body["max_completion_tokens"] == 77 and body["model"] == "up"


def test_n_out_of_range_is_400() -> None:
    for bad in (b'{"model":"m","messages":[{}],"n":0}', b'{"model":"m","messages":[{}],"n":129}',
                b'{"model":"m","prompt":"x","best_of":true}'):
        path = "/v1/completions" if b"prompt" in bad else "/v1/chat/completions"
        err = payload.parse_request(path, bad)
        assert isinstance(err, ApiError) and err.status == 400, bad


# --- what is billed when usage is missing ----------------------------------------------------


def test_missing_usage_is_estimated_from_text_at_four_bytes_a_token() -> None:
    assert payload.estimated_usage(10, 41) == payload.Usage(10, 11)  # ceil(41 / 4)


def test_stream_meter_counts_generated_text_not_events() -> None:
    m = StreamMeter()
    for word in ("hello ", "wörld "):  # 6 + 7 bytes of text
        m.feed(b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"'
               + word.encode() + b'"}}]}\n\n')
    m.feed(b"data: [DONE]\n\n")
    assert m.usage is None and m.text == 13


# --- streams: the usage chunk the client did not ask for -----------------------------------

CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n'


def test_usage_chunk_is_removed_and_no_chunk_carries_usage_when_not_asked() -> None:
    m = StreamMeter(strip_usage=True)
    out = m.feed(CHUNK + USAGE + b"data: [DONE]\n\n") + m.finish()
    assert out == b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'
    assert m.usage == payload.Usage(7, 3)


def test_usage_chunk_passes_unchanged_when_the_client_asked() -> None:
    m = StreamMeter(strip_usage=False)
    assert m.feed(CHUNK + USAGE) == CHUNK + USAGE


def test_an_event_split_across_chunks_is_stripped_whole() -> None:
    m = StreamMeter(strip_usage=True)
    data = CHUNK + USAGE + b"data: [DONE]\n\n"
    out = b"".join(m.feed(data[i:i + 7]) for i in range(0, len(data), 7)) + m.finish()
    assert out == b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'
    assert m.usage == payload.Usage(7, 3)


def test_usage_of_a_responses_event_larger_than_a_mebibyte_is_found() -> None:
    m = StreamMeter()
    text = "x" * (3 << 20)
    event = {"type": "response.completed", "response": {"output": [{"content": [{"text": text}]}],
                                                        "usage": {"input_tokens": 5, "output_tokens": 786432}, "metadata": {}}}
    data = b"event: response.completed\ndata: " + json.dumps(event).encode() + b"\n\n"
    for i in range(0, len(data), 65536):
        m.feed(data[i:i + 65536])
    m.finish()
    assert m.usage == payload.Usage(5, 786432)


def test_usage_text_inside_a_string_is_not_mistaken_for_usage() -> None:
    m = StreamMeter(json_body=True)
    fake = json.dumps({"choices": [{"text": '"usage": {"prompt_tokens": 1, "completion_tokens": 1}'}],
                       "usage": {"prompt_tokens": 9, "completion_tokens": 4}}).encode()
    m.feed(fake[:20])
    m.feed(fake[20:])
    m.finish()
    assert m.usage == payload.Usage(9, 4)
