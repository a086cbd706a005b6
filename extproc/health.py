"""Provider health: a circuit per provider, shared by every processor through Redis.

`failures` failures within `window_s` seconds open the circuit for `cooldown_s` seconds; while
open, routes skip the provider (reason `provider_unhealthy`, per their
`on_provider_unhealthy` rule); after the cooldown it is tried again. Each process reads the
open circuits once a second in the background, so the request path never waits on Redis for
health; failures are written only on the failure path.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from extproc import metrics
from extproc.policy.model import Policy
from extproc.store import RedisLike, Scripts

log = logging.getLogger("tollgate.health")


def _keys(provider: str) -> tuple[str, str]:
    return f"tollgate:health:{{p:{provider}}}:failures", f"tollgate:health:{{p:{provider}}}:open"


class Health:
    def __init__(self, redis: RedisLike, policy: Policy) -> None:
        self.redis = redis
        self.policy = policy
        self.unhealthy: frozenset[str] = frozenset()
        self.scripts = Scripts(redis, "health_fail")

    async def record_failure(self, provider: str) -> None:
        p = self.policy.providers.get(provider)
        if p is None:
            return
        try:
            opened = await self.scripts.eval("health_fail", list(_keys(provider)), [p.circuit_window_s, p.circuit_failures, p.circuit_cooldown_s])
        except RedisError:
            metrics.REDIS_ERRORS.labels("health").inc()
            return
        if int(opened):
            log.warning("provider %s: circuit opened for %ss after %d failures", provider, p.circuit_cooldown_s, p.circuit_failures)
            self.unhealthy = self.unhealthy | {provider}

    async def refresh(self) -> None:
        names = list(self.policy.providers)
        if not names:
            self.unhealthy = frozenset()
            return
        pipe = self.redis.pipeline(transaction=False)  # one key per provider: different cluster slots
        for n in names:
            pipe.get(_keys(n)[1])
        flags = await pipe.execute()
        self.unhealthy = frozenset(n for n, f in zip(names, flags, strict=True) if f is not None)

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            try:
                await self.refresh()
            except RedisError:
                metrics.REDIS_ERRORS.labels("health").inc()
            await asyncio.sleep(interval_s)
