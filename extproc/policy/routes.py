"""Route mappings (`routes:` items, or a lone route file like the seed template): the primary
model, the fallback rules with the seed's checklist, and billing.

The checklist warns where a legal route will not behave as it probably reads. Fields the
gateway parses but does not act on are reported as `no_effect` warnings whenever their value
asks for something other than what the gateway always does (see `_no_effect_billing`).
"""

from __future__ import annotations

from typing import Any

from extproc import config
from extproc.policy.checker import Checker, boolean, name, whole
from extproc.policy.issues import Kind
from extproc.policy.model import ACTIONS, EVENTS, FallbackRule, Route, RouteFallback
from extproc.policy.yamlpos import LocDict

ROUTE_FIELDS = {"route", "primary_model", "fallback", "billing", "default_max_tokens"}
FALLBACK_FIELDS = set(EVENTS) | {"max_attempts", "models"}
BILLING_FIELDS = {"owner", "record_primary_and_final_model"}
BILLING_OWNERS = ("customer_api_key", "workspace", "customer")
MAX_ATTEMPTS_LIMIT = 10  # the most upstream attempts a route may allow per request
# What the gateway always does, whatever the policy says: the only value with an effect.
BILLING_OWNER_IN_EFFECT = "customer_api_key"


def parse_route(c: Checker, rd: LocDict, index: int) -> Route | None:
    route_name = rd.get("route")
    key = f"routes[{route_name}]" if isinstance(route_name, str) else f"routes[{index}]"
    c.known_keys(rd, key, ROUTE_FIELDS)
    valid_name = name(c, rd.at("route"), f"{key}.route", route_name)
    if valid_name is None:
        return None
    primary = rd.get("primary_model")
    if not isinstance(primary, str):
        c.error(rd.at("primary_model"), f"{key}.primary_model", f"is required and must name a model, got {primary!r}")
        return None
    fallback = _fallback(c, rd, key)
    owner, record_both = _billing(c, rd, key)
    return Route(
        name=valid_name,
        primary_model=primary,
        fallback=fallback,
        billing_owner=owner,
        record_primary_and_final_model=record_both,
        default_max_tokens=whole(c, rd, key, "default_max_tokens", 1) or config.ROUTE_DEFAULT_MAX_TOKENS,
    )


# --- fallback ----------------------------------------------------------------------------------


def _fallback(c: Checker, rd: LocDict, key: str) -> RouteFallback:
    fb = rd.get("fallback")
    if fb is None:
        c.warn(rd.at("route"), key, "has no fallback section: every failure fails closed and max_attempts is 1", Kind.CHECKLIST)
        return RouteFallback()
    fd = c.mapping(fb, rd.at("fallback"), f"{key}.fallback")
    if fd is None:
        return RouteFallback()
    key = f"{key}.fallback"
    c.known_keys(fd, key, FALLBACK_FIELDS)
    rules = {event: rule for event in EVENTS if event in fd and (rule := _rule(c, fd, key, event)) is not None}
    max_attempts = _max_attempts(c, fd, key)
    _checklist(c, fd, key, rules, max_attempts)
    return RouteFallback(rules=rules, max_attempts=max_attempts, models=_models(c, fd, key))


def _rule(c: Checker, fd: LocDict, key: str, event: str) -> FallbackRule | None:
    """`event: action`, `event: {action, count}`, or the shorthand `event: {retry_same: N}`."""
    v = fd[event]
    action: Any
    count: Any
    if isinstance(v, str):
        action, count = v, 1
    elif isinstance(v, LocDict) and len(v) == 1 and next(iter(v)) in ACTIONS:
        action, count = next(iter(v.items()))
    elif isinstance(v, LocDict):
        action, count = v.get("action"), v.get("count", 1)
        c.known_keys(v, f"{key}.{event}", {"action", "count"})
    else:
        c.error(fd.at(event), f"{key}.{event}", f"must be an action or {{action, count}}, got {v!r}")
        return None
    if action not in ACTIONS:
        c.error(fd.at(event), f"{key}.{event}", f"unknown action {action!r} (known: {', '.join(ACTIONS)})")
        return None
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        c.error(fd.at(event), f"{key}.{event}.count", f"must be a whole number >= 1, got {count!r}")
        return None
    return FallbackRule(action, count)


def _max_attempts(c: Checker, fd: LocDict, key: str) -> int | None:
    max_attempts = whole(c, fd, key, "max_attempts", 1)
    if max_attempts is not None and max_attempts > MAX_ATTEMPTS_LIMIT:
        c.error(fd.at("max_attempts"), f"{key}.max_attempts", f"must be at most {MAX_ATTEMPTS_LIMIT}, got {max_attempts}")
        return MAX_ATTEMPTS_LIMIT
    return max_attempts


