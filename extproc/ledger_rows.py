"""Ledger rows: a usage or credit record from the stream, as the durable store keeps it (pure).

One row per `record_id`. A request whose reservation expired has an `unsettled` record and,
if its processor came back, a later settled one with the same `record_id` (`late=1`): the
settled one supersedes the unsettled one (`precedence`), whatever order they arrive in, so the
store holds what Redis charged. Money stays integer micro-dollars.
"""

from __future__ import annotations

import json
import time
from dataclasses import astuple, dataclass, fields
from typing import Any

from extproc import ledger

CREDIT = "credit"
SPEND_KINDS = ("normal", "retry", "fallback")


@dataclass(frozen=True)
class LedgerRow:
    record_id: str
    entry: str  # "usage" or "credit"
    kind: str  # normal / retry / fallback for usage; "credit" for credits
    precedence: int  # 0 unsettled, 1 final: a higher one replaces a lower one
    stream_id: str
    ts_ms: int
    month: str  # YYYY-MM (UTC) of ts_ms, the month Redis charged
    customer_id: str
    workspace_id: str
    api_key_id: str
    plan: str
    route: str
    request_id: str
    primary_model: str
    final_model: str
    provider: str
    attempts: int
    fallback_reason: str
    status: str
    prompt_tokens: int
    completion_tokens: int
    cost_micro_usd: int
    retry_cost_micro_usd: int
    fallback_cost_micro_usd: int
    reserved_micro_usd: int
    prepaid: int  # 1: the cost came off the prepaid balance
    amount_micro_usd: int  # credits: the amount credited (negative: a deduction)
    reference: str
    stream: int
    latency_ms: int
    usage_source: str
    attempt_list: str  # JSON array of {model, provider, status, reason}
    record: str  # the whole record as exported (JSON), for fields added later

    @staticmethod
    def columns() -> list[str]:
        return [f.name for f in fields(LedgerRow)]

    def values(self) -> tuple[Any, ...]:
        return astuple(self)

    @property
    def balance_effect(self) -> int:
        """What this row did to the customer's prepaid balance."""
        if self.entry == CREDIT:
            return self.amount_micro_usd
        return -self.cost_micro_usd if self.prepaid else 0


def month_of_ms(ts_ms: int) -> str:
    return time.strftime("%Y-%m", time.gmtime(ts_ms / 1000))


def _int(rec: dict[str, str], name: str) -> int:
    value = rec.get(name) or "0"
    return int(value)


def spend_kind(rec: dict[str, str]) -> str:
    """The record's own `kind` when it has one; else as the processor decides it: another
    model served -> fallback; a later attempt on the primary -> retry; else normal."""
    kind = rec.get("kind", "")
    if kind in SPEND_KINDS:
        return kind
    return ledger.spend_kind(rec.get("primary_model", ""), rec.get("final_model", ""), _int(rec, "attempts"))


def row_of(stream_id: str, rec: dict[str, str]) -> LedgerRow:
    """A stream entry's fields (text) as a ledger row. Raises ValueError on a malformed one."""
    if not rec.get("record_id"):
        raise ValueError(f"stream entry {stream_id} has no record_id")
    ts = _int(rec, "ts")
    is_credit = rec.get("kind") == CREDIT
    attempts = rec.get("attempt_list", "[]")
    json.loads(attempts)  # must be JSON
    return LedgerRow(
        record_id=rec["record_id"], entry=CREDIT if is_credit else "usage", kind=CREDIT if is_credit else spend_kind(rec),
        precedence=0 if rec.get("status") == "unsettled" else 1, stream_id=stream_id, ts_ms=ts, month=month_of_ms(ts),
        customer_id=rec.get("customer_id", ""), workspace_id=rec.get("workspace_id", ""), api_key_id=rec.get("api_key_id", ""),
        plan=rec.get("plan", ""), route=rec.get("route", ""), request_id=rec.get("request_id", ""),
        primary_model=rec.get("primary_model", ""), final_model=rec.get("final_model", ""), provider=rec.get("provider", ""),
        attempts=_int(rec, "attempts"), fallback_reason=rec.get("fallback_reason", ""), status=rec.get("status", ""),
        prompt_tokens=_int(rec, "prompt_tokens"), completion_tokens=_int(rec, "completion_tokens"),
        cost_micro_usd=_int(rec, "cost_micro_usd"), retry_cost_micro_usd=_int(rec, "retry_cost_micro_usd"),
        fallback_cost_micro_usd=_int(rec, "fallback_cost_micro_usd"), reserved_micro_usd=_int(rec, "reserved_micro_usd"),
        prepaid=1 if rec.get("prepaid") == "true" else 0, amount_micro_usd=_int(rec, "amount_micro_usd"),
        reference=rec.get("reference", ""), stream=1 if rec.get("stream") == "true" else 0, latency_ms=_int(rec, "latency_ms"),
        usage_source=rec.get("usage_source", ""), attempt_list=attempts, record=json.dumps(rec, sort_keys=True),
    )


def newest_per_record(rows: list[LedgerRow]) -> list[LedgerRow]:
    """One row per record_id within a batch: the highest precedence (first of equals)."""
    best: dict[str, LedgerRow] = {}
    for r in rows:
        have = best.get(r.record_id)
        if have is None or r.precedence > have.precedence:
            best[r.record_id] = r
    return list(best.values())
