"""SPEC audit: one test per concrete statement of the public contract that no other test pins
down, written the way an outside test would (the real stack, the `openai` SDK, raw HTTP, the
`tollgate` command line). Each test names the SPEC section it checks."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam

from extproc.devstack import RedisServer, envoy_binary, free_port, wait_for_port
from extproc.fakeprovider import FakeProvider, Reply
from tests.conftest import PROVIDER_SECRETS, SEED, Stack, running_stack

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
ERROR_KEYS = {"message", "type", "param", "code"}
# OpenAI's duration format for x-ratelimit-reset-*: "1s", "6m0s", "20ms", "1h2m3.5s".
OPENAI_DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s)?(\d+ms)?$")


def request(stack: Stack, path: str, body: bytes | None, headers: dict[str, str],
            method: str = "POST") -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(stack.envoy.base_url + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, hdrs, raw = r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw.decode("utf-8", "replace")


def chat(stack: Stack, secret: str, body: dict[str, Any], extra: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    return request(stack, "/v1/chat/completions", json.dumps(body).encode(),
                   {"authorization": f"Bearer {secret}", "content-type": "application/json", **(extra or {})})


def tollgate(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extproc.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, input=stdin)


# §3: the attribution headers on errors the gateway produces once the key is known.

def assert_attributed(headers: dict[str, str], customer: str, key_id: str) -> None:
    assert headers.get("x-request-id")
    assert headers.get("x-tollgate-customer") == customer
    assert headers.get("x-tollgate-workspace") == f"{customer}-ws"
    assert headers.get("x-tollgate-key-id") == key_id
    assert headers.get("x-tollgate-attempts") == "0"


def test_spec3_unknown_model_404_carries_attribution_headers_and_openai_shape(stack: Stack, customer: str) -> None:
    key_id, secret = stack.create_key(customer)
    status, headers, body = chat(stack, secret, {"model": "no-such-model", "messages": MESSAGES})
    assert (status, body["error"]["code"]) == (404, "model_not_found")
    assert set(body["error"]) == ERROR_KEYS
    assert_attributed(headers, customer, key_id)


def test_spec3_bad_request_400_carries_attribution_headers(stack: Stack, customer: str) -> None:
    key_id, secret = stack.create_key(customer)
    status, headers, body = chat(stack, secret, {"model": "support_draft"})
    assert (status, body["error"]["code"]) == (400, "invalid_request_error")
    assert_attributed(headers, customer, key_id)


def test_spec3_budget_429_carries_attribution_headers(stack: Stack, customer: str) -> None:
    key_id, secret = stack.create_key(customer, plan="tiny_budget")
    status, headers, body = chat(stack, secret, {"model": "support_draft", "messages": MESSAGES})
    assert (status, body["error"]["code"]) == (429, "insufficient_quota")
    assert_attributed(headers, customer, key_id)
    assert (headers["x-tollgate-route"], headers["x-tollgate-primary-model"]) == ("support_draft", "low_cost_chat")
    assert (headers["x-tollgate-fallback-reason"], headers["x-tollgate-cost-usd"]) == ("budget", "0.000000")


def test_spec4_insufficient_quota_has_no_retry_after(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, plan="tiny_budget")
    status, headers, body = chat(stack, secret, {"model": "support_draft", "messages": MESSAGES})
    assert (status, body["error"]["code"]) == (429, "insufficient_quota")
    assert "retry-after" not in headers
    assert sum(f.calls() for f in stack.fakes.values()) == 0


def test_spec3_request_id_is_generated_when_absent(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, headers, _ = chat(stack, secret, {"model": "support_draft", "messages": MESSAGES})
    assert status == 200
    assert len(headers["x-request-id"]) >= 8


def test_spec3_served_answer_has_every_attribution_header(stack: Stack, customer: str) -> None:
    key_id, secret = stack.create_key(customer, plan="starter")
    status, h, _ = chat(stack, secret, {"model": "support_draft", "messages": MESSAGES})
    assert status == 200
    assert (h["x-tollgate-route"], h["x-tollgate-customer"], h["x-tollgate-workspace"], h["x-tollgate-key-id"]) == \
        ("support_draft", customer, f"{customer}-ws", key_id)
    assert (h["x-tollgate-primary-model"], h["x-tollgate-final-model"], h["x-tollgate-provider"]) == \
        ("low_cost_chat", "low_cost_chat", "p1")
    assert (h["x-tollgate-attempts"], h["x-tollgate-fallback-reason"]) == ("1", "none")
    assert re.fullmatch(r"\d+\.\d+", h["x-tollgate-cost-usd"]), h["x-tollgate-cost-usd"]


def test_spec3_ratelimit_headers_use_openai_names_and_formats(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, plan="starter")  # 1000 rpm, 10,000,000 tpm
    status, h, _ = chat(stack, secret, {"model": "support_draft", "messages": MESSAGES})
    assert status == 200
    assert h["x-ratelimit-limit-requests"] == "1000"
    assert h["x-ratelimit-limit-tokens"] == "10000000"
    assert 0 <= int(h["x-ratelimit-remaining-requests"]) < 1000
    assert 0 <= int(h["x-ratelimit-remaining-tokens"]) < 10_000_000
    for kind in ("requests", "tokens"):
        assert OPENAI_DURATION.fullmatch(h[f"x-ratelimit-reset-{kind}"]), h[f"x-ratelimit-reset-{kind}"]


def test_spec3_fallback_reason_header_names_the_5xx(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(status=500))
    status, h, _ = chat(stack, secret, {"model": "switch_all", "messages": MESSAGES})
    assert status == 200
    assert (h["x-tollgate-final-model"], h["x-tollgate-provider"]) == ("low_cost_chat_backup", "p2")
    assert (h["x-tollgate-attempts"], h["x-tollgate-fallback-reason"]) == ("2", "provider_5xx")


# §4: error codes and statuses.

@pytest.mark.parametrize("body", [
    {"model": "support_draft", "messages": "hello"},
    {"model": 7, "messages": MESSAGES},
    {"model": "support_draft", "messages": MESSAGES, "max_tokens": "ten"},
    {"model": "support_draft", "messages": MESSAGES, "stream": "yes"},
    {"model": "support_draft", "messages": [{"content": "no role"}]},
    {"model": "support_draft", "messages": [{"role": 1, "content": "x"}]},
    {"model": "support_draft", "messages": MESSAGES, "temperature": "hot"},
    {"model": "support_draft", "messages": MESSAGES, "top_p": True},
], ids=["messages-string", "model-number", "max_tokens-string", "stream-string", "message-without-role", "role-number",
        "temperature-string", "top_p-bool"])
def test_spec4_wrong_types_are_400_invalid_request_error(stack: Stack, customer: str, body: dict[str, Any]) -> None:
    _, secret = stack.create_key(customer)
    status, _, err = chat(stack, secret, body)
    assert (status, err["error"]["code"]) == (400, "invalid_request_error")
    assert set(err["error"]) == ERROR_KEYS
    assert sum(f.calls() for f in stack.fakes.values()) == 0


def test_spec4_non_object_json_body_is_400(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, _, err = request(stack, "/v1/chat/completions", b"[1, 2]", {"authorization": f"Bearer {secret}",
                                                                        "content-type": "application/json"})
    assert (status, err["error"]["code"]) == (400, "invalid_request_error")


def test_spec4_rate_limit_error_shape_through_the_sdk(stack: Stack, customer: str) -> None:
    key_id, secret = stack.create_key(customer, plan="starter")
    tollgate("limits", "set", "--customer", customer, "--rpm", "1", "--redis-url", stack.redis.url)
    client = stack.client(secret)
    client.chat.completions.create(model="support_draft", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="support_draft", messages=MESSAGES)
    body = info.value.response.json()
    assert set(body["error"]) == ERROR_KEYS and body["error"]["code"] == "rate_limit_exceeded"
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert info.value.response.headers["x-tollgate-key-id"] == key_id


# §1.3: route resolution.

def test_spec1_model_name_without_default_route_is_404(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)  # no default route
    status, _, err = chat(stack, secret, {"model": "gpt-4o-mini", "messages": MESSAGES})
    assert (status, err["error"]["code"]) == (404, "model_not_found")
    assert sum(f.calls() for f in stack.fakes.values()) == 0


def test_spec1_policy_model_name_with_default_route_is_served_by_the_route(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, default_route="support_draft")
    status, h, _ = chat(stack, secret, {"model": "low_cost_chat", "messages": MESSAGES})
    assert (status, h["x-tollgate-route"]) == (200, "support_draft")
    assert stack.fakes["p1"].requests[-1].body["model"] == "gpt-4o-mini"


def test_spec1_route_header_wins_over_the_body_model(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, h, _ = chat(stack, secret, {"model": "support_draft", "messages": MESSAGES}, {"x-tollgate-route": "legal_summary"})
    assert (status, h["x-tollgate-route"], h["x-tollgate-provider"]) == (200, "legal_summary", "p3")


def test_spec1_unknown_route_header_is_404(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, _, err = chat(stack, secret, {"model": "support_draft", "messages": MESSAGES}, {"x-tollgate-route": "nope"})
    assert (status, err["error"]["code"]) == (404, "model_not_found")


# §2: endpoints.

def test_spec2_models_is_an_openai_list(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, plan="starter")
    status, _, body = request(stack, "/v1/models", None, {"authorization": f"Bearer {secret}"}, method="GET")
    assert status == 200
    assert body["object"] == "list"
    assert sorted(m["id"] for m in body["data"]) == ["embeddings", "support_draft"]
    assert all(m["object"] == "model" for m in body["data"])


def test_spec2_models_without_a_key_is_401(stack: Stack) -> None:
    status, _, body = request(stack, "/v1/models", None, {}, method="GET")
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")


def test_spec2_get_on_a_post_endpoint_is_404_in_openai_shape(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, _, body = request(stack, "/v1/chat/completions", None, {"authorization": f"Bearer {secret}"}, method="GET")
    assert status in (404, 405)
    assert set(body["error"]) == ERROR_KEYS


# §1 Streaming: the usage chunk the gateway asked for is hidden unless the client asked.

def test_spec1_stream_without_include_usage_has_no_empty_choices_chunk(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    chunks = list(stack.client(secret).chat.completions.create(model="support_draft", messages=MESSAGES, stream=True))
    assert chunks and all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert stack.fakes["p1"].requests[-1].body["stream_options"]["include_usage"] is True


def test_spec1_stream_with_include_usage_ends_with_the_usage_chunk(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    chunks = list(stack.client(secret).chat.completions.create(model="support_draft", messages=MESSAGES, stream=True,
                                                               stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


# §1.4: the cap goes into the forwarded body.

def test_spec1_cap_is_written_when_the_client_sent_none(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.client(secret).chat.completions.create(model="support_draft", messages=MESSAGES)
    sent = stack.fakes["p1"].requests[-1].body
    assert isinstance(sent.get("max_completion_tokens", sent.get("max_tokens")), int)


def test_spec1_responses_cap_is_max_output_tokens(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.client(secret).responses.create(model="support_draft", input="hi")
    sent = stack.fakes["p1"].requests[-1].body
    assert isinstance(sent.get("max_output_tokens"), int) and "max_tokens" not in sent


def test_spec1_completions_cap_is_max_tokens(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.client(secret).completions.create(model="support_draft", prompt="hi")
    sent = stack.fakes["p1"].requests[-1].body
    assert isinstance(sent.get("max_tokens"), int) and "max_completion_tokens" not in sent


def test_spec1_client_cap_below_the_bound_is_kept(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.client(secret).chat.completions.create(model="support_draft", messages=MESSAGES, max_tokens=7)
    assert stack.fakes["p1"].requests[-1].body["max_tokens"] == 7


# §8: the command line.

def test_spec8_keys_create_prints_the_secret_on_the_first_line(stack: Stack, customer: str) -> None:
    out = tollgate("keys", "create", "--customer", customer, "--workspace", "w1", "--plan", "starter",
                   "--redis-url", stack.redis.url)
    assert out.returncode == 0, out.stderr
    secret = out.stdout.splitlines()[0].strip()
    status, h, _ = chat(stack, secret, {"model": "support_draft", "messages": MESSAGES})
    assert (status, h["x-tollgate-customer"], h["x-tollgate-workspace"]) == (200, customer, "w1")


def test_spec8_keys_create_json_has_the_spec_fields(stack: Stack, customer: str) -> None:
    out = tollgate("keys", "create", "--customer", customer, "--workspace", "w1", "--plan", "starter", "--json",
                   "--redis-url", stack.redis.url)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert {"key_id", "secret", "customer", "workspace", "plan"} <= set(doc)
    assert (doc["customer"], doc["workspace"], doc["plan"]) == (customer, "w1", "starter")
    assert doc["key_id"] != doc["secret"]


def test_spec8_redis_url_comes_from_the_environment(stack: Stack, customer: str) -> None:
    out = tollgate("keys", "create", "--customer", customer, "--workspace", "w1", "--plan", "starter", "--json",
                   env={"TOLLGATE_REDIS_URL": stack.redis.url})
    assert out.returncode == 0, out.stderr
    key_id = json.loads(out.stdout)["key_id"]
    listed = tollgate("keys", "list", "--json", env={"TOLLGATE_REDIS_URL": stack.redis.url})
    assert key_id in listed.stdout


def test_spec8_revoking_an_unknown_key_exits_1(stack: Stack) -> None:
    out = tollgate("keys", "revoke", "no-such-key-id", "--redis-url", stack.redis.url)
    assert out.returncode == 1


def test_spec8_explain_of_an_unknown_request_exits_1(stack: Stack) -> None:
    out = tollgate("explain", "no-such-request-id", "--redis-url", stack.redis.url)
    assert out.returncode == 1


@pytest.mark.parametrize("args", [["keys", "create", "--customer", "c"], ["no-such-verb"], ["balance", "add", "--customer", "c",
                                                                                              "--usd", "lots"]])
def test_spec8_usage_errors_exit_2(stack: Stack, args: list[str]) -> None:
    assert tollgate(*args, "--redis-url", stack.redis.url).returncode == 2


def test_spec8_balance_add_then_show_in_json(stack: Stack, customer: str) -> None:
    assert tollgate("balance", "add", "--customer", customer, "--usd", "2.5", "--redis-url", stack.redis.url).returncode == 0
    out = tollgate("balance", "show", "--customer", customer, "--json", "--redis-url", stack.redis.url)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert 2_500_000 in [v for v in doc.values() if isinstance(v, int)], doc


def test_spec8_usage_tail_json_is_one_object_per_line(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    client = stack.client(secret)
    for _ in range(2):
        client.chat.completions.create(model="support_draft", messages=MESSAGES)
    stack.settled(customer)
    out = tollgate("usage", "tail", "-n", "2", "--json", "--redis-url", stack.redis.url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    assert all("request_id" in json.loads(line) for line in lines)


def test_spec8_policy_check_accepts_the_seed_template_alone(tmp_path: Path) -> None:
    seed = tmp_path / "support_draft.yaml"
    seed.write_text(SEED.read_text())
    out = tollgate("policy", "check", str(seed))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "low_cost_chat" in out.stdout + out.stderr  # the unresolved primary model, as a warning


def test_spec8_policy_check_with_a_catalog_refuses_an_unresolved_reference(tmp_path: Path) -> None:
    cat = {"tiers": ["low"], "providers": {"p": {"address": "127.0.0.1:1", "tls": False}},
           "models": {"m": {"provider": "p", "upstream_model": "x", "tier": "low",
                            "price": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 1}}},
           "plans": {"basic": {"routes": "*"}}}
    (tmp_path / "00-catalog.yaml").write_text(yaml.safe_dump(cat))
    (tmp_path / "10-route.yaml").write_text(SEED.read_text())  # its primary_model low_cost_chat is not in the catalog
    out = tollgate("policy", "check", str(tmp_path / "00-catalog.yaml"), str(tmp_path / "10-route.yaml"))
    assert out.returncode == 1
    assert "low_cost_chat" in out.stdout + out.stderr


def test_spec5_invalid_policy_error_names_file_line_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(SEED.read_text().replace("max_attempts: 2", "max_attempts: two"))
    out = tollgate("policy", "check", str(bad))
    assert out.returncode == 1
    text = out.stdout + out.stderr
    line = next(i for i, s in enumerate(bad.read_text().splitlines(), 1) if "max_attempts" in s)
    assert "bad.yaml" in text and str(line) in text and "max_attempts" in text


def test_spec8_envoy_config_has_one_cluster_per_provider_and_the_admin_port(policy_dir: Path) -> None:
    out = tollgate("envoy-config", "--policy", str(policy_dir), "--extproc", "127.0.0.1:50051", "--port", "18080",
                   "--admin-port", "19901")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    doc = yaml.safe_load(text)
    names = {c["name"] for c in doc["static_resources"]["clusters"]}
    for provider in ("p1", "p2", "p3", "p4", "dead"):
        assert any(provider == n or n.endswith(provider) or provider in n for n in names), (provider, names)
    assert "19901" in json.dumps(doc["admin"])
    assert "18080" in text


# §7: metrics names and labels.

def metrics(stack: Stack) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.processor.metrics_port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def test_spec7_upstream_attempts_are_counted_with_their_labels(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(status=500))
    stack.client(secret).chat.completions.create(model="switch_all", messages=MESSAGES)
    stack.settled(customer)
    text = metrics(stack)
    rows = [line for line in text.splitlines() if line.startswith("tollgate_upstream_attempts_total{")]
    assert any('route="switch_all"' in r and 'model="low_cost_chat_backup"' in r and 'provider="p2"' in r for r in rows), rows
    assert any('model="low_cost_chat"' in r and 'provider="p1"' in r for r in rows), rows
    for r in rows:
        assert set(re.findall(r'(\w+)="', r.split("}")[0])) == {"route", "model", "provider", "outcome"}


def test_spec7_fallback_metric_has_the_spec_labels(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(status=500))
    stack.client(secret).chat.completions.create(model="switch_all", messages=MESSAGES)
    stack.settled(customer)
    rows = [line for line in metrics(stack).splitlines() if line.startswith("tollgate_fallbacks_total{")]
    assert any('from_model="low_cost_chat"' in r and 'to_model="low_cost_chat_backup"' in r and 'reason=' in r
               and 'route="switch_all"' in r for r in rows), rows




def test_spec8_envoy_config_from_repeated_policy_files_without_extproc_passes_envoy_validate(policy_dir: Path,
                                                                                              tmp_path: Path) -> None:
    files = sorted(str(f) for f in policy_dir.glob("*.yaml"))
    out = tollgate("envoy-config", *[a for f in files for a in ("--policy", f)], "--port", "18081", "--admin-port", "19902")
    assert out.returncode == 0, out.stderr
    config = tmp_path / "envoy.yaml"
    config.write_text(out.stdout)
    checked = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_spec8_serve_metrics_port_serves_metrics(policy_dir: Path) -> None:
    redis_server = RedisServer().start()
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "extproc.cli", "serve", "--policy", str(policy_dir), "--redis-url", redis_server.url,
                             "--listen", f"127.0.0.1:{port}", "--metrics-port", str(metrics_port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **PROVIDER_SECRETS})
    try:
        wait_for_port(metrics_port, proc=proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            assert r.status == 200 and "tollgate_" in r.read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        redis_server.stop()


@pytest.mark.parametrize("reason", ["rpm", "tpm", "balance"])
def test_spec7_quota_rejections_are_counted_by_reason(stack: Stack, customer: str, reason: str) -> None:
    plan = "prepaid" if reason == "balance" else "starter"
    _, secret = stack.create_key(customer, plan=plan)
    if reason != "balance":
        tollgate("limits", "set", "--customer", customer, f"--{reason}", "1" if reason == "rpm" else "100",
                 "--redis-url", stack.redis.url)
    client = stack.client(secret)
    if reason != "balance":  # the first request empties the bucket (one larger than the bucket is clipped to it)
        client.chat.completions.create(model="support_draft", messages=MESSAGES, max_tokens=200)
    line = f'tollgate_quota_rejections_total{{reason="{reason}",route="support_draft"}}'
    before = next((float(x.split()[-1]) for x in metrics(stack).splitlines() if x.startswith(line)), 0.0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="support_draft", messages=MESSAGES, max_tokens=200)
    after = next(float(x.split()[-1]) for x in metrics(stack).splitlines() if x.startswith(line))
    assert after == before + 1


def test_spec7_redis_errors_are_counted_by_operation(fakes: dict[str, FakeProvider], policy_dir: Path, customer: str) -> None:
    redis_server = RedisServer().start()
    with running_stack(fakes, policy_dir, workers=1, redis_server=redis_server, name="audit-redis-errors") as s:
        _, secret = s.create_key(customer)
        redis_server.stop()
        status, _, err = chat(s, secret, {"model": "support_draft", "messages": MESSAGES})
        assert (status, err["error"]["code"]) == (503, "quota_unavailable")
        rows = [x for x in metrics(s).splitlines() if x.startswith("tollgate_redis_errors_total{")]
        assert rows and all(re.match(r'tollgate_redis_errors_total\{operation="[a-z_]+"\} [1-9]', x) for x in rows), rows


# §1.4 rate limits: tokens per minute hold for a request whose estimate exceeds the whole limit.

def test_spec1_tokens_per_minute_hold_when_the_output_cap_exceeds_the_limit(stack: Stack, customer: str) -> None:
    """reserve.lua takes at most the bucket's capacity from a request larger than the bucket;
    the settlement must give back only what was taken beyond the real use, else a client that
    asks for a huge max_tokens refills the bucket with every request and is never limited."""
    out = tollgate("keys", "create", "--customer", customer, "--workspace", "w", "--plan", "premium", "--tpm", "1000", "--json",
                   "--redis-url", stack.redis.url)
    client = stack.client(json.loads(out.stdout)["secret"])
    stack.fakes["p1"].default = Reply(completion_tokens=900)  # each answer uses ~910 of the 1000 tokens a minute
    client.chat.completions.create(model="support_draft", messages=MESSAGES, max_tokens=5000)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="support_draft", messages=MESSAGES, max_tokens=5000)
    assert info.value.response.json()["error"]["code"] == "rate_limit_exceeded"
    assert stack.fakes["p1"].calls() == 1


# §8 usage report: `[--to URL]` is optional; without a ledger the month's lines come from the stream.

def test_spec8_usage_report_without_a_ledger_reads_the_stream_and_matches_the_exported_ledger(
        fakes: dict[str, FakeProvider], policy_dir: Path, customer: str, tmp_path: Path) -> None:
    with running_stack(fakes, policy_dir, workers=1, name="audit-report") as s:
        _, secret = s.create_key(customer)
        costs = []
        for _ in range(2):
            raw = s.client(secret).chat.completions.with_raw_response.create(model="support_draft", messages=MESSAGES)
            costs.append(int(raw.headers["x-tollgate-cost-usd"].replace(".", "")))
        s.settled(customer)
        month = time.strftime("%Y-%m", time.gmtime())
        env = {"TOLLGATE_LEDGER_URL": "", "TOLLGATE_REDIS_URL": s.redis.url}
        out = tollgate("usage", "report", "--customer", customer, "--month", month, "--format", "json", env=env)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["lines"] == [{"route": "support_draft", "model": "low_cost_chat", "kind": "normal", "requests": 2,
                                    "prompt_tokens": report["lines"][0]["prompt_tokens"],
                                    "completion_tokens": 16, "cost_micro_usd": sum(costs)}]
        assert report["total_micro_usd"] == sum(costs)
        ledger = f"sqlite:///{tmp_path}/ledger.db"
        assert tollgate("usage", "export", "--once", "--to", ledger, env=env).returncode == 0
        # Once exported (and trimmed), the stream alone would give a partial invoice: refused.
        assert tollgate("usage", "report", "--customer", customer, "--month", month, env=env).returncode == 1
        exported = tollgate("usage", "report", "--customer", customer, "--month", month, "--json", "--to", ledger, env=env)
        assert json.loads(exported.stdout) == report


# §1.1: keys are stored hashed (SHA-256); the plaintext is nowhere in Redis.

def test_spec1_key_is_stored_as_its_sha256_and_never_in_plaintext(stack: Stack, customer: str) -> None:
    out = tollgate("keys", "create", "--customer", customer, "--workspace", "w", "--plan", "starter", "--json",
                   "--redis-url", stack.redis.url)
    doc = json.loads(out.stdout)
    secret, key_id = doc["secret"], doc["key_id"]
    digest = hashlib.sha256(secret.encode()).hexdigest()
    r = stack.redis_sync()
    names = [k.decode() for k in r.scan_iter("*", count=1000)]
    assert any(digest in n for n in names) or digest.encode() in (r.get(f"tollgate:keyid:{key_id}") or b"")
    for name in names:
        assert secret not in name
        kind = r.type(name).decode()
        values = {"string": lambda n: [r.get(n)], "hash": lambda n: list(r.hgetall(n).values())}.get(kind, lambda n: [])(name)
        assert all(secret.encode() not in (v or b"") for v in values), name


# §1.4: a client cap above what the money allows is lowered in the forwarded body.

def test_spec1_client_cap_above_the_money_left_is_lowered_in_the_forwarded_body(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, plan="prepaid")
    assert tollgate("balance", "add", "--customer", customer, "--usd", "0.001", "--redis-url", stack.redis.url).returncode == 0
    stack.client(secret).chat.completions.create(model="support_draft", messages=MESSAGES, max_tokens=100_000)
    sent = stack.fakes["p1"].requests[-1].body
    # $0.001 at the dearest output price the route may end on ($0.60/Mtok) buys at most 1666 output tokens.
    assert 16 <= sent["max_tokens"] <= 1666
    assert sent.get("max_completion_tokens", 0) <= 1666


def test_spec1_a_route_outside_the_plan_is_403_even_with_a_default_route(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, plan="starter", default_route="support_draft")
    status, _, err = chat(stack, secret, {"model": "legal_summary", "messages": MESSAGES})
    assert (status, err["error"]["code"]) == (403, "permission_denied")
    assert sum(f.calls() for f in stack.fakes.values()) == 0


def test_spec1_an_upstream_model_name_of_a_route_outside_the_plan_is_served_by_the_default_route(stack: Stack, customer: str) -> None:
    """`o3` is strong_reasoning's upstream_model: a name the policy knows, so the default route serves it."""
    _, secret = stack.create_key(customer, plan="starter", default_route="support_draft")
    status, h, _ = chat(stack, secret, {"model": "o3", "messages": MESSAGES})
    assert (status, h["x-tollgate-route"], h["x-tollgate-final-model"]) == (200, "support_draft", "low_cost_chat")
    assert stack.fakes["p3"].calls() == 0


