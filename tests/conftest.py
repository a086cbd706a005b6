"""Fixtures that start the real parts: Redis, fake providers, `tollgate serve`, Envoy.

One stack serves the whole session (starting Envoy and the processor takes seconds); each
test makes its own customer keys, and the fake providers are reset before every test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import yaml

from extproc.devstack import Envoy, Processor, RedisServer
from extproc.fakeprovider import FakeProvider
from extproc.keys import KeyStore
from extproc.keyspace import Account
from extproc.store import redis_client

PROVIDER_SECRETS = {"TG_TEST_P1_KEY": "sk-provider-one", "TG_TEST_P2_KEY": "sk-provider-two", "TG_TEST_P3_KEY": "sk-provider-three",
                    "TG_TEST_P4_KEY": "sk-provider-four"}
FAKE_NAMES = ("p1", "p2", "p3", "p4")
SEED = Path(__file__).resolve().parent.parent / "extproc" / "examples" / "policy" / "support_draft.yaml"


# The shared providers' circuits never open: tests that make them fail must not affect others.
# Their expected generation rate is high, so a non-stream attempt's budget is about timeout_s.
NEVER_OPENS = {"circuit": {"failures": 100000}, "tokens_per_s": 10000}


def _dead_port() -> int:
    from extproc.devstack import free_port

    return free_port()


DEAD_PORT = _dead_port()


def catalog(fakes: dict[str, FakeProvider]) -> dict[str, Any]:
    """The test catalog: three providers, models in every tier, plans with different rights."""
    return {
        "tiers": ["low", "standard", "premium"],
        "providers": {
            "p1": {"address": fakes["p1"].address, "tls": False, "api_key_env": "TG_TEST_P1_KEY", "timeout_s": 2, **NEVER_OPENS},
            "p2": {"address": fakes["p2"].address, "tls": False, "api_key_env": "TG_TEST_P2_KEY", "timeout_s": 2, **NEVER_OPENS},
            "p3": {"address": fakes["p3"].address, "tls": False, "api_key_env": "TG_TEST_P3_KEY", "timeout_s": 2, **NEVER_OPENS},
            # Only the circuit tests use p4; it opens after 2 failures and recovers after 2 s.
            "p4": {"address": fakes["p4"].address, "tls": False, "api_key_env": "TG_TEST_P4_KEY", "timeout_s": 2,
                   "tokens_per_s": 10000, "circuit": {"failures": 2, "window_s": 30, "cooldown_s": 2}},
            # Nothing listens here: every connection is refused.
            "dead": {"address": f"127.0.0.1:{DEAD_PORT}", "tls": False, "timeout_s": 2, **NEVER_OPENS},
        },
        "models": {
            "low_cost_chat": {"provider": "p1", "upstream_model": "gpt-4o-mini", "tier": "low",
                              "price": {"input_per_mtok_usd": 0.15, "output_per_mtok_usd": 0.60}},
            "low_cost_chat_backup": {"provider": "p2", "upstream_model": "small-chat-v2", "tier": "low",
                                     "price": {"input_per_mtok_usd": 0.20, "output_per_mtok_usd": 0.60}},
            "standard_chat": {"provider": "p2", "upstream_model": "mid-chat-v1", "tier": "standard",
                              "price": {"input_per_mtok_usd": 0.40, "output_per_mtok_usd": 1.60}},
            "strong_reasoning": {"provider": "p3", "upstream_model": "o3", "tier": "premium",
                                 "price": {"input_per_mtok_usd": 2.00, "output_per_mtok_usd": 8.00}},
            "premium_lite": {"provider": "p3", "upstream_model": "o3-lite", "tier": "premium",
                             "price": {"input_per_mtok_usd": 1.00, "output_per_mtok_usd": 4.00}},
            "flaky_chat": {"provider": "p4", "upstream_model": "flaky-1", "tier": "low",
                           "price": {"input_per_mtok_usd": 0.15, "output_per_mtok_usd": 0.60}},
            "dead_chat": {"provider": "dead", "upstream_model": "dead-1", "tier": "low",
                          "price": {"input_per_mtok_usd": 0.15, "output_per_mtok_usd": 0.60}},
            "embed_small": {"provider": "p1", "upstream_model": "text-embedding-3-small", "tier": "low",
                            "price": {"input_per_mtok_usd": 0.02, "output_per_mtok_usd": 0}},
        },
        "plans": {
            "starter": {"routes": ["support_draft", "embeddings"], "requests_per_minute": 1000, "tokens_per_minute": 10_000_000,
                        "monthly_budget_usd": 50, "fallback": {"allow": ["same_tier", "downgrade"]}},
            "premium": {"routes": "*", "requests_per_minute": 10000, "monthly_budget_usd": 5000,
                        "fallback": {"allow": ["same_tier", "downgrade", "upgrade"], "max_cost_multiplier": 3}},
            "embeddings_only": {"routes": ["embeddings"]},
            "starter_down": {"routes": "*", "fallback": {"allow": ["same_tier", "downgrade"]}},
            "premium_no_down": {"routes": "*", "fallback": {"allow": ["same_tier"]}},
            "prepaid": {"routes": "*", "requests_per_minute": 100000, "prepaid": True},
            "tiny_budget": {"routes": "*", "monthly_budget_usd": 0.00001},
        },
        "routes": [
            {"route": "legal_summary", "primary_model": "strong_reasoning",
             "fallback": {"on_provider_5xx": "fail_closed", "on_rate_limit": "fail_closed", "max_attempts": 1}},
            {"route": "embeddings", "primary_model": "embed_small", "fallback": {"max_attempts": 1}},
            {"route": "switch_all", "primary_model": "low_cost_chat", "fallback": {
                "on_provider_5xx": "switch_same_price_tier", "on_rate_limit": "switch_same_price_tier",
                "on_timeout": "switch_same_price_tier", "on_connect_failure": "switch_same_price_tier", "max_attempts": 3,
                "models": ["low_cost_chat", "low_cost_chat_backup"]}},
            {"route": "retry_twice", "primary_model": "low_cost_chat", "fallback": {
                "on_provider_5xx": {"action": "retry_same", "count": 2}, "max_attempts": 3}},
            {"route": "downgrade_route", "primary_model": "standard_chat", "fallback": {"on_provider_5xx": "downgrade", "max_attempts": 2}},
            {"route": "upgrade_route", "primary_model": "standard_chat", "fallback": {"on_provider_5xx": "upgrade", "max_attempts": 2}},
            {"route": "dead_primary", "primary_model": "dead_chat", "fallback": {
                "on_connect_failure": "switch_same_price_tier", "max_attempts": 2, "models": ["low_cost_chat"]}},
            {"route": "flaky", "primary_model": "flaky_chat", "fallback": {
                "on_provider_5xx": "switch_same_price_tier", "on_provider_unhealthy": "switch_same_price_tier", "max_attempts": 2,
                "models": ["low_cost_chat"]}},
        ],
    }


@dataclass
class Stack:
    redis: Any  # RedisServer or RedisClusterServer
    fakes: dict[str, FakeProvider]
    processor: Processor
    envoy: Envoy
    policy_dir: Path

    @property
    def base_url(self) -> str:
        return self.envoy.base_url + "/v1"

    def redis_sync(self) -> Any:
        if self.redis.url.startswith("redis+cluster://"):
            return redis.RedisCluster.from_url("redis://" + self.redis.url.removeprefix("redis+cluster://"))
        return redis.Redis.from_url(self.redis.url)

    def create_key(self, customer: str, plan: str = "premium", workspace: str | None = None, default_route: str | None = None) -> tuple[str, str]:
        async def run() -> tuple[str, str]:
            client = redis_client(self.redis.url)
            try:
                created = await KeyStore(client).create(customer, workspace or f"{customer}-ws", plan, default_route)
                return created.info.key_id, created.secret
            finally:
                await client.aclose()

        return asyncio.run(run())

    def client(self, secret: str, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=secret, max_retries=0, timeout=30, **kw)

    def settled(self, customer: str, timeout_s: float = 5.0) -> None:
        """Wait until nothing of `customer` is reserved: a plain answer is settled from Envoy's
        access log a few milliseconds after the client has it (its money, spend and record land
        then), so a test that reads them right after an answer waits for that first."""
        r, reserved = self.redis_sync(), Account(customer, "", "").k("reserved")
        deadline = time.monotonic() + timeout_s
        while int(r.get(reserved) or 0) != 0:
            assert time.monotonic() < deadline, f"{customer}: money still reserved {timeout_s:g} s after the answers"
            time.sleep(0.01)


def post_raw(url: str, body: bytes, secret: str, headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, Any]:
    """POST exact bytes (the SDK would re-serialise them): (status, parsed JSON or text)."""
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"authorization": f"Bearer {secret}", "content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def logdir() -> Path:
    d = Path(os.environ.get("TOLLGATE_TEST_LOGS") or tempfile.mkdtemp(prefix="tollgate-test-logs-"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_policy(fakes: dict[str, FakeProvider]) -> Path:
    policy_dir = Path(tempfile.mkdtemp(prefix="tollgate-test-policy-"))
    (policy_dir / "00-catalog.yaml").write_text(yaml.safe_dump(catalog(fakes), sort_keys=False))
    (policy_dir / "10-support_draft.yaml").write_text(SEED.read_text())
    return policy_dir


@contextlib.contextmanager
def running_stack(fakes: dict[str, FakeProvider], policy_dir: Path, *, workers: int = 2, redis_server: Any = None,
                  env: dict[str, str] | None = None, name: str = "stack") -> Iterator[Stack]:
    """Redis (unless given), `tollgate serve` and Envoy; all stopped on exit."""
    logs = logdir()
    r = redis_server or RedisServer().start()
    proc = envoy = stack = None
    try:
        proc = Processor([str(policy_dir)], r.url, workers=workers, env={**PROVIDER_SECRETS, **(env or {})},
                         log_path=str(logs / f"{name}-extproc.log")).start()
        envoy = Envoy([str(policy_dir)], proc.endpoints, log_path=str(logs / f"{name}-envoy.log"), access_log=True).start()
        stack = Stack(r, fakes, proc, envoy, policy_dir)
        yield stack
    finally:
        # A test may have replaced the processor (restarts): stop the one running now too.
        for part in (envoy, stack.processor if stack else None, proc, r):
            if part is not None:
                part.stop()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A throw-away redis-server per test module, for tests that need Redis but no Envoy."""
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def fakes() -> Iterator[dict[str, FakeProvider]]:
    started = {n: FakeProvider(n).start() for n in FAKE_NAMES}
    yield started
    for f in started.values():
        f.stop()


@pytest.fixture(scope="session")
def policy_dir(fakes: dict[str, FakeProvider]) -> Path:
    return write_policy(fakes)


@pytest.fixture(scope="session")
def stack(fakes: dict[str, FakeProvider], policy_dir: Path) -> Iterator[Stack]:
    """The shared stack: two processor workers, so every test also crosses processes."""
    with running_stack(fakes, policy_dir, workers=2, name="shared") as s:
        yield s


@pytest.fixture(autouse=True)
def _reset_fakes(request: pytest.FixtureRequest) -> None:
    if "fakes" in request.fixturenames or "stack" in request.fixturenames:
        for f in request.getfixturevalue("fakes").values():
            f.reset()


_counter = 0


@pytest.fixture
def customer(request: pytest.FixtureRequest) -> str:
    """A customer id unique to this test, so tests never share balances or limits."""
    global _counter
    _counter += 1
    return f"cust-{request.node.name[:40]}-{_counter}".replace("[", "_").replace("]", "_")
