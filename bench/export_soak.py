"""`make export-soak`: Redis stays bounded while the exporter runs (issue 13). Not a CI test: figures
are printed and written to bench/export_soak.json, never asserted.

Tollgate (Envoy + one processor + Redis) in front of a canned provider (an Envoy answering
with direct_response), wrk pushing requests for SOAK_SECONDS (default 120; at least 50,000
requests on this machine), and `tollgate usage export` running against a ledger
(SOAK_LEDGER, default a SQLite file). Every 0.25 s the sampler reads the stream length and the
export group's lag (entries not yet acknowledged). At the end it waits for the exporter to
catch up and checks that the ledger holds exactly as many records as were ever added to the
stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis as redis_sync
import yaml

import bench.run as bench_run
from bench.run import COMPLETION, _key, _listener, _start_envoy, wrk
from extproc.devstack import Envoy, Processor, RedisServer, free_port
from extproc.ledger_store import open_store
from extproc.quota import USAGE_STREAM

SECONDS = int(os.environ.get("SOAK_SECONDS", "120"))


def sample(r: Any, stop: threading.Event, out: list[tuple[float, int, int]]) -> None:
    while not stop.is_set():
        length = int(r.xlen(USAGE_STREAM))
        lag = 0
        if length:
            for g in r.xinfo_groups(USAGE_STREAM):
                lag = int(g["pending"]) + int(g.get("lag") or 0)
        out.append((time.monotonic(), length, lag))
        stop.wait(0.25)


def key_kinds(r: Any) -> dict[str, str]:
    """Per-request keys left in Redis, by kind, with the longest TTL seen (seconds)."""
    out = {}
    for name, pattern in (("publish markers", "{tollgate:usage}:uid:*"), ("explain pointers", "{tollgate:usage}:request:*"),
                          ("request-id markers (409 duplicate_request)", "tollgate:{c:*}:req:*")):
        keys = list(r.scan_iter(match=pattern, count=5000))
        ttl = max((int(r.ttl(k)) for k in keys[:2000]), default=0)
        out[name] = f"{len(keys)} keys, TTL <= {ttl} s"
    return out


def main() -> int:
    logdir = Path(tempfile.mkdtemp(prefix="tollgate-soak-"))
    ledger = os.environ.get("SOAK_LEDGER") or f"sqlite:///{logdir}/ledger.db"
    ok_port, prov_admin = free_port(), free_port()
    provider = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": prov_admin}}},
                "static_resources": {"listeners": [_listener("ok", ok_port, 200, COMPLETION)]}}
    policy = {
        "providers": {"fast": {"address": f"127.0.0.1:{ok_port}", "tls": False, "circuit": {"failures": 10**9}}},
        "models": {"low_cost_chat": {"provider": "fast", "upstream_model": "m", "tier": "low",
                                     "price": {"input_per_mtok_usd": 0.15, "output_per_mtok_usd": 0.6}}},
        "plans": {"bench": {"routes": "*"}},
        "routes": [{"route": "direct", "primary_model": "low_cost_chat", "fallback": {"max_attempts": 1}}],
    }
    policy_file = logdir / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(policy))
    parts: list[Any] = []
    provider_proc = _start_envoy(provider, prov_admin, logdir, "providers")
    exporter: subprocess.Popen[bytes] | None = None
    samples: list[tuple[float, int, int]] = []
    try:
        rs = RedisServer().start()
        parts.append(rs)
        proc = Processor([str(policy_file)], rs.url, log_path=str(logdir / "extproc.log"), env={"TOLLGATE_LOG_LEVEL": "WARNING"}).start()
        parts.append(proc)
        envoy = Envoy([str(policy_file)], proc.endpoints, log_path=str(logdir / "envoy.log")).start()
        parts.append(envoy)
        key = asyncio.run(_key(rs.url))
        exporter = subprocess.Popen([sys.executable, "-m", "extproc.cli", "usage", "export", "--to", ledger, "--redis-url", rs.url],
                                    stdout=open(logdir / "export.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        r = redis_sync.Redis.from_url(rs.url)
        stop = threading.Event()
        sampler = threading.Thread(target=sample, args=(r, stop, samples), daemon=True)
        sampler.start()
        bench_run.DURATION_S = SECONDS
        started = time.monotonic()
        load = wrk(envoy.base_url, key, "direct", logdir)
        load_s = time.monotonic() - started
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not samples or samples[-1][2] > 0):
            time.sleep(0.25)
        caught_up_s = time.monotonic() - started - load_s
        time.sleep(1.5)  # one more trim
        stop.set()
        sampler.join()
        added = int(r.xinfo_stream(USAGE_STREAM)["entries-added"])
        store = open_store(ledger)
        in_ledger = store.count()
        store.close()
        during = [s for s in samples if s[0] - started <= load_s]
        result = {
            "seconds": SECONDS, "requests": int(load["requests"]), "rps": load["rps"], "non_2xx": int(load["non_2xx"]),
            "records_added_to_stream": added, "records_in_ledger": in_ledger,
            "max_stream_length": max(s[1] for s in during), "max_export_lag_entries": max(s[2] for s in during),
            "mean_stream_length": round(sum(s[1] for s in during) / len(during)),
            "stream_length_after": int(r.xlen(USAGE_STREAM)), "caught_up_after_load_s": round(caught_up_s, 1),
            "redis_keys_after": int(r.dbsize()), "redis_keys_by_kind": key_kinds(r), "redis_used_memory_mb": round(int(r.info("memory")["used_memory"]) / 2**20, 1),
            "ledger": ledger.split("@")[-1],
        }
    finally:
        if exporter is not None:
            exporter.terminate()
            exporter.wait(15)
        for part in reversed(parts):
            part.stop()
        provider_proc.terminate()
        provider_proc.wait()
    print(json.dumps(result, indent=2))
    Path(__file__).with_name("export_soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"logs in {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
