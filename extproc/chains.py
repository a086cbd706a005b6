"""Fallback chains: policy -> which model serves each attempt (pure, no I/O).

Shared by the downstream processor (first attempt, reservation estimate), the upstream
processor (every later attempt) and `envoy_config` (how many relay slots to render).

A route's rule for an event (SPEC §5) becomes a *sequence* of models tried after the
primary. The first failure's event picks the sequence; every later failure must itself be
allowed to fall back (its own rule is not `fail_closed`), and `max_attempts` caps all
attempts together. Candidates whose provider's circuit is open are skipped.

  retry_once_then_switch_same_price_tier  [primary] + same tier
  switch_same_price_tier                  same tier
  retry_same (count n)                    [primary] * n
  downgrade / upgrade                     the nearest cheaper / dearer tier with models
  fail_closed                             nothing

"Same tier" = the other models of the primary's tier on a *different* provider, in the order
`models` lists them (narrowed by the route's `fallback.models`). Switching tier needs the key's
plan to allow it; an upgrade also needs both prices within the plan's `max_cost_multiplier`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from extproc.errors import ApiError, upstream_unavailable
from extproc.policy.model import Model, Plan, Policy, Route

# Failure outcomes of an attempt, each the name of a policy event without its "on_" prefix.
OUTCOMES = ("provider_5xx", "rate_limit", "timeout", "connect_failure", "provider_unhealthy")
# The status a client gets when a request ends on that failure (SPEC §4: 502/503/504).
FAILURE_STATUS = {"provider_5xx": 502, "rate_limit": 503, "timeout": 504, "connect_failure": 502, "provider_unhealthy": 503}
# Failures that count against a provider's health. A 429 means the provider is alive but
# throttling this account: it does not.
HEALTH_FAILURES = ("provider_5xx", "timeout", "connect_failure")


def unavailable_error(last_outcome: str, attempts: int, rule: str) -> ApiError:
    """Every allowed attempt failed, or the policy ended the chain: SPEC §4's
    upstream_unavailable, its status from the last failure, saying how many attempts were
    made and which rule decided (the one wording for both processors)."""
    why = f"; {rule}" if rule else ""
    return upstream_unavailable(FAILURE_STATUS.get(last_outcome, 502),
                                f"No provider could serve the request after {attempts} attempt(s) ({last_outcome}){why}.")


def outcome_of_status(status: int) -> str:
    """How an attempt that got a response ended: 'ok', a failure outcome, or 'client_error'."""
    if 200 <= status < 400:
        return "ok"
    if status == 429:
        return "rate_limit"
    if status == 504:
        return "timeout"
    if status >= 500:
        return "provider_5xx"
    return "client_error"


@dataclass(frozen=True)
class Tried:
    """One earlier attempt (or a candidate skipped as unhealthy) and how it ended."""

    model: str
    provider: str
    outcome: str  # one of OUTCOMES, or "ok"
    real: bool = True  # False: skipped without an upstream call (provider_unhealthy)
    opened_by: str = ""  # skipped: the failure event that opened the provider's circuit


@dataclass(frozen=True)
class Step:
    """The decision for the next attempt: go to `model`, or stop."""

    go: bool
    model: str = ""
    reason: str = "none"  # the fallback reason (the first failure's event, or "policy")
    rule: str = ""  # the policy rule that applied, for explanations


def _same_tier(policy: Policy, route: Route, primary: Model) -> list[Model]:
    pool = _pool(policy, route)
    return [m for m in pool if m.tier == primary.tier and m.provider != primary.provider and m.name != primary.name]


def _pool(policy: Policy, route: Route) -> list[Model]:
    if route.fallback.models is not None:
        return [policy.models[n] for n in route.fallback.models if n in policy.models]
    return list(policy.models.values())


def _tier_step(policy: Policy, route: Route, primary: Model, direction: int) -> list[Model]:
    """Models of the nearest tier left (-1) or right (+1) of the primary's that has any."""
    pool = _pool(policy, route)
    i = policy.tiers.index(primary.tier) + direction
    while 0 <= i < len(policy.tiers):
        found = [m for m in pool if m.tier == policy.tiers[i]]
        if found:
            return found
        i += direction
    return []


def _within_multiplier(candidate: Model, primary: Model, multiplier: str | None) -> bool:
    if multiplier is None:
        return False
    cap = Decimal(multiplier)
    return (candidate.price.input_micro_per_mtok <= cap * primary.price.input_micro_per_mtok
            and candidate.price.output_micro_per_mtok <= cap * primary.price.output_micro_per_mtok)


def sequence(policy: Policy, route: Route, plan: Plan, event: str) -> tuple[tuple[str, ...], bool]:
    """The models tried after the primary when the first failure is `event`.
    Returns (models, refused_by_plan): the second is True when the rule named a fallback
    the plan does not allow (the reason then is "policy")."""
    cache = _cache_of(policy)
    key = (route.name, plan.name, event)
    if key not in cache:
        cache[key] = _compute_sequence(policy, route, plan, event)
    return cache[key]


def _cache_of(policy: Policy) -> dict[tuple[str, str, str], tuple[tuple[str, ...], bool]]:
    """Sequences are computed once per policy object (kept on it; a reload makes a new one)."""
    cache: dict[tuple[str, str, str], tuple[tuple[str, ...], bool]] = policy.derived.setdefault("chains.sequences", {})
    return cache


