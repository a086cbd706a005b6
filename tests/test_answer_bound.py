"""caps.answer_bytes_bound: the most bytes a non-stream answer can be, which decides whether
Envoy may buffer it whole (json_to_metadata) or the processor must read it. Figures from
config: 256 bytes a token, 8,192 with log probabilities, 160,000 an embedding, 65,536 of
overhead."""

from __future__ import annotations

from extproc.caps import answer_bytes_bound

CHAT = "/v1/chat/completions"


def test_a_chat_answer_is_its_cap_times_its_choices_at_256_bytes_a_token() -> None:
    # 65,536 + 1,000 x 2 x 256
    assert answer_bytes_bound(CHAT, {"n": 2}, 1_000, 2, 500) == 577_536


def test_log_probabilities_make_every_token_8_kib() -> None:
    # 65,536 + 100 x 1 x 8,192
    assert answer_bytes_bound(CHAT, {"logprobs": True}, 100, 1, 500) == 884_736
    assert answer_bytes_bound(CHAT, {"top_logprobs": 5}, 100, 1, 500) == 884_736


def test_the_responses_api_asking_for_log_probabilities_in_include_counts_them() -> None:
    assert answer_bytes_bound("/v1/responses", {"include": ["message.output_text.logprobs"]}, 100, 1, 500) == 884_736


def test_an_echoed_prompt_counts_six_times_its_bytes() -> None:
    # 65,536 + 6 x 1,000 + 10 x 1 x 256
    assert answer_bytes_bound("/v1/completions", {"echo": True}, 10, 1, 1_000) == 74_096


def test_embeddings_count_one_vector_per_input() -> None:
    # 65,536 + 3 x 160,000
    assert answer_bytes_bound("/v1/embeddings", {"input": ["a", "b", "c"]}, 0, 1, 50) == 545_536


def test_a_list_of_token_ids_is_one_embedding_input() -> None:
    assert answer_bytes_bound("/v1/embeddings", {"input": [1, 2, 3]}, 0, 1, 50) == 225_536