def _models(c: Checker, fd: LocDict, key: str) -> tuple[str, ...] | None:
    """`models:` narrows the candidates of same-tier and tier changes."""
    ms = fd.get("models")
    if ms is None:
        return None
    if isinstance(ms, list) and all(isinstance(m, str) for m in ms):
        return tuple(ms)
    c.error(fd.at("models"), f"{key}.models", f"must be a list of model names, got {ms!r}")
    return None


def _checklist(c: Checker, fd: LocDict, key: str, rules: dict[str, FallbackRule], max_attempts: int | None) -> None:
    """The seed's checklist: rules that will not behave as they read."""
    if "max_attempts" not in fd:
        c.warn(fd.at(), key, "has no max_attempts: every request gets one attempt only; set the cap explicitly", Kind.CHECKLIST)
    budget = rules.get("on_budget_exceeded")
    if budget is not None and budget.action != "fail_closed":
        c.warn(fd.at("on_budget_exceeded"), f"{key}.on_budget_exceeded",
               f"is {budget.action!r}, which has no effect: budget exhaustion should fail closed, and always does (an "
               "exhausted balance or monthly budget is refused with 429 insufficient_quota before any upstream call)",
               Kind.NO_EFFECT)
    for event, rule in rules.items():
        if rule.action == "retry_once_then_switch_same_price_tier":
            _check_retry_and_switch(c, fd, key, event, max_attempts or 1)
        elif rule.action == "retry_same":
            _check_retry_same(c, fd, key, event, rule.count, max_attempts)


def _check_retry_and_switch(c: Checker, fd: LocDict, key: str, event: str, cap: int) -> None:
    if cap >= 3:
        return
    instead = ("the failed attempt is neither retried nor switched" if cap == 1 else
               "the failed attempt is retried once on the same provider and, if that fails too, the request "
               "fails (upstream_unavailable) without switching")
    c.warn(fd.at(event), f"{key}.{event}", f"retry and switch need max_attempts >= 3, got {cap}: {instead}; "
           "it switches to the same price tier at once only while the provider's circuit is open", Kind.CHECKLIST)


def _check_retry_same(c: Checker, fd: LocDict, key: str, event: str, count: int, max_attempts: int | None) -> None:
    if max_attempts is None:
        c.warn(fd.at(event), f"{key}.{event}", "retry_same with no max_attempts: retries are uncapped per error type", Kind.CHECKLIST)
    elif count >= max_attempts:
        c.warn(fd.at(event), f"{key}.{event}", f"retry_same count {count} does not fit in max_attempts "
               f"{max_attempts}: only {max_attempts - 1} retr{'y' if max_attempts == 2 else 'ies'} will be made", Kind.CHECKLIST)


# --- billing -----------------------------------------------------------------------------------


def _billing(c: Checker, rd: LocDict, key: str) -> tuple[str, bool]:
    """(owner, record_primary_and_final_model), both parsed and kept on `Route`; neither changes
    what the gateway does, so a value asking for something else is reported as `no_effect`."""
    owner, record_both = BILLING_OWNER_IN_EFFECT, True
    billing = rd.get("billing")
    if billing is None:
        return owner, record_both
    bd = c.mapping(billing, rd.at("billing"), f"{key}.billing")
    if bd is None:
        return owner, record_both
    key = f"{key}.billing"
    c.known_keys(bd, key, BILLING_FIELDS)
    owner_v = bd.get("owner", owner)
    if owner_v not in BILLING_OWNERS:
        c.error(bd.at("owner"), f"{key}.owner", f"must be customer_api_key, workspace or customer, got {owner_v!r}")
    else:
        owner = owner_v
    record_both = boolean(c, bd, key, "record_primary_and_final_model", True)
    _no_effect_billing(c, bd, key, owner, record_both)
    return owner, record_both


def _no_effect_billing(c: Checker, bd: LocDict, key: str, owner: str, record_both: bool) -> None:
    if owner != BILLING_OWNER_IN_EFFECT:
        c.warn(bd.at("owner"), f"{key}.owner", f"is {owner!r}, which has no effect: every request is charged and "
               "recorded the same way whatever the owner (its usage record names the key, the workspace and the "
               f"customer); only {BILLING_OWNER_IN_EFFECT!r} reads as the gateway behaves", Kind.NO_EFFECT)
    if not record_both:
        c.warn(bd.at("record_primary_and_final_model"), f"{key}.record_primary_and_final_model",
               "is false, which has no effect: every usage record keeps both primary_model and final_model",
               Kind.NO_EFFECT)
