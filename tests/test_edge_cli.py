"""The command line refuses what would not work (SPEC §8 exit statuses: 1 refused, 2 usage
error) and prints one JSON document per command. Real Redis; the shared stack's processor
publishes its policy's plan and route names."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.devstack import RedisServer
from extproc.fakeprovider import FakeProvider
from extproc.quota import Account
from tests.conftest import Stack, running_stack


def tollgate(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extproc.cli", *args, "--redis-url", redis_url],
                          capture_output=True, text=True, timeout=60)


def keys_of(stack: Stack, customer: str) -> list[dict[str, str]]:
    rows = json.loads(tollgate(stack.redis.url, "keys", "list", "--json").stdout)["keys"]
    return [r for r in rows if r["customer"] == customer]


@pytest.fixture
def bare_redis() -> Iterator[RedisServer]:
    """A Redis no processor has published to."""
    r = RedisServer().start()
    yield r
    r.stop()


def test_keys_create_with_an_unknown_plan_exits_1_naming_it_and_creates_nothing(stack: Stack, customer: str) -> None:
    out = tollgate(stack.redis.url, "keys", "create", "--customer", customer, "--workspace", "w", "--plan", "gold")
    assert out.returncode == 1
    assert "plan 'gold'" in out.stderr and "premium" in out.stderr  # names the plans there are
    assert out.stdout == ""
    assert keys_of(stack, customer) == []


def test_keys_create_with_an_unknown_default_route_exits_1(stack: Stack, customer: str) -> None:
    out = tollgate(stack.redis.url, "keys", "create", "--customer", customer, "--workspace", "w", "--plan", "premium",
                   "--default-route", "no_such_route")
    assert out.returncode == 1
    assert "default route 'no_such_route'" in out.stderr
    assert keys_of(stack, customer) == []


def test_keys_create_with_a_known_plan_and_route_succeeds(stack: Stack, customer: str) -> None:
    out = tollgate(stack.redis.url, "keys", "create", "--customer", customer, "--workspace", "w", "--plan", "premium",
                   "--default-route", "legal_summary", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["plan"] == "premium"


def test_keys_create_checks_against_policy_files_when_given(bare_redis: RedisServer, policy_dir: Path) -> None:
    bad = tollgate(bare_redis.url, "keys", "create", "--customer", "c1", "--workspace", "w", "--plan", "gold",
                   "--policy", str(policy_dir))
    good = tollgate(bare_redis.url, "keys", "create", "--customer", "c1", "--workspace", "w", "--plan", "starter",
                    "--policy", str(policy_dir))
    assert (bad.returncode, good.returncode) == (1, 0)


def test_keys_create_without_a_published_policy_or_policy_flag_exits_1_saying_what_to_do(bare_redis: RedisServer) -> None:
    out = tollgate(bare_redis.url, "keys", "create", "--customer", "c1", "--workspace", "w", "--plan", "starter")
    assert out.returncode == 1
    assert "--policy" in out.stderr and "tollgate serve" in out.stderr


def test_keys_list_json_is_one_json_document(stack: Stack, customer: str) -> None:
    stack.create_key(customer)
    stack.create_key(customer)
    out = tollgate(stack.redis.url, "keys", "list", "--json")
    doc = json.loads(out.stdout)  # the whole output parses as one document
    assert len([k for k in doc["keys"] if k["customer"] == customer]) == 2


@pytest.mark.parametrize("ids", [["--customer", "bad id/x"], ["--customer", "ok", "--workspace", "bad id/x"]])
def test_limits_set_refuses_an_invalid_id_as_a_usage_error(stack: Stack, ids: list[str]) -> None:
    out = tollgate(stack.redis.url, "limits", "set", *ids, "--rpm", "5")
    assert out.returncode == 2
    assert "bad id/x" in out.stderr


def test_negative_rpm_is_a_usage_error_and_keeps_the_override(stack: Stack, customer: str) -> None:
    assert tollgate(stack.redis.url, "limits", "set", "--customer", customer, "--rpm", "5").returncode == 0
    out = tollgate(stack.redis.url, "limits", "set", "--customer", customer, "--rpm", "-1")
    assert out.returncode == 2
    assert stack.redis_sync().hget(Account(customer, "", "").k("limits"), "rpm") == b"5"


def test_clear_rpm_removes_the_override(stack: Stack, customer: str) -> None:
    assert tollgate(stack.redis.url, "limits", "set", "--customer", customer, "--rpm", "5").returncode == 0
    assert tollgate(stack.redis.url, "limits", "set", "--customer", customer, "--clear-rpm").returncode == 0
    assert stack.redis_sync().hget(Account(customer, "", "").k("limits"), "rpm") is None


def test_negative_monthly_limit_is_a_usage_error(stack: Stack, customer: str) -> None:
    out = tollgate(stack.redis.url, "limits", "set", "--customer", customer, "--monthly-usd", "-5")
    assert out.returncode == 2
    assert "--clear-monthly" in out.stderr


def test_a_reloaded_policy_republishes_its_plan_names(fakes: dict[str, FakeProvider], policy_dir: Path, tmp_path: Path) -> None:
    live = tmp_path / "policy"
    shutil.copytree(policy_dir, live)
    with running_stack(fakes, live, workers=1, name="edge-publish") as s:
        def create_gold() -> int:
            return tollgate(s.redis.url, "keys", "create", "--customer", "c1", "--workspace", "w", "--plan", "gold").returncode

        assert create_gold() == 1
        (live / "20-gold.yaml").write_text("plans:\n  gold:\n    routes: '*'\n")
        deadline = time.monotonic() + 10
        while create_gold() != 0:
            assert time.monotonic() < deadline, "the reloaded policy's plans were not published"
            time.sleep(0.3)
