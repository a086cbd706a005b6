"""The policy as typed, immutable data.

Everything the processor decides is a pure function of a `Policy` and the facts of one
request; the loader (`policy.load`) is the only place that knows about YAML.
Money is integer micro-dollars: prices are kept as micro-USD per million tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from extproc import config

EVENTS = (
    "on_provider_5xx",
    "on_rate_limit",
    "on_timeout",
    "on_connect_failure",
    "on_budget_exceeded",
    "on_provider_unhealthy",
)
ACTIONS = (
    "retry_once_then_switch_same_price_tier",
    "switch_same_price_tier",
    "retry_same",
    "downgrade",
    "upgrade",
    "fail_closed",
)
PLAN_FALLBACK_KINDS = ("same_tier", "downgrade", "upgrade")
# Defaults live in `extproc.config`; this name stays for `quota`, which imports it from here.
DEFAULT_IDEMPOTENCY_WINDOW_S = config.IDEMPOTENCY_WINDOW_S


@dataclass(frozen=True)
class Provider:
    """One upstream vendor endpoint; rendered as one Envoy cluster of the same name."""

    name: str
    host: str
    port: int
    tls: bool
    api_key_env: str | None = None
    api_key_file: str | None = None
    timeout_s: float = config.PROVIDER_TIMEOUT_S  # non-stream attempts: plus the output cap at tokens_per_s
    tokens_per_s: float = config.PROVIDER_TOKENS_PER_S
    ttfb_timeout_s: float | None = None  # streams: until the first byte; None means timeout_s
    idle_timeout_s: float | None = None  # streams: between two chunks; None means timeout_s
    circuit_failures: int = config.CIRCUIT_FAILURES
    circuit_failure_rate: str = config.CIRCUIT_FAILURE_RATE
    circuit_customers: int = config.CIRCUIT_CUSTOMERS
    circuit_window_s: int = config.CIRCUIT_WINDOW_S
    circuit_cooldown_s: int = config.CIRCUIT_COOLDOWN_S  # how long an open circuit skips the provider
    headers: tuple[tuple[str, str], ...] = ()  # sent on every request to it (names lower case)
    query_params: tuple[str, ...] = ()  # query parameters a client may pass on (e.g. api-version)

    @property
    def ttfb_s(self) -> float:
        return self.ttfb_timeout_s if self.ttfb_timeout_s is not None else self.timeout_s

    @property
    def idle_s(self) -> float:
        return self.idle_timeout_s if self.idle_timeout_s is not None else self.timeout_s


@dataclass(frozen=True)
class Price:
    """Micro-dollars per million tokens (exact integers, never floats)."""

    input_micro_per_mtok: int
    output_micro_per_mtok: int

    def cost_micro(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Cost of one call in micro-dollars, rounded up to a whole micro-dollar."""
        nano = prompt_tokens * self.input_micro_per_mtok + completion_tokens * self.output_micro_per_mtok
        return -(-nano // 1_000_000)


@dataclass(frozen=True)
class Model:
    """A name clients and routes use, bound to one provider's own model name."""

    name: str
    provider: str
    upstream_model: str
    tier: str
    price: Price
    context_window: int | None = None  # prompt tokens it accepts at most (caps the input bound)
    max_output_tokens: int | None = None  # the largest output cap the gateway writes for it
    image_part_tokens: int = config.IMAGE_PART_TOKENS  # prompt tokens an image part may cost
    file_part_tokens: int = config.FILE_PART_TOKENS  # prompt tokens a file part may cost


@dataclass(frozen=True)
class FallbackRule:
    """What a route does on one failure event: an action and, for `retry_same`, a count."""

    action: str
    count: int = 1


@dataclass(frozen=True)
class RouteFallback:
    rules: dict[str, FallbackRule] = field(default_factory=dict)
    max_attempts: int | None = None
    models: tuple[str, ...] | None = None  # narrows same-tier / tier-change candidates

    def rule(self, event: str) -> FallbackRule:
        """The rule for an event; an event the route does not name fails closed."""
        return self.rules.get(event, FallbackRule("fail_closed"))


@dataclass(frozen=True)
class Route:
    name: str
    primary_model: str
    fallback: RouteFallback = field(default_factory=RouteFallback)
    billing_owner: str = "customer_api_key"
    record_primary_and_final_model: bool = True
    default_max_tokens: int = config.ROUTE_DEFAULT_MAX_TOKENS

    @property
    def max_attempts(self) -> int:
        """The total cap on upstream attempts; 1 when the route names none."""
        return self.fallback.max_attempts or 1


@dataclass(frozen=True)
class Plan:
    name: str
    routes: frozenset[str] | None  # None means "*": every route
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    monthly_budget_micro: int | None = None
    prepaid: bool = False
    fallback_allow: frozenset[str] = frozenset({"same_tier"})
    max_cost_multiplier: str | None = None  # decimal string, e.g. "3"

    def allows_route(self, route: str) -> bool:
        return self.routes is None or route in self.routes


@dataclass(frozen=True)
class Settings:
    """Process-wide settings (top-level `settings:`); every per-request Redis key is bounded by them."""

    idempotency_window_s: int = config.IDEMPOTENCY_WINDOW_S


@dataclass(frozen=True)
class Policy:
    tiers: tuple[str, ...]
    providers: dict[str, Provider]
    models: dict[str, Model]
    plans: dict[str, Plan]
    routes: dict[str, Route]
    sources: tuple[str, ...] = ()
    settings: Settings = Settings()
    # Derived data computed once per policy object (chains' fallback sequences); never
    # compared or printed. A reload makes a new policy, so nothing here goes stale.
    derived: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    def model_of_route(self, route: Route) -> Model:
        return self.models[route.primary_model]
