"""Quotas and money: reserve before the upstream call, settle from `usage`, release on failure.

All arithmetic on money happens in Redis Lua scripts (`lua/*.lua`, loaded once, run with
EVALSHA) on integer micro-dollars, so concurrent requests from any number of processor
processes can never overspend: a check and its charge are one atomic step.

Redis layout. Everything about one customer shares the hash tag `{c:<customer>}` so that each
script's keys live in one Redis Cluster slot:
  tollgate:{c:C}:balance                 prepaid balance (micro-USD)
  tollgate:{c:C}:reserved                sum of reservations in flight
  tollgate:{c:C}:spend:YYYYMM            settled spend this month (UTC)
  tollgate:{c:C}:limits                  hash: monthly_budget_micro override
  tollgate:{c:C}:ws:W:{reserved,spend:YYYYMM,limits,rpm,tpm}   the same per workspace
  tollgate:{c:C}:{rpm,tpm}               token buckets per customer (limits: plan, or limits hash)
  tollgate:{c:C}:key:K:{rpm,tpm}         token buckets per API key
  tollgate:{c:C}:req:ID                  request-id marker (inflight / settled / unsettled; kept for the
                                         idempotency window, `settings.idempotency_window_s`, 24 h)
  tollgate:{c:C}:resv:ID                 one reservation: amount, tokens, deadline, record
  tollgate:{c:C}:resv-index              the customer's reservations by deadline
  tollgate:{c:C}:outbox                  records written with the money, not yet in the stream
  tollgate:usage                         the usage stream (SPEC §6)
  {tollgate:usage}:uid:U, :request:ID    publish-once marks and request id -> entry (same slot; the
                                         request index is kept for the idempotency window)
  tollgate:reservations, tollgate:outboxes  hints (global zsets) so the reaper and the drainer
                                         find what a crashed processor left; written before,
                                         removed after the real work, never trusted alone

The estimate (what is reserved) is deliberately bounded and documented in the README:
prompt tokens are estimated as characters / 3, completion tokens as the request's
max_tokens or the route's `default_max_tokens`, priced at the most expensive model the request
may end on. It is refunded to the real cost when the response's `usage` arrives.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from extproc.policy.model import DEFAULT_IDEMPOTENCY_WINDOW_S, Model, Plan
from extproc.store import RedisLike, Scripts
from extproc.store import text as _s

USAGE_STREAM = "tollgate:usage"
RESERVATIONS = "tollgate:reservations"
UID_MARK_TTL_S = 7 * 24 * 3600  # publish-once marks (owned by the usage export)
ID_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")


def valid_id(value: str) -> bool:
    """Customer, workspace and request ids become parts of Redis keys: keep them plain."""
    return bool(ID_RE.match(value))


# --- pure parts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    micro: int
    tokens: int


def estimate(prompt_tokens: int, max_tokens: int, candidates: list[Model]) -> Estimate:
    """The reservation: the dearest candidate model's price for the prompt plus max_tokens."""
    micro = max(m.price.cost_micro(prompt_tokens, max_tokens) for m in candidates)
    return Estimate(micro, prompt_tokens + max_tokens)


@dataclass(frozen=True)
class Limits:
    """The limits one request is held to (plan values, with per-key overrides)."""

    prepaid: bool
    monthly_budget_micro: int | None
    rpm: int | None
    tpm: int | None
    key_rpm: int | None = None
    key_tpm: int | None = None

    @classmethod
    def of(cls, plan: Plan, key_rpm: int | None = None, key_tpm: int | None = None) -> Limits:
        return cls(plan.prepaid, plan.monthly_budget_micro, plan.requests_per_minute, plan.tokens_per_minute, key_rpm, key_tpm)


@dataclass(frozen=True)
class Account:
    customer: str
    workspace: str
    key_id: str

    def k(self, suffix: str) -> str:
        return f"tollgate:{{c:{self.customer}}}:{suffix}"

    def w(self, suffix: str) -> str:
        return self.k(f"ws:{self.workspace}:{suffix}")


def month_of(ts: float) -> str:
    return time.strftime("%Y%m", time.gmtime(ts))


@dataclass(frozen=True)
class Reservation:
    """What `finish` needs to settle exactly what `reserve` took."""

    account: Account
    request_id: str
    month: str
    amount: int
    tokens: int
    prepaid: bool

    @property
    def member(self) -> str:
        return json.dumps([self.account.customer, self.account.workspace, self.request_id])


