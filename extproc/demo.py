"""`tollgate demo`: the whole stack on this machine, with a demo key printed.

Redis (a throwaway server), two fake providers on the ports the example catalog names,
the processor and Envoy, all children of this process; Ctrl-C stops every one of them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from extproc.devstack import Envoy, Processor, RedisServer, UsageExporter, free_port
from extproc.fakeprovider import FakeProvider
from extproc.keys import KeyStore
from extproc.policy import load_policy

EXAMPLE_POLICY = Path(__file__).parent / "examples" / "policy"
DEMO_SECRETS = {"OPENAI_API_KEY": "sk-demo-primary-provider", "BACKUP_API_KEY": "sk-demo-backup-provider"}


async def _create_key(redis_url: str) -> tuple[str, str]:
    from extproc.store import close as close_client
    from extproc.store import redis_client

    client = redis_client(redis_url)
    try:
        created = await KeyStore(client).create("demo-customer", "demo-workspace", "premium", "support_draft")
        return created.info.key_id, created.secret
    finally:
        await close_client(client)


def tollgate_command() -> str:
    """How to run `tollgate` as printed: the script beside this Python (relative when it is
    under the current directory, e.g. `.venv/bin/tollgate`), so it works without activating."""
    script = Path(sys.executable).parent / "tollgate"
    if not script.exists():
        return f"{sys.executable} -m extproc.cli"
    rel = os.path.relpath(script)
    return rel if not rel.startswith("..") else str(script)


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def run_demo(port: int = 8080, redis_port: int = 0, workers: int = 1) -> int:
    policy = load_policy([str(EXAMPLE_POLICY)])
    cmd = tollgate_command()
    wanted = [("Envoy (the gateway)", port, "--port"), *((f"fake provider {p.name}", p.port, "") for p in policy.providers.values())]
    if redis_port:
        wanted.append(("Redis", redis_port, "--redis-port"))
    for what, p, flag in wanted:
        if port_taken(p):
            how = f"choose another with `{cmd} demo {flag} N`" if flag else "stop the program that uses it"
            print(f"tollgate demo: port {p} (for {what}) is already in use; {how}.", file=sys.stderr)
            return 1
    logdir = tempfile.mkdtemp(prefix="tollgate-demo-")
    parts: list[RedisServer | Processor | Envoy | UsageExporter] = []
    fakes = [FakeProvider(p.name, p.host, p.port).start() for p in policy.providers.values()]
    try:
        redis = RedisServer(redis_port or free_port()).start()
        parts.append(redis)
        proc = Processor([str(EXAMPLE_POLICY)], redis.url, workers=workers, env=DEMO_SECRETS,
                         log_path=f"{logdir}/extproc.log").start()
        parts.append(proc)
        envoy = Envoy([str(EXAMPLE_POLICY)], proc.endpoints, port=port, log_path=f"{logdir}/envoy.log", access_log=True).start()
        parts.append(envoy)
        key_id, secret = asyncio.run(_create_key(redis.url))
        ledger = f"sqlite:///{logdir}/ledger.db"  # logdir is absolute: sqlite:////tmp/...
        parts.append(UsageExporter(redis.url, ledger, log_path=f"{logdir}/export.log").start())
        month = time.strftime("%Y-%m", time.gmtime())
        print(f"""
Tollgate demo is up.
  base URL      {envoy.base_url}/v1
  demo key      {secret}
  key id        {key_id} (customer demo-customer, plan premium, default route support_draft)
  routes        {', '.join(sorted(policy.routes))}
  providers     {', '.join(f'{f.name}={f.url}' for f in fakes)} (fake)
  redis         {redis.url}
  metrics       http://127.0.0.1:{proc.metrics_port}/metrics
  logs          {logdir}

Try:
  curl -s {envoy.base_url}/v1/chat/completions -H "Authorization: Bearer {secret}" \\
       -H 'content-type: application/json' -d '{{"model":"support_draft","messages":[{{"role":"user","content":"hi"}}]}}'
  TOLLGATE_REDIS_URL={redis.url} {cmd} usage tail
  {cmd} usage report --customer demo-customer --month {month} --to {ledger}

Ledger (usage exported from Redis as it happens, SQLite): {ledger}

Ctrl-C stops everything.""", flush=True)
        stop = False

        def on_signal(_s: int, _f: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop:
            for part in parts:
                if part.proc is not None and part.proc.poll() is not None:
                    print(f"{type(part).__name__} exited ({part.proc.returncode}); see {logdir}", file=sys.stderr)
                    stop = True
            time.sleep(0.2)
        return 0
    except (RuntimeError, TimeoutError) as exc:  # a part did not start: say so, not a traceback
        print(f"tollgate demo: could not start: {exc}; logs in {logdir}", file=sys.stderr)
        return 1
    finally:
        for part in reversed(parts):
            part.stop()
        for f in fakes:
            f.stop()
        print("stopped.", flush=True)
