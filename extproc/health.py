"""Provider health: a circuit per provider, shared by every processor through Redis.

A circuit opens on a failure *rate*, not a count: within `window_s` seconds at least
`failures` failed attempts (5xx, timeouts, connect failures; not 429), at least
`failure_rate` of the provider's attempts, from at least `customers` distinct customers. So
one tenant whose requests fail (or whose huge requests time out, see
`timeouts.size_explains_timeout`) cannot open a provider's circuit for everybody, and a busy
provider with a few errors stays in service.

Open: routes skip the provider for `cooldown_s` (remembering which failure opened it, so a
route without `on_provider_unhealthy` follows that failure's rule). Half-open, after the
cooldown: each process lets one request a second through as a probe; a failure reopens the
circuit at once, a success closes it (like Envoy's outlier detection, with probes).

The request path never waits on Redis for health: each process reads the circuits once a
second in the background and in the same round trip flushes its count of successful attempts;
failures are written only on the failure path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from redis.exceptions import RedisError

from extproc import config, metrics
from extproc.policy.model import Policy, Provider
from extproc.store import RedisLike, Scripts, text

log = logging.getLogger("tollgate.health")

BUCKETS = config.CIRCUIT_BUCKETS
PROBE_INTERVAL_S = config.CIRCUIT_PROBE_INTERVAL_S


def _get(client: Any, key: str) -> Any:
    return client.get(key)


def _prefix(provider: str) -> str:
    return f"tollgate:health:{{p:{provider}}}"


def bucket_keys(provider: str, window_s: int, now_s: float) -> list[str]:
    """The attempt-count and failing-customer keys of the window, current bucket first."""
    size = max(1, window_s // BUCKETS)
    n = -(-window_s // size)
    current = int(now_s // size)
    buckets = [current - i for i in range(n)]
    p = _prefix(provider)
    return [f"{p}:n:{b}" for b in buckets] + [f"{p}:c:{b}" for b in buckets]


@dataclass(frozen=True)
class Circuits:
    """What one request sees: providers to skip, and the failure that opened each circuit."""

    unhealthy: frozenset[str] = frozenset()
    opened_by: Mapping[str, str] = field(default_factory=dict)
    probing: frozenset[str] = frozenset()  # half-open, and this request is the probe

    @property
    def after_first(self) -> frozenset[str]:
        """Providers later attempts skip: a probe gets one attempt, never a retry on it."""
        return self.unhealthy | self.probing


class Health:
    def __init__(self, redis: RedisLike, policy: Policy) -> None:
        self.redis = redis
        self.policy = policy
        self.open: dict[str, str] = {}  # provider -> the failure event that opened its circuit
        self.half_open: dict[str, str] = {}
        self.next_probe: dict[str, float] = {}
        self.successes: Counter[str] = Counter()  # not yet flushed to Redis
        self.scripts = Scripts(redis, "health_note")

    def view(self) -> Circuits:
        """The circuits for one request. A half-open provider is skipped except for one
        request a second (the probe, which this call hands out)."""
        unhealthy, probing = set(self.open), set()
        now = time.monotonic()
        for provider in self.half_open:
            if now >= self.next_probe.get(provider, 0.0):
                self.next_probe[provider] = now + PROBE_INTERVAL_S
                probing.add(provider)
            else:
                unhealthy.add(provider)
        return Circuits(frozenset(unhealthy), {**self.half_open, **self.open}, frozenset(probing))

    def record_success(self, provider: str) -> None:
        """Counted in memory; flushed with the next refresh (no Redis call per request)."""
        self.successes[provider] += 1

    def _args(self, p: Provider, kind: str, count: int, customer: str, event: str) -> tuple[list[str], list[object]]:
        keys = bucket_keys(p.name, p.circuit_window_s, time.time())
        n = len(keys) // 2
        size = max(1, p.circuit_window_s // BUCKETS)
        args: list[object] = [n, kind, count, customer, event, p.circuit_failures, p.circuit_failure_rate, p.circuit_customers,
                              p.circuit_cooldown_s, p.circuit_window_s + size]
        return [f"{_prefix(p.name)}:open", f"{_prefix(p.name)}:probe", *keys], args

    async def record_failure(self, provider: str, customer: str, event: str) -> None:
        p = self.policy.providers.get(provider)
        if p is None:
            return
        keys, args = self._args(p, "fail", 1, customer, event)
        try:  # shares a round trip with whatever else is in flight (store.GroupCommit)
            (opened,) = await self.scripts.batch(partial(self.scripts.call, name="health_note", keys=keys, args=args))
        except RedisError:
            metrics.REDIS_ERRORS.labels("health").inc()
            return
        if int(opened):
            log.warning("provider %s: circuit opened for %ss (%s)", provider, p.circuit_cooldown_s, event)
            self.open = {**self.open, provider: event}

    async def refresh(self) -> None:
        """Flush this process's successes and read every circuit, in one round trip."""
        providers = list(self.policy.providers.values())
        flush, self.successes = self.successes, Counter()
        commands: list[Callable[[Any], Any]] = []
        for p in providers:
            if flush.get(p.name):
                keys, args = self._args(p, "ok", flush[p.name], "", "")
                commands.append(partial(self.scripts.call, name="health_note", keys=keys, args=args))
        for p in providers:  # one key each: different cluster slots, so plain GETs
            for flag in ("open", "probe"):
                commands.append(partial(_get, key=f"{_prefix(p.name)}:{flag}"))
        try:
            replies = await self.scripts.batch(*commands) if commands else []
        except RedisError:
            self.successes.update(flush)  # try again next time
            raise
        flags = replies[len(replies) - 2 * len(providers):]
        opened, probing = {}, {}
        for i, p in enumerate(providers):
            o, probe = flags[2 * i], flags[2 * i + 1]
            if o is not None:
                opened[p.name] = text(o)
            elif probe is not None:
                probing[p.name] = text(probe)
        self.open, self.half_open = opened, probing

    async def run(self, interval_s: float = config.HEALTH_REFRESH_INTERVAL_S) -> None:
        while True:
            try:
                await self.refresh()
            except RedisError:
                metrics.REDIS_ERRORS.labels("health").inc()
            await asyncio.sleep(interval_s)
