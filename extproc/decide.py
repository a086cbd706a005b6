"""Routing decisions: pure functions of (policy, key, request facts) -> decision.

No I/O here. The processor gathers facts (who is calling, which route header, which body
`model`), calls these functions and turns the result into Envoy mutations.
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc import errors
from extproc.errors import ApiError
from extproc.policy.model import Model, Plan, Policy, Provider, Route


@dataclass(frozen=True)
class KeyInfo:
    """A customer API key as stored (never the secret itself)."""

    key_id: str
    customer: str
    workspace: str
    plan: str
    default_route: str | None = None
    active: bool = True
    rpm: int | None = None  # per-key overrides of the plan's limits
    tpm: int | None = None


@dataclass(frozen=True)
class RouteChoice:
    """Where one request goes on its first attempt."""

    route: Route
    plan: Plan
    primary: Model
    target: Model
    provider: Provider


def plan_of(policy: Policy, key: KeyInfo) -> Plan | ApiError:
    plan = policy.plans.get(key.plan)
    if plan is None:
        return errors.permission_denied(f"This key's plan '{key.plan}' is not offered by the gateway's policy.")
    return plan


def knows_model(policy: Policy, name: str) -> bool:
    """A name the policy knows: one of its model names or a provider's `upstream_model`."""
    return name in policy.models or any(m.upstream_model == name for m in policy.models.values())


def resolve_route(policy: Policy, key: KeyInfo, header_route: str | None, body_model: str | None) -> Route | ApiError:
    """SPEC §1.3: the `x-tollgate-route` header, else the body's `model` when it names a
    route, else the key's default route — but only for a model the policy knows or an absent
    `model`, so a typo is a 404 and never served silently."""
    if header_route:
        name = header_route
    elif body_model and body_model in policy.routes:
        name = body_model
    elif key.default_route and (not body_model or knows_model(policy, body_model)):
        name = key.default_route
    elif not body_model:
        return errors.invalid_request("You must provide a model parameter.", param="model")
    else:
        return errors.model_not_found(body_model or "")
    route = policy.routes.get(name)
    return route if route is not None else errors.model_not_found(name)


def authorize(policy: Policy, key: KeyInfo, route: Route) -> Plan | ApiError:
    """The key's plan, if it allows the route."""
    plan = plan_of(policy, key)
    if isinstance(plan, ApiError):
        return plan
    if not plan.allows_route(route.name):
        return errors.permission_denied(f"Your plan '{plan.name}' does not include the route '{route.name}'.")
    return plan


def visible_routes(policy: Policy, key: KeyInfo) -> list[str]:
    """The routes this key may use, for `GET /v1/models`."""
    plan = policy.plans.get(key.plan)
    if plan is None:
        return []
    return sorted(r for r in policy.routes if plan.allows_route(r))
