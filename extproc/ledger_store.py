"""The durable ledger: usage and credit records in PostgreSQL (production) or SQLite (embedded).

`open_store(url)` takes `postgresql://...` (psycopg 3) or `sqlite:///relative/path` /
`sqlite:////absolute/path` (SQLAlchemy's convention). The schema is created and migrated by
whoever opens the store (a `schema_version` table; PostgreSQL serialises concurrent
migrations with an advisory lock). Writes are idempotent by `record_id`: writing a batch
again changes nothing, and a settled record replaces an `unsettled` one with the same id,
never the reverse. Money columns are BIGINT micro-dollars; the attempt list is JSON.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extproc.ledger_rows import CREDIT, LedgerRow

TABLE = "ledger_records"
_INT_COLUMNS = {
    "precedence", "ts_ms", "attempts", "prompt_tokens", "completion_tokens", "cost_micro_usd", "retry_cost_micro_usd",
    "fallback_cost_micro_usd", "reserved_micro_usd", "prepaid", "amount_micro_usd", "stream", "latency_ms",
}
_JSON_COLUMNS = {"attempt_list", "record"}
PG_MIGRATION_LOCK = 7_468_201  # pg_advisory_xact_lock key: one migrator at a time


def _column_type(name: str, dialect: str) -> str:
    if name in _INT_COLUMNS:
        return "BIGINT NOT NULL"
    if name in _JSON_COLUMNS:
        return ("JSONB" if dialect == "postgresql" else "TEXT") + " NOT NULL"
    return "TEXT NOT NULL"


def migrations(dialect: str) -> list[list[str]]:
    """Schema versions in order; version N is migrations(...)[N-1]. Append, never edit."""
    cols = ", ".join(f"{c} {_column_type(c, dialect)}" for c in LedgerRow.columns())
    return [
        [
            f"CREATE TABLE {TABLE} ({cols}, PRIMARY KEY (record_id))",
            f"CREATE INDEX {TABLE}_customer_month ON {TABLE} (customer_id, month)",
            f"CREATE INDEX {TABLE}_request ON {TABLE} (request_id)",
        ],
    ]


@dataclass(frozen=True)
class ReportLine:
    route: str
    model: str
    kind: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micro_usd: int


class LedgerStore:
    """One connection to the ledger; a DB-API connection and its placeholder style."""

    def __init__(self, conn: Any, dialect: str, url_for_humans: str) -> None:
        self.conn = conn
        self.dialect = dialect
        self.where = url_for_humans
        self.ph = "%s" if dialect == "postgresql" else "?"

    # --- schema ---------------------------------------------------------------------------

    def schema_version(self) -> int:
        cur = self.conn.cursor()
        cur.execute("SELECT MAX(version) FROM schema_version")
        row = cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def migrate(self) -> int:
        """Create or upgrade the schema; returns the version now in place."""
        cur = self.conn.cursor()
        # One migration at a time: the demo's exporter and a `usage report` may open a new
        # ledger at the same moment, and both would create its tables (seen: "table already
        # exists" stopped the exporter). SQLite: the write lock first (others wait, then see
        # the version in place).
        if self.dialect == "postgresql":
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (PG_MIGRATION_LOCK,))
        elif not self.conn.in_transaction:
            cur.execute("BEGIN IMMEDIATE")
        cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        have = self.schema_version()
        steps = migrations(self.dialect)
        for version in range(have + 1, len(steps) + 1):
            for statement in steps[version - 1]:
                cur.execute(statement)
            cur.execute(f"INSERT INTO schema_version (version) VALUES ({self.ph})", (version,))
        self.conn.commit()
        return len(steps)

    # --- writes ---------------------------------------------------------------------------

    def write(self, rows: list[LedgerRow]) -> None:
        """Write rows in one transaction, idempotently (see the module docstring)."""
        if not rows:
            return
        cols = LedgerRow.columns()
        marks = ", ".join(self.ph for _ in cols)
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != "record_id")
        sql = (f"INSERT INTO {TABLE} ({', '.join(cols)}) VALUES ({marks}) ON CONFLICT (record_id) DO UPDATE SET {updates}"
               f" WHERE {TABLE}.precedence < excluded.precedence")
        cur = self.conn.cursor()
        try:
            cur.executemany(sql, [r.values() for r in rows])
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise

    # --- reads ----------------------------------------------------------------------------

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        cur = self.conn.cursor()
        cur.execute(sql, args)
        rows = [tuple(r) for r in cur.fetchall()]
        self.conn.commit()  # end the read transaction (PostgreSQL opens one per statement batch)
        return rows

    def count(self) -> int:
        return int(self._all(f"SELECT COUNT(*) FROM {TABLE}")[0][0])

    def report_lines(self, customer: str, month: str) -> list[ReportLine]:
        """Invoice lines of one customer's month: route x final model x kind."""
        p = self.ph
        rows = self._all(
            f"SELECT route, final_model, kind, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_micro_usd)"
            f" FROM {TABLE} WHERE entry = 'usage' AND customer_id = {p} AND month = {p}"
            f" GROUP BY route, final_model, kind ORDER BY route, final_model, kind", (customer, month))
        return [ReportLine(str(r[0]), str(r[1]), str(r[2]), *(int(v) for v in r[3:])) for r in rows]

    def balances(self) -> dict[str, int]:
        """Per customer: credits minus the spend that came off the prepaid balance."""
        rows = self._all(
            f"SELECT customer_id, SUM(CASE WHEN entry = '{CREDIT}' THEN amount_micro_usd"
            f" WHEN prepaid = 1 THEN -cost_micro_usd ELSE 0 END) FROM {TABLE} GROUP BY customer_id")
        return {str(r[0]): int(r[1]) for r in rows}

    def month_spend(self, by_workspace: bool = False) -> dict[tuple[str, ...], int]:
        """Settled spend per (customer, month) or (customer, workspace, month)."""
        group = "customer_id, workspace_id, month" if by_workspace else "customer_id, month"
        rows = self._all(f"SELECT {group}, SUM(cost_micro_usd) FROM {TABLE} WHERE entry = 'usage' GROUP BY {group}")
        return {tuple(str(v) for v in r[:-1]): int(r[-1]) for r in rows}

    def find_request(self, request_id: str) -> dict[str, Any] | None:
        """The exported record of one request (for `explain` once the stream is trimmed)."""
        import json

        rows = self._all(f"SELECT record FROM {TABLE} WHERE request_id = {self.ph} ORDER BY precedence DESC", (request_id,))
        if not rows:
            return None
        raw = rows[0][0]
        return dict(raw) if isinstance(raw, dict) else dict(json.loads(raw))

    def close(self) -> None:
        self.conn.close()


