"""The billing verbs of `tollgate`: `usage export`, `usage report`, `ledger verify`, `admin`.

Kept apart from `cli.py` so that file only wires them in. The ledger URL comes from `--to`,
else $TOLLGATE_LEDGER_URL.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from typing import Any

LEDGER_ENV = "TOLLGATE_LEDGER_URL"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def _redis_url(args: argparse.Namespace) -> str:
    return str(args.redis_url or os.environ.get("TOLLGATE_REDIS_URL") or DEFAULT_REDIS)


def _ledger_url(args: argparse.Namespace) -> str | None:
    return args.to or os.environ.get(LEDGER_ENV)


def _fail(message: str, code: int = 1) -> int:
    print(f"tollgate: {message}", file=sys.stderr)
    return code


def _open_store(args: argparse.Namespace) -> Any:
    from extproc.ledger_store import open_store

    url = _ledger_url(args)
    if not url:
        raise ValueError(f"no ledger: pass --to URL or set ${LEDGER_ENV} (postgresql://... or sqlite:///path)")
    return open_store(url)


def find_in_ledger(args: argparse.Namespace, request_id: str) -> dict[str, Any] | None:
    """`explain` of a record already exported and trimmed from the stream: from the ledger,
    when one is configured (--to or $TOLLGATE_LEDGER_URL)."""
    if not _ledger_url(args):
        return None
    store = _open_store(args)
    try:
        rec: dict[str, Any] | None = store.find_request(request_id)
    finally:
        store.close()
    if rec is not None and isinstance(rec.get("attempt_list"), str):
        rec["attempt_list"] = json.loads(rec["attempt_list"])
    return rec


def cmd_usage_export(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from extproc.export import ExportConfig, Exporter, redis_sync_client
    from extproc.quota import USAGE_STREAM

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        store = _open_store(args)
    except Exception as exc:  # a bad URL or an unreachable database: say which, exit 1
        return _fail(f"cannot open the ledger: {exc}")
    cfg = ExportConfig(group=args.group, batch=args.batch, claim_idle_ms=args.claim_idle_ms, marker_ttl_s=args.marker_ttl,
                       stall_after_commit=args.stall_after_commit)
    if args.consumer:
        cfg.consumer = args.consumer
    redis = redis_sync_client(_redis_url(args))
    exporter = Exporter(redis, store, cfg)
    try:
        if args.once:
            n = exporter.run_once()
            print(json.dumps({"exported": n, "ledger": store.where, "stream_length": int(redis.xlen(USAGE_STREAM))})
                  if args.json else f"exported {n} record(s) to {store.where}; {redis.xlen(USAGE_STREAM)} left in the stream")
            return 0
        stopping = False

        def on_signal(_s: int, _f: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        logging.getLogger("tollgate.export").info("exporting %s to %s as %s/%s", USAGE_STREAM, store.where, cfg.group, cfg.consumer)
        exporter.run_forever(lambda: stopping)
        return 0
    except RedisError as exc:
        return _fail(f"cannot reach Redis at {_redis_url(args)}: {exc}")
    except Exception as exc:  # the ledger failed: nothing uncommitted was acknowledged; exit so a supervisor restarts us
        logging.getLogger("tollgate.export").exception("export stopped")
        return _fail(f"export stopped: {type(exc).__name__}: {exc}")
    finally:
        store.close()
        redis.close()


def cmd_usage_report(args: argparse.Namespace) -> int:
    from extproc import invoice

    scratch = None
    try:
        if _ledger_url(args):
            store = _open_store(args)
        else:
            scratch = tempfile.mkdtemp(prefix="tollgate-report-")
            store = _stream_store(args, scratch)
    except Exception as exc:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        return _fail(f"cannot open the ledger: {exc}")
    try:
        report = invoice.build(store, args.customer, args.month)
    except ValueError as exc:
        return _fail(str(exc), 2)
    finally:
        store.close()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print(invoice.render(report, "json" if args.json else args.format))
    return 0


def _stream_store(args: argparse.Namespace, scratch: str) -> Any:
    """No ledger given: the usage stream itself, read-only (XRANGE, no group, no trim), copied
    into a throwaway SQLite ledger so the lines are exactly what an export would give. The
    stream is trimmed only after an export: once one exists, it may miss trimmed entries, so
    the ledger is needed (never a partial invoice)."""
    from extproc.export import fields_of, redis_sync_client, rows_of
    from extproc.ledger_store import open_store
    from extproc.quota import USAGE_STREAM
    from extproc.store import text

    redis = redis_sync_client(_redis_url(args))
    try:
        if redis.exists(USAGE_STREAM) and redis.xinfo_groups(USAGE_STREAM):
            raise ValueError(f"the usage stream is exported to a ledger: pass --to URL or set ${LEDGER_ENV}")
        store = open_store(f"sqlite:///{scratch}/ledger.db")
        start = "-"
        while batch := redis.xrange(USAGE_STREAM, min=start, max="+", count=1000):
            store.write(rows_of([(text(i), fields_of(f)) for i, f in batch]))
            start = "(" + text(batch[-1][0])
        return store
    finally:
        redis.close()


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from extproc import reconcile
    from extproc.export import redis_sync_client
    from extproc.quota import USAGE_STREAM

    try:
        store = _open_store(args)
    except Exception as exc:
        return _fail(f"cannot open the ledger: {exc}")
    redis = redis_sync_client(_redis_url(args))
    try:
        money = reconcile.read_redis(redis, USAGE_STREAM, args.group)
        diffs = reconcile.verify(store, money, args.customer)
    except RedisError as exc:
        return _fail(f"cannot reach Redis at {_redis_url(args)}: {exc}")
    finally:
        store.close()
        redis.close()
    if args.json:
        print(json.dumps({"ok": not diffs, "unexported": money.unexported, "differences": [
            {"what": d.what, "subject": list(d.subject), "ledger_micro_usd": d.ledger_micro, "redis_micro_usd": d.redis_micro}
            for d in diffs]}))
    else:
        for d in diffs:
            print(f"DIFFERENCE {d}")
        if money.unexported:
            print(f"note: {money.unexported} stream entries are not exported yet (group {args.group}); they show as differences")
        if not diffs:
            print(f"ok: ledger {store.where} agrees with Redis: {len(money.balances)} balance(s), "
                  f"{len(money.spend)} customer-month(s), {len(money.ws_spend)} workspace-month(s)")
    return 1 if diffs else 0


def cmd_admin(args: argparse.Namespace) -> int:
    from extproc.admin import serve_admin

    return serve_admin(args)


def add_usage_commands(usage: Any, redis_opt: Callable[[argparse.ArgumentParser], None]) -> None:
    """`usage export` and `usage report` under the existing `usage` group."""
    from extproc.export import DEFAULT_GROUP, EXPORTED_MARKER_TTL_S
    from extproc.invoice import FORMATS

    ex = usage.add_parser("export", help="export the usage stream to the durable ledger (postgresql://..., sqlite:///path)")
    ex.add_argument("--to", help=f"ledger URL (default ${LEDGER_ENV})")
    ex.add_argument("--once", action="store_true", help="export what is in the stream, trim it and exit")
    ex.add_argument("--group", default=DEFAULT_GROUP, help="consumer group (one per ledger)")
    ex.add_argument("--consumer", help="consumer name (default: the host name; keep it stable across restarts)")
    ex.add_argument("--batch", type=int, default=500)
    ex.add_argument("--claim-idle-ms", type=int, default=60_000, help="take over entries another consumer left pending this long")
    ex.add_argument("--marker-ttl", type=int, default=EXPORTED_MARKER_TTL_S, help="seconds publish-once markers live after export")
    ex.add_argument("--stall-after-commit", action="store_true", help=argparse.SUPPRESS)
    ex.add_argument("--log-level", default=os.environ.get("TOLLGATE_LOG_LEVEL", "INFO"))
    ex.add_argument("--json", action="store_true")
    redis_opt(ex)
    ex.set_defaults(fn=cmd_usage_export)

    rp = usage.add_parser("report", help="a customer's invoice lines for a month, from the ledger (else the usage stream)")
    rp.add_argument("--customer", required=True)
    rp.add_argument("--month", required=True, help="YYYY-MM (UTC)")
    rp.add_argument("--format", choices=FORMATS, default="table")
    rp.add_argument("--to", help=f"ledger URL (default ${LEDGER_ENV}; neither: the usage stream in Redis)")
    rp.add_argument("--json", action="store_true", help="the same as --format json")
    redis_opt(rp)  # no ledger given: the report is read from the usage stream
    rp.set_defaults(fn=cmd_usage_report)


def add_commands(sub: Any, redis_opt: Callable[[argparse.ArgumentParser], None]) -> None:
    """`ledger verify` and `admin`."""
    from extproc.export import DEFAULT_GROUP

    lg = sub.add_parser("ledger", help="the durable ledger").add_subparsers(dest="ledger_cmd", required=True)
    lv = lg.add_parser("verify", help="compare the ledger with Redis (balances, month spend); exit 1 naming each difference")
    lv.add_argument("--to", help=f"ledger URL (default ${LEDGER_ENV})")
    lv.add_argument("--customer", help="check only this customer")
    lv.add_argument("--group", default=DEFAULT_GROUP, help="the exporter's consumer group (to count what awaits export)")
    lv.add_argument("--json", action="store_true")
    redis_opt(lv)
    lv.set_defaults(fn=cmd_ledger_verify)

    ad = sub.add_parser("admin", help="the admin HTTP API (keys, credits, limits, reports)")
    ad.add_argument("--listen", default="127.0.0.1:8090", help="HOST:PORT")
    ad.add_argument("--token-file", help="file holding the admin bearer token (default $TOLLGATE_ADMIN_TOKEN)")
    ad.add_argument("--to", help=f"ledger URL for reports (default ${LEDGER_ENV})")
    ad.add_argument("--log-level", default=os.environ.get("TOLLGATE_LOG_LEVEL", "INFO"))
    redis_opt(ad)
    ad.set_defaults(fn=cmd_admin)
