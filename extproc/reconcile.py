"""`tollgate ledger verify`: does the durable ledger agree with the money in Redis?

Checks, to the micro-dollar:
- per customer: credits - spend taken from the prepaid balance = the balance in Redis;
- per customer and month, and per customer, workspace and month: the ledger's settled spend
  = Redis's month spend counter (months Redis still keeps, i.e. with a counter, or the ledger's
  last 12 months).
Run it once the exporter has caught up: records still in the stream are not in the ledger
yet, and show as differences (the report names how many entries await export).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from extproc.ledger_store import LedgerStore
from extproc.money import format_usd
from extproc.store import text as _text

_BALANCE = re.compile(r"^tollgate:\{c:(?P<c>[^}]+)\}:balance$")
_SPEND = re.compile(r"^tollgate:\{c:(?P<c>[^}]+)\}:spend:(?P<y>\d{4})(?P<m>\d{2})$")
_WS_SPEND = re.compile(r"^tollgate:\{c:(?P<c>[^}]+)\}:ws:(?P<w>.+):spend:(?P<y>\d{4})(?P<m>\d{2})$")
RECENT_MONTHS = 12


@dataclass(frozen=True)
class Difference:
    what: str
    subject: tuple[str, ...]
    ledger_micro: int
    redis_micro: int

    def __str__(self) -> str:
        names = ("customer", "workspace", "month") if len(self.subject) == 3 else (
            ("customer", "month") if len(self.subject) == 2 else ("customer",))
        subject = " ".join(f"{n} {v}" for n, v in zip(names, self.subject, strict=True))
        delta = self.ledger_micro - self.redis_micro
        return (f"{self.what} of {subject}: ledger {format_usd(self.ledger_micro)} USD, Redis {format_usd(self.redis_micro)} USD"
                f" (ledger - Redis = {format_usd(delta)} USD)")


def compare(what: str, ledger: dict[tuple[str, ...], int], redis: dict[tuple[str, ...], int]) -> list[Difference]:
    """Every subject whose amounts differ (a missing one counts as 0)."""
    return [Difference(what, k, ledger.get(k, 0), redis.get(k, 0))
            for k in sorted(set(ledger) | set(redis)) if ledger.get(k, 0) != redis.get(k, 0)]


def recent_months(now: float, n: int = RECENT_MONTHS) -> set[str]:
    t = time.gmtime(now)
    y, m = t.tm_year, t.tm_mon
    out = set()
    for _ in range(n):
        out.add(f"{y:04d}-{m:02d}")
        y, m = (y - 1, 12) if m == 1 else (y, m - 1)
    return out


@dataclass
class RedisMoney:
    balances: dict[tuple[str, ...], int]
    spend: dict[tuple[str, ...], int]
    ws_spend: dict[tuple[str, ...], int]
    unexported: int


def read_redis(redis: Any, stream: str, group: str) -> RedisMoney:
    """Balances and month spend counters of every customer (SCAN; fine for an audit)."""
    money = RedisMoney({}, {}, {}, 0)
    for pattern, regex, target in (("tollgate:{c:*}:balance", _BALANCE, money.balances),
                                   ("tollgate:{c:*}:spend:*", _SPEND, money.spend),
                                   ("tollgate:{c:*}:ws:*:spend:*", _WS_SPEND, money.ws_spend)):
        keys = [_text(k) for k in redis.scan_iter(match=pattern, count=1000)]
        for key in keys:
            m = regex.match(key)
            if m is None:
                continue
            g = m.groupdict()
            subject = (g["c"],) if "y" not in g else (
                (g["c"], f"{g['y']}-{g['m']}") if "w" not in g else (g["c"], g["w"], f"{g['y']}-{g['m']}"))
            target[subject] = int(redis.get(key) or 0)
    money.unexported = unexported(redis, stream, group)
    return money


def unexported(redis: Any, stream: str, group: str) -> int:
    """Entries the group has not committed yet (pending + never delivered)."""
    if not redis.exists(stream):
        return 0
    for g in redis.xinfo_groups(stream):
        if _text(g["name"]) == group:
            lag = g.get("lag")
            return int(g["pending"]) + (int(lag) if lag is not None else 0)
    return int(redis.xlen(stream))


def verify(store: LedgerStore, money: RedisMoney, customer: str | None = None, now: float | None = None) -> list[Difference]:
    """Every difference between the ledger and Redis (of one customer, or of all)."""
    months = recent_months(time.time() if now is None else now)

    def mine(amounts: dict[tuple[str, ...], int]) -> dict[tuple[str, ...], int]:
        return {k: v for k, v in amounts.items() if customer is None or k[0] == customer}

    def kept(amounts: dict[tuple[str, ...], int], redis_side: dict[tuple[str, ...], int]) -> dict[tuple[str, ...], int]:
        return {k: v for k, v in mine(amounts).items() if k[-1] in months or k in redis_side}

    ledger_balances: dict[tuple[str, ...], int] = {(c,): v for c, v in store.balances().items()}
    return (compare("balance", mine(ledger_balances), mine(money.balances))
            + compare("month spend", kept(store.month_spend(), money.spend), mine(money.spend))
            + compare("workspace month spend", kept(store.month_spend(by_workspace=True), money.ws_spend), mine(money.ws_spend)))
