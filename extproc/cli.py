"""`tollgate`: the command line of SPEC §8.

Exit status: 0 done, 1 refused (invalid policy, unknown key), 2 usage error.
Every command that talks to Redis takes `--redis-url` (default: $TOLLGATE_REDIS_URL, else
redis://127.0.0.1:6379/0). Commands that print data take `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from extproc import billing_cli, config

DEFAULT_REDIS = config.REDIS_URL


def _redis_url(args: argparse.Namespace) -> str:
    return str(args.redis_url or os.environ.get("TOLLGATE_REDIS_URL") or DEFAULT_REDIS)


def _with_redis(args: argparse.Namespace, fn: Callable[[Any], Awaitable[int]]) -> int:
    from redis.exceptions import RedisError

    from extproc.store import close as close_client
    from extproc.store import redis_client

    async def run() -> int:
        client = redis_client(_redis_url(args))
        try:
            return await fn(client)
        finally:
            await close_client(client)

    try:
        return asyncio.run(run())
    except RedisError as exc:
        print(f"tollgate: cannot reach Redis at {_redis_url(args)}: {exc}", file=sys.stderr)
        return 1


# --- serve / envoy-config / policy ------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from extproc.envoy_config import GrpcEndpoint
    from extproc.policy import PolicyError
    from extproc.server import IDEMPOTENCY_ENV, serve

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.idempotency_window is not None:  # workers (spawned processes) inherit the environment
        os.environ[IDEMPOTENCY_ENV] = str(args.idempotency_window)
    host, port = "0.0.0.0", args.metrics_port
    if args.metrics_listen:
        try:
            endpoint = GrpcEndpoint.parse(args.metrics_listen)
        except ValueError as exc:
            print(f"tollgate: --metrics-listen: {exc}", file=sys.stderr)
            return 2
        host, port = endpoint.host, endpoint.port
    try:
        return serve(args.policy, _redis_url(args), args.listen, port, args.workers, args.log_level, host)
    except PolicyError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 1


def cmd_envoy_config(args: argparse.Namespace) -> int:
    from extproc import envoy_config
    from extproc.policy import PolicyError, load_policy

    try:
        policy = load_policy(args.policy)
        endpoints: list[envoy_config.GrpcEndpoint] = []
        for text in args.extproc or [config.EXTPROC_LISTEN]:
            endpoints += envoy_config.worker_endpoints(envoy_config.GrpcEndpoint.parse(text), args.workers)
    except PolicyError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"tollgate: --extproc: {exc}", file=sys.stderr)
        return 2
    bootstrap = envoy_config.render_bootstrap(
        policy, endpoints, port=args.port, admin_port=args.admin_port, listen_address=args.address,
        max_body_bytes=args.max_body_bytes, access_log=args.access_log, stats_port=args.stats_port,
    )
    text = json.dumps(bootstrap, indent=2) if args.json else envoy_config.dump(bootstrap)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def cmd_policy_check(args: argparse.Namespace) -> int:
    from extproc.policy.load import check_policy

    policy, issues = check_policy(args.files)
    errors = [i for i in issues if i.level == "error"]
    if args.json:
        print(json.dumps({"ok": not errors, "issues": [i.__dict__ for i in issues]}))
    else:
        for i in issues:
            print(i, file=sys.stderr if i.level == "error" else sys.stdout)
        if not errors and policy is not None:
            print(f"ok: {len(policy.routes)} route(s), {len(policy.models)} model(s), {len(policy.providers)} provider(s), "
                  f"{len(policy.plans)} plan(s); {len(issues)} warning(s)")
    return 1 if errors else 0


# --- keys ----------------------------------------------------------------------------------------


def cmd_keys(args: argparse.Namespace) -> int:
    from extproc.keys import KeyStore

    async def run(redis: Any) -> int:
        store = KeyStore(redis)
        if args.keys_cmd == "create":
            problem = await _key_problem(args, redis)
            if problem is not None:
                print(f"tollgate: {problem}", file=sys.stderr)
                return 1
            try:
                created = await store.create(args.customer, args.workspace, args.plan, args.default_route, args.rpm, args.tpm)
            except ValueError as exc:
                print(f"tollgate: {exc}", file=sys.stderr)
                return 1
            i = created.info
            if args.json:
                print(json.dumps({"key_id": i.key_id, "secret": created.secret, "customer": i.customer,
                                  "workspace": i.workspace, "plan": i.plan, "default_route": i.default_route}))
            else:
                print(created.secret)
                print(f"key_id={i.key_id} customer={i.customer} workspace={i.workspace} plan={i.plan}"
                      f" default_route={i.default_route or '-'}  (the secret above is shown only once)")
            return 0
        if args.keys_cmd == "list":
            rows = [{"key_id": k.key_id, "customer": k.customer, "workspace": k.workspace, "plan": k.plan,
                     "default_route": k.default_route, "status": "active" if k.active else "revoked"} for k in await store.list()]
            if args.json:  # one JSON document (SPEC §8)
                print(json.dumps({"keys": rows}))
            else:
                for row in rows:
                    print("\t".join(str(v or "-") for v in row.values()))
            return 0
        ok = await store.revoke(args.key_id)
        if not ok:
            print(f"tollgate: unknown key id {args.key_id!r}", file=sys.stderr)
            return 1
        print(json.dumps({"key_id": args.key_id, "status": "revoked"}) if args.json else f"revoked {args.key_id}")
        return 0

    return _with_redis(args, run)


async def _key_problem(args: argparse.Namespace, redis: Any) -> str | None:
    """Why the key being created would be refused by the policy in force (`--policy`, else
    the names the running processor published), or None."""
    from extproc import published
    from extproc.policy import PolicyError, load_policy

    if args.policy:
        try:
            names = published.PolicyNames.of(load_policy(args.policy), "--policy " + " ".join(args.policy))
        except PolicyError as exc:
            return str(exc)
    else:
        found = await published.read(redis)
        if found is None:
            return ("cannot check the plan: no running processor has published its policy to this Redis; "
                    "start `tollgate serve` first or pass --policy FILE|DIR")
        names = found
    return names.key_problem(args.plan, args.default_route)


def _id(text: str) -> str:
    """A customer/workspace id (becomes part of Redis keys)."""
    from extproc.quota import valid_id

    if not valid_id(text):
        raise argparse.ArgumentTypeError(f"must be 1-128 letters, digits or _ . : @ -, got {text!r}")
    return text


def _count(text: str) -> int:
    """A non-negative whole number (a limit); deleting an override has its own flag."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value} (to remove an override use --clear-...)")
    return value


