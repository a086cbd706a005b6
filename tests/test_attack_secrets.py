"""Secrets on the two-message path (issue 12): the provider's credential now travels in Envoy's
dynamic metadata (`tollgate.apply`) to the apply filter. Neither it nor a customer's key may
appear in a response, a log line (Envoy's access and error log, the processor's log), a usage
record, a metric or Envoy's config dump; a provider gets only its own key, on every attempt."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path

from extproc.fakeprovider import Reply
from tests.conftest import PROVIDER_SECRETS, Stack, post_raw

MESSAGES = [{"role": "user", "content": "hi"}]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        text: str = r.read().decode("utf-8", "replace")
    return text


def test_fallback_attempt_carries_its_own_providers_key_not_the_first_ones(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].default = Reply(status=500)  # switch_all: then the same tier (p2)
    status, _ = post_raw(f"{stack.base_url}/chat/completions", json.dumps({"model": "switch_all", "messages": MESSAGES}).encode(), secret)
    assert status == 200
    assert {r.headers.get("authorization") for r in stack.fakes["p1"].requests} == {f"Bearer {PROVIDER_SECRETS['TG_TEST_P1_KEY']}"}
    assert {r.headers.get("authorization") for r in stack.fakes["p2"].requests} == {f"Bearer {PROVIDER_SECRETS['TG_TEST_P2_KEY']}"}


def test_no_secret_in_responses_logs_records_metrics_or_envoy_config(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    url = f"{stack.base_url}/chat/completions"
    answers = []
    stack.fakes["p3"].script(Reply(), Reply(status=500), Reply(usage=False), Reply(status=429, retry_after=1))
    for extra in ({}, {}, {}, {}, {"stream": True}):
        body = json.dumps({"model": "legal_summary", "messages": MESSAGES, **extra}).encode()
        answers.append(post_raw(url, body, secret, {"x-request-id": uuid.uuid4().hex}))
    answers.append(post_raw(url, b"{not json", secret))
    answers.append(post_raw(url, json.dumps({"model": "legal_summary", "messages": MESSAGES}).encode(), secret + "x"))
    answers.append(post_raw(url, json.dumps({"model": "legal_summary", "messages": MESSAGES}).encode(), secret,
                            {"authorization": f"Bearer {secret}", "api-key": secret, "x-tollgate-cluster": "p1"}))
    time.sleep(1.0)  # the records are published and the logs flushed
    records = json.dumps([{k.decode(): v.decode() for k, v in f.items()} for _, f in stack.redis_sync().xrange("tollgate:usage")])
    places = {
        "responses": json.dumps(answers),
        "records": records,
        "envoy log": Path(stack.envoy.log_path or "").read_text(errors="replace"),
        "processor log": Path(stack.processor.log_path or "").read_text(errors="replace"),
        "metrics": get(f"http://127.0.0.1:{stack.processor.metrics_port}/metrics"),
        "envoy config": get(f"http://127.0.0.1:{stack.envoy.admin_port}/config_dump?include_eds"),
        "envoy stats": get(f"http://127.0.0.1:{stack.envoy.admin_port}/stats"),
    }
    for where, text in places.items():
        for name, value in {**PROVIDER_SECRETS, "customer key": secret}.items():
            assert value not in text, f"{name} found in {where}"
