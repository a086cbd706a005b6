"""Load policy YAML into a `Policy`, naming file, line and key in every complaint.

A policy may be one file or several (a catalog of tiers/providers/models/plans plus one file
per route, like the seed template); `--policy` may also name a directory. Files merge in the
order given (`merge`): maps merge by name, a later route of the same name replaces an earlier one.

Every problem is an `Issue` with a level and a kind. `load_policy` raises `PolicyError` on any
error; `check_policy` returns all issues so `tollgate policy check` can print warnings too.
A reference that cannot be resolved (a route naming an unknown model) is an error when the
catalog is present and only a warning for a lone route file, which is checked on its own.

The parts: `yamlpos` (YAML with positions), `merge` (the documents together, typed),
`sections` (the shared section shape, tiers, settings), `providers`, `catalog` (models,
plans) and `routes` (routes, fallback checklist, billing).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from extproc.policy.catalog import parse_model, parse_plan
from extproc.policy.checker import Checker, kind_of
from extproc.policy.issues import Issue, Kind, PolicyError, Where
from extproc.policy.merge import TOP_LEVEL_KEYS, Merged, merge
from extproc.policy.model import Policy, Route
from extproc.policy.providers import parse_provider
from extproc.policy.routes import parse_route
from extproc.policy.sections import parse_named, parse_settings, parse_tiers
from extproc.policy.yamlpos import LocDict, expand_sources, read_yaml

__all__ = ["Issue", "Kind", "PolicyError", "check_policy", "expand_sources", "load_policy", "parse_policy", "read_yaml"]


def parse_policy(docs: list[Any], sources: tuple[str, ...]) -> tuple[Policy, list[Issue]]:
    """Build a Policy from parsed documents; returns it with every issue found."""
    c = Checker()
    good_docs: list[LocDict] = []
    for doc, src in zip(docs, sources, strict=True):
        if isinstance(doc, LocDict):
            good_docs.append(doc)
        elif doc is not None:
            c.error(Where(src, 1), "(document)", f"must be a mapping, got {kind_of(doc)}")
    merged = merge(good_docs)
    c.issues.extend(merged.issues)
    for d in merged.catalog_docs:
        c.known_keys(d, "(top level)", set(TOP_LEVEL_KEYS))
    policy, route_docs = _build(c, merged, sources)
    _check_references(c, policy, route_docs, merged)
    return policy, c.issues + c.unresolved_issues(has_catalog=bool(policy.models or policy.providers))


def _build(c: Checker, merged: Merged, sources: tuple[str, ...]) -> tuple[Policy, dict[str, LocDict]]:
    """The policy of the merged sections, and each route's mapping (for reference errors)."""
    tiers = parse_tiers(c, merged.section("tiers"))
    providers = parse_named(c, merged.section("providers"), "providers", parse_provider)
    models = parse_named(c, merged.section("models"), "models", partial(parse_model, tiers=tiers, providers=providers))
    plans = parse_named(c, merged.section("plans"), "plans", parse_plan)
    routes: dict[str, Route] = {}
    route_docs: dict[str, LocDict] = {}
    for i, rd in enumerate(merged.routes):
        route = parse_route(c, rd, i)
        if route is not None:
            routes[route.name], route_docs[route.name] = route, rd
    settings = parse_settings(c, merged.section("settings"))
    return Policy(tiers, providers, models, plans, routes, sources, settings), route_docs


def _check_references(c: Checker, policy: Policy, route_docs: dict[str, LocDict], merged: Merged) -> None:
    for route in policy.routes.values():
        rd = route_docs[route.name]
        if route.primary_model not in policy.models:
            c.ref(rd.at("primary_model"), f"routes[{route.name}].primary_model",
                  f"names model {route.primary_model!r}, which the policy does not define")
        for m in route.fallback.models or ():
            if m not in policy.models:
                c.ref(rd.at("fallback"), f"routes[{route.name}].fallback.models", f"names model {m!r}, which the policy does not define")
    plans = merged.section("plans")
    if plans is None or not isinstance(plans.value, LocDict):
        return
    for plan in policy.plans.values():
        for r in sorted(plan.routes or ()):
            if r not in policy.routes:
                # Harmless (SPEC §5's own example lists a route it does not define): a warning.
                c.warn(plans.value[plan.name].at("routes"), f"plans.{plan.name}.routes", f"names route {r!r}, which the policy "
                       "does not define (requests for it get 404 until it exists)", Kind.UNDEFINED_PLAN_ROUTE)


def check_policy(paths: Sequence[str | Path]) -> tuple[Policy | None, list[Issue]]:
    """Every issue of the files together; the policy too when it has no errors."""
    files = expand_sources(paths)
    docs: list[Any] = []
    issues: list[Issue] = []
    for f in files:
        try:
            docs.append(read_yaml(f))
        except PolicyError as exc:
            issues.extend(exc.issues)
            docs.append(None)
        except OSError as exc:
            issues.append(Issue("error", str(f), 0, "(file)", f"cannot read: {exc.strerror}", Kind.FILE))
            docs.append(None)
    if not files:
        issues.append(Issue("error", ", ".join(map(str, paths)), 0, "(file)", "no policy files found", Kind.FILE))
    policy, more = parse_policy(docs, tuple(map(str, files)))
    issues.extend(more)
    return (None if any(i.level == "error" for i in issues) else policy), issues


def serving_errors(policy: Policy, issues: list[Issue]) -> list[Issue]:
    """What a served policy may not have beyond `check_policy`'s errors: no catalog, or
    references left unresolved (warnings only while a lone route file is checked)."""
    errors = [i.as_error() for i in issues if i.level == "warning" and i.kind == Kind.UNRESOLVED]
    if not policy.models:
        where = policy.sources[0] if policy.sources else "?"
        errors.insert(0, Issue("error", where, 0, "models", "a served policy needs providers and models (a catalog)", Kind.INCOMPLETE))
    return errors


def load_policy(paths: Sequence[str | Path] | str | Path, *, require_routes: bool = True) -> Policy:
    """The policy for serving: every reference resolved, or `PolicyError`."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    policy, issues = check_policy(paths)
    errors = [i for i in issues if i.level == "error"]
    if policy is not None and require_routes:
        errors += serving_errors(policy, issues)
    if errors or policy is None:
        raise PolicyError(errors)
    return policy
