"""Billing end to end (issue 13): a mixed run through real Envoy, the real processor, Redis and
the openai SDK, exported to a real PostgreSQL or SQLite ledger; invoices that reconcile with
Redis to the micro-dollar; credits once per reference; an exporter that stops loses nothing."""

from __future__ import annotations

import itertools
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from extproc.fakeprovider import FakeProvider, Reply
from extproc.ledger_store import open_store
from extproc.quota import USAGE_STREAM, Account
from tests.conftest import Stack, running_stack
from tests.ledger_helpers import ledger_url, postgres, tollgate, tollgate_bg, wait_for

__all__ = ["ledger_url", "postgres"]  # fixtures used by name

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Summarise this support ticket."}]
_groups = itertools.count()


@pytest.fixture(scope="module")
def bstack(fakes: dict[str, FakeProvider], policy_dir: Path) -> Iterator[Stack]:
    """A stack of its own: these tests export and trim its usage stream."""
    with running_stack(fakes, policy_dir, workers=1, name="billing") as s:
        yield s


@pytest.fixture
def group(bstack: Stack) -> Iterator[str]:
    """A consumer group per test (one per ledger), removed afterwards so it holds no entries."""
    name = f"ledger-test-{next(_groups)}"
    yield name
    r = bstack.redis_sync()
    if r.exists(USAGE_STREAM):
        for g in r.xinfo_groups(USAGE_STREAM):
            if g["name"].decode() == name:
                r.xgroup_destroy(USAGE_STREAM, name)


def month_now() -> str:
    return time.strftime("%Y-%m", time.gmtime())


def chat(stack: Stack, secret: str, route: str, **kw: Any) -> tuple[int, dict[str, str]]:
    client = stack.client(secret)
    try:
        if kw.get("stream"):
            with client.chat.completions.with_streaming_response.create(model=route, messages=MESSAGES, **kw) as raw:
                for _ in raw.iter_lines():
                    pass
                return raw.status_code, dict(raw.headers)
        raw = client.chat.completions.with_raw_response.create(model=route, messages=MESSAGES, **kw)
        return raw.status_code, dict(raw.headers)
    except openai.APIStatusError as exc:
        return exc.status_code, dict(exc.response.headers)


def micro(headers: dict[str, str]) -> int:
    return int(headers["x-tollgate-cost-usd"].replace(".", ""))


def export_once(stack: Stack, url: str, group: str) -> None:
    done = tollgate(stack.redis.url, "usage", "export", "--once", "--to", url, "--group", group)
    assert done.returncode == 0, done.stderr


def test_the_same_payment_reference_credits_once(bstack: Stack, customer: str, ledger_url: str, group: str) -> None:
    for _ in range(2):
        out = tollgate(bstack.redis.url, "balance", "add", "--customer", customer, "--usd", "2.50", "--reference", "pi_123", "--json")
        assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["balance_micro"] == 2_500_000 and shown["credited"] is False
    export_once(bstack, ledger_url, group)
    store = open_store(ledger_url)
    assert store.balances()[customer] == 2_500_000
    assert tollgate(bstack.redis.url, "ledger", "verify", "--to", ledger_url, "--customer", customer).returncode == 0


