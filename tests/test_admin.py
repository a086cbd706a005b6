"""The admin HTTP API (issue 13): `tollgate admin` as a process on a real Redis and a SQLite
ledger, driven with a real HTTP client (urllib): the token is required, every endpoint works,
credits are idempotent by reference, errors have OpenAI's shape, the OpenAPI document is served."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from extproc.devstack import RedisServer, free_port, wait_for_port
from extproc.keys import KeyStore
from extproc.ledger_store import open_store
from extproc.quota import Account
from extproc.store import redis_client
from tests.ledger_helpers import add_records, tollgate

TOKEN = "admin-test-token-5f1c"


@dataclass
class Admin:
    base: str
    redis_url: str
    ledger_url: str

    def call(self, method: str, path: str, body: Any = None, token: str | None = TOKEN,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {})
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw = r.read()
                status = r.status
                ctype = r.headers.get("content-type", "")
        except urllib.error.HTTPError as exc:
            raw, status, ctype = exc.read(), exc.code, exc.headers.get("content-type", "")
        return status, json.loads(raw) if "json" in ctype else raw.decode()


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Admin]:
    r = RedisServer().start()
    port = free_port()
    ledger = f"sqlite:///{tmp_path_factory.mktemp('admin')}/ledger.db"
    log = open(tmp_path_factory.mktemp("admin-log") / "admin.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "extproc.cli", "admin", "--listen", f"127.0.0.1:{port}", "--redis-url", r.url,
                             "--to", ledger], stdout=log, stderr=log, env={**os.environ, "TOLLGATE_ADMIN_TOKEN": TOKEN})
    try:
        wait_for_port(port, proc=proc)
        yield Admin(f"http://127.0.0.1:{port}", r.url, ledger)
    finally:
        proc.terminate()
        proc.wait(10)
        r.stop()


def is_openai_error(body: Any, code: str) -> bool:
    return isinstance(body, dict) and set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code


ENDPOINTS = [("POST", "/v1/keys"), ("GET", "/v1/keys"), ("DELETE", "/v1/keys/key_x"), ("POST", "/v1/customers/c1/credits"),
             ("GET", "/v1/customers/c1/balance"), ("PUT", "/v1/customers/c1/limits"), ("GET", "/v1/customers/c1/reports/2026-11")]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_every_endpoint_refuses_a_missing_token_with_401(admin: Admin, method: str, path: str) -> None:
    status, body = admin.call(method, path, {} if method in ("POST", "PUT") else None, token=None)
    assert status == 401 and is_openai_error(body, "invalid_api_key")


def test_a_wrong_token_is_401(admin: Admin) -> None:
    status, body = admin.call("GET", "/v1/keys", token="not-the-token")
    assert status == 401 and is_openai_error(body, "invalid_api_key")


def test_openapi_document_lists_every_endpoint(admin: Admin) -> None:
    status, doc = admin.call("GET", "/openapi.json", token=None)
    assert status == 200 and doc["openapi"].startswith("3.")
    for method, path in ENDPOINTS:
        template = path.replace("key_x", "{key_id}").replace("c1", "{customer}").replace("2026-11", "{month}")
        assert method.lower() in doc["paths"][template], (method, template)


def test_create_list_and_revoke_a_key(admin: Admin) -> None:
    status, created = admin.call("POST", "/v1/keys", {"customer": "acme", "workspace": "web", "plan": "premium"})
    assert status == 201 and created["secret"].startswith("tg-")

    async def lookup() -> Any:
        client = redis_client(admin.redis_url)
        try:
            return await KeyStore(client, cache_ttl_s=0).lookup(created["secret"])
        finally:
            await client.aclose()

    assert asyncio.run(lookup()).key_id == created["key_id"]  # the gateway accepts the new key
    status, listed = admin.call("GET", "/v1/keys?customer=acme")
    assert status == 200 and [k["key_id"] for k in listed["data"]] == [created["key_id"]]
    assert "secret" not in json.dumps(listed)
    status, revoked = admin.call("DELETE", f"/v1/keys/{created['key_id']}")
    assert status == 200 and revoked["status"] == "revoked"
    assert asyncio.run(lookup()) is None
    status, body = admin.call("DELETE", "/v1/keys/key_unknown")
    assert status == 404 and is_openai_error(body, "not_found")


def test_a_key_without_its_plan_is_400_in_openai_shape(admin: Admin) -> None:
    status, body = admin.call("POST", "/v1/keys", {"customer": "acme", "workspace": "web"})
    assert status == 400 and is_openai_error(body, "invalid_request_error") and body["error"]["param"] == "plan"
    status, body = admin.call("POST", "/v1/keys", b"{not json")
    assert status == 400 and is_openai_error(body, "invalid_request_error")


def test_a_credit_delivered_twice_credits_once(admin: Admin) -> None:
    first = admin.call("POST", "/v1/customers/payer/credits", {"usd": "12.34", "reference": "evt_1"})
    second = admin.call("POST", "/v1/customers/payer/credits", {"usd": "12.34", "reference": "evt_1"})
    assert first[0] == 201 and first[1]["credited"] is True and first[1]["balance_micro_usd"] == 12_340_000
    assert second[0] == 200 and second[1]["credited"] is False and second[1]["record_id"] == first[1]["record_id"]
    status, shown = admin.call("GET", "/v1/customers/payer/balance")
    assert status == 200 and shown["balance_micro"] == 12_340_000


def test_the_idempotency_key_header_is_a_reference_too(admin: Admin) -> None:
    for _ in range(2):
        admin.call("POST", "/v1/customers/hdr/credits", {"usd": 3}, headers={"Idempotency-Key": "webhook-9"})
    assert admin.call("GET", "/v1/customers/hdr/balance")[1]["balance_micro"] == 3_000_000


def test_a_credit_without_reference_or_with_a_float_fraction_is_refused(admin: Admin) -> None:
    status, body = admin.call("POST", "/v1/customers/payer2/credits", {"usd": "1.00"})
    assert status == 400 and body["error"]["param"] == "reference"
    status, body = admin.call("POST", "/v1/customers/payer2/credits", {"usd": "0.0000001", "reference": "r"})
    assert status == 400 and body["error"]["param"] == "usd"


def test_set_limits_for_a_customer_and_a_workspace(admin: Admin) -> None:
    status, _ = admin.call("PUT", "/v1/customers/lim/limits", {"monthly_usd": "20", "rpm": 30})
    assert status == 200
    status, _ = admin.call("PUT", "/v1/customers/lim/limits", {"workspace": "w1", "tpm": 5000})
    assert status == 200
    r = redis.Redis.from_url(admin.redis_url)
    assert r.hgetall(Account("lim", "", "").k("limits")) == {b"monthly_budget_micro": b"20000000", b"rpm": b"30"}
    assert r.hgetall(Account("lim", "w1", "").w("limits")) == {b"tpm": b"5000"}


def test_a_customers_report_comes_from_the_ledger(admin: Admin) -> None:
    r = redis.Redis.from_url(admin.redis_url)
    add_records(r, 3, start=100, customer="billed", cost=250)
    assert admin.call("POST", "/v1/customers/billed/credits", {"usd": "1", "reference": "r-1"})[0] == 201
    assert tollgate(admin.redis_url, "usage", "export", "--once", "--to", admin.ledger_url).returncode == 0
    month = time.strftime("%Y-%m", time.gmtime())
    status, report = admin.call("GET", f"/v1/customers/billed/reports/{month}")
    assert status == 200
    assert report == {"customer": "billed", "month": month, "total_micro_usd": 750, "lines": [
        {"route": "support_draft", "model": "low_cost_chat", "kind": "normal", "requests": 3, "prompt_tokens": 30,
         "completion_tokens": 12, "cost_micro_usd": 750}]}
    status, text = admin.call("GET", f"/v1/customers/billed/reports/{month}?format=csv")
    assert status == 200 and text.splitlines()[-1] == "total,,,,,,750"
    assert open_store(admin.ledger_url).balances()["billed"] == 1_000_000


def test_without_a_token_configured_the_admin_api_does_not_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TOLLGATE_ADMIN_TOKEN"}
    out = subprocess.run([sys.executable, "-m", "extproc.cli", "admin", "--listen", f"127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 2 and "TOLLGATE_ADMIN_TOKEN" in out.stderr
