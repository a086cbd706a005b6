"""`make bench`: Tollgate's cost next to Envoy alone and the Portkey AI Gateway, in one run on this machine.

Setups (wrk, same request, same canned provider; every setup answers 200 with a completion,
checked before it is measured):
  envoy_alone       a plain Envoy proxy (router only): the floor of this architecture
  tollgate_direct   Tollgate on a single-attempt route
  tollgate_chain    Tollgate on the seed route (a fallback chain; normal path): "Tollgate" in the ratios
  tollgate_noop     the floor of Tollgate's architecture: the same rendered Envoy config in front of a
                    processor that does no work (bench/noop_processor.py answers every request with
                    the seed route's reply, computed once); chain minus noop is Tollgate's own work
  tollgate_fallback a route whose primary answers 500 (circuit kept closed): every request
                    switches to the healthy provider
  portkey           the Portkey AI Gateway (npm, one Node process), one OpenAI target
  portkey_fallback  Portkey in fallback mode: first target answers 500, second is healthy

Procedure: each setup is checked and warmed up (5 s; Node needs ~4 s of load before its JIT
settles); then BENCH_ROUNDS (2) rounds visit every setup in turn with wrk at BENCH_CONNECTIONS
(32) for BENCH_SECONDS (8), the CPU time of the setup's processes sampled around each run
(/proc); then the same rounds at 1 connection for BENCH_SECONDS_1CONN (3). Best round for
req/s and latency, all rounds for CPU per request (see `combine`). The "providers" are a second
Envoy answering canned completions via direct_response, so the upstream is never the
bottleneck; its CPU is shown apart. Results go to
stdout and bench/results.json. Timings are reported, never asserted.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import cpu, portkey, report
from extproc.devstack import Envoy, Processor, RedisServer, envoy_binary, free_port, wait_for_port
from extproc.envoy_config import GrpcEndpoint
from extproc.keys import KeyStore
from extproc.store import redis_client

DURATION_S = int(os.environ.get("BENCH_SECONDS", "8"))  # per round
ONE_CONN_S = int(os.environ.get("BENCH_SECONDS_1CONN", "3"))  # per round
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
SETTLE_S = 0.6  # after a run, before its CPU sample: longer than Envoy's access-log flush (config.SETTLE_LOG_FLUSH_S)
WARMUP_S = int(os.environ.get("BENCH_WARMUP_SECONDS", "5"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
WORKERS = int(os.environ.get("BENCH_WORKERS", "1"))
# Tollgate's Envoy gets one worker thread: on 2 cores it shares the machine with the processor
# (one worker, a core of its own under load) and Redis, and a second Envoy worker only adds
# cross-thread work (measured: -9 to -16% req/s). Envoy alone keeps 2, its best.
ENVOY_WORKERS = int(os.environ.get("BENCH_ENVOY_WORKERS", "1"))
WORKDIR = Path(os.environ.get("BENCH_WORKDIR", str(Path(__file__).with_name(".work"))))
COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
})
SERVER_ERROR = json.dumps({"error": {"message": "upstream broke", "type": "server_error", "param": None, "code": "server_error"}})
T = "type.googleapis.com/envoy."


def _listener(name: str, port: int, status: int, body: str) -> dict[str, Any]:
    hcm = {"@type": T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", "stat_prefix": name,
           "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"], "routes": [{"match": {"prefix": "/"},
                            "direct_response": {"status": status, "body": {"inline_string": body}},
                            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}]}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": T + "extensions.filters.http.router.v3.Router"}}]}
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}


def _plain_proxy(port: int, admin: int, upstream: int) -> dict[str, Any]:
    hcm = {"@type": T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", "stat_prefix": "alone",
           "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": T + "extensions.filters.http.router.v3.Router"}}]}
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {
                "listeners": [{"name": "alone", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                               "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}],
                "clusters": [{"name": "up", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {"cluster_name": "up",
                              "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}}}]}]}}]}}


def _start_envoy(config: dict[str, Any], admin: int, logdir: Path, name: str) -> subprocess.Popen[bytes]:
    path = logdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([envoy_binary(), "-c", str(path), "--concurrency", "2", "--log-level", "error",
                             "--base-id", str(admin), "--disable-hot-restart"], stdout=subprocess.DEVNULL,
                            stderr=open(logdir / f"{name}.log", "wb"))  # noqa: SIM115
    wait_for_port(admin, proc=proc)
    return proc


def wrk_run(url: str, headers: dict[str, str], model: str, connections: int, seconds: int, logdir: Path) -> dict[str, float]:
    """One wrk run posting the bench's chat request; errors are non-2xx answers plus socket errors."""
    script = logdir / "post.lua"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16})
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body)}", 'wrk.headers["Content-Type"] = "application/json"']
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(["wrk", "-t", str(min(2, connections)), "-c", str(connections), "-d", f"{seconds}s", "--latency", "-s", str(script),
                          url + "/v1/chat/completions"], capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    return {"rps": rps, "p50_ms": ms("50%"), "p99_ms": ms("99%"), "non_2xx": float(non_2xx.group(1)) if non_2xx else 0.0,
            "socket_errors": float(sum(int(g) for g in sockets.groups())) if sockets else 0.0,
            "requests": float(total.group(1)) if total else 0.0}


def wrk(url: str, key: str | None, route: str, logdir: Path) -> dict[str, float]:
    """wrk at CONNECTIONS for DURATION_S with a customer key (used by bench/export_soak.py too)."""
    return wrk_run(url, {"Authorization": f"Bearer {key}"} if key else {}, route, CONNECTIONS, DURATION_S, logdir)


@dataclass
class Setup:
    """One thing measured: where to send, what to send, which processes are the gateway."""

    name: str
    url: str
    headers: dict[str, str]
    model: str
    gateway: dict[str, int]  # part name -> pid whose process tree is that part


def verify(setup: Setup) -> str | None:
    """None when one request answers 200 with a completion, else what went wrong (a bench
    that measures error answers is worthless)."""
    body = json.dumps({"model": setup.model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}).encode()
    req = urllib.request.Request(setup.url + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json", **setup.headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, answer = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, answer = e.code, e.read()
    except OSError as e:
        return f"no answer: {e}"
    try:
        content = json.loads(answer)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        content = None
    if status != 200 or not content:
        return f"status {status}: {answer[:300].decode(errors='replace')}"
    return None


def loaded_run(setup: Setup, provider_pid: int, logdir: Path) -> dict[str, Any]:
    """One wrk run at CONNECTIONS with the CPU time of the setup's processes (and the provider's)
    sampled around it."""
    pids = {**setup.gateway, "provider": provider_pid}
    before = cpu.sample(pids)
    run: dict[str, Any] = dict(wrk_run(setup.url, setup.headers, setup.model, CONNECTIONS, DURATION_S, logdir))
    time.sleep(SETTLE_S)  # work a gateway defers (batched settlement, access logs) still counts
    after = cpu.sample(pids)
    run["cpu_s"] = {name: after[name] - before[name] for name in pids}
    print(f"  {setup.name}: {run['rps']:.0f} req/s, p50 {run['p50_ms']:.2f} ms")
    return run


def combine(setup: Setup, loaded: list[dict[str, Any]], single: list[dict[str, float]]) -> dict[str, Any]:
    """A setup's figures from its rounds: req/s and latencies from its best round (a shared
    machine only ever slows a run down), 1-connection p50 from its best 1-connection round, CPU per
    request over all rounds (more requests, steadier), errors summed over every run."""
    best, best_single = max(loaded, key=lambda r: r["rps"]), min(single, key=lambda r: r["p50_ms"])
    served = max(sum(r["requests"] for r in loaded), 1.0)
    parts = {name: round(sum(r["cpu_s"][name] for r in loaded) * 1000 / served, 4) for name in setup.gateway}
    runs = [*loaded, *single]
    errors = sum(r["non_2xx"] + r["socket_errors"] for r in runs)
    return {
        "rps": best["rps"], "p50_ms": best["p50_ms"], "p99_ms": best["p99_ms"], "rps_rounds": [r["rps"] for r in loaded],
        "p50_1conn_ms": best_single["p50_ms"], "p99_1conn_ms": best_single["p99_ms"], "rps_1conn": best_single["rps"],
        "requests": sum(r["requests"] for r in runs), "errors": errors,
        "error_rate": round(errors / max(sum(r["requests"] for r in runs), 1.0), 6),
        "cpu_ms_per_req": round(sum(parts.values()), 4), "cpu_parts_ms_per_req": parts,
        "provider_cpu_ms_per_req": round(sum(r["cpu_s"]["provider"] for r in loaded) * 1000 / served, 4),
    }


def measure_all(setups: list[Setup], provider_pid: int, logdir: Path) -> dict[str, dict[str, Any]]:
    """Check and warm up every setup, then ROUNDS rounds that visit every setup in turn (so a
    burst of load from other jobs hits all of them, not one), then the 1-connection rounds."""
    results: dict[str, dict[str, Any]] = {}
    live: list[Setup] = []
    for setup in setups:
        problem = verify(setup)
        if problem:
            print(f"{setup.name}: NOT MEASURED, {problem}")
            results[setup.name] = {"error": problem}
            continue
        wrk_run(setup.url, setup.headers, setup.model, CONNECTIONS, WARMUP_S, logdir)  # warm-up (connections, JIT, caches)
        live.append(setup)
    loaded: dict[str, list[dict[str, Any]]] = {s.name: [] for s in live}
    single: dict[str, list[dict[str, float]]] = {s.name: [] for s in live}
    for n in range(ROUNDS):
        print(f"round {n + 1} of {ROUNDS}, {CONNECTIONS} connections, {DURATION_S} s each")
        for setup in live:
            loaded[setup.name].append(loaded_run(setup, provider_pid, logdir))
    for _ in range(ROUNDS):
        for setup in live:
            single[setup.name].append(wrk_run(setup.url, setup.headers, setup.model, 1, ONE_CONN_S, logdir))
    for setup in live:
        results[setup.name] = combine(setup, loaded[setup.name], single[setup.name])
    return {s.name: results[s.name] for s in setups}


async def _key(redis_url: str) -> str:
    client = redis_client(redis_url)
    try:
        return (await KeyStore(client).create("bench", "bench", "bench", "support_draft")).secret
    finally:
        await client.aclose()


def _policy(ok_port: int, failing_port: int) -> dict[str, Any]:
    never_open = {"failures": 10**9}  # the fallback setup measures the path with the circuit closed
    return {
        "tiers": ["low", "standard", "premium"],
        "providers": {"fast": {"address": f"127.0.0.1:{ok_port}", "tls": False, "circuit": never_open},
                      "failing": {"address": f"127.0.0.1:{failing_port}", "tls": False, "circuit": never_open}},
        "models": {
            "low_cost_chat": {"provider": "fast", "upstream_model": "m", "tier": "low", "price": {"input_per_mtok_usd": 0.15, "output_per_mtok_usd": 0.6}},
            "failing_chat": {"provider": "failing", "upstream_model": "f", "tier": "low", "price": {"input_per_mtok_usd": 0.15, "output_per_mtok_usd": 0.6}},
        },
        "plans": {"bench": {"routes": "*"}},
        "routes": [
            {"route": "direct", "primary_model": "low_cost_chat", "fallback": {"max_attempts": 1}},
            {"route": "support_draft", "primary_model": "low_cost_chat", "fallback": {
                "on_provider_5xx": "retry_once_then_switch_same_price_tier", "on_rate_limit": "switch_same_price_tier",
                "on_budget_exceeded": "fail_closed", "max_attempts": 2}},
            # Mirrors Portkey's fallback config: one failed attempt (500), then the healthy provider.
            {"route": "falls_back", "primary_model": "failing_chat", "fallback": {"on_provider_5xx": "switch_same_price_tier", "max_attempts": 2}},
        ],
    }


def main() -> int:
    if not shutil.which("wrk"):
        print("bench needs wrk (apt-get install wrk)", file=sys.stderr)
        return 1
    logdir = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    ok_port, failing_port, prov_admin = free_port(), free_port(), free_port()
    provider = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": prov_admin}}},
                "static_resources": {"listeners": [_listener("ok", ok_port, 200, COMPLETION),
                                                   _listener("failing", failing_port, 500, SERVER_ERROR)]}}
    policy_file = logdir / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(_policy(ok_port, failing_port)))
    portkey_script = portkey.install(WORKDIR / "portkey")
    load_before = os.getloadavg()[0]
    procs: list[subprocess.Popen[bytes]] = []
    parts: list[Any] = []
    results: dict[str, dict[str, Any]] = {}
    try:
        providers = _start_envoy(provider, prov_admin, logdir, "providers")
        procs.append(providers)
        alone_port, alone_admin = free_port(), free_port()
        alone = _start_envoy(_plain_proxy(alone_port, alone_admin, ok_port), alone_admin, logdir, "alone")
        procs.append(alone)
        wait_for_port(alone_port)
        redis = RedisServer().start()
        parts.append(redis)
        proc = Processor([str(policy_file)], redis.url, workers=WORKERS, log_path=str(logdir / "extproc.log"),
                         env={"TOLLGATE_LOG_LEVEL": "WARNING"}).start()
        parts.append(proc)
        envoy = Envoy([str(policy_file)], proc.endpoints, log_path=str(logdir / "envoy.log"), concurrency=ENVOY_WORKERS).start()
        parts.append(envoy)
        key = asyncio.run(_key(redis.url))
        noop_port = free_port()
        noop = subprocess.Popen([sys.executable, "-m", "bench.noop_processor", str(noop_port), redis.url, str(policy_file), key,
                                 "support_draft"], stdout=subprocess.PIPE, stderr=open(logdir / "noop.log", "wb"))  # noqa: SIM115
        procs.append(noop)
        assert noop.stdout is not None
        if noop.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the no-op processor did not start; see {logdir / 'noop.log'}")
        noop_envoy = Envoy([str(policy_file)], [GrpcEndpoint(host="127.0.0.1", port=noop_port)],
                           log_path=str(logdir / "noop-envoy.log"), concurrency=ENVOY_WORKERS).start()
        parts.append(noop_envoy)
        assert redis.proc and proc.proc and envoy.proc and noop_envoy.proc
        tollgate = {"processor": proc.proc.pid, "envoy": envoy.proc.pid, "redis": redis.proc.pid}
        auth = {"Authorization": f"Bearer {key}"}
        setups = [Setup("envoy_alone", f"http://127.0.0.1:{alone_port}", {}, "direct", {"envoy": alone.pid}),
                  Setup("tollgate_direct", envoy.base_url, auth, "direct", tollgate),
                  Setup("tollgate_chain", envoy.base_url, auth, "support_draft", tollgate),
                  Setup("tollgate_noop", noop_envoy.base_url, auth, "support_draft", {"processor": noop.pid, "envoy": noop_envoy.proc.pid}),
                  Setup("tollgate_fallback", envoy.base_url, auth, "falls_back", tollgate)]
        # Each Portkey setup runs right after the Tollgate setup it is compared with, so the
        # pair sees the same neighbours on a shared machine.
        node = None
        if portkey_script is not None:
            pk_port = free_port()
            try:
                node = portkey.start(portkey_script, pk_port, logdir / "portkey.log")
                procs.append(node)
            except (RuntimeError, TimeoutError) as e:
                print(f"portkey: skipped (it did not start: {e}; see {logdir / 'portkey.log'})")
        if node is not None:
            pk_url, client_auth = f"http://127.0.0.1:{pk_port}", {"Authorization": f"Bearer {portkey.API_KEY}"}
            setups.insert(3, Setup("portkey", pk_url, {**client_auth, "x-portkey-config": portkey.single_config(ok_port)}, "m",
                                   {"node": node.pid}))
            setups.append(Setup("portkey_fallback", pk_url, {**client_auth, "x-portkey-config": portkey.fallback_config(failing_port, ok_port)},
                                "m", {"node": node.pid}))
        results = measure_all(setups, providers.pid, logdir)
    finally:
        for part in reversed(parts):
            part.stop()
        for p in reversed(procs):
            p.terminate()
            p.wait()
    meta = {"seconds": DURATION_S, "seconds_1conn": ONE_CONN_S, "rounds": ROUNDS, "warmup_seconds": WARMUP_S, "connections": CONNECTIONS, "workers": WORKERS, "envoy_workers": ENVOY_WORKERS, "cores": os.cpu_count(),
            "portkey_version": portkey.VERSION if portkey_script else None, "tollgate_setup_in_ratios": report.TOLLGATE,
            "load_avg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    summary = report.summarise(results)
    report.print_report(results, summary)
    Path(__file__).with_name("results.json").write_text(json.dumps({"meta": meta, "results": results, **summary}, indent=2) + "\n")
    print(f"\n{meta}; logs in {logdir}")
    if load_before > 0.5:
        print(f"The machine was busy before the bench started (1-minute load {load_before:.2f}): other jobs share these "
              "cores, so req/s and latencies are noisy; CPU per request moves least. Compare setups within one run.")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
