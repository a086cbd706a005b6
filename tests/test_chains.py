"""Fallback decisions are pure functions of policy and history: every verb, without I/O."""

from __future__ import annotations

from pathlib import Path

import yaml

from extproc.chains import Tried, all_candidates, first_step, next_step, planned_second_steps, sequence
from extproc.policy import Policy, load_policy

CATALOG = {
    "tiers": ["low", "standard", "premium"],
    "providers": {p: {"address": f"127.0.0.1:{port}", "tls": False} for p, port in (("pa", 1001), ("pb", 1002), ("pc", 1003))},
    "models": {
        "a_low": {"provider": "pa", "upstream_model": "a", "tier": "low", "price": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 2}},
        "b_low": {"provider": "pb", "upstream_model": "b", "tier": "low", "price": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 2}},
        "a_low2": {"provider": "pa", "upstream_model": "a2", "tier": "low", "price": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 2}},
        "c_low": {"provider": "pc", "upstream_model": "c", "tier": "low", "price": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 2}},
        "b_std": {"provider": "pb", "upstream_model": "bs", "tier": "standard", "price": {"input_per_mtok_usd": 2, "output_per_mtok_usd": 4}},
        "c_prem": {"provider": "pc", "upstream_model": "cp", "tier": "premium", "price": {"input_per_mtok_usd": 10, "output_per_mtok_usd": 20}},
    },
    "plans": {
        "basic": {"fallback": {"allow": ["same_tier"]}},
        "down": {"fallback": {"allow": ["same_tier", "downgrade"]}},
        "up3": {"fallback": {"allow": ["same_tier", "upgrade"], "max_cost_multiplier": 3}},
        "up10": {"fallback": {"allow": ["same_tier", "upgrade"], "max_cost_multiplier": 10}},
    },
    "routes": [
        {"route": "seed", "primary_model": "a_low", "fallback": {
            "on_provider_5xx": "retry_once_then_switch_same_price_tier", "on_rate_limit": "switch_same_price_tier",
            "on_budget_exceeded": "fail_closed", "max_attempts": 2}},
        {"route": "long", "primary_model": "a_low", "fallback": {
            "on_provider_5xx": "retry_once_then_switch_same_price_tier", "on_rate_limit": "fail_closed", "max_attempts": 4}},
        {"route": "retry3", "primary_model": "a_low", "fallback": {"on_provider_5xx": {"action": "retry_same", "count": 3}, "max_attempts": 3}},
        {"route": "down", "primary_model": "b_std", "fallback": {"on_provider_5xx": "downgrade", "on_timeout": "downgrade", "max_attempts": 3}},
        {"route": "up", "primary_model": "b_std", "fallback": {"on_provider_5xx": "upgrade", "max_attempts": 2}},
        {"route": "closed", "primary_model": "a_low", "fallback": {"on_provider_5xx": "fail_closed", "max_attempts": 3}},
        {"route": "unhealthy", "primary_model": "a_low", "fallback": {"on_provider_unhealthy": "switch_same_price_tier", "max_attempts": 2}},
    ],
}


def policy(tmp_path: Path) -> Policy:
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(CATALOG))
    return load_policy([f])


def steps(p: Policy, route: str, plan: str, outcomes: list[str], unhealthy: frozenset[str] = frozenset(),
          opened_by: dict[str, str] | None = None) -> list[str]:
    """Drive a route through failures; returns the model of every attempt, then 'stop:<reason>'."""
    r, pl = p.routes[route], p.plans[plan]
    step, history = first_step(p, r, pl, unhealthy, opened_by)
    tried: list[str] = []
    for outcome in outcomes:
        if not step.go:
            break
        tried.append(step.model)
        history.append(Tried(step.model, p.models[step.model].provider, outcome))
        step = next_step(p, r, pl, history, unhealthy)
    return [*tried, step.model if step.go else f"stop:{step.reason}"]


def test_5xx_retries_the_same_model_once_within_the_cap(tmp_path: Path) -> None:
    assert steps(policy(tmp_path), "seed", "basic", ["provider_5xx", "provider_5xx"]) == ["a_low", "a_low", "stop:provider_5xx"]


def test_5xx_retries_once_then_switches_to_the_same_tier_on_another_provider(tmp_path: Path) -> None:
    assert steps(policy(tmp_path), "long", "basic", ["provider_5xx", "provider_5xx", "provider_5xx"]) == [
        "a_low", "a_low", "b_low", "c_low"]


def test_rate_limit_switches_at_once_to_the_same_tier(tmp_path: Path) -> None:
    assert steps(policy(tmp_path), "seed", "basic", ["rate_limit"]) == ["a_low", "b_low"]


def test_same_tier_excludes_models_on_the_same_provider(tmp_path: Path) -> None:
    p = policy(tmp_path)
    assert "a_low2" not in sequence(p, p.routes["seed"], p.plans["basic"], "rate_limit")[0]


def test_retry_same_repeats_the_primary_count_times(tmp_path: Path) -> None:
    assert steps(policy(tmp_path), "retry3", "basic", ["provider_5xx"] * 3) == ["a_low", "a_low", "a_low", "stop:provider_5xx"]


def test_downgrade_moves_to_the_nearest_cheaper_tier_when_the_plan_allows(tmp_path: Path) -> None:
    assert steps(policy(tmp_path), "down", "down", ["provider_5xx"]) == ["b_std", "a_low"]


