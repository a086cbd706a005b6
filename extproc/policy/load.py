"""Load policy YAML into a `Policy`, naming file, line and key in every complaint.

A policy may be one file or several (a catalog of tiers/providers/models/plans plus one file
per route, like the seed template); `--policy` may also name a directory. Files merge in the
order given: maps merge by name, a later route of the same name replaces an earlier one.

Every problem is an `Issue` with a level. `load_policy` raises `PolicyError` on any error;
`check_policy` returns all issues so `tollgate policy check` can print warnings too.
A reference that cannot be resolved (a route naming an unknown model) is an error when the
catalog is present and only a warning for a lone route file, which is checked on its own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from extproc.money import usd_to_micro
from extproc.policy.model import (
    ACTIONS,
    DEFAULT_TIERS,
    DEFAULT_TIMEOUT_S,
    DEFAULT_TOKENS_PER_S,
    EVENTS,
    PLAN_FALLBACK_KINDS,
    FallbackRule,
    Model,
    Plan,
    Policy,
    Price,
    Provider,
    Route,
    RouteFallback,
    Settings,
)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# Optional per-model token limits (whole numbers >= 1), see `Model`.
MODEL_LIMITS = ("context_window", "max_output_tokens", "image_part_tokens", "file_part_tokens")


@dataclass(frozen=True)
class Issue:
    level: str  # "error" or "warning"
    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.level}: {self.key}: {self.message}"


class PolicyError(Exception):
    """An invalid policy; the message names file, line and key of every error."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = issues
        super().__init__("invalid policy:\n" + "\n".join(f"  {i}" for i in issues))


# --- YAML with positions --------------------------------------------------------------


class LocDict(dict[str, Any]):
    """A mapping that remembers where it and each of its keys were written."""

    file: str = "?"
    line: int = 0
    key_lines: dict[str, int]


class LocList(list[Any]):
    file: str = "?"
    line: int = 0
    item_lines: list[int]


def _to_python(node: yaml.Node, file: str) -> Any:
    if isinstance(node, yaml.MappingNode):
        out = LocDict()
        out.file, out.line, out.key_lines = file, node.start_mark.line + 1, {}
        for key_node, value_node in node.value:
            key = str(_to_python(key_node, file))
            out[key] = _to_python(value_node, file)
            out.key_lines[key] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        seq = LocList(_to_python(n, file) for n in node.value)
        seq.file, seq.line = file, node.start_mark.line + 1
        seq.item_lines = [n.start_mark.line + 1 for n in node.value]
        return seq
    return yaml.SafeLoader("").construct_object(node, deep=True)