def _sqlite_path(url: str) -> str:
    path = url[len("sqlite:///"):]
    if not path:
        raise ValueError("sqlite URL needs a path: sqlite:///relative.db or sqlite:////absolute/path.db")
    return path


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user, colon, _ = creds.partition(":")
    return f"{scheme}{sep}{user}{':***' if colon else ''}@{host}"


def _wal(conn: sqlite3.Connection) -> None:
    """Switch a SQLite ledger to WAL. Two processes opening a new ledger at once may find it
    locked (switching the journal does not wait for the busy timeout): try again a while."""
    for _ in range(100):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            time.sleep(0.05)
    conn.execute("PRAGMA journal_mode=WAL")


def open_store(url: str, migrate: bool = True) -> LedgerStore:
    """Connect to the ledger at `url`; create or migrate its schema unless told not to."""
    if url.startswith("sqlite:///"):
        path = _sqlite_path(url)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30)
        _wal(conn)  # readers (reports) never block the exporter
        conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the stream entry is acked
        store = LedgerStore(conn, "sqlite", f"sqlite:///{path}")
    elif url.startswith(("postgresql://", "postgres://")):
        import psycopg

        conn_pg = psycopg.connect(url)
        store = LedgerStore(conn_pg, "postgresql", redact(url))
    else:
        raise ValueError(f"unsupported ledger URL (postgresql://... or sqlite:///path): {url.split('://')[0]}://...")
    if migrate:
        store.migrate()
    return store