def test_downgrade_not_in_the_plan_stops_with_reason_policy(tmp_path: Path) -> None:
    assert steps(policy(tmp_path), "down", "basic", ["provider_5xx"]) == ["b_std", "stop:policy"]


def test_upgrade_needs_the_plan_and_the_cost_multiplier(tmp_path: Path) -> None:
    p = policy(tmp_path)
    assert steps(p, "up", "basic", ["provider_5xx"]) == ["b_std", "stop:policy"]
    assert steps(p, "up", "up3", ["provider_5xx"]) == ["b_std", "stop:policy"]  # premium is 5x the price
    assert steps(p, "up", "up10", ["provider_5xx"]) == ["b_std", "c_prem"]


def test_fail_closed_never_reaches_a_second_model(tmp_path: Path) -> None:
    assert steps(policy(tmp_path), "closed", "basic", ["provider_5xx"]) == ["a_low", "stop:provider_5xx"]


def test_an_event_the_route_does_not_name_fails_closed(tmp_path: Path) -> None:
    assert steps(policy(tmp_path), "seed", "basic", ["timeout"]) == ["a_low", "stop:timeout"]


def test_a_later_failure_whose_rule_is_fail_closed_stops_the_chain(tmp_path: Path) -> None:
    assert steps(policy(tmp_path), "long", "basic", ["provider_5xx", "rate_limit"]) == ["a_low", "a_low", "stop:provider_5xx"]


def test_max_attempts_caps_all_attempts_together(tmp_path: Path) -> None:
    assert len(steps(policy(tmp_path), "long", "basic", ["provider_5xx"] * 10)) == 5  # 4 attempts + stop


def test_unhealthy_primary_follows_on_provider_unhealthy(tmp_path: Path) -> None:
    assert steps(policy(tmp_path), "unhealthy", "basic", ["ok"], frozenset({"pa"})) == ["b_low", "stop:provider_unhealthy"]


def test_unhealthy_primary_without_a_rule_or_a_known_cause_fails_closed(tmp_path: Path) -> None:
    assert steps(policy(tmp_path), "seed", "basic", [], frozenset({"pa"})) == ["stop:provider_unhealthy"]


def test_circuit_opened_by_5xx_follows_the_5xx_rule_without_retrying_the_unhealthy_provider(tmp_path: Path) -> None:
    # seed: on_provider_5xx retry_once_then_switch_same_price_tier, max_attempts 2: the retry on
    # pa falls away (skipped, no attempt spent) and the switch to b_low remains, then c_low.
    assert steps(policy(tmp_path), "seed", "basic", ["provider_5xx", "provider_5xx"], frozenset({"pa"}), {"pa": "provider_5xx"}) == [
        "b_low", "c_low", "stop:provider_unhealthy"]


def test_circuit_opened_by_an_event_the_route_does_not_name_fails_closed(tmp_path: Path) -> None:
    assert steps(policy(tmp_path), "seed", "basic", [], frozenset({"pa"}), {"pa": "timeout"}) == ["stop:provider_unhealthy"]


def test_a_named_on_provider_unhealthy_rule_wins_over_the_opening_failure(tmp_path: Path) -> None:
    assert steps(policy(tmp_path), "unhealthy", "basic", ["ok"], frozenset({"pa"}), {"pa": "provider_5xx"}) == [
        "b_low", "stop:provider_unhealthy"]


def test_unhealthy_candidates_are_skipped(tmp_path: Path) -> None:
    assert steps(policy(tmp_path), "long", "basic", ["provider_5xx"] * 2, frozenset({"pb"})) == ["a_low", "a_low", "c_low"]


def test_reservation_candidates_cover_every_model_a_request_may_end_on(tmp_path: Path) -> None:
    p = policy(tmp_path)
    assert [m.name for m in all_candidates(p, p.routes["seed"], p.plans["basic"])] == ["a_low", "b_low", "c_low"]


# --- attempt 2 planned with attempt 1 (chains.planned_second_steps) ------------------------------

PLANNED = {"5xx": "provider_5xx", "429": "rate_limit"}


def planned(p: Policy, route: str, plan: str, unhealthy: frozenset[str] = frozenset()) -> dict[str, str]:
    r, pl = p.routes[route], p.plans[plan]
    first = p.models[r.primary_model]
    return {k: s.model for k, s in planned_second_steps(p, r, pl, [], first, unhealthy, PLANNED).items()}


def test_the_seed_plans_its_rate_limit_switch_but_not_its_same_provider_retry(tmp_path: Path) -> None:
    """seed: a 5xx retries a_low once (same provider: back-off, left to the processor); a 429
    switches to b_low, the first other-provider model of the tier."""
    assert planned(policy(tmp_path), "seed", "basic") == {"429": "b_low"}


def test_a_fail_closed_event_plans_nothing(tmp_path: Path) -> None:
    assert planned(policy(tmp_path), "closed", "basic") == {}


def test_a_downgrade_is_planned_for_a_5xx_only(tmp_path: Path) -> None:
    """down: b_std's 5xx goes to the low tier's first model, a_low on pa; no rate-limit rule
    names a fallback, so a 429 is left to the processor."""
    assert planned(policy(tmp_path), "down", "down") == {"5xx": "a_low"}


def test_an_open_circuit_known_at_the_start_is_skipped_in_the_plan(tmp_path: Path) -> None:
    """seed with pb unhealthy: the 429 switch skips b_low (pb) for c_low (pc)."""
    assert planned(policy(tmp_path), "seed", "basic", frozenset({"pb"})) == {"429": "c_low"}