# --- money and usage -------------------------------------------------------------------------------


def _usd_micro(text: str) -> int:
    """A USD amount from the command line as exact micro-dollars."""
    from extproc.money import usd_to_micro

    try:
        return usd_to_micro(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_balance(args: argparse.Namespace) -> int:
    from extproc.quota import Quota, valid_id
    from extproc.records import usd

    if not valid_id(args.customer):
        print(f"tollgate: invalid customer id {args.customer!r}", file=sys.stderr)
        return 1

    async def run(redis: Any) -> int:
        q = Quota(redis)
        credit = None
        if args.balance_cmd == "add":
            from extproc.credits import add_credit

            try:
                credit = await add_credit(redis, args.customer, args.usd, args.reference, source="cli")
            except ValueError as exc:
                print(f"tollgate: {exc}", file=sys.stderr)
                return 1
            if not credit.credited:
                print(f"reference {credit.reference!r} was already credited; nothing changed", file=sys.stderr)
        info = await q.account_show(args.customer)
        if args.json:
            extra = {"reference": credit.reference, "credited": credit.credited, "record_id": credit.record_id} if credit else {}
            print(json.dumps({"customer": args.customer, **info, **extra}))
        else:
            print(f"customer {args.customer}: balance {usd(info['balance_micro'])}, in flight {usd(info['reserved_micro'])}, "
                  f"available {usd(info['available_micro'])}, spent this month {usd(info['month_spend_micro'])}")
        return 0

    return _with_redis(args, run)


def cmd_limits(args: argparse.Namespace) -> int:
    from extproc.quota import Quota

    if args.monthly_usd is not None and args.monthly_usd < 0:
        print("tollgate: limits set: --monthly-usd must not be negative (to remove the override use --clear-monthly)",
              file=sys.stderr)
        return 2
    budget = -1 if args.clear_monthly else args.monthly_usd
    rpm = -1 if args.clear_rpm else args.rpm  # -1 removes the override
    tpm = -1 if args.clear_tpm else args.tpm
    if budget is None and rpm is None and tpm is None:
        print("tollgate: limits set: nothing to set (give --monthly-usd, --rpm, --tpm or a --clear-... flag)", file=sys.stderr)
        return 2

    async def run(redis: Any) -> int:
        await Quota(redis).set_limits(args.customer, args.workspace, monthly_budget_micro=budget, rpm=rpm, tpm=tpm)
        print(json.dumps({"customer": args.customer, "workspace": args.workspace, "monthly_budget_micro": budget,
                          "rpm": rpm, "tpm": tpm}) if args.json else "ok")
        return 0

    return _with_redis(args, run)


def cmd_usage_tail(args: argparse.Namespace) -> int:
    from extproc import records

    async def run(redis: Any) -> int:
        for rec in await records.tail(redis, args.n):
            if args.json:
                print(json.dumps(rec))
            else:
                print(f"{rec.get('request_id')}  {rec.get('route')}  {rec.get('customer_id')}  {rec.get('primary_model')}->"
                      f"{rec.get('final_model')}  attempts={rec.get('attempts')}  reason={rec.get('fallback_reason')}  "
                      f"status={rec.get('status')}  cost={records.usd(rec.get('cost_micro_usd'))}")
        return 0

    return _with_redis(args, run)


def cmd_explain(args: argparse.Namespace) -> int:
    from extproc import records

    async def run(redis: Any) -> int:
        try:
            rec = await records.find(redis, args.request_id, args.customer) or billing_cli.find_in_ledger(args, args.request_id)
        except records.AmbiguousRequestId as exc:
            print(f"tollgate: {exc}; choose one with --customer", file=sys.stderr)
            return 1
        if rec is None:
            whose = f" of customer {args.customer!r}" if args.customer else ""
            print(f"tollgate: no usage record for request {args.request_id!r}{whose} (refused before any upstream call, "
                  "or unknown)", file=sys.stderr)
            return 1
        print(json.dumps(records.typed(rec)) if args.json else records.explain(rec))
        return 0

    return _with_redis(args, run)


# --- demo and fake provider ------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from extproc.demo import run_demo

    return run_demo(port=args.port, redis_port=args.redis_port, workers=args.workers)


def cmd_fake_provider(args: argparse.Namespace) -> int:
    from extproc.fakeprovider import main

    main(args.name, args.host, args.port)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


# --- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tollgate", description="OpenAI-compatible gateway: Envoy + ext_proc + Redis.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def redis_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--redis-url", help="Redis URL (default $TOLLGATE_REDIS_URL or redis://127.0.0.1:6379/0)")

    s = sub.add_parser("serve", help="run the ext_proc processor")
    s.add_argument("--policy", action="append", required=True, help="policy file or directory (repeatable; merged in order)")
    redis_opt(s)
    s.add_argument("--listen", default=config.EXTPROC_LISTEN, help="HOST:PORT (workers use consecutive ports) or unix:PATH")
    s.add_argument("--metrics-port", type=int, default=config.METRICS_PORT, help="/metrics on every interface, this port")
    s.add_argument("--metrics-listen", help="HOST:PORT for /metrics instead (e.g. 127.0.0.1:9464 for loopback only)")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--log-level", default=os.environ.get("TOLLGATE_LOG_LEVEL", "INFO"))
    s.add_argument("--idempotency-window", type=_positive_int, metavar="SECONDS",
                   help="how long a served x-request-id stays spent and `explain` finds it (overrides the policy's "
                        f"settings.idempotency_window_s; default {config.IDEMPOTENCY_WINDOW_S})")
    s.set_defaults(fn=cmd_serve)

    e = sub.add_parser("envoy-config", help="print the Envoy bootstrap for a policy")
    e.add_argument("--policy", action="append", required=True)
    e.add_argument("--extproc", action="append", help="processor HOST:PORT or unix:PATH (repeatable)")
    e.add_argument("--workers", type=int, default=1, help="expand each --extproc to N consecutive ports")
    e.add_argument("--port", type=int, default=8080)
    e.add_argument("--admin-port", type=int, default=9901)
    e.add_argument("--address", default="0.0.0.0", help="listener address")
    e.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    e.add_argument("--access-log", action="store_true")
    e.add_argument("--stats-port", type=int, help="a listener exposing only /stats/prometheus and /ready")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_envoy_config)

    pol = sub.add_parser("policy", help="policy tools").add_subparsers(dest="policy_cmd", required=True)
    pc = pol.add_parser("check", help="check policy files (schema and the seed's checklist)")
    pc.add_argument("files", nargs="+")
    pc.add_argument("--json", action="store_true")
    pc.set_defaults(fn=cmd_policy_check)

    k = sub.add_parser("keys", help="customer API keys").add_subparsers(dest="keys_cmd", required=True)
    kc = k.add_parser("create")
    kc.add_argument("--customer", required=True)
    kc.add_argument("--workspace", required=True)
    kc.add_argument("--plan", required=True)
    kc.add_argument("--default-route")
    kc.add_argument("--rpm", type=_count, help="override the plan's requests per minute for this key")
    kc.add_argument("--tpm", type=_count, help="override the plan's tokens per minute for this key")
    kc.add_argument("--policy", action="append", help="check plan and route against these policy files (default: the "
                    "names the running processor published to Redis)")
    kl = k.add_parser("list")
    kr = k.add_parser("revoke")
    kr.add_argument("key_id")
    for sp in (kc, kl, kr):
        redis_opt(sp)
        sp.add_argument("--json", action="store_true")
        sp.set_defaults(fn=cmd_keys)

    b = sub.add_parser("balance", help="prepaid balances").add_subparsers(dest="balance_cmd", required=True)
    ba = b.add_parser("add")
    ba.add_argument("--customer", required=True)
    ba.add_argument("--usd", required=True, type=_usd_micro, help="amount in US dollars (negative to deduct)")
    ba.add_argument("--reference", help="payment id: the same reference never credits twice (default: a new one)")
    bs = b.add_parser("show")
    bs.add_argument("--customer", required=True)
    for sp in (ba, bs):
        redis_opt(sp)
        sp.add_argument("--json", action="store_true")
        sp.set_defaults(fn=cmd_balance)

    lim = sub.add_parser("limits", help="per-customer or per-workspace limit overrides").add_subparsers(dest="limits_cmd", required=True)
    ls = lim.add_parser("set")
    ls.add_argument("--customer", required=True, type=_id)
    ls.add_argument("--workspace", type=_id, help="set the workspace's limits instead of the customer's")
    ls.add_argument("--monthly-usd", type=_usd_micro, help="monthly spend limit in US dollars")
    ls.add_argument("--clear-monthly", action="store_true", help="remove the monthly spend override")
    ls.add_argument("--rpm", type=_count, help="requests per minute of the customer (or the workspace)")
    ls.add_argument("--tpm", type=_count, help="tokens per minute of the customer (or the workspace)")
    ls.add_argument("--clear-rpm", action="store_true", help="remove the requests-per-minute override")
    ls.add_argument("--clear-tpm", action="store_true", help="remove the tokens-per-minute override")
    redis_opt(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_limits)

    u = sub.add_parser("usage", help="usage records").add_subparsers(dest="usage_cmd", required=True)
    ut = u.add_parser("tail", help="the last N usage records, oldest first")
    ut.add_argument("-n", type=int, default=10)
    redis_opt(ut)
    ut.add_argument("--json", action="store_true")
    ut.set_defaults(fn=cmd_usage_tail)
    billing_cli.add_usage_commands(u, redis_opt)

    x = sub.add_parser("explain", help="why a request used the model it did, and what it cost")
    x.add_argument("request_id")
    x.add_argument("--to", help="also look in this ledger (default $TOLLGATE_LEDGER_URL) once the stream is trimmed")
    x.add_argument("--customer", help="the customer whose request it was (request ids are scoped per customer)")
    redis_opt(x)
    x.add_argument("--json", action="store_true")
    x.set_defaults(fn=cmd_explain)

    billing_cli.add_commands(sub, redis_opt)

    d = sub.add_parser("demo", help="start Redis, fake providers, the processor and Envoy; print a demo key")
    d.add_argument("--port", type=int, default=8080)
    d.add_argument("--redis-port", type=int, default=0)
    d.add_argument("--workers", type=int, default=1)
    d.set_defaults(fn=cmd_demo)

    f = sub.add_parser("fake-provider", help="run an OpenAI-compatible fake provider")
    f.add_argument("--name", default="fake")
    f.add_argument("--host", default="127.0.0.1")
    f.add_argument("--port", type=int, default=18080)
    f.set_defaults(fn=cmd_fake_provider)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
