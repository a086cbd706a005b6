"""The Portkey AI Gateway as the bench's peer: installed from npm into the bench's work folder,
started as one Node process, configured per request with `x-portkey-config`.

Portkey does routing and fallback only (no keys, quotas, spend or records), so it is the
cost floor of a gateway written in a fast runtime; Tollgate is measured against it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from extproc.devstack import wait_for_port

PACKAGE = "@portkey-ai/gateway"
VERSION = os.environ.get("BENCH_PORTKEY_VERSION", "1.15.2")
API_KEY = "sk-bench"  # the fake provider accepts any bearer; Portkey's config requires one


def install(workdir: Path) -> Path | None:
    """The gateway's start script, installed once into `workdir` (reused while the pinned
    version matches). None, with the reason printed, when node/npm is missing or npm fails:
    the bench then runs without Portkey rather than failing."""
    if not shutil.which("node") or not shutil.which("npm"):
        print("portkey: skipped (node and npm are needed: apt-get install nodejs npm)")
        return None
    package_dir = workdir / "node_modules" / PACKAGE
    script = package_dir / "build" / "start-server.js"
    try:
        installed = json.loads((package_dir / "package.json").read_text()).get("version")
    except (OSError, ValueError):
        installed = None
    if installed == VERSION and script.exists():
        return script
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"portkey: npm install {PACKAGE}@{VERSION} into {workdir}")
    # --ignore-scripts: its only script is patch-package, and the package ships no patches.
    try:
        done = subprocess.run(["npm", "install", "--prefix", str(workdir), "--no-audit", "--no-fund", "--ignore-scripts",
                               f"{PACKAGE}@{VERSION}"], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        print("portkey: skipped (npm install took over 300 s)")
        return None
    if done.returncode != 0 or not script.exists():
        print(f"portkey: skipped (npm install failed: {done.stderr.strip()[-400:]})")
        return None
    return script


def start(script: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """One Node process, as `npx @portkey-ai/gateway` runs it (`--headless`: no web UI)."""
    proc = subprocess.Popen(["node", str(script), f"--port={port}", "--headless"], stdout=open(log, "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, env={**os.environ, "NODE_ENV": "production"})
    wait_for_port(port, proc=proc, timeout_s=30)
    return proc


def _target(port: int) -> dict[str, str]:
    return {"provider": "openai", "api_key": API_KEY, "custom_host": f"http://127.0.0.1:{port}/v1"}


def single_config(port: int) -> str:
    """One OpenAI-compatible target: the `x-portkey-config` header's value."""
    return json.dumps(_target(port), separators=(",", ":"))


def fallback_config(failing_port: int, ok_port: int) -> str:
    """Fallback mode: the first target answers 500, Portkey moves on to the healthy one
    (`on_status_codes` names what counts as a failure; without it any non-2xx does)."""
    config = {"strategy": {"mode": "fallback", "on_status_codes": [500]}, "targets": [_target(failing_port), _target(ok_port)]}
    return json.dumps(config, separators=(",", ":"))