def _compute_sequence(policy: Policy, route: Route, plan: Plan, event: str) -> tuple[tuple[str, ...], bool]:
    rule = route.fallback.rule(f"on_{event}")
    primary = policy.models[route.primary_model]
    action = rule.action
    if action == "fail_closed":
        return (), False
    if action == "retry_same":
        return (primary.name,) * rule.count, False
    if action in ("switch_same_price_tier", "retry_once_then_switch_same_price_tier"):
        head = (primary.name,) if action.startswith("retry_once") else ()
        if "same_tier" not in plan.fallback_allow:
            return head, True
        return head + tuple(m.name for m in _same_tier(policy, route, primary)), False
    if action == "downgrade":
        if "downgrade" not in plan.fallback_allow:
            return (), True
        return tuple(m.name for m in _tier_step(policy, route, primary, -1)), False
    # upgrade
    if "upgrade" not in plan.fallback_allow:
        return (), True
    allowed = [m for m in _tier_step(policy, route, primary, +1) if _within_multiplier(m, primary, plan.max_cost_multiplier)]
    return tuple(m.name for m in allowed), not allowed


def all_candidates(policy: Policy, route: Route, plan: Plan) -> list[Model]:
    """Every model a request on this route may end on (for the reservation estimate)."""
    names = [route.primary_model]
    for outcome in OUTCOMES:
        names += sequence(policy, route, plan, outcome)[0]
    return [policy.models[n] for n in dict.fromkeys(names)]


def first_step(policy: Policy, route: Route, plan: Plan, unhealthy: frozenset[str],
               opened_by: Mapping[str, str] | None = None) -> tuple[Step, list[Tried]]:
    """Where the first attempt goes: the primary, unless its provider's circuit is open; then
    the route's `on_provider_unhealthy` rule decides, or, when the route names none, the rule
    of the failure that opened the circuit (`rule_event`)."""
    primary = policy.models[route.primary_model]
    if primary.provider not in unhealthy:
        return Step(True, primary.name), []
    cause = (opened_by or {}).get(primary.provider, "")
    skipped = [Tried(primary.name, primary.provider, "provider_unhealthy", real=False, opened_by=cause)]
    return next_step(policy, route, plan, skipped, unhealthy), skipped


def rule_event(route: Route, first: Tried) -> str:
    """The event whose rule picks the sequence. SPEC §5: a route naming no
    `on_provider_unhealthy` treats an open circuit like the failure that opened it (5xx,
    timeout, connect failure); the unhealthy provider itself is skipped, so that rule's
    retries on it fall away and its switch remains."""
    if (first.outcome == "provider_unhealthy" and first.opened_by in HEALTH_FAILURES
            and "on_provider_unhealthy" not in route.fallback.rules):
        return first.opened_by
    return first.outcome


def next_step(policy: Policy, route: Route, plan: Plan, history: list[Tried], unhealthy: frozenset[str]) -> Step:
    """After the attempts in `history` failed, where does the next one go?"""
    real = sum(1 for t in history if t.real)
    first, last = history[0].outcome, history[-1].outcome
    event = rule_event(route, history[0])
    rule_text = f"on_{event}: {route.fallback.rule(f'on_{event}').action}"
    if event != first:
        rule_text = f"on_provider_unhealthy (not named) follows {rule_text}, the failure that opened the circuit"
    if real >= route.max_attempts:
        return Step(False, reason=first, rule=f"{rule_text}; max_attempts {route.max_attempts} reached")
    if len(history) > 1 and route.fallback.rule(f"on_{last}").action == "fail_closed":
        return Step(False, reason=first, rule=f"on_{last}: fail_closed")
    if len(history) == 1 and route.fallback.rule(f"on_{event}").action == "fail_closed":
        return Step(False, reason=first, rule=f"on_{event}: fail_closed")
    models, refused = sequence(policy, route, plan, event)
    position = 0  # the attempts after the first walked the sequence in order, maybe skipping
    for tried in history[1:]:
        while position < len(models) and models[position] != tried.model:
            position += 1
        position += 1
    for name in models[position:]:
        model = policy.models.get(name)
        if model is None or model.provider in unhealthy:
            continue
        return Step(True, name, reason=first, rule=rule_text)
    if refused:
        return Step(False, reason="policy", rule=f"{rule_text}, not allowed by plan {plan.name}")
    return Step(False, reason=first, rule=f"{rule_text}; no candidate left")


def max_chain_attempts(policy: Policy) -> int:
    """The most attempts any route may make: how many relay slots Envoy needs."""
    return max((r.max_attempts for r in policy.routes.values()), default=1)


def planned_second_steps(policy: Policy, route: Route, plan: Plan, skipped: list[Tried], first: Model,
                         unhealthy: frozenset[str], outcomes: Mapping[str, str]) -> dict[str, Step]:
    """Attempt 2 decided before attempt 1 is sent, for each failure outcome in `outcomes`
    (key -> outcome): exactly what `next_step` would decide after it, from the same facts.
    Only steps that go to another provider are planned: a retry on the same provider waits a
    back-off first, which the per-attempt processor does."""
    out: dict[str, Step] = {}
    for key, outcome in outcomes.items():
        step = next_step(policy, route, plan, [*skipped, Tried(first.name, first.provider, outcome)], unhealthy)
        if step.go and policy.models[step.model].provider != first.provider:
            out[key] = step
    return out
