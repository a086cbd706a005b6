"""The names of the policy in force, published to Redis so the command line can check them.

`tollgate keys create --plan P --default-route R` must refuse a plan or route the running
gateway does not know (every request with such a key would be refused). The processor that
loads (or reloads) a policy writes its plan and route names to one Redis hash; the CLI reads
it, or loads `--policy` itself when given. With several processors on different policies (a
rolling update) the last one to load wins; a key checked against either is still usable.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from extproc.policy.model import Policy
from extproc.store import RedisLike
from extproc.store import text as _text

ACTIVE_POLICY = "tollgate:policy:active"
REPUBLISH_S = 60.0  # also after a Redis flush or failover, the names come back within a minute


@dataclass(frozen=True)
class PolicyNames:
    plans: frozenset[str]
    routes: frozenset[str]
    source: str  # where the names came from, for messages

    @classmethod
    def of(cls, policy: Policy, source: str) -> PolicyNames:
        return cls(frozenset(policy.plans), frozenset(policy.routes), source)

    def key_problem(self, plan: str, default_route: str | None) -> str | None:
        """Why a key with this plan and default route would be refused, or None."""
        if plan not in self.plans:
            return f"plan {plan!r} is not in the policy in force ({self.source}); plans: {', '.join(sorted(self.plans)) or 'none'}"
        if default_route is not None and default_route not in self.routes:
            return (f"default route {default_route!r} is not in the policy in force ({self.source}); "
                    f"routes: {', '.join(sorted(self.routes)) or 'none'}")
        return None


async def publish(redis: RedisLike, policy: Policy) -> None:
    await redis.hset(ACTIVE_POLICY, mapping={
        "plans": json.dumps(sorted(policy.plans)), "routes": json.dumps(sorted(policy.routes)),
        "published_ms": str(int(time.time() * 1000)),
    })


async def read(redis: RedisLike) -> PolicyNames | None:
    """The names a running processor published, or None if none has."""
    fields = {_text(k): _text(v) for k, v in (await redis.hgetall(ACTIVE_POLICY)).items()}
    if "plans" not in fields:
        return None
    return PolicyNames(frozenset(json.loads(fields["plans"])), frozenset(json.loads(fields.get("routes", "[]"))),
                       "as published by the running processor")
