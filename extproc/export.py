"""`tollgate usage export`: the usage stream -> the durable ledger, exactly once per record.

A consumer group on `tollgate:usage` (default group `ledger`):
1. read a batch (first this consumer's own pending entries, left by a crash of the same
   consumer name; then entries other consumers left pending for `claim_idle_ms`, taken over
   with XAUTOCLAIM; then new entries),
2. write it to the store in one transaction, idempotent by `record_id`,
3. only then XACK it, and shorten the entries' publish-once markers to `marker_ttl_s`,
4. trim the stream below what every group on it has committed: per group, its oldest
   pending (delivered, not yet acknowledged) entry, or the entry after its last delivered
   one; XTRIM MINID the lowest of those. A group that has committed nothing keeps it all.

A crash anywhere re-delivers at most the batch in flight, and writing it again changes
nothing: every record ends up in the store exactly once, and the stream stays bounded by the
export lag.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import redis as redis_sync
from redis.exceptions import ResponseError

from extproc import config
from extproc.ledger_rows import LedgerRow, newest_per_record, row_of
from extproc.ledger_store import LedgerStore
from extproc.quota import USAGE_STREAM, request_key, uid_key
from extproc.store import CLUSTER_SCHEME
from extproc.store import text as _text

log = logging.getLogger("tollgate.export")

DEFAULT_GROUP = config.EXPORT_GROUP
EXPORTED_MARKER_TTL_S = config.EXPORTED_MARKER_TTL_S


def redis_sync_client(url: str) -> Any:
    if url.startswith(CLUSTER_SCHEME):
        return redis_sync.RedisCluster.from_url("redis://" + url[len(CLUSTER_SCHEME):], socket_timeout=config.EXPORT_SOCKET_TIMEOUT_S)
    return redis_sync.Redis.from_url(url, socket_timeout=config.EXPORT_SOCKET_TIMEOUT_S)


@dataclass
class ExportConfig:
    group: str = DEFAULT_GROUP
    consumer: str = field(default_factory=socket.gethostname)  # stable: a restart resumes its own pending entries
    batch: int = config.EXPORT_BATCH
    block_ms: int = config.EXPORT_BLOCK_MS
    claim_idle_ms: int = config.EXPORT_CLAIM_IDLE_MS
    marker_ttl_s: int = EXPORTED_MARKER_TTL_S
    stall_after_commit: bool = False  # tests: hang between commit and XACK (the crash window)


def next_id(entry_id: str) -> str:
    """The smallest stream id after `entry_id`."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Exporter:
    def __init__(self, redis: Any, store: LedgerStore, config: ExportConfig | None = None) -> None:
        self.redis = redis
        self.store = store
        self.cfg = config or ExportConfig()
        self.exported = 0
        self._own_from: str | None = "0"  # reading this consumer's own pending entries until none are left

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(USAGE_STREAM, self.cfg.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # --- one batch ------------------------------------------------------------------------

    def _read(self, block: bool) -> list[tuple[str, dict[str, str]]]:
        c = self.cfg
        if self._own_from is not None:
            got = _entries(self.redis.xreadgroup(c.group, c.consumer, {USAGE_STREAM: self._own_from}, count=c.batch))
            if got:
                self._own_from = got[-1][0]
                gone = [i for i, f in got if f is None]
                if gone:  # nothing left to export; do not let them hold the trim floor
                    self.redis.xack(USAGE_STREAM, c.group, *gone)
                return [(i, f) for i, f in got if f is not None] or self._read(block)
            self._own_from = None
        claimed = self.redis.xautoclaim(USAGE_STREAM, c.group, c.consumer, c.claim_idle_ms, start_id="0-0", count=c.batch)
        entries = [(_text(i), fields_of(f)) for i, f in claimed[1] if f is not None]
        if entries:
            return entries
        got = self.redis.xreadgroup(c.group, c.consumer, {USAGE_STREAM: ">"}, count=c.batch, block=c.block_ms if block else None)
        return [(i, f) for i, f in _entries(got) if f is not None]

    def step(self, block: bool = False) -> int:
        """Export one batch; returns how many entries it held (0: nothing to do)."""
        entries = self._read(block)
        if not entries:
            return 0
        self.store.write(rows_of(entries))
        if self.cfg.stall_after_commit:
            log.warning("stalling after commit (test hook)")
            while True:
                time.sleep(3600)
        ids = [i for i, _ in entries]
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(USAGE_STREAM, self.cfg.group, *ids)
        for _, f in entries:
            pipe.expire(uid_key(f["record_id"]), self.cfg.marker_ttl_s, lt=True)
            if f.get("request_id"):
                pipe.expire(request_key(f["request_id"]), self.cfg.marker_ttl_s, lt=True)
        pipe.execute()
        self.exported += len(entries)
        return len(entries)

    # --- trimming -------------------------------------------------------------------------

    def committed_floor(self) -> str | None:
        """The lowest id some export group still needs; None when no group exists."""
        floors: list[str] = []
        for g in self.redis.xinfo_groups(USAGE_STREAM):
            name = _text(g["name"])
            if int(g["pending"]):
                summary = self.redis.xpending(USAGE_STREAM, name)
                floors.append(_text(summary["min"]))
            else:
                floors.append(next_id(_text(g["last-delivered-id"])))
        return min(floors, key=_id_key) if floors else None

    def trim(self) -> int:
        """Drop entries every group has committed; returns how many went."""
        floor = self.committed_floor()
        if floor is None:
            return 0
        return int(self.redis.xtrim(USAGE_STREAM, minid=floor, approximate=False))

    # --- loops ----------------------------------------------------------------------------

    def run_once(self) -> int:
        """Export everything in the stream now, trim, and return how many entries went."""
        self.ensure_group()
        start = self.exported
        while self.step(block=False):
            pass
        self.trim()
        return self.exported - start

    def run_forever(self, should_stop: Any = lambda: False, trim_every_s: float = 0.25) -> None:
        self.ensure_group()
        last_trim = 0.0
        while not should_stop():
            self.step(block=True)
            if time.monotonic() - last_trim >= trim_every_s:
                trimmed = self.trim()
                last_trim = time.monotonic()
                if trimmed:
                    log.debug("trimmed %d entries", trimmed)


def rows_of(entries: list[tuple[str, dict[str, str]]]) -> list[LedgerRow]:
    """Stream entries (id, fields) as the ledger rows they become, the newest per record."""
    return newest_per_record([row_of(i, f) for i, f in entries])


def fields_of(raw: dict[Any, Any]) -> dict[str, str]:
    """A stream entry's fields as text."""
    return {_text(k): _text(v) for k, v in raw.items()}


def _entries(reply: Any) -> list[tuple[str, dict[str, str] | None]]:
    """XREADGROUP's reply as (id, fields); fields None for an entry deleted while pending."""
    return [(_text(i), fields_of(raw) if raw else None) for _name, messages in reply or [] for i, raw in messages]