def test_mixed_run_reconciles_to_the_micro_dollar(bstack: Stack, customer: str, ledger_url: str, group: str) -> None:
    s, f = bstack, bstack.fakes
    assert tollgate(s.redis.url, "balance", "add", "--customer", customer, "--usd", "5", "--reference", "pay-1").returncode == 0
    _, web = s.create_key(customer, plan="prepaid", workspace="web")
    _, batch = s.create_key(customer, plan="prepaid", workspace="batch")
    costs: dict[str, int] = {}
    status, h = chat(s, web, "support_draft")                       # normal
    assert status == 200
    costs["normal"] = micro(h)
    status, h = chat(s, batch, "support_draft")                     # normal, other workspace
    costs["normal"] += micro(h)
    f["p1"].script(Reply(status=500))
    status, h = chat(s, web, "retry_twice")                         # retry on the same model
    assert status == 200 and h["x-tollgate-attempts"] == "2"
    costs["retry"] = micro(h)
    f["p1"].script(Reply(status=429))
    status, h = chat(s, web, "support_draft")                       # fallback to the backup model
    assert status == 200 and h["x-tollgate-final-model"] == "low_cost_chat_backup"
    costs["fallback"] = micro(h)
    status, _ = chat(s, web, "support_draft", stream=True)           # stream (cost only in the record)
    assert status == 200
    f["p3"].script(Reply(status=500))
    status, _ = chat(s, web, "legal_summary")                       # failed, fail_closed: billed 0
    assert status == 502
    _, refused_secret = s.create_key(customer + "-broke", plan="prepaid")
    status, _ = chat(s, refused_secret, "support_draft")             # refused: no balance, no record
    assert status == 429

    export_once(s, ledger_url, group)
    verify = tollgate(s.redis.url, "ledger", "verify", "--to", ledger_url, "--customer", customer)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    out = tollgate(s.redis.url, "usage", "report", "--customer", customer, "--month", month_now(), "--to", ledger_url,
                   "--format", "json")
    report = json.loads(out.stdout)
    lines = {(x["route"], x["model"], x["kind"]): x for x in report["lines"]}
    assert {k: v["requests"] for k, v in lines.items()} == {
        ("legal_summary", "strong_reasoning", "normal"): 1,
        ("retry_twice", "low_cost_chat", "retry"): 1,
        ("support_draft", "low_cost_chat", "normal"): 3,
        ("support_draft", "low_cost_chat_backup", "fallback"): 1,
    }
    assert lines[("retry_twice", "low_cost_chat", "retry")]["cost_micro_usd"] == costs["retry"]
    assert lines[("support_draft", "low_cost_chat_backup", "fallback")]["cost_micro_usd"] == costs["fallback"]
    assert lines[("legal_summary", "strong_reasoning", "normal")]["cost_micro_usd"] == 0
    assert lines[("support_draft", "low_cost_chat", "normal")]["cost_micro_usd"] > costs["normal"]  # + the stream
    assert sum(x["cost_micro_usd"] for x in report["lines"]) == report["total_micro_usd"]
    r = s.redis_sync()
    a = Account(customer, "", "")
    redis_spend = int(r.get(a.k(f"spend:{month_now().replace('-', '')}")))
    assert report["total_micro_usd"] == redis_spend
    assert int(r.get(a.k("balance"))) == 5_000_000 - redis_spend


def test_a_hand_made_discrepancy_fails_verify_naming_it(bstack: Stack, customer: str, ledger_url: str, group: str) -> None:
    s = bstack
    _, secret = s.create_key(customer, plan="prepaid", workspace="web")
    assert tollgate(s.redis.url, "balance", "add", "--customer", customer, "--usd", "1", "--reference", "p-1").returncode == 0
    assert chat(s, secret, "support_draft")[0] == 200
    export_once(s, ledger_url, group)
    assert tollgate(s.redis.url, "ledger", "verify", "--to", ledger_url, "--customer", customer).returncode == 0
    r = s.redis_sync()
    a = Account(customer, "web", "")
    r.incrby(a.k("balance"), 1)  # a micro-dollar appears from nowhere
    r.incrby(a.w(f"spend:{month_now().replace('-', '')}"), 7)
    bad = tollgate(s.redis.url, "ledger", "verify", "--to", ledger_url, "--customer", customer)
    assert bad.returncode == 1
    assert f"balance of customer {customer}:" in bad.stdout
    assert f"workspace month spend of customer {customer} workspace web month {month_now()}" in bad.stdout
    assert f"DIFFERENCE month spend of customer {customer}" not in bad.stdout  # the customer's own counter agrees


def test_report_formats_table_and_csv_add_up(bstack: Stack, customer: str, ledger_url: str, group: str) -> None:
    s = bstack
    _, secret = s.create_key(customer)
    status, h = chat(s, secret, "support_draft")
    assert status == 200
    export_once(s, ledger_url, group)
    args = ["usage", "report", "--customer", customer, "--month", month_now(), "--to", ledger_url]
    csv_out = tollgate(s.redis.url, *args, "--format", "csv").stdout.splitlines()
    assert csv_out[0] == "route,model,kind,requests,prompt_tokens,completion_tokens,cost_micro_usd"
    assert csv_out[1].startswith("support_draft,low_cost_chat,normal,1,")
    assert csv_out[-1] == f"total,,,,,,{micro(h)}"
    table = tollgate(s.redis.url, *args).stdout
    assert h["x-tollgate-cost-usd"] in table and "total" in table
    assert tollgate(s.redis.url, "usage", "report", "--customer", customer, "--month", "2026-13", "--to", ledger_url).returncode == 2


