"""Attempt budgets are pure arithmetic on the provider's settings (values computed by hand)."""

from __future__ import annotations

from extproc.policy.model import Provider
from extproc.timeouts import attempt_budget_ms, size_explains_timeout

P = Provider("p", "127.0.0.1", 1, False, timeout_s=30, tokens_per_s=50, ttfb_timeout_s=10)


def test_a_non_stream_attempt_gets_its_output_cap_at_the_provider_rate() -> None:
    assert attempt_budget_ms(P, 1000, stream=False) == 50_000  # 30 s + 1000 / 50 tokens/s


def test_a_stream_attempt_waits_only_for_the_first_byte_whatever_its_size() -> None:
    assert attempt_budget_ms(P, 100_000, stream=True) == 10_000


def test_only_a_non_stream_request_whose_cap_alone_outlasts_timeout_s_explains_its_timeout() -> None:
    assert size_explains_timeout(P, 1501, stream=False)  # 30.02 s of generation > 30 s
    assert not size_explains_timeout(P, 1500, stream=False)  # exactly 30 s
    assert not size_explains_timeout(P, 100_000, stream=True)
