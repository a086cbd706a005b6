"""Beyond one Redis (issue 5): the same quotas, fallback and records on a real three-master
Redis Cluster on loopback. Every script's keys share one hash slot, so nothing changes but
the URL (`redis+cluster://`)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.devstack import RedisClusterServer
from extproc.fakeprovider import FakeProvider, Reply
from tests.conftest import Stack, running_stack
from tests.test_quota import assert_nothing_left_over, money, race, records_of


@pytest.fixture(scope="module")
def cluster_stack(fakes: dict[str, FakeProvider], policy_dir: Path) -> Iterator[Stack]:
    cluster = RedisClusterServer(3).start()
    with running_stack(fakes, policy_dir, workers=2, redis_server=cluster, name="cluster") as s:
        yield s


def test_the_cluster_spreads_customers_over_three_masters(cluster_stack: Stack) -> None:
    r = cluster_stack.redis_sync()
    slots = {r.keyslot(f"tollgate:{{c:cust-{i}}}:balance") for i in range(50)}
    owners = {r.get_node_from_key(f"tollgate:{{c:cust-{i}}}:balance").name for i in range(50)}
    assert len(slots) > 40 and len(owners) == 3


def test_race_holds_on_a_redis_cluster(cluster_stack: Stack, customer: str) -> None:
    k, n = 5, 50
    statuses, cost = race(cluster_stack, customer, "legal_summary", (2_000_000, 8_000_000), k, n)
    assert statuses.count(200) == k and statuses.count(429) == n - k
    assert cluster_stack.fakes["p3"].calls() == k
    assert money(cluster_stack, customer)["balance"] == 0
    assert_nothing_left_over(cluster_stack, customer, k, cost)


def test_fallback_and_explain_on_a_redis_cluster(cluster_stack: Stack, customer: str) -> None:
    _, secret = cluster_stack.create_key(customer)
    cluster_stack.fakes["p1"].script(Reply(status=429))
    raw = cluster_stack.client(secret).chat.completions.with_raw_response.create(
        model="support_draft", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-tollgate-final-model"] == "low_cost_chat_backup"
    assert raw.headers["x-tollgate-fallback-reason"] == "rate_limit"
    (rec,) = records_of(cluster_stack, customer)
    assert [a["reason"] for a in json.loads(rec["attempt_list"])] == ["rate_limit", "ok"]
    out = subprocess.run([sys.executable, "-m", "extproc.cli", "explain", raw.headers["x-request-id"],
                          "--redis-url", cluster_stack.redis.url], capture_output=True, text=True, check=True).stdout
    assert "instead of low_cost_chat" in out


def test_cli_balance_and_keys_work_against_a_cluster(cluster_stack: Stack, customer: str) -> None:
    def tollgate(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "extproc.cli", *args, "--redis-url", cluster_stack.redis.url],
                              capture_output=True, text=True, check=True).stdout

    created = json.loads(tollgate("keys", "create", "--customer", customer, "--workspace", "w", "--plan", "prepaid", "--json"))
    assert created["secret"].startswith("tg-")
    tollgate("balance", "add", "--customer", customer, "--usd", "2.5")
    assert json.loads(tollgate("balance", "show", "--customer", customer, "--json"))["balance_micro"] == 2_500_000
    assert any(k["key_id"] == created["key_id"] for k in json.loads(tollgate("keys", "list", "--json"))["keys"])