# §5 providers: tls defaults to true on port 443; the key may come from api_key_file.

def test_spec5_tls_defaults_to_true_for_port_443_only(tmp_path: Path) -> None:
    from extproc.policy import load_policy

    cat = {"tiers": ["low"], "providers": {"a": {"address": "api.example:443"}, "b": {"address": "127.0.0.1:18081"}},
           "models": {"m": {"provider": "a", "upstream_model": "x", "tier": "low", "price": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 1}}},
           "plans": {"p": {"routes": "*"}}, "routes": [{"route": "r", "primary_model": "m"}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cat))
    providers = load_policy([tmp_path / "p.yaml"]).providers
    assert (providers["a"].tls, providers["b"].tls) == (True, False)


def test_spec5_provider_key_from_api_key_file_reaches_the_provider(fakes: dict[str, FakeProvider], customer: str,
                                                                   tmp_path: Path) -> None:
    from tests.conftest import catalog

    key_file = tmp_path / "p1-key"
    key_file.write_text("sk-from-a-file\n")
    cat = catalog(fakes)
    del cat["providers"]["p1"]["api_key_env"]
    cat["providers"]["p1"]["api_key_file"] = str(key_file)
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "00-catalog.yaml").write_text(yaml.safe_dump(cat, sort_keys=False))
    (policy / "10-support_draft.yaml").write_text(SEED.read_text())
    with running_stack(fakes, policy, workers=1, name="audit-key-file") as s:
        _, secret = s.create_key(customer)
        s.client(secret).chat.completions.create(model="support_draft", messages=MESSAGES)
        assert fakes["p1"].requests[-1].headers["authorization"] == "Bearer sk-from-a-file"


