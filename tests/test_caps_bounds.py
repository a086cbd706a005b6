"""The money cap's arithmetic at its edges (SPEC §1.4): the reservation's rounding, file
parts, mixed tools, the rate estimate, the useful minimum and the cap written into every field
a provider may read. Expected numbers worked out by hand."""

from __future__ import annotations

import json

from extproc.caps import CostBound, cost_bound, input_bound, write_cap
from extproc.policy.model import Model, Price

CHEAP = Model("cheap", "p1", "c-1", "low", Price(150_000, 600_000))
FILES = Model("files", "p1", "f-1", "low", Price(150_000, 600_000), file_part_tokens=5_000)


def bound(input_tokens: int, input_price: int, choices: int = 1, output_price: int = 0) -> CostBound:
    return CostBound(input_tokens=input_tokens, rate_tokens=0, output_tokens=100, min_output_tokens=16, choices=choices,
                     input_price=input_price, output_price=output_price)


def test_reservation_of_whole_micro_dollars_is_exact() -> None:
    assert bound(1_000, 1_000_000).cost_micro(0) == 1_000  # 1,000 tokens at $1/Mtok = 1,000 micro-USD


def test_reservation_rounds_a_fraction_of_a_micro_dollar_up() -> None:
    assert bound(1, 1_000_001).cost_micro(0) == 2  # 1.000001 micro-USD -> 2


def test_reservation_prices_every_choice_of_the_output() -> None:
    assert bound(100, 1_000_000, choices=2, output_price=2_000_000).cost_micro(10) == 140  # 100 + 10 x 2 x 2


def test_a_chat_file_part_adds_its_ceiling() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]}
    size = len(json.dumps(body).encode())
    assert cost_bound("/v1/chat/completions", body, size, 100, [FILES]).input_tokens == size + 5_000


def test_two_responses_file_parts_add_two_ceilings() -> None:
    body = {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f1"}, {"type": "input_file", "file_id": "f2"}]}]}
    size = len(json.dumps(body).encode())
    assert cost_bound("/v1/responses", body, size, 100, [FILES]).input_tokens == size + 10_000


def test_one_provider_run_tool_among_functions_counts_a_whole_context() -> None:
    body = {"input": "q", "tools": [{"type": "function", "name": "f"}, {"type": "web_search_preview"}]}
    size = len(json.dumps(body).encode())
    assert cost_bound("/v1/responses", body, size, 100, [CHEAP]).input_tokens == size + 128_000


def test_an_empty_body_bounds_no_input() -> None:
    assert input_bound(0, 0, 0, [CHEAP]) == 0


def test_rate_estimate_is_the_bytes_over_four_rounded_up() -> None:
    assert cost_bound("/v1/chat/completions", {}, 10, 100, [CHEAP]).rate_tokens == 3  # ceil(10 / 4)


def test_a_cap_below_the_useful_minimum_is_its_own_minimum() -> None:
    b = cost_bound("/v1/chat/completions", {"max_tokens": 10}, 20, 100, [CHEAP])
    assert (b.output_tokens, b.min_output_tokens) == (10, 10)


def test_the_client_field_that_is_honoured_gets_the_cap_and_no_other_is_added() -> None:
    body: dict[str, object] = {"max_tokens": 500}
    write_cap("/v1/chat/completions", body, 300)
    assert body == {"max_tokens": 300}


def test_chat_lowers_both_chat_cap_fields() -> None:
    body: dict[str, object] = {"max_completion_tokens": 500, "max_tokens": 800}
    write_cap("/v1/chat/completions", body, 300)
    assert body == {"max_completion_tokens": 300, "max_tokens": 300}


def test_chat_lowers_a_responses_cap_field_sent_alongside() -> None:
    body: dict[str, object] = {"max_output_tokens": 5_000}
    write_cap("/v1/chat/completions", body, 300)
    assert body == {"max_output_tokens": 300, "max_completion_tokens": 300}


def test_embeddings_get_no_cap_field() -> None:
    body: dict[str, object] = {"input": "x"}
    write_cap("/v1/embeddings", body, 300)
    assert body == {"input": "x"}