def read_yaml(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        raise PolicyError([Issue("error", str(path), line, "(yaml)", str(exc).replace("\n", " "))]) from None
    return None if node is None else _to_python(node, str(path))


def expand_sources(paths: Sequence[str | Path]) -> list[Path]:
    """Files in the order given; a directory contributes its *.yaml/*.yml files sorted by name."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix in (".yaml", ".yml") and q.is_file()))
        else:
            out.append(p)
    return out


# --- checking ------------------------------------------------------------------------


class _Checker:
    def __init__(self) -> None:
        self.issues: list[Issue] = []
        self.unresolved: list[Issue] = []

    def error(self, where: LocDict | LocList, key: str, message: str, field: str | None = None) -> None:
        self.issues.append(Issue("error", where.file, _line(where, field), key, message))

    def warn(self, where: LocDict | LocList, key: str, message: str, field: str | None = None) -> None:
        self.issues.append(Issue("warning", where.file, _line(where, field), key, message))

    def ref(self, where: LocDict, key: str, message: str, field: str | None = None) -> None:
        self.unresolved.append(Issue("error", where.file, _line(where, field), key, message))

    def mapping(self, value: Any, parent: LocDict, key: str, field: str) -> LocDict | None:
        if isinstance(value, LocDict):
            return value
        self.error(parent, key, f"must be a mapping, got {_kind(value)}", field)
        return None

    def known_keys(self, d: LocDict, key: str, allowed: set[str]) -> None:
        for k in d:
            if k not in allowed:
                self.warn(d, f"{key}.{k}", f"unknown field (known: {', '.join(sorted(allowed))})", k)


def _line(where: LocDict | LocList, field: str | None) -> int:
    if field is not None and isinstance(where, LocDict):
        return where.key_lines.get(field, where.line)
    return where.line


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _int(c: _Checker, d: LocDict, key: str, field: str, minimum: int = 0) -> int | None:
    v = d.get(field)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        c.error(d, f"{key}.{field}", f"must be a whole number >= {minimum}, got {v!r}", field)
        return None
    return v


def _bool(c: _Checker, d: LocDict, key: str, field: str, default: bool) -> bool:
    v = d.get(field, default)
    if not isinstance(v, bool):
        c.error(d, f"{key}.{field}", f"must be true or false, got {v!r}", field)
        return default
    return v


def _seconds(c: _Checker, d: LocDict, key: str, field: str, default: float | None, limit: float = 3600) -> float | None:
    """A positive number (seconds, or a rate) up to `limit`; the default when absent or invalid."""
    v = d.get(field, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= limit:
        c.error(d, f"{key}.{field}", f"must be a number between 0 and {limit:g}, got {v!r}", field)
        return default
    return float(v)


def _usd_to_micro(c: _Checker, d: LocDict, key: str, field: str) -> int | None:
    """A non-negative USD amount from YAML as exact micro-dollars (rounded up)."""
    v = d.get(field)
    if v is None:
        return None
    try:
        micro = usd_to_micro(v, round_up=True)
    except ValueError:
        c.error(d, f"{key}.{field}", f"must be a number of US dollars, got {v!r}", field)
        return None
    if micro < 0:
        c.error(d, f"{key}.{field}", f"must be a non-negative amount, got {v!r}", field)
        return None
    return micro


def _name(c: _Checker, where: LocDict, key: str, value: Any, field: str | None = None) -> str | None:
    if not isinstance(value, str) or not NAME_RE.match(value):
        c.error(where, key, f"must be a name of letters, digits, '_', '.', '-', got {value!r}", field)
        return None
    return value


def _merge(docs: list[Any]) -> tuple[LocDict, list[LocDict]]:
    """Merge documents in order; returns the merged catalog and the route mappings."""
    merged = LocDict()
    merged.file, merged.line, merged.key_lines = (docs[0].file if docs else "?"), 1, {}
    routes: dict[str, LocDict] = {}
    loose: list[LocDict] = []

    def add_route(r: Any) -> None:
        if isinstance(r, LocDict) and isinstance(r.get("route"), str):
            routes[r["route"]] = r
        elif isinstance(r, LocDict):
            loose.append(r)

    for doc in docs:
        if "route" in doc and "routes" not in doc:
            add_route(doc)  # a lone route file, like the seed template
            continue
        for k, v in doc.items():
            if k == "routes":
                if isinstance(v, LocList):
                    for item in v:
                        add_route(item)
                        if not isinstance(item, LocDict):
                            merged.setdefault("_bad_routes", []).append((v, item))
                else:
                    merged["_routes_not_list"] = doc
            elif isinstance(v, LocDict) and isinstance(merged.get(k), LocDict):
                merged[k].update(v)
                merged[k].key_lines.update(v.key_lines)
            else:
                merged[k] = v
                merged.key_lines[k] = doc.key_lines[k]
                if k == "tiers":
                    merged["_tiers_doc"] = doc
    return merged, list(routes.values()) + loose


def _parse_settings(c: _Checker, raw: LocDict) -> Settings:
    section = raw.get("settings")
    if section is None:
        return Settings()
    d = c.mapping(section, raw, "settings", "settings")
    if d is None:
        return Settings()
    c.known_keys(d, "settings", {"idempotency_window_s"})
    window = _int(c, d, "settings", "idempotency_window_s", minimum=1)
    return Settings() if window is None else Settings(idempotency_window_s=window)


def _parse_providers(c: _Checker, raw: LocDict) -> dict[str, Provider]:
    out: dict[str, Provider] = {}
    section = raw.get("providers")
    if section is None:
        return out
    section = c.mapping(section, raw, "providers", "providers")
    for name, d in (section or {}).items():
        key = f"providers.{name}"
        if _name(c, section, key, name, name) is None:  # type: ignore[arg-type]
            continue
        pd = c.mapping(d, section, key, name)  # type: ignore[arg-type]
        if pd is None:
            continue
        c.known_keys(pd, key, {"address", "tls", "api_key_env", "api_key_file", "timeout_s", "tokens_per_s", "ttfb_timeout_s",
                               "idle_timeout_s", "circuit", "headers", "query_params"})
        address = pd.get("address")
        m = re.match(r"^\[?([A-Za-z0-9.:-]+?)\]?:(\d{1,5})$", str(address)) if isinstance(address, str) else None
        if m is None or not 0 < int(m.group(2)) < 65536:
            c.error(pd, f"{key}.address", f"must be host:port, got {address!r}", "address")
            continue
        host, port = m.group(1), int(m.group(2))
        timeout = _seconds(c, pd, key, "timeout_s", DEFAULT_TIMEOUT_S) or DEFAULT_TIMEOUT_S
        tokens_per_s = _seconds(c, pd, key, "tokens_per_s", DEFAULT_TOKENS_PER_S, limit=1_000_000) or DEFAULT_TOKENS_PER_S
        ttfb = _seconds(c, pd, key, "ttfb_timeout_s", None)
        idle = _seconds(c, pd, key, "idle_timeout_s", None)
        key_env, key_file = pd.get("api_key_env"), pd.get("api_key_file")
        for f, v in (("api_key_env", key_env), ("api_key_file", key_file)):
            if v is not None and not isinstance(v, str):
                c.error(pd, f"{key}.{f}", f"must be a string, got {v!r}", f)
        circuit: dict[str, Any] = {}
        if "circuit" in pd:
            cd = c.mapping(pd["circuit"], pd, f"{key}.circuit", "circuit")
            if cd is not None:
                c.known_keys(cd, f"{key}.circuit", {"failures", "failure_rate", "customers", "window_s", "cooldown_s"})
                for f in ("failures", "customers", "window_s", "cooldown_s"):
                    v = _int(c, cd, f"{key}.circuit", f, 1)
                    if v is not None:
                        circuit[f"circuit_{f}"] = v
                rate = cd.get("failure_rate")
                if rate is not None:
                    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
                        c.error(cd, f"{key}.circuit.failure_rate", f"must be a share between 0 and 1, got {rate!r}", "failure_rate")
                    else:
                        circuit["circuit_failure_rate"] = str(rate)
        out[name] = Provider(
            name=name,
            host=host,
            port=port,
            tls=_bool(c, pd, key, "tls", port == 443),
            api_key_env=key_env if isinstance(key_env, str) else None,
            api_key_file=key_file if isinstance(key_file, str) else None,
            timeout_s=timeout,
            tokens_per_s=tokens_per_s,
            ttfb_timeout_s=ttfb,
            idle_timeout_s=idle,
            headers=_provider_headers(c, pd, key),
            query_params=_query_params(c, pd, key),
            **circuit,
        )
    return out


_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")


def _provider_headers(c: _Checker, pd: LocDict, key: str) -> tuple[tuple[str, str], ...]:
    """`headers:` of a provider: name -> value, printable ASCII; never credentials or framing."""
    from extproc.edge import RESERVED_HEADERS

    if "headers" not in pd:
        return ()
    hd = c.mapping(pd["headers"], pd, f"{key}.headers", "headers")
    if hd is None:
        return ()
    out: list[tuple[str, str]] = []
    for name, value in hd.items():
        lname = str(name).lower()
        if not _TOKEN.match(str(name)) or lname in RESERVED_HEADERS or lname.startswith(("x-tollgate-", "x-envoy-")):
            c.error(hd, f"{key}.headers.{name}", "not a header name the policy may set (credentials, framing and "
                    "x-tollgate-*/x-envoy-* are the gateway's)", str(name))
        elif not isinstance(value, (str, int)) or isinstance(value, bool) or not _PRINTABLE.match(str(value)):
            c.error(hd, f"{key}.headers.{name}", f"must be a printable ASCII string, got {value!r}", str(name))
        else:
            out.append((lname, str(value)))
    return tuple(out)


def _query_params(c: _Checker, pd: LocDict, key: str) -> tuple[str, ...]:
    """`query_params:` of a provider: the query parameter names a client may pass on."""
    raw = pd.get("query_params")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(n, str) and _TOKEN.match(n) for n in raw):
        c.error(pd, f"{key}.query_params", f"must be a list of parameter names, got {raw!r}", "query_params")
        return ()
    return tuple(raw)


def _parse_models(c: _Checker, raw: LocDict, tiers: tuple[str, ...], providers: dict[str, Provider]) -> dict[str, Model]:
    out: dict[str, Model] = {}
    section = raw.get("models")
    if section is None:
        return out
    section = c.mapping(section, raw, "models", "models")
    for name, d in (section or {}).items():
        key = f"models.{name}"
        if _name(c, section, key, name, name) is None:  # type: ignore[arg-type]
            continue
        md = c.mapping(d, section, key, name)  # type: ignore[arg-type]
        if md is None:
            continue
        c.known_keys(md, key, {"provider", "upstream_model", "tier", "price", *MODEL_LIMITS})
        provider, upstream, tier = md.get("provider"), md.get("upstream_model"), md.get("tier")
        if not isinstance(provider, str):
            c.error(md, f"{key}.provider", f"is required and must name a provider, got {provider!r}", "provider")
            continue
        if provider not in providers:
            c.ref(md, f"{key}.provider", f"names provider {provider!r}, which the policy does not define", "provider")
        if not isinstance(upstream, str) or not upstream:
            c.error(md, f"{key}.upstream_model", f"is required and must be a string, got {upstream!r}", "upstream_model")
            continue
        if not isinstance(tier, str) or tier not in tiers:
            c.error(md, f"{key}.tier", f"must be one of the tiers {list(tiers)}, got {tier!r}", "tier")
            continue
        pd = c.mapping(md.get("price"), md, f"{key}.price", "price")
        if pd is None:
            continue
        c.known_keys(pd, f"{key}.price", {"input_per_mtok_usd", "output_per_mtok_usd"})
        inp = _usd_to_micro(c, pd, f"{key}.price", "input_per_mtok_usd")
        outp = _usd_to_micro(c, pd, f"{key}.price", "output_per_mtok_usd")
        if inp is None or outp is None:
            if "input_per_mtok_usd" not in pd or "output_per_mtok_usd" not in pd:
                c.error(pd, f"{key}.price", "needs input_per_mtok_usd and output_per_mtok_usd")
            continue
        limits = {f: _int(c, md, key, f, 1) for f in MODEL_LIMITS if f in md}
        out[name] = Model(name, provider, upstream, tier, Price(inp, outp), **{f: v for f, v in limits.items() if v is not None})
    return out


def _parse_plans(c: _Checker, raw: LocDict) -> dict[str, Plan]:
    out: dict[str, Plan] = {}
    section = raw.get("plans")
    if section is None:
        return out
    section = c.mapping(section, raw, "plans", "plans")
    for name, d in (section or {}).items():
        key = f"plans.{name}"
        if _name(c, section, key, name, name) is None:  # type: ignore[arg-type]
            continue
        pd = c.mapping(d, section, key, name)  # type: ignore[arg-type]
        if pd is None:
            continue
        c.known_keys(
            pd,
            key,
            {"routes", "requests_per_minute", "tokens_per_minute", "monthly_budget_usd", "prepaid", "fallback"},
        )
        routes_v = pd.get("routes", "*")
        routes: frozenset[str] | None
        if routes_v == "*":
            routes = None
        elif isinstance(routes_v, list) and all(isinstance(r, str) for r in routes_v):
            routes = frozenset(routes_v)
        else:
            c.error(pd, f"{key}.routes", f'must be "*" or a list of route names, got {routes_v!r}', "routes")
            routes = frozenset()
        allow: frozenset[str] = frozenset({"same_tier"})
        multiplier: str | None = None
        fb = pd.get("fallback")
        if fb is not None:
            fbd = c.mapping(fb, pd, f"{key}.fallback", "fallback")
            if fbd is not None:
                c.known_keys(fbd, f"{key}.fallback", {"allow", "max_cost_multiplier"})
                allow_v = fbd.get("allow", ["same_tier"])
                if not isinstance(allow_v, list) or any(a not in PLAN_FALLBACK_KINDS for a in allow_v):
                    c.error(fbd, f"{key}.fallback.allow", f"must list some of {list(PLAN_FALLBACK_KINDS)}, got {allow_v!r}", "allow")
                else:
                    allow = frozenset(allow_v)
                mult = fbd.get("max_cost_multiplier")
                if mult is not None:
                    if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not math.isfinite(mult) or mult < 1:
                        c.error(fbd, f"{key}.fallback.max_cost_multiplier", f"must be a number >= 1, got {mult!r}", "max_cost_multiplier")
                    else:
                        multiplier = str(Decimal(str(mult)))
                if "upgrade" in allow and multiplier is None:
                    c.warn(fbd, f"{key}.fallback", "allows upgrade without max_cost_multiplier: upgrades are then refused (set a cap)", "allow")
        out[name] = Plan(
            name=name,
            routes=routes,
            requests_per_minute=_int(c, pd, key, "requests_per_minute", 1),
            tokens_per_minute=_int(c, pd, key, "tokens_per_minute", 1),
            monthly_budget_micro=_usd_to_micro(c, pd, key, "monthly_budget_usd"),
            prepaid=_bool(c, pd, key, "prepaid", False),
            fallback_allow=allow,
            max_cost_multiplier=multiplier,
        )
    return out


def _parse_rule(c: _Checker, fd: LocDict, key: str, event: str) -> FallbackRule | None:
    v = fd[event]
    action: Any
    count: Any
    if isinstance(v, str):
        action, count = v, 1
    elif isinstance(v, LocDict):
        action, count = v.get("action"), v.get("count", 1)
        c.known_keys(v, f"{key}.{event}", {"action", "count"})
    else:
        c.error(fd, f"{key}.{event}", f"must be an action or {{action, count}}, got {v!r}", event)
        return None
    if action not in ACTIONS:
        c.error(fd, f"{key}.{event}", f"unknown action {action!r} (known: {', '.join(ACTIONS)})", event)
        return None
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        c.error(fd, f"{key}.{event}.count", f"must be a whole number >= 1, got {count!r}", event)
        return None
    return FallbackRule(action, count)


def _parse_route(c: _Checker, rd: LocDict, index: int) -> Route | None:
    name = rd.get("route")
    key = f"routes[{name}]" if isinstance(name, str) else f"routes[{index}]"
    c.known_keys(rd, key, {"route", "primary_model", "fallback", "billing", "default_max_tokens"})
    name = _name(c, rd, f"{key}.route", name, "route")
    if name is None:
        return None
    primary = rd.get("primary_model")
    if not isinstance(primary, str):
        c.error(rd, f"{key}.primary_model", f"is required and must name a model, got {primary!r}", "primary_model")
        return None
    rules: dict[str, FallbackRule] = {}
    max_attempts: int | None = None
    narrowed: tuple[str, ...] | None = None
    fb = rd.get("fallback")
    if fb is not None:
        fd = c.mapping(fb, rd, f"{key}.fallback", "fallback")
        if fd is not None:
            c.known_keys(fd, f"{key}.fallback", set(EVENTS) | {"max_attempts", "models"})
            for event in EVENTS:
                if event in fd:
                    rule = _parse_rule(c, fd, f"{key}.fallback", event)
                    if rule is not None:
                        rules[event] = rule
            max_attempts = _int(c, fd, f"{key}.fallback", "max_attempts", 1)
            if max_attempts is not None and max_attempts > 10:
                c.error(fd, f"{key}.fallback.max_attempts", f"must be at most 10, got {max_attempts}", "max_attempts")
                max_attempts = 10
            ms = fd.get("models")
            if ms is not None:
                if isinstance(ms, list) and all(isinstance(m, str) for m in ms):
                    narrowed = tuple(ms)
                else:
                    c.error(fd, f"{key}.fallback.models", f"must be a list of model names, got {ms!r}", "models")
            if "max_attempts" not in fd:
                c.warn(fd, f"{key}.fallback", "has no max_attempts: every request gets one attempt only; set the cap explicitly")
            budget = rules.get("on_budget_exceeded")
            if budget is not None and budget.action != "fail_closed":
                c.warn(fd, f"{key}.fallback.on_budget_exceeded", f"is {budget.action!r}: budget exhaustion should fail closed", "on_budget_exceeded")
            cap = max_attempts or 1
            for event, rule in rules.items():
                if rule.action == "retry_once_then_switch_same_price_tier" and cap < 3:
                    instead = ("the failed attempt is neither retried nor switched" if cap == 1 else
                               "the failed attempt is retried once on the same provider and, if that fails too, the request "
                               "fails (upstream_unavailable) without switching")
                    c.warn(fd, f"{key}.fallback.{event}", f"retry and switch need max_attempts >= 3, got {cap}: {instead}; "
                           "it switches to the same price tier at once only while the provider's circuit is open", event)
                if rule.action == "retry_same" and max_attempts is not None and rule.count >= max_attempts:
                    c.warn(fd, f"{key}.fallback.{event}", f"retry_same count {rule.count} does not fit in max_attempts "
                           f"{max_attempts}: only {max_attempts - 1} retr{'y' if max_attempts == 2 else 'ies'} will be made", event)
                if rule.action == "retry_same" and max_attempts is None:
                    c.warn(fd, f"{key}.fallback.{event}", "retry_same with no max_attempts: retries are uncapped per error type", event)
    else:
        c.warn(rd, key, "has no fallback section: every failure fails closed and max_attempts is 1", "route")
    billing = rd.get("billing")
    owner, record_both = "customer_api_key", True
    if billing is not None:
        bd = c.mapping(billing, rd, f"{key}.billing", "billing")
        if bd is not None:
            c.known_keys(bd, f"{key}.billing", {"owner", "record_primary_and_final_model"})
            owner_v = bd.get("owner", owner)
            if owner_v not in ("customer_api_key", "workspace", "customer"):
                c.error(bd, f"{key}.billing.owner", f"must be customer_api_key, workspace or customer, got {owner_v!r}", "owner")
            else:
                owner = owner_v
            record_both = _bool(c, bd, f"{key}.billing", "record_primary_and_final_model", True)
    default_max_tokens = _int(c, rd, key, "default_max_tokens", 1) or 1024
    return Route(
        name=name,
        primary_model=primary,
        fallback=RouteFallback(rules=rules, max_attempts=max_attempts, models=narrowed),
        billing_owner=owner,
        record_primary_and_final_model=record_both,
        default_max_tokens=default_max_tokens,
    )


def _check_references(c: _Checker, policy: Policy, route_docs: dict[str, LocDict], plan_docs: LocDict | None) -> None:
    for route in policy.routes.values():
        rd = route_docs[route.name]
        if route.primary_model not in policy.models:
            c.ref(rd, f"routes[{route.name}].primary_model", f"names model {route.primary_model!r}, which the policy does not define", "primary_model")
        for m in route.fallback.models or ():
            if m not in policy.models:
                c.ref(rd, f"routes[{route.name}].fallback.models", f"names model {m!r}, which the policy does not define", "fallback")
    for plan in policy.plans.values():
        for r in sorted(plan.routes or ()):
            if r not in policy.routes and plan_docs is not None:
                # Harmless (SPEC §5's own example lists a route it does not define): a warning.
                c.warn(plan_docs[plan.name], f"plans.{plan.name}.routes", f"names route {r!r}, which the policy does not define "
                       "(requests for it get 404 until it exists)", "routes")


def parse_policy(docs: list[Any], sources: tuple[str, ...]) -> tuple[Policy, list[Issue]]:
    """Build a Policy from parsed documents; returns it with every issue found."""
    c = _Checker()
    good_docs: list[LocDict] = []
    for doc, src in zip(docs, sources, strict=True):
        if doc is None:
            continue
        if not isinstance(doc, LocDict):
            c.issues.append(Issue("error", src, 1, "(document)", f"must be a mapping, got {_kind(doc)}"))
            continue
        good_docs.append(doc)
    raw, route_docs = _merge(good_docs)
    for seq, item in raw.pop("_bad_routes", []):
        c.error(seq, "routes", f"every item must be a mapping with a 'route' name, got {item!r}")
    if "_routes_not_list" in raw:
        doc = raw.pop("_routes_not_list")
        c.error(doc, "routes", "must be a list of route mappings", "routes")
    for d in good_docs:
        if "route" not in d or "routes" in d:
            c.known_keys(d, "(top level)", {"tiers", "providers", "models", "plans", "routes", "settings"})

    tiers = DEFAULT_TIERS
    tiers_doc = raw.pop("_tiers_doc", None)
    if "tiers" in raw:
        tv = raw["tiers"]
        if isinstance(tv, list) and tv and all(isinstance(t, str) for t in tv) and len(set(tv)) == len(tv):
            tiers = tuple(tv)
        else:
            c.error(tiers_doc or raw, "tiers", f"must be a list of distinct tier names, cheapest first, got {tv!r}", "tiers")
    providers = _parse_providers(c, raw)
    models = _parse_models(c, raw, tiers, providers)
    plans = _parse_plans(c, raw)
    routes: dict[str, Route] = {}
    docs_by_route: dict[str, LocDict] = {}
    for i, rd in enumerate(route_docs):
        route = _parse_route(c, rd, i)
        if route is not None:
            routes[route.name] = route
            docs_by_route[route.name] = rd
    policy = Policy(tiers, providers, models, plans, routes, sources, _parse_settings(c, raw))
    plan_docs = raw.get("plans") if isinstance(raw.get("plans"), LocDict) else None
    _check_references(c, policy, docs_by_route, plan_docs)

    has_catalog = bool(models or providers)
    level = "error" if has_catalog else "warning"
    issues = c.issues + [Issue(level, i.file, i.line, i.key, i.message) for i in c.unresolved]
    return policy, issues


def check_policy(paths: Sequence[str | Path]) -> tuple[Policy | None, list[Issue]]:
    """Every issue of the files together; the policy too when it has no errors."""
    files = expand_sources(paths)
    docs, issues = [], []
    for f in files:
        try:
            docs.append(read_yaml(f))
        except PolicyError as exc:
            issues.extend(exc.issues)
            docs.append(None)
        except OSError as exc:
            issues.append(Issue("error", str(f), 0, "(file)", f"cannot read: {exc.strerror}"))
            docs.append(None)
    if not files:
        issues.append(Issue("error", ", ".join(map(str, paths)), 0, "(file)", "no policy files found"))
    policy, more = parse_policy(docs, tuple(map(str, files)))
    issues.extend(more)
    return (None if any(i.level == "error" for i in issues) else policy), issues


def load_policy(paths: Sequence[str | Path] | str | Path, *, require_routes: bool = True) -> Policy:
    """The policy for serving: every reference resolved, or `PolicyError`."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    policy, issues = check_policy(paths)
    errors = [i for i in issues if i.level == "error"]
    if policy is not None and require_routes:
        if not policy.models:
            errors.append(Issue("error", policy.sources[0] if policy.sources else "?", 0, "models", "a served policy needs providers and models (a catalog)"))
        for w in issues:
            if w.level == "warning" and "does not define" in w.message and not w.key.startswith("plans."):
                errors.append(Issue("error", w.file, w.line, w.key, w.message))
    if errors or policy is None:
        raise PolicyError(errors)
    return policy