def test_spec8_envoy_config_accepts_a_host_name_for_the_processor(policy_dir: Path, tmp_path: Path) -> None:
    """`--extproc HOST:PORT`: a name (localhost, a Kubernetes service, a compose service)
    works as well as an IP address."""
    out = tollgate("envoy-config", "--policy", str(policy_dir), "--extproc", "localhost:50051")
    assert out.returncode == 0, out.stderr
    config = tmp_path / "envoy.yaml"
    config.write_text(out.stdout)
    checked = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]


def test_spec8_processor_and_providers_named_localhost_serve_and_fall_back(fakes: dict[str, FakeProvider], customer: str,
                                                                           tmp_path: Path) -> None:
    """Host names resolve to IPv4 first: `localhost` has ::1 too, where nothing listens."""
    from extproc.devstack import Envoy, Processor
    from extproc.envoy_config import GrpcEndpoint
    from tests.conftest import catalog

    cat = catalog(fakes)
    for name in ("p1", "p2"):
        cat["providers"][name]["address"] = fakes[name].address.replace("127.0.0.1", "localhost")
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "00-catalog.yaml").write_text(yaml.safe_dump(cat, sort_keys=False))
    (policy / "10-support_draft.yaml").write_text(SEED.read_text())
    redis_server = RedisServer().start()
    proc = envoy = None
    try:
        proc = Processor([str(policy)], redis_server.url, env=PROVIDER_SECRETS).start()
        envoy = Envoy([str(policy)], [GrpcEndpoint("localhost", proc.port)]).start()
        s = Stack(redis_server, fakes, proc, envoy, policy)
        _, secret = s.create_key(customer)
        status, h, _ = chat(s, secret, {"model": "support_draft", "messages": MESSAGES})
        assert (status, h["x-tollgate-provider"]) == (200, "p1")
        fakes["p1"].script(Reply(status=500))
        status, h, _ = chat(s, secret, {"model": "switch_all", "messages": MESSAGES})
        assert (status, h["x-tollgate-provider"], h["x-tollgate-attempts"]) == (200, "p2", "2")
    finally:
        for child in (envoy, proc):
            if child is not None:
                child.stop()
        redis_server.stop()


# §5: `retry_same` (with a count): the count may be written as `{retry_same: N}` too.

@pytest.mark.parametrize("rule", [{"action": "retry_same", "count": 2}, {"retry_same": 2}], ids=["action-count", "shorthand"])
def test_spec5_retry_same_with_a_count_loads(tmp_path: Path, rule: dict[str, Any]) -> None:
    from extproc.policy import load_policy

    cat = {"tiers": ["low"], "providers": {"a": {"address": "127.0.0.1:18081"}},
           "models": {"m": {"provider": "a", "upstream_model": "x", "tier": "low", "price": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 1}}},
           "plans": {"p": {"routes": "*"}},
           "routes": [{"route": "r", "primary_model": "m", "fallback": {"on_provider_5xx": rule, "max_attempts": 3}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cat))
    got = load_policy([tmp_path / "p.yaml"]).routes["r"].fallback.rule("on_provider_5xx")
    assert (got.action, got.count) == ("retry_same", 2)