@dataclass(frozen=True)
class RateInfo:
    rpm_limit: int
    rpm_remaining: int
    rpm_reset_ms: int
    tpm_limit: int
    tpm_remaining: int
    tpm_reset_ms: int

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers (only for limits that exist)."""
        out: dict[str, str] = {}
        for kind, limit, left, reset in (("requests", self.rpm_limit, self.rpm_remaining, self.rpm_reset_ms),
                                         ("tokens", self.tpm_limit, self.tpm_remaining, self.tpm_reset_ms)):
            if limit >= 0:
                out[f"x-ratelimit-limit-{kind}"] = str(limit)
                out[f"x-ratelimit-remaining-{kind}"] = str(left)
                out[f"x-ratelimit-reset-{kind}"] = format_duration(reset)
        return out


def format_duration(ms: int) -> str:
    """OpenAI's reset format: '20ms', '1.5s', '6m0s'."""
    if ms < 1000:
        return f"{max(0, ms)}ms"
    if ms < 60_000:
        return f"{round(ms / 1000, 3):g}s"
    m, s = divmod(round(ms / 1000), 60)
    return f"{m}m{s}s"


@dataclass(frozen=True)
class ReserveResult:
    status: str  # "ok", "refused", "duplicate"
    reason: str  # "ok", "rpm", "tpm", "balance", "budget", "duplicate"
    retry_after_ms: int
    rate: RateInfo


def now_ms() -> int:
    return int(time.time() * 1000)


def _opt(v: int | None) -> str:
    return "-1" if v is None else str(v)


# --- Redis edge --------------------------------------------------------------------------------

RESERVATION_HINTS = "tollgate:reservations"
OUTBOX_HINTS = "tollgate:outboxes"


def uid_key(uid: str) -> str:
    return f"{{{USAGE_STREAM}}}:uid:{uid}"


def request_key(request_id: str) -> str:
    """Where `explain` finds a request's record (in the usage stream's hash slot)."""
    return f"{{{USAGE_STREAM}}}:request:{request_id}"


