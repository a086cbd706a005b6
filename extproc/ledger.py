"""The request's side of the ledger: its usage record (SPEC §6), typed and serialised once,
what kind of spend it was, and settling it (with retries when Redis fails).

The atomic parts (reserve, finish = settle + record, expire) are Redis scripts driven by
`quota`; this module decides what goes into them. A reservation that is never settled is
turned into an `unsettled` record by the reaper, so a failed settlement is never lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from extproc import config, metrics
from extproc.gateway import Gateway
from extproc.quota import Reservation
from extproc.records import Attempt

log = logging.getLogger("tollgate.ledger")


def spend_kind(primary_model: str, final_model: str, attempts: int) -> str:
    """normal: the primary served on the first attempt; retry: a later attempt on the
    primary; fallback: another model served (SPEC §7: retry spend kept apart)."""
    if final_model != primary_model:
        return "fallback"
    return "normal" if attempts <= 1 else "retry"


@dataclass
class UsageRecord:
    """One request's usage record. Known before the upstream call: who, which route and plan,
    the primary model (also what an `unsettled` record shows). The rest once it is finished."""

    request_id: str
    ts: str  # ms since the epoch, when the request arrived
    route: str
    customer_id: str
    workspace_id: str
    api_key_id: str
    plan: str
    primary_model: str
    final_model: str
    provider: str
    stream: bool
    endpoint: str
    record_id: str  # publishes the record exactly once
    prepaid: bool
    attempts: int = 1
    fallback_reason: str = "none"
    attempt_list: list[Attempt] = field(default_factory=list)
    # --- known once finished ---
    status: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    kind: str = "normal"
    cost_micro_usd: int = 0
    reserved_micro_usd: int = 0
    output_cap: int = 0
    overrun: bool = False
    usage_source: str = "none"
    rule: str = ""
    latency_ms: int = 0

    def fields(self, finished: bool = True) -> dict[str, str]:
        """The record as Redis stream fields (strings; money in integer micro-dollars)."""
        base = {
            "request_id": self.request_id, "ts": self.ts, "route": self.route, "customer_id": self.customer_id,
            "workspace_id": self.workspace_id, "api_key_id": self.api_key_id, "plan": self.plan,
            "primary_model": self.primary_model, "final_model": self.final_model, "provider": self.provider,
            "attempts": str(self.attempts), "fallback_reason": self.fallback_reason,
            "stream": _flag(self.stream), "endpoint": self.endpoint, "record_id": self.record_id, "prepaid": _flag(self.prepaid),
            "attempt_list": json.dumps([a.as_dict() for a in self.attempt_list]),
        }
        if not finished:
            return base
        cost = self.cost_micro_usd
        return {**base, "status": str(self.status), "prompt_tokens": str(self.prompt_tokens),
                "completion_tokens": str(self.completion_tokens), "kind": self.kind, "cost_micro_usd": str(cost),
                "retry_cost_micro_usd": str(cost if self.kind == "retry" else 0),
                "fallback_cost_micro_usd": str(cost if self.kind == "fallback" else 0),
                "reserved_micro_usd": str(self.reserved_micro_usd), "output_cap": str(self.output_cap),
                "overrun": _flag(self.overrun), "usage_source": self.usage_source, "rule": self.rule,
                "latency_ms": str(self.latency_ms)}


def _flag(value: bool) -> str:
    return "true" if value else "false"


# Redis failed to settle: try again after these delays (s), then leave it to the reaper.
SETTLE_RETRY_DELAYS_S = config.SETTLE_RETRY_DELAYS_S


async def settle(gw: Gateway, res: Reservation, cost: int, tokens: int, served: bool, record: dict[str, str]) -> None:
    """Settle now; if Redis fails, keep retrying in the background. The reservation stays
    until then, so at worst the reaper turns it into an 'unsettled' record — never lost.
    Shielded: Envoy may reset the request's stream meanwhile, which must not cut the
    settlement (or its clean-ups) in half."""
    try:
        await asyncio.shield(gw.spawn(gw.quota.finish(res, cost, tokens, served, record)))
        return
    except RedisError:
        metrics.REDIS_ERRORS.labels("finish").inc()

    async def retry() -> None:
        for delay in SETTLE_RETRY_DELAYS_S:
            await asyncio.sleep(delay)
            try:
                await gw.quota.finish(res, cost, tokens, served, record)
                return
            except RedisError:
                metrics.REDIS_ERRORS.labels("finish").inc()
        log.error("request %s: could not settle; its reservation will expire as an unsettled record", res.request_id)

    gw.spawn(retry())
