"""`models:` and `plans:` entries: the names routes and clients use, and what a key may do."""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from extproc.policy.checker import Checker, boolean, is_number, usd_micro, whole
from extproc.policy.issues import Kind
from extproc.policy.model import PLAN_FALLBACK_KINDS, Model, Plan, Price, Provider
from extproc.policy.yamlpos import LocDict

# Optional per-model token limits (whole numbers >= 1), see `Model`.
MODEL_LIMITS = ("context_window", "max_output_tokens", "image_part_tokens", "file_part_tokens")
MODEL_FIELDS = {"provider", "upstream_model", "tier", "price", *MODEL_LIMITS}
PRICE_FIELDS = {"input_per_mtok_usd", "output_per_mtok_usd"}
PLAN_FIELDS = {"routes", "requests_per_minute", "tokens_per_minute", "monthly_budget_usd", "prepaid", "fallback"}
PLAN_FALLBACK_FIELDS = {"allow", "max_cost_multiplier"}


def parse_model(c: Checker, name: str, md: LocDict, key: str, *, tiers: tuple[str, ...],
                providers: Mapping[str, Provider]) -> Model | None:
    c.known_keys(md, key, MODEL_FIELDS)
    provider, upstream, tier = md.get("provider"), md.get("upstream_model"), md.get("tier")
    if not isinstance(provider, str):
        c.error(md.at("provider"), f"{key}.provider", f"is required and must name a provider, got {provider!r}")
        return None
    if provider not in providers:
        c.ref(md.at("provider"), f"{key}.provider", f"names provider {provider!r}, which the policy does not define")
    if not isinstance(upstream, str) or not upstream:
        c.error(md.at("upstream_model"), f"{key}.upstream_model", f"is required and must be a string, got {upstream!r}")
        return None
    if not isinstance(tier, str) or tier not in tiers:
        c.error(md.at("tier"), f"{key}.tier", f"must be one of the tiers {list(tiers)}, got {tier!r}")
        return None
    price = _price(c, md, key)
    if price is None:
        return None
    limits = {f: whole(c, md, key, f, 1) for f in MODEL_LIMITS if f in md}
    return Model(name, provider, upstream, tier, price, **{f: v for f, v in limits.items() if v is not None})


def _price(c: Checker, md: LocDict, key: str) -> Price | None:
    pd = c.mapping(md.get("price"), md.at("price"), f"{key}.price")
    if pd is None:
        return None
    c.known_keys(pd, f"{key}.price", PRICE_FIELDS)
    inp = usd_micro(c, pd, f"{key}.price", "input_per_mtok_usd")
    outp = usd_micro(c, pd, f"{key}.price", "output_per_mtok_usd")
    if inp is None or outp is None:
        if not pd.keys() >= PRICE_FIELDS:
            c.error(pd.at(), f"{key}.price", "needs input_per_mtok_usd and output_per_mtok_usd")
        return None
    return Price(inp, outp)


def parse_plan(c: Checker, name: str, pd: LocDict, key: str) -> Plan:
    c.known_keys(pd, key, PLAN_FIELDS)
    allow, multiplier = _plan_fallback(c, pd, key)
    return Plan(
        name=name,
        routes=_plan_routes(c, pd, key),
        requests_per_minute=whole(c, pd, key, "requests_per_minute", 1),
        tokens_per_minute=whole(c, pd, key, "tokens_per_minute", 1),
        monthly_budget_micro=usd_micro(c, pd, key, "monthly_budget_usd"),
        prepaid=boolean(c, pd, key, "prepaid", False),
        fallback_allow=allow,
        max_cost_multiplier=multiplier,
    )


def _plan_routes(c: Checker, pd: LocDict, key: str) -> frozenset[str] | None:
    """None for "*" (every route); an invalid value allows none."""
    routes_v = pd.get("routes", "*")
    if routes_v == "*":
        return None
    if isinstance(routes_v, list) and all(isinstance(r, str) for r in routes_v):
        return frozenset(routes_v)
    c.error(pd.at("routes"), f"{key}.routes", f'must be "*" or a list of route names, got {routes_v!r}')
    return frozenset()


def _plan_fallback(c: Checker, pd: LocDict, key: str) -> tuple[frozenset[str], str | None]:
    """The model changes the plan permits, and the upgrade price cap (a decimal string)."""
    allow: frozenset[str] = frozenset({"same_tier"})
    fb = pd.get("fallback")
    if fb is None:
        return allow, None
    fbd = c.mapping(fb, pd.at("fallback"), f"{key}.fallback")
    if fbd is None:
        return allow, None
    c.known_keys(fbd, f"{key}.fallback", PLAN_FALLBACK_FIELDS)
    allow_v = fbd.get("allow", ["same_tier"])
    if not isinstance(allow_v, list) or any(a not in PLAN_FALLBACK_KINDS for a in allow_v):
        c.error(fbd.at("allow"), f"{key}.fallback.allow", f"must list some of {list(PLAN_FALLBACK_KINDS)}, got {allow_v!r}")
    else:
        allow = frozenset(allow_v)
    multiplier = _multiplier(c, fbd, key, fbd.get("max_cost_multiplier"))
    if "upgrade" in allow and multiplier is None:
        c.warn(fbd.at("allow"), f"{key}.fallback", "allows upgrade without max_cost_multiplier: upgrades are then refused (set a cap)",
               Kind.CHECKLIST)
    return allow, multiplier


def _multiplier(c: Checker, fbd: LocDict, key: str, mult: Any) -> str | None:
    if mult is None:
        return None
    if not is_number(mult) or not math.isfinite(mult) or mult < 1:
        c.error(fbd.at("max_cost_multiplier"), f"{key}.fallback.max_cost_multiplier", f"must be a number >= 1, got {mult!r}")
        return None
    return str(Decimal(str(mult)))
