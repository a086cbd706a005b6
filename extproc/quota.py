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
  tollgate:{c:C}:req:ID                  request-id marker (inflight:<call> / cancelled:<call> / settled / unsettled; kept for the
                                         idempotency window, `settings.idempotency_window_s`, 24 h)
  tollgate:{c:C}:resv:ID                 one reservation: amount, cap, tokens, deadline, record
  tollgate:{c:C}:resv-index              the customer's reservations by deadline
  tollgate:{c:C}:outbox                  records written with the money, not yet in the stream
  tollgate:usage                         the usage stream (SPEC §6)
  {tollgate:usage}:uid:U, :requests:ID   publish-once marks; request id -> {customer: entry} (same slot;
                                         the request index is kept for the idempotency window)
  tollgate:reservations, tollgate:outboxes  hints (global zsets) so the reaper and the drainer
                                         find what a crashed processor left; written before,
                                         removed after the real work, never trusted alone

The estimate (what is reserved) is deliberately bounded and documented in the README:
prompt tokens are estimated as characters / 3, completion tokens as the request's
max_tokens or the route's `default_max_tokens`, priced at the most expensive model the request
may end on. It is refunded to the real cost when the response's `usage` arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from extproc import config
from extproc.caps import CostBound
from extproc.keyspace import Account as Account  # re-exported: the key layout lives in keyspace
from extproc.policy.model import DEFAULT_IDEMPOTENCY_WINDOW_S, Plan
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


def month_of(ts: float) -> str:
    return time.strftime("%Y%m", time.gmtime(ts))


@dataclass(frozen=True)
class Reservation:
    """What `finish` needs to settle exactly what `reserve` took (`amount` and the output
    `cap` are known once `reserve` has answered)."""

    account: Account
    request_id: str
    month: str
    prepaid: bool
    amount: int = 0
    cap: int = 0

    @property
    def member(self) -> str:
        return json.dumps([self.account.customer, self.account.workspace, self.request_id])

    @property
    def marker_key(self) -> str:
        """The request id's marker (`inflight:<call>` while reserved, then `settled`)."""
        return self.account.marker(self.request_id)


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
    cap: int = 0  # output tokens per choice the forwarded body must carry
    amount: int = 0  # micro-USD reserved
    need: int = 0  # money refusals: what the smallest useful request costs (micro-USD)
    available: int = 0  # money refusals: what the tightest limit has left (micro-USD)


# Money arithmetic in reserve.lua uses doubles: every nano-USD figure stays below 2^52.
NANO_CEILING = 2**52


