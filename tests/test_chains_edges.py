"""Fallback decisions at their edges: status classification, the status a failed chain
answers with, the plan's rights (same tier, upgrade price bound), the tier walk's ends and
sequences that run out. Policies built as plain objects; expected chains written by hand."""

from __future__ import annotations

import pytest

from extproc.chains import FAILURE_STATUS, Step, Tried, all_candidates, first_step, next_step, outcome_of_status
from extproc.policy.model import FallbackRule, Model, Plan, Policy, Price, Provider, Route, RouteFallback


def model(name: str, provider: str, tier: str, inp: int, out: int) -> Model:
    return Model(name, provider, name, tier, Price(inp, out))


MODELS = [
    model("a_low", "pa", "low", 1_000_000, 2_000_000),
    model("b_low", "pb", "low", 1_000_000, 2_000_000),
    model("a_std", "pa", "standard", 2_000_000, 4_000_000),
    model("b_prem_exact3", "pb", "premium", 6_000_000, 12_000_000),  # exactly 3x a_std, both prices
    model("c_prem_out5", "pc", "premium", 5_000_000, 20_000_000),  # input 2.5x, output 5x a_std
    model("d_prem_in5", "pd", "premium", 10_000_000, 8_000_000),  # input 5x, output 2x a_std
]


def policy(routes: list[Route], models: list[Model] = MODELS) -> Policy:
    providers = {p: Provider(p, "127.0.0.1", 1, False) for p in ("pa", "pb", "pc", "pd")}
    plans = {
        "none": Plan("none", None, fallback_allow=frozenset()),
        "same": Plan("same", None),
        "up3": Plan("up3", None, fallback_allow=frozenset({"same_tier", "upgrade"}), max_cost_multiplier="3"),
    }
    return Policy(("low", "standard", "premium"), providers, {m.name: m for m in models}, plans, {r.name: r for r in routes})


def route(name: str, primary: str, max_attempts: int, **rules: FallbackRule) -> Route:
    return Route(name, primary, RouteFallback(rules=rules, max_attempts=max_attempts))


def after(p: Policy, route_name: str, plan: str, history: list[Tried]) -> Step:
    return next_step(p, p.routes[route_name], p.plans[plan], history, frozenset())


@pytest.mark.parametrize(("status", "outcome"), [
    (200, "ok"), (399, "ok"), (400, "client_error"), (499, "client_error"), (429, "rate_limit"),
    (500, "provider_5xx"), (503, "provider_5xx"), (504, "timeout"),
])
def test_a_status_is_classified_as_its_outcome(status: int, outcome: str) -> None:
    assert outcome_of_status(status) == outcome


def test_a_failed_chain_answers_bad_gateway_unavailable_or_gateway_timeout() -> None:
    assert FAILURE_STATUS == {"provider_5xx": 502, "rate_limit": 503, "timeout": 504, "connect_failure": 502,
                              "provider_unhealthy": 503}


def test_switching_to_the_same_tier_needs_the_plans_same_tier_right() -> None:
    p = policy([route("r", "a_low", 2, on_provider_5xx=FallbackRule("switch_same_price_tier"))])
    assert after(p, "r", "same", [Tried("a_low", "pa", "provider_5xx")]) == Step(True, "b_low", "provider_5xx",
                                                                                    "on_provider_5xx: switch_same_price_tier")
    assert after(p, "r", "none", [Tried("a_low", "pa", "provider_5xx")]).reason == "policy"


def test_an_upgrade_exactly_at_the_cost_multiplier_is_allowed() -> None:
    p = policy([route("r", "a_std", 2, on_provider_5xx=FallbackRule("upgrade"))], MODELS[:4])
    step = after(p, "r", "up3", [Tried("a_std", "pa", "provider_5xx")])
    assert (step.go, step.model) == (True, "b_prem_exact3")


def test_an_upgrade_whose_output_price_exceeds_the_multiplier_is_refused() -> None:
    p = policy([route("r", "a_std", 2, on_provider_5xx=FallbackRule("upgrade"))], [*MODELS[:3], MODELS[4]])
    step = after(p, "r", "up3", [Tried("a_std", "pa", "provider_5xx")])
    assert (step.go, step.reason) == (False, "policy")


def test_an_upgrade_whose_input_price_exceeds_the_multiplier_is_refused() -> None:
    p = policy([route("r", "a_std", 2, on_provider_5xx=FallbackRule("upgrade"))], [*MODELS[:3], MODELS[5]])
    step = after(p, "r", "up3", [Tried("a_std", "pa", "provider_5xx")])
    assert (step.go, step.reason) == (False, "policy")


