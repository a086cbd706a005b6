"""Usage records (SPEC §6): what one request was, did and cost — and `tollgate explain`.

A record is written once per request by the `finish` script, in the same atomic step that
settles its money, to the Redis stream `tollgate:usage` (trimmed by `tollgate usage export` once exported).
Money fields are integer micro-dollars as decimal strings; `attempt_list` is a JSON array of
{model, provider, status, reason} in attempt order.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

from extproc.money import format_usd
from extproc.quota import USAGE_STREAM, request_key
from extproc.store import RedisLike
from extproc.store import text as _text


@dataclass(frozen=True)
class Attempt:
    model: str
    provider: str
    status: int
    reason: str  # "ok", or the failure event: provider_5xx, rate_limit, timeout, connect_failure, ...

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "provider": self.provider, "status": self.status, "reason": self.reason}


def decode_entry(entry_id: Any, fields: dict[Any, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {_text(k): _text(v) for k, v in fields.items()}
    rec["stream_id"] = _text(entry_id)
    with contextlib.suppress(json.JSONDecodeError):
        rec["attempt_list"] = json.loads(rec.get("attempt_list", "[]"))
    return rec


async def tail(redis: RedisLike, n: int) -> list[dict[str, Any]]:
    """The last n records, oldest first."""
    entries: list[Any] = await redis.xrevrange(USAGE_STREAM, count=n) or []
    return [decode_entry(i, f) for i, f in reversed(entries)]


class AmbiguousRequestId(Exception):
    """Several customers used one request id: `explain` needs `--customer`."""

    def __init__(self, request_id: str, customers: list[str]) -> None:
        super().__init__(f"request id {request_id!r} was used by {len(customers)} customers: {', '.join(customers)}")
        self.customers = customers


async def find(redis: RedisLike, request_id: str, customer: str | None = None) -> dict[str, Any] | None:
    """The record of a request id (ids are scoped per customer). Without `customer`, an id
    more than one customer used raises AmbiguousRequestId naming them."""
    index = {_text(k): _text(v) for k, v in (await redis.hgetall(request_key(request_id))).items()}
    if customer is not None:
        entry_id = index.get(customer)
    elif len(index) > 1:
        raise AmbiguousRequestId(request_id, sorted(index))
    else:
        entry_id = next(iter(index.values()), None)
    if entry_id is None:
        return None
    entries: list[Any] = await redis.xrange(USAGE_STREAM, min=entry_id, max=entry_id) or []
    return decode_entry(entries[0][0], entries[0][1]) if entries else None


# Record fields that are integers (stored as decimal strings, like every stream field).
INTEGER_FIELDS = ("ts", "attempts", "status", "prompt_tokens", "completion_tokens", "cost_micro_usd", "retry_cost_micro_usd",
                  "fallback_cost_micro_usd", "reserved_micro_usd", "latency_ms")


def typed(rec: dict[str, Any]) -> dict[str, Any]:
    """A record for JSON output: integers as numbers, `stream` as a boolean (a status such as
    `unsettled` stays a string)."""
    out = dict(rec)
    for f in INTEGER_FIELDS:
        v = out.get(f)
        if isinstance(v, str) and v.lstrip("-").isdigit():
            out[f] = int(v)
    if out.get("stream") in ("true", "false"):
        out["stream"] = out["stream"] == "true"
    return out


def usd(micro: Any) -> str:
    return "$" + format_usd(int(micro or 0))


def explain(rec: dict[str, Any]) -> str:
    """In plain words: which model was intended, what failed, which rule applied, what it cost."""
    attempts: list[dict[str, Any]] = rec.get("attempt_list") or []
    primary, final = rec.get("primary_model", "?"), rec.get("final_model", "?")
    lines = [
        f"Request {rec.get('request_id')} on route {rec.get('route')} "
        f"(customer {rec.get('customer_id')}, workspace {rec.get('workspace_id')}, key {rec.get('api_key_id')}, plan {rec.get('plan')})",
        f"  intended model : {primary}",
    ]
    status = rec.get("status", "?")
    if status == "unsettled":
        lines.append("  outcome        : UNSETTLED - the processor handling it stopped before the response was accounted;")
        lines.append(f"                   {usd(rec.get('reserved_micro_usd'))} had been reserved and was released; reconcile with the provider")
    elif final == primary:
        lines.append(f"  served by      : {final} on {rec.get('provider')} (no model change), status {status}")
    else:
        lines.append(f"  served by      : {final} on {rec.get('provider')} instead of {primary}, status {status}")
    if attempts:
        lines.append(f"  attempts       : {len(attempts)}")
        for i, a in enumerate(attempts, 1):
            outcome = "served" if a.get("reason") == "ok" else f"failed: {a.get('reason')}"
            lines.append(f"    {i}. {a.get('model')} on {a.get('provider')} -> {a.get('status')} ({outcome})")
    reason = rec.get("fallback_reason", "none")
    if reason != "none":
        lines.append(f"  why it changed : {reason}; rule applied: {rec.get('rule') or 'route policy'}")
    else:
        lines.append("  why it changed : it did not (fallback reason none)")
    lines.append(
        f"  tokens         : {rec.get('prompt_tokens', 0)} prompt + {rec.get('completion_tokens', 0)} completion"
        f" ({rec.get('usage_source', 'provider')} usage)"
    )
    lines.append(
        f"  cost           : {usd(rec.get('cost_micro_usd'))} (of which retry {usd(rec.get('retry_cost_micro_usd'))}, "
        f"fallback {usd(rec.get('fallback_cost_micro_usd'))}); reserved beforehand {usd(rec.get('reserved_micro_usd'))}"
    )
    lines.append(f"  streamed       : {rec.get('stream')}, latency {rec.get('latency_ms')} ms")
    return "\n".join(lines)
