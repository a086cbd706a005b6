"""The policy model's own arithmetic: the bill of one call (integer micro-USD, rounded up) and a
route's attempt cap. Worked by hand."""

from __future__ import annotations

from extproc.decide import KeyInfo
from extproc.policy.model import Price, Route, RouteFallback


def test_a_call_costs_prompt_and_completion_at_their_prices() -> None:
    # 1,000 x $0.15/Mtok + 500 x $0.60/Mtok = 150 + 300 micro-USD
    assert Price(150_000, 600_000).cost_micro(1_000, 500) == 450


def test_a_call_costing_a_fraction_of_a_micro_dollar_costs_one() -> None:
    assert Price(1, 0).cost_micro(1, 0) == 1  # 1e-6 micro-USD, rounded up


def test_a_call_costing_just_over_one_micro_dollar_costs_two() -> None:
    assert Price(1_000_001, 0).cost_micro(1, 0) == 2  # 1.000001 micro-USD, rounded up


def test_a_free_call_costs_nothing() -> None:
    assert Price(150_000, 600_000).cost_micro(0, 0) == 0


def test_a_key_stored_without_a_status_is_active() -> None:
    assert KeyInfo("k1", "acme", "w", "premium").active is True


def test_a_route_naming_no_max_attempts_makes_one_attempt() -> None:
    assert Route("r", "m").max_attempts == 1


def test_a_route_naming_max_attempts_makes_that_many() -> None:
    assert Route("r", "m", RouteFallback(max_attempts=3)).max_attempts == 3


def test_a_providers_stream_idle_bound_is_its_own_when_set_else_its_timeout() -> None:
    from extproc.policy.model import Provider

    assert Provider("p", "h", 1, False, timeout_s=30, idle_timeout_s=7).idle_s == 7
    assert Provider("p", "h", 1, False, timeout_s=30).idle_s == 30