def reserve_args(bound: CostBound, limits: Limits, ttl_ms: int, request_id: str, call: str,
                 settling: bool = False) -> dict[str, int | str]:
    """reserve.lua's request, by name (see the script's header). `call` names this one call,
    so a resend of it by the Redis client reserves once (the script answers it again).
    `settling`: refuse as 'settling' instead of cutting the cap or refusing for money while
    the customer has money in flight (it may be an answer whose settlement is on its way)."""
    token_nano = bound.choices * bound.output_price
    input_nano = min(bound.input_tokens * bound.input_price, NANO_CEILING)
    want = bound.output_tokens
    if token_nano:
        want = max(0, min(want, (NANO_CEILING - input_nano) // token_nano))
    return {
        "input_nano": input_nano, "token_nano": token_nano, "want": want, "min": min(bound.min_output_tokens, want),
        "rate_tokens": bound.rate_tokens, "choices": bound.choices, "prepaid": int(limits.prepaid),
        "budget": _lim(limits.monthly_budget_micro), "rpm": _lim(limits.rpm), "tpm": _lim(limits.tpm),
        "key_rpm": _lim(limits.key_rpm), "key_tpm": _lim(limits.key_tpm), "ttl_ms": ttl_ms, "request_id": request_id,
        "call": call, "settling": int(settling),
    }


def now_ms() -> int:
    return int(time.time() * 1000)


def _lim(v: int | None) -> int:
    return -1 if v is None else v


# --- Redis edge --------------------------------------------------------------------------------

RESERVATION_HINTS = "tollgate:reservations"
OUTBOX_HINTS = "tollgate:outboxes"


def uid_key(uid: str) -> str:
    return f"{{{USAGE_STREAM}}}:uid:{uid}"


def request_key(request_id: str) -> str:
    """Where `explain` finds a request's record: a hash customer -> stream entry, since request
    ids are scoped per customer (in the usage stream's hash slot)."""
    return f"{{{USAGE_STREAM}}}:requests:{request_id}"


def publish_args(uid: str, request_id: str, customer: str, body: str,
                 window_s: int = DEFAULT_IDEMPOTENCY_WINDOW_S) -> tuple[list[str], list[Any]]:
    """publish.lua's keys and arguments for one record (the explain index lives `window_s`)."""
    return [USAGE_STREAM, uid_key(uid), request_key(request_id)], [body, UID_MARK_TTL_S, customer, window_s]


class Quota:
    def __init__(self, redis: RedisLike, idempotency_window_s: int = DEFAULT_IDEMPOTENCY_WINDOW_S) -> None:
        self.redis = redis
        # Served-request markers and the explain index live this long (a policy/CLI setting).
        self.idempotency_window_s = idempotency_window_s
        self._chores: list[Callable[[Any], Any]] = []  # clean-ups for the next round trip
        self._flushing: asyncio.Task[None] | None = None  # a background flush of them (`_flush_soon`)
        self.scripts = Scripts(redis, "reserve", "finish", "expire", "cancel", "publish", "hint_done", "extend")

    async def reserve(self, res: Reservation, bound: CostBound, limits: Limits, ttl_ms: int, record: dict[str, str],
                      settling: bool = False) -> ReserveResult:
        """Check every limit and reserve the request's cap, in one atomic step (`settling`:
        see `reserve_args`)."""
        a = res.account
        keys = a.reserve_keys(res.request_id, res.month).as_list()

        # Earlier requests' clean-ups ride along; then the hint, so that a reservation that
        # exists always has one.
        chores = self.take_chores()
        call = secrets.token_hex(8)
        args = [json.dumps(reserve_args(bound, limits, ttl_ms, res.request_id, call, settling)), json.dumps(record)]
        try:
            *_, r = await self.scripts.batch(
                *chores,
                lambda c: c.zadd(RESERVATION_HINTS, {res.member: now_ms() + ttl_ms + 1000}),
                lambda c: self.scripts.call(c, "reserve", keys, args),
                tolerate=len(chores),
            )
        except BaseException as exc:
            # Maybe not run (Redis error, or cancelled): run the chores again later. The reserve
            # call may have run, or may still run late (a stall): undo it, so the request id is
            # free for the client's retry and no money stays held until the reaper.
            self._chores[:0] = chores
            await self._undo(lambda c: self.scripts.call(
                c, "cancel", a.cancel_keys(res.request_id).as_list(), [call, res.request_id, config.CANCEL_TOMBSTONE_MS]),
                wait=not isinstance(exc, asyncio.CancelledError))
            raise
        code = int(r[0])
        rate = RateInfo(*(int(float(x)) for x in r[3:9]))
        status = {1: "ok", 0: "refused", -1: "duplicate"}[code]
        cap, amount, need, available = (int(float(x)) for x in r[9:13])
        return ReserveResult(status, _s(r[1]), int(r[2]), rate, cap, amount, need, available)

    def forget_hint(self, res: Reservation) -> None:
        """The reservation is gone (refused, or settled and published): its hint goes with the
        next round trip. Never before `finish` succeeded, so a failed settlement always leaves
        a hint for the reaper."""
        self._chores.append(lambda c: c.zrem(RESERVATION_HINTS, res.member))

    def take_chores(self) -> list[Callable[[Any], Any]]:
        """Clean-ups queued by earlier requests (idempotent; a lost one is redone by the reaper
        or the drainer): they cost no round trip of their own."""
        chores, self._chores = self._chores, []
        return chores

    async def _undo(self, undo: Callable[[Any], Any], wait: bool) -> None:
        """Undo a failed reserve call before its 503 goes out (`wait`): the client's retry may
        come at once and reach another worker, which must find the request id free, not 409.
        A Redis that does not take it within `config.CANCEL_WAIT_S` (or a caller cancelled
        meanwhile) leaves it queued, sent in the background at once (`_flush_soon`)."""
        done = False
        try:
            if wait:
                with contextlib.suppress(RedisError, TimeoutError):
                    async with asyncio.timeout(config.CANCEL_WAIT_S):
                        await self.scripts.batch(undo)
                    done = True
        finally:
            if not done:
                self._chores.append(undo)
                self._flush_soon()  # now, not with this process's next request: the retry may reach another

    def _flush_soon(self) -> None:
        """Run the queued clean-ups in the background (one flush at a time; a failed one leaves
        them queued for the next round trip or the reaper)."""
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush_quietly())

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(RedisError):  # they stay queued
            await self.flush_chores()

    async def flush_all_chores(self) -> None:
        """Every queued clean-up, including one a background flush is sending now (the
        reaper must not expire a reservation whose cancel is still on its way). Raises if
        some could not be sent."""
        if self._flushing is not None and not self._flushing.done():
            await asyncio.shield(self._flushing)
        await self.flush_chores()

    async def flush_chores(self) -> None:
        """Run queued clean-ups now (the reaper does, so an idle processor leaves none)."""
        chores = self.take_chores()
        if chores:
            try:
                await self.scripts.batch(*chores, tolerate=len(chores))
            except BaseException:
                self._chores[:0] = chores
                raise

    async def extend(self, res: Reservation, ttl_ms: int) -> bool:
        """Push a live reservation's deadline `ttl_ms` from now (a flowing stream); False when
        it is already gone. The hint moves first, so it never falls behind the reservation."""
        a = res.account
        _, deadline = await self.scripts.batch(
            lambda c: c.zadd(RESERVATION_HINTS, {res.member: now_ms() + ttl_ms + 1000}, xx=True, gt=True),
            lambda c: self.scripts.call(c, "extend", [a.k(f"resv:{res.request_id}"), a.k("resv-index")], [res.request_id, ttl_ms]),
        )
        return int(deadline) > 0

    async def finish(self, res: Reservation, cost_micro: int, actual_tokens: int, served: bool, record: dict[str, str]) -> None:
        """Settle (or release, with cost 0) and put the record in the customer's outbox, in one
        atomic step; then publish it to the usage stream exactly once (by its uid). One round
        trip. Raises if either failed: then the reservation's hint stays for the reaper and the
        outbox entry for the drainer. Only after both succeeded are the outbox entry and the
        hint removed, with the next round trip (`take_chores`)."""
        a = res.account
        uid = record["record_id"]
        keys = a.finish_keys(res.request_id, res.month).as_list()
        body = json.dumps(record)
        args: list[Any] = [cost_micro, int(res.prepaid), actual_tokens, res.request_id, self.idempotency_window_s, int(served), uid, body]

        await self.scripts.batch(
            # Before the record exists; NX keeps the time of the oldest pending write, so even a
            # customer who never pauses gets drained.
            lambda c: c.zadd(OUTBOX_HINTS, {a.customer: now_ms()}, nx=True),
            lambda c: self.scripts.call(c, "finish", keys, args),
            lambda c: self._publish(c, uid, res.request_id, a.customer, body),
        )
        self._chores.append(lambda c: c.hdel(a.k("outbox"), uid))
        self.forget_hint(res)

    def _publish(self, client: Any, uid: str, request_id: str, customer: str, body: str) -> Any:
        return self.scripts.call(client, "publish", *publish_args(uid, request_id, customer, body, self.idempotency_window_s))


    async def drain_outboxes(self, older_than_ms: int = 5000, limit: int = 100) -> int:
        """Publish records a processor settled but did not publish (it died in between)."""
        hints = await self.redis.zrangebyscore(OUTBOX_HINTS, "-inf", now_ms() - older_than_ms, start=0, num=limit, withscores=True)
        published = 0
        for member, score in hints:  # type: ignore[str-unpack]
            customer = _s(member)
            outbox = Account(customer, "", "").k("outbox")
            for uid, body in (await self.redis.hgetall(outbox)).items():
                text = _s(body)
                await self.scripts.eval("publish", *publish_args(_s(uid), json.loads(text).get("request_id", ""), customer, text, self.idempotency_window_s))
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
            keys = a.expire_keys(request_id).as_list()
            state = int(await self.scripts.eval("expire", keys, [request_id, self.idempotency_window_s, uid]))
            if state == 1:
                body = await self.redis.hget(a.k("outbox"), uid)
                if body is not None:
                    await self.scripts.eval("publish", *publish_args(uid, request_id, customer, _s(body), self.idempotency_window_s))
                    await self.redis.hdel(a.k("outbox"), uid)
                done += 1
            if state in (0, 1):
                await self.redis.zrem(RESERVATION_HINTS, _s(m))
        return done

    async def sweep_orphans(self, grace_s: float) -> int:
        """Give a hint back to every reservation overdue by more than `grace_s` that has none
        (its hint was lost), so `expire_overdue` takes it. Returns how many it found."""
        found = 0
        cutoff = now_ms() - int(grace_s * 1000)
        async for index in self.redis.scan_iter(match="tollgate:{c:*}:resv-index", count=1000):
            name = _s(index)
            customer = name[len("tollgate:{c:"):-len("}:resv-index")]
            for rid in await self.redis.zrangebyscore(name, "-inf", cutoff, start=0, num=100):
                request_id = _s(rid)
                record = await self.redis.hget(Account(customer, "", "").k(f"resv:{request_id}"), "record")
                workspace = json.loads(_s(record)).get("workspace_id", "") if record else ""
                member = json.dumps([customer, workspace, request_id])
                if await self.redis.zadd(RESERVATION_HINTS, {member: now_ms()}, nx=True):
                    found += 1
        return found

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


def reservation_ttl_ms(budgets_ms: list[int], max_attempts: int, grace_s: float = config.RESERVATION_GRACE_S) -> int:
    """How long a reservation may stay in flight before the reaper calls it unsettled: every
    attempt using the largest time budget (`timeouts.attempt_budget_ms`), plus a grace. A
    flowing stream extends it (`extend`)."""
    return max(budgets_ms) * max_attempts + int(grace_s * 1000)