def test_an_upgrade_from_the_top_tier_finds_nothing() -> None:
    p = policy([route("r", "b_prem_exact3", 2, on_provider_5xx=FallbackRule("upgrade"))])
    step = after(p, "r", "up3", [Tried("b_prem_exact3", "pb", "provider_5xx")])
    assert (step.go, step.reason) == (False, "policy")


def test_a_downgrade_from_the_bottom_tier_finds_nothing() -> None:
    p = policy([route("r", "a_low", 2, on_provider_5xx=FallbackRule("downgrade"))])
    plan_down = Plan("down", None, fallback_allow=frozenset({"downgrade"}))
    p.plans["down"] = plan_down
    step = after(p, "r", "down", [Tried("a_low", "pa", "provider_5xx")])
    assert (step.go, step.reason) == (False, "provider_5xx")


def test_retries_of_the_same_model_that_run_out_stop_on_the_failure_not_on_policy() -> None:
    p = policy([route("r", "a_low", 3, on_provider_5xx=FallbackRule("retry_same", 1))])
    step = after(p, "r", "same", [Tried("a_low", "pa", "provider_5xx"), Tried("a_low", "pa", "provider_5xx")])
    assert (step.go, step.reason) == (False, "provider_5xx")


def test_a_circuit_opened_by_connect_failures_follows_the_connect_failure_rule() -> None:
    p = policy([route("r", "a_low", 2, on_connect_failure=FallbackRule("switch_same_price_tier"))])
    step, skipped = first_step(p, p.routes["r"], p.plans["same"], frozenset({"pa"}), {"pa": "connect_failure"})
    assert (step.go, step.model) == (True, "b_low")
    assert skipped == [Tried("a_low", "pa", "provider_unhealthy", real=False, opened_by="connect_failure")]


def test_an_attempt_on_a_model_the_sequence_does_not_name_ends_the_chain() -> None:
    """A policy reloaded between two attempts: the history names a model the sequence lost."""
    p = policy([route("r", "a_low", 4, on_provider_5xx=FallbackRule("switch_same_price_tier"))])
    step = after(p, "r", "same", [Tried("a_low", "pa", "provider_5xx"), Tried("gone", "pz", "provider_5xx")])
    assert (step.go, step.reason) == (False, "provider_5xx")


def test_the_reservation_counts_the_model_a_connect_failure_would_switch_to() -> None:
    p = policy([route("r", "a_low", 2, on_connect_failure=FallbackRule("switch_same_price_tier"))])
    assert [m.name for m in all_candidates(p, p.routes["r"], p.plans["same"])] == ["a_low", "b_low"]


def test_the_reservation_counts_the_model_a_timeout_would_switch_to() -> None:
    p = policy([route("r", "a_low", 2, on_timeout=FallbackRule("switch_same_price_tier"))])
    assert [m.name for m in all_candidates(p, p.routes["r"], p.plans["same"])] == ["a_low", "b_low"]


def test_a_downgrade_skips_an_empty_tier_to_the_nearest_cheaper_one() -> None:
    """Premium primary, no standard model in the route's pool: the downgrade lands on low."""
    r = Route("r", "c_prem_out5", RouteFallback(rules={"on_provider_5xx": FallbackRule("downgrade")}, max_attempts=2,
                                                models=("c_prem_out5", "a_low")))
    p = policy([r])
    down = Plan("down", None, fallback_allow=frozenset({"downgrade"}))
    p = Policy(p.tiers, p.providers, p.models, {**p.plans, "down": down}, p.routes)
    step = after(p, "r", "down", [Tried("c_prem_out5", "pc", "provider_5xx")])
    assert (step.go, step.model) == (True, "a_low")


def test_the_reservation_counts_the_model_a_rate_limit_would_switch_to() -> None:
    p = policy([route("r", "a_low", 2, on_rate_limit=FallbackRule("switch_same_price_tier"))])
    assert [m.name for m in all_candidates(p, p.routes["r"], p.plans["same"])] == ["a_low", "b_low"]


def test_a_fail_closed_first_failure_stops_naming_exactly_its_rule() -> None:
    p = policy([route("r", "a_low", 3, on_provider_5xx=FallbackRule("fail_closed"))])
    step = after(p, "r", "same", [Tried("a_low", "pa", "provider_5xx")])
    assert (step.go, step.reason, step.rule) == (False, "provider_5xx", "on_provider_5xx: fail_closed")


def test_envoy_gets_relay_slots_for_the_longest_chain_in_the_policy() -> None:
    from extproc.chains import max_chain_attempts

    p = policy([route("one", "a_low", 1), route("three", "a_low", 3), route("two", "a_low", 2)])
    assert max_chain_attempts(p) == 3