def test_stopped_exporter_loses_nothing_and_catches_up(bstack: Stack, customer: str, ledger_url: str, group: str,
                                                       tmp_path: Path) -> None:
    s = bstack
    _, secret = s.create_key(customer)
    args = ["usage", "export", "--to", ledger_url, "--group", group, "--consumer", "catch-up"]
    proc = tollgate_bg(s.redis.url, *args, log=tmp_path / "export.log")
    store = open_store(ledger_url)

    def exported() -> int:
        return sum(line.requests for line in store.report_lines(customer, month_now()))

    for _ in range(10):
        assert chat(s, secret, "support_draft")[0] == 200
    wait_for(lambda: exported() == 10, what="the running exporter to export 10 records")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    for _ in range(25):
        assert chat(s, secret, "support_draft")[0] == 200
    s.settled(customer)
    r = s.redis_sync()
    assert r.xlen(USAGE_STREAM) >= 25  # kept in Redis while nobody exports
    assert exported() == 10
    proc = tollgate_bg(s.redis.url, *args, log=tmp_path / "export.log")
    try:
        wait_for(lambda: exported() == 35, what="the restarted exporter to catch up")
        wait_for(lambda: r.xlen(USAGE_STREAM) == 0, what="the stream to be trimmed")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert tollgate(s.redis.url, "ledger", "verify", "--to", ledger_url, "--customer", customer).returncode == 0


def test_demo_prints_its_ledger_and_a_report_command_that_works_as_printed(tmp_path: Path) -> None:
    import os
    import shlex
    import subprocess
    import sys

    from extproc.devstack import free_port

    port = free_port()
    demo = subprocess.Popen([sys.executable, "-m", "extproc.cli", "demo", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line.rstrip("\n"))
            if "Ctrl-C stops everything" in line:
                break
        text = "\n".join(lines)
        assert "Ledger (usage exported from Redis as it happens, SQLite): sqlite:////" in text, text
        secret = next(x.split()[-1] for x in lines if x.strip().startswith("demo key"))
        (report_cmd,) = [x.strip() for x in lines if " usage report " in x]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=secret, max_retries=0)
        client.chat.completions.create(model="support_draft", messages=MESSAGES)
        argv = shlex.split(report_cmd)  # run exactly as printed

        def requests_reported() -> int:
            out = subprocess.run([*argv, "--format", "json"], capture_output=True, text=True, timeout=60,
                                 env=dict(os.environ))
            return sum(x["requests"] for x in json.loads(out.stdout)["lines"]) if out.returncode == 0 else -1

        wait_for(lambda: requests_reported() == 1, what="the demo's exporter to put the request in its ledger")
        printed = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert printed.returncode == 0 and "support_draft" in printed.stdout and "demo-customer" in printed.stdout
    finally:
        demo.send_signal(signal.SIGINT)
        demo.wait(30)


def test_explain_finds_an_exported_and_trimmed_record_in_the_ledger(bstack: Stack, customer: str, ledger_url: str,
                                                                    group: str) -> None:
    s, f = bstack, bstack.fakes
    _, secret = s.create_key(customer)
    f["p1"].script(Reply(status=429))
    status, h = chat(s, secret, "support_draft")
    assert status == 200
    export_once(s, ledger_url, group)
    request_id = h["x-request-id"]
    assert s.redis_sync().xlen(USAGE_STREAM) == 0  # trimmed: Redis no longer has it
    assert tollgate(s.redis.url, "explain", request_id).returncode == 1
    out = tollgate(s.redis.url, "explain", request_id, "--to", ledger_url)
    assert out.returncode == 0, out.stderr
    assert "low_cost_chat_backup on p2 instead of low_cost_chat" in out.stdout
    assert "1. low_cost_chat on p1 -> 429 (failed: rate_limit)" in out.stdout