class Quota:
    def __init__(self, redis: RedisLike, idempotency_window_s: int = DEFAULT_IDEMPOTENCY_WINDOW_S) -> None:
        self.redis = redis
        # Served-request markers and the explain index live this long (a policy/CLI setting).
        self.idempotency_window_s = idempotency_window_s
        self.scripts = Scripts(redis, "reserve", "finish", "expire", "publish", "hint_done")

    async def reserve(self, res: Reservation, limits: Limits, ttl_ms: int, record: dict[str, str]) -> ReserveResult:
        a = res.account
        keys = [
            a.k(f"req:{res.request_id}"), a.k(f"resv:{res.request_id}"), a.k("resv-index"),
            a.k("balance"), a.k("reserved"), a.k(f"spend:{res.month}"), a.k("limits"),
            a.w("reserved"), a.w(f"spend:{res.month}"), a.w("limits"),
            a.k(f"key:{a.key_id}:rpm"), a.k(f"key:{a.key_id}:tpm"), a.w("rpm"), a.w("tpm"), a.k("rpm"), a.k("tpm"),
        ]
        args: list[str | int] = [
            res.amount, res.tokens, int(limits.prepaid), _opt(limits.monthly_budget_micro), _opt(limits.rpm),
            _opt(limits.tpm), _opt(limits.key_rpm), _opt(limits.key_tpm), ttl_ms, res.request_id, json.dumps(record),
        ]

        # The hint goes first: a reservation that exists always has one.
        _, r = await self.scripts.batch(
            lambda c: c.zadd(RESERVATION_HINTS, {res.member: now_ms() + ttl_ms + 1000}),
            lambda c: self.scripts.call(c, "reserve", keys, args),
        )
        code = int(r[0])
        rate = RateInfo(*(int(float(x)) for x in r[3:9]))
        status = {1: "ok", 0: "refused", -1: "duplicate"}[code]
        return ReserveResult(status, _s(r[1]), int(r[2]), rate)

    async def forget_hint(self, res: Reservation) -> None:
        """A refused reservation leaves its hint behind; drop it (off the reply path)."""
        await self.redis.zrem(RESERVATION_HINTS, res.member)

    async def finish(self, res: Reservation, cost_micro: int, actual_tokens: int, served: bool, record: dict[str, str]) -> None:
        """Settle (or release, with cost 0), then publish the record exactly once. One round
        trip on one Redis; on a cluster the commands run in order, one after another."""
        a = res.account
        uid = record["record_id"]
        keys = [
            a.k(f"req:{res.request_id}"), a.k(f"resv:{res.request_id}"), a.k("resv-index"), a.k("balance"),
            a.k("reserved"), a.k(f"spend:{res.month}"), a.w("reserved"), a.w(f"spend:{res.month}"),
            a.k(f"key:{a.key_id}:tpm"), a.w("tpm"), a.k("outbox"), a.k("tpm"),
        ]
        body = json.dumps(record)
        args: list[Any] = [cost_micro, int(res.prepaid), actual_tokens, res.request_id, self.idempotency_window_s, int(served), uid, body]

        await self.scripts.batch(
            # Before the record exists; NX keeps the time of the oldest pending write, so even a
            # customer who never pauses gets drained.
            lambda c: c.zadd(OUTBOX_HINTS, {a.customer: now_ms()}, nx=True),
            lambda c: self.scripts.call(c, "finish", keys, args),
            lambda c: self._publish(c, uid, res.request_id, body),
            lambda c: c.hdel(a.k("outbox"), uid),
            lambda c: c.zrem(RESERVATION_HINTS, res.member),
        )

    def _publish(self, client: Any, uid: str, request_id: str, body: str) -> Any:
        return self.scripts.call(client, "publish", *self._publish_args(uid, request_id, body))

    def _publish_args(self, uid: str, request_id: str, body: str) -> tuple[list[str], list[Any]]:
        return [USAGE_STREAM, uid_key(uid), request_key(request_id)], [body, UID_MARK_TTL_S, self.idempotency_window_s]

    async def drain_outboxes(self, older_than_ms: int = 5000, limit: int = 100) -> int:
        """Publish records a processor settled but did not publish (it died in between)."""
        hints = await self.redis.zrangebyscore(OUTBOX_HINTS, "-inf", now_ms() - older_than_ms, start=0, num=limit, withscores=True)
        published = 0
        for member, score in hints:  # type: ignore[str-unpack]
            customer = _s(member)
            outbox = Account(customer, "", "").k("outbox")
            for uid, body in (await self.redis.hgetall(outbox)).items():
                text = _s(body)
                await self.scripts.eval("publish", *self._publish_args(_s(uid), json.loads(text).get("request_id", ""), text))
                await self.redis.hdel(outbox, uid)
                published += 1
            if await self.redis.hlen(outbox):
                continue
            removed = await self.scripts.eval("hint_done", [OUTBOX_HINTS], [customer, repr(score)])
            # A finish may have written between the check and the removal: look once more.
            if removed and await self.redis.hlen(outbox):
                await self.redis.zadd(OUTBOX_HINTS, {customer: now_ms()}, nx=True)
        return published

    async def expire_overdue(self, limit: int = 200) -> int:
        """Turn reservations past their deadline into 'unsettled' records; returns how many."""
        members = await self.redis.zrangebyscore(RESERVATION_HINTS, "-inf", now_ms(), start=0, num=limit)
        done = 0
        for m in members:
            customer, workspace, request_id = json.loads(_s(m))
            a = Account(customer, workspace, "")
            uid = uuid.uuid4().hex
            await self.redis.zadd(OUTBOX_HINTS, {customer: now_ms()}, nx=True)
            keys = [a.k(f"req:{request_id}"), a.k(f"resv:{request_id}"), a.k("resv-index"), a.k("reserved"), a.w("reserved"),
                    a.k("outbox")]
            state = int(await self.scripts.eval("expire", keys, [request_id, self.idempotency_window_s, uid]))
            if state == 1:
                body = await self.redis.hget(a.k("outbox"), uid)
                if body is not None:
                    await self.scripts.eval("publish", *self._publish_args(uid, request_id, _s(body)))
                    await self.redis.hdel(a.k("outbox"), uid)
                done += 1
            if state in (0, 1):
                await self.redis.zrem(RESERVATION_HINTS, _s(m))
        return done

    # --- accounts (CLI) ---------------------------------------------------------------------

    async def balance_add(self, customer: str, micro: int) -> int:
        return int(await self.redis.incrby(Account(customer, "", "").k("balance"), micro))

    async def account_show(self, customer: str) -> dict[str, int]:
        """Balance, money in flight and this month's spend of one customer (micro-USD)."""
        a = Account(customer, "", "")
        month = month_of(time.time())
        balance, reserved, spend = (int(v or 0) for v in await self.redis.mget(a.k("balance"), a.k("reserved"), a.k(f"spend:{month}")))
        budget = await self.redis.hget(a.k("limits"), "monthly_budget_micro")
        return {"balance_micro": balance, "reserved_micro": reserved, "available_micro": balance - reserved,
                "month_spend_micro": spend, "monthly_budget_override_micro": int(budget) if budget is not None else -1}

    async def set_limits(self, customer: str, workspace: str | None, **fields: int | None) -> None:
        a = Account(customer, workspace or "", "")
        target = a.w("limits") if workspace else a.k("limits")
        for name, value in fields.items():
            if value is None:
                continue
            if value < 0:
                await self.redis.hdel(target, name)
            else:
                await self.redis.hset(target, name, value)


def reservation_ttl_ms(timeouts_s: list[float], max_attempts: int) -> int:
    """How long a reservation may stay in flight before the reaper calls it unsettled:
    every attempt timing out, plus a grace (TOLLGATE_RESERVATION_GRACE_S, default 60 s)."""
    grace = float(os.environ.get("TOLLGATE_RESERVATION_GRACE_S", "60"))
    return int((max(timeouts_s) * max_attempts + grace) * 1000)
