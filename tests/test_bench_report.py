"""`make bench`'s pure parts: target verdicts against Portkey, CPU sampling from /proc, and
running without node (Portkey skipped, never a failed bench)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import cpu, portkey, report
from extproc.devstack import Envoy, free_port
from extproc.envoy_config import GrpcEndpoint
from extproc.fakeprovider import FakeProvider
from extproc.keys import KeyStore
from extproc.store import close, redis_client
from tests.conftest import post_raw


def _run(rps: float, p50_1conn: float, cpu_ms: float) -> dict[str, Any]:
    return {"rps": rps, "p50_1conn_ms": p50_1conn, "cpu_ms_per_req": cpu_ms}


def _results(tollgate_rps: float, fallback_rps: float) -> dict[str, dict[str, Any]]:
    return {
        "envoy_alone": _run(10000.0, 0.2, 0.05),
        "tollgate_chain": _run(tollgate_rps, 1.0, 0.5),
        "portkey": _run(1000.0, 0.8, 0.9),
        "tollgate_fallback": _run(fallback_rps, 1.5, 0.8),
        "portkey_fallback": _run(500.0, 1.2, 1.6),
    }


def test_targets_met_when_tollgate_beats_portkey_by_the_margins() -> None:
    summary = report.summarise(_results(tollgate_rps=1200.0, fallback_rps=500.0))
    # 1200 / 1000 = 1.2 (>= 1.2); 1.0 - 0.8 = 0.2 ms (<= 0.3); 0.5 ms CPU (<= 0.6); 500 / 500 = 1.0 (>= 1.0)
    assert {k: t["verdict"] for k, t in summary["targets"].items()} == {
        "rps_32conn_vs_portkey": "met", "p50_1conn_over_portkey_ms": "met",
        "cpu_ms_per_request": "met", "fallback_rps_vs_portkey_fallback": "met"}
    assert summary["ratios"]["tollgate_rps_over_portkey"] == 1.2
    assert summary["ratios"]["tollgate_p50_1conn_minus_portkey_ms"] == 0.2


def test_targets_missed_just_under_the_margins() -> None:
    summary = report.summarise(_results(tollgate_rps=1199.0, fallback_rps=499.0))
    assert summary["targets"]["rps_32conn_vs_portkey"]["verdict"] == "missed"  # 1.199
    assert summary["targets"]["fallback_rps_vs_portkey_fallback"]["verdict"] == "missed"  # 0.998


def test_targets_against_portkey_not_measured_without_portkey() -> None:
    results = _results(tollgate_rps=1200.0, fallback_rps=500.0)
    del results["portkey"], results["portkey_fallback"]
    verdicts = {k: t["verdict"] for k, t in report.summarise(results)["targets"].items()}
    assert verdicts == {"rps_32conn_vs_portkey": "not measured", "p50_1conn_over_portkey_ms": "not measured",
                        "cpu_ms_per_request": "met", "fallback_rps_vs_portkey_fallback": "not measured"}


def test_a_setup_that_failed_its_check_gives_no_ratio() -> None:
    results = _results(tollgate_rps=1200.0, fallback_rps=500.0)
    results["portkey"] = {"error": "status 400: Invalid config passed"}
    summary = report.summarise(results)
    assert summary["ratios"]["tollgate_rps_over_portkey"] is None
    assert summary["targets"]["rps_32conn_vs_portkey"]["verdict"] == "not measured"


def test_cpu_counts_a_child_that_exited_between_samples() -> None:
    spin = "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.6: pass"
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys, time; sys.stdin.readline(); "
                               f"subprocess.run([sys.executable, '-c', '{spin}']); print('done', flush=True); time.sleep(30)"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        before = cpu.cpu_seconds(parent.pid)
        assert parent.stdin and parent.stdout
        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "done"
        after = cpu.cpu_seconds(parent.pid)  # the child is gone: its 0.6 s is in the parent's cutime
    finally:
        parent.kill()
        parent.wait()
    assert after - before >= 0.55


def test_cpu_of_a_running_tree_includes_its_live_children() -> None:
    # The child (stdin and stdout inherited) spins 0.5 s of its own CPU on "go", says "done" and
    # stays alive; the parent only sleeps. Counted in CPU, not wall time, so a busy machine is fine.
    spin = "import sys, time\\nsys.stdin.readline()\\nt = time.process_time()\\nwhile time.process_time() - t < 0.5: pass\\nprint(1, flush=True)\\ntime.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', '{spin}']); time.sleep(30)"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        before = cpu.cpu_seconds(parent.pid)
        assert parent.stdin and parent.stdout
        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "1"
        after = cpu.cpu_seconds(parent.pid)
        assert len(cpu.tree(parent.pid)) == 2
    finally:
        for pid in cpu.tree(parent.pid)[1:]:
            subprocess.run(["kill", str(pid)], check=False)
        parent.kill()
        parent.wait()
    assert after - before >= 0.45


def test_portkey_is_skipped_without_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no node, no npm
    assert portkey.install(tmp_path / "work") is None
    assert "portkey: skipped (node and npm are needed" in capsys.readouterr().out


def test_portkey_fallback_config_names_the_failing_target_first() -> None:
    assert portkey.fallback_config(1, 2) == (
        '{"strategy":{"mode":"fallback","on_status_codes":[500]},"targets":['
        '{"provider":"openai","api_key":"sk-bench","custom_host":"http://127.0.0.1:1/v1"},'
        '{"provider":"openai","api_key":"sk-bench","custom_host":"http://127.0.0.1:2/v1"}]}')


def test_tollgates_own_work_is_the_chain_minus_the_no_op_floor() -> None:
    results = _results(tollgate_rps=1200.0, fallback_rps=500.0)
    results["tollgate_noop"] = _run(2500.0, 0.9, 0.35)
    ratios = report.summarise(results)["ratios"]
    # chain 0.5 ms CPU - floor 0.35 = 0.15; p50 1.0 - 0.9 = 0.1 ms; floor p50 0.9 - Portkey 0.8 = 0.1 ms
    assert ratios["floor_cpu_ms_per_req"] == 0.35
    assert ratios["tollgate_work_cpu_ms_per_req"] == 0.15
    assert ratios["tollgate_work_p50_1conn_ms"] == 0.1
    assert ratios["floor_p50_1conn_minus_portkey_ms"] == 0.1


def test_the_no_op_processor_serves_the_seed_route_through_a_real_envoy(
        fakes: dict[str, FakeProvider], policy_dir: Path, redis_url: str) -> None:
    async def make_key() -> str:
        client = redis_client(redis_url)
        try:
            return (await KeyStore(client).create("c-noop", "c-noop-ws", "premium", "support_draft")).secret
        finally:
            await close(client)

    secret = asyncio.run(make_key())
    port = free_port()
    noop = subprocess.Popen([sys.executable, "-m", "bench.noop_processor", str(port), redis_url, str(policy_dir), secret, "support_draft"],
                            stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent)
    envoy = None
    try:
        assert noop.stdout is not None and noop.stdout.readline().strip() == b"ready"
        envoy = Envoy([str(policy_dir)], [GrpcEndpoint(host="127.0.0.1", port=port)]).start()
        body = b'{"model": "support_draft", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}'
        statuses = [post_raw(envoy.base_url + "/v1/chat/completions", body, secret)[0] for _ in range(3)]
    finally:
        if envoy is not None:
            envoy.stop()
        noop.terminate()
        noop.wait()
    # Three answers from the provider through Tollgate's Envoy config, the processor's one reply reused.
    assert statuses == [200, 200, 200]
    assert sum(len(f.requests) for f in fakes.values()) == 3
