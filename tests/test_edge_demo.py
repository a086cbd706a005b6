"""`tollgate demo` and `tollgate serve --metrics-listen` as a new user meets them."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import urllib.request

import pytest

from extproc.demo import tollgate_command
from extproc.devstack import free_port
from tests.conftest import Stack


def test_demo_with_its_port_taken_names_the_port_and_the_option_without_a_traceback() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "extproc.cli", "demo", "--port", str(port)],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert f"port {port}" in out.stderr and "demo --port N" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_the_printed_tollgate_command_runs_as_printed() -> None:
    out = subprocess.run([*shlex.split(tollgate_command()), "usage", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "tail" in out.stdout


def _outside_address() -> str | None:
    """This machine's address on a non-loopback interface, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            ip = str(s.getsockname()[0])
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_metrics_listen_on_loopback_is_not_reachable_on_other_interfaces(stack: Stack) -> None:
    port = stack.processor.metrics_port  # the test stack serves with --metrics-listen 127.0.0.1:PORT
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
    ip = _outside_address()
    if ip is None:
        pytest.skip("no non-loopback interface on this machine")
    with pytest.raises(OSError), socket.create_connection((ip, port), timeout=2):
        pass


def test_metrics_listen_must_be_host_and_port() -> None:
    out = subprocess.run([sys.executable, "-m", "extproc.cli", "serve", "--policy", "x", "--metrics-listen", f"nohost{free_port()}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--metrics-listen" in out.stderr
