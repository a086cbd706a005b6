"""The request path of SPEC §1-4, through real Envoy, the real processor, real Redis and the
official openai SDK; fake providers record what reached them."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import PROVIDER_SECRETS, Stack

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Draft a reply to a customer asking about refunds."}]


def post(stack: Stack, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(stack.envoy.base_url + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_chat_completion_is_served_by_the_primary_model_with_its_provider_name(stack: Stack, customer: str) -> None:
    key_id, secret = stack.create_key(customer)
    raw = stack.client(secret).chat.completions.with_raw_response.create(model="support_draft", messages=MESSAGES)
    completion = raw.parse()
    assert completion.model == "gpt-4o-mini"
    assert (completion.choices[0].message.content or "").startswith("[p1]")
    received = stack.fakes["p1"].requests[-1]
    assert received.body["model"] == "gpt-4o-mini"
    assert received.body["messages"] == MESSAGES
    assert stack.fakes["p2"].calls() == stack.fakes["p3"].calls() == 0
    h = raw.headers
    assert h["x-tollgate-route"] == "support_draft"
    assert h["x-tollgate-primary-model"] == h["x-tollgate-final-model"] == "low_cost_chat"
    assert h["x-tollgate-provider"] == "p1"
    assert h["x-tollgate-attempts"] == "1"
    assert h["x-tollgate-fallback-reason"] == "none"
    assert h["x-tollgate-customer"] == customer
    assert h["x-tollgate-workspace"] == f"{customer}-ws"
    assert h["x-tollgate-key-id"] == key_id
    assert h["x-request-id"]


def test_cost_header_is_the_usage_priced_at_the_model_in_micro_dollars(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    raw = stack.client(secret).chat.completions.with_raw_response.create(model="support_draft", messages=MESSAGES)
    usage = raw.parse().usage
    assert usage is not None
    # low_cost_chat: $0.15 / $0.60 per million tokens, rounded up to a whole micro-dollar
    micro = -(-(usage.prompt_tokens * 150_000 + usage.completion_tokens * 600_000) // 1_000_000)
    assert raw.headers["x-tollgate-cost-usd"] == f"0.{micro:06d}"


def test_provider_gets_its_own_credential_never_the_customer_key(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.client(secret).chat.completions.create(model="support_draft", messages=MESSAGES)
    headers = stack.fakes["p1"].requests[-1].headers
    assert headers["authorization"] == f"Bearer {PROVIDER_SECRETS['TG_TEST_P1_KEY']}"
    assert secret not in json.dumps(headers)


def test_api_key_header_authenticates_and_is_not_forwarded(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    body = json.dumps({"model": "support_draft", "messages": MESSAGES}).encode()
    status, _, _ = post(stack, "/v1/chat/completions", body, {"api-key": secret, "content-type": "application/json"})
    assert status == 200
    assert "api-key" not in stack.fakes["p1"].requests[-1].headers


def test_client_sent_cluster_header_does_not_steer(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    client = stack.client(secret, default_headers={"x-tollgate-cluster": "p3", "x-tollgate-provider": "p3"})
    raw = client.chat.completions.with_raw_response.create(model="support_draft", messages=MESSAGES)
    assert raw.headers["x-tollgate-provider"] == "p1"
    assert stack.fakes["p3"].calls() == 0
    assert not any(k.startswith("x-tollgate-") for k in stack.fakes["p1"].requests[-1].headers)


def test_client_cannot_forge_attribution_headers(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    client = stack.client(secret, default_headers={"x-tollgate-customer": "someone-else", "x-tollgate-cost-usd": "0"})
    raw = client.chat.completions.with_raw_response.create(model="support_draft", messages=MESSAGES)
    assert raw.headers["x-tollgate-customer"] == customer
    assert raw.headers["x-tollgate-cost-usd"] != "0"


def test_route_header_selects_the_route(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    client = stack.client(secret, default_headers={"x-tollgate-route": "legal_summary"})
    raw = client.chat.completions.with_raw_response.create(model="anything", messages=MESSAGES)
    assert raw.headers["x-tollgate-route"] == "legal_summary"
    assert stack.fakes["p3"].requests[-1].body["model"] == "o3"


def test_key_default_route_serves_a_known_model_name_that_is_not_a_route(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, default_route="legal_summary")
    raw = stack.client(secret).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert raw.headers["x-tollgate-route"] == "legal_summary"


def test_unknown_model_with_a_default_route_is_404_and_reaches_no_provider(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, default_route="legal_summary")
    with pytest.raises(openai.NotFoundError) as info:
        stack.client(secret).chat.completions.create(model="gpt-does-not-exist", messages=MESSAGES)
    assert error_of(info.value)["code"] == "model_not_found"
    assert sum(f.calls() for f in stack.fakes.values()) == 0


def test_streaming_chunks_arrive_incrementally_with_attribution(stack: Stack, customer: str) -> None:
    from extproc.fakeprovider import Reply

    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(completion_tokens=5, chunk_delay_s=0.3))
    with stack.client(secret).chat.completions.with_streaming_response.create(
        model="support_draft", messages=MESSAGES, stream=True
    ) as response:
        assert response.headers["x-tollgate-final-model"] == "low_cost_chat"
        arrivals, text = [], ""
        for chunk in response.parse():
            arrivals.append(time.monotonic())
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
    assert text.split() == ["w0", "w1", "w2", "w3", "w4"]
    # The provider paused 0.3 s between chunks; had Envoy buffered the stream, all chunks
    # would have arrived together.
    assert arrivals[-1] - arrivals[0] >= 0.8
    assert stack.fakes["p1"].requests[-1].body["stream_options"] == {"include_usage": True}


def test_embeddings_completions_and_responses_endpoints_are_routed(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    client = stack.client(secret)
    emb = client.embeddings.create(model="embeddings", input=["a", "b"])
    assert len(emb.data) == 2
    assert stack.fakes["p1"].requests[-1].body["model"] == "text-embedding-3-small"
    comp = client.completions.create(model="support_draft", prompt="Say hi")
    assert comp.choices[0].text
    resp = client.responses.create(model="support_draft", input="Say hi")
    assert resp.usage is not None and resp.usage.output_tokens > 0
    assert [r.path for r in stack.fakes["p1"].requests[-2:]] == ["/v1/completions", "/v1/responses"]


def test_models_lists_the_routes_the_key_may_use(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, plan="starter")
    ids = [m.id for m in stack.client(secret).models.list()]
    assert ids == ["embeddings", "support_draft"]


@pytest.mark.parametrize("secret", [None, "tg-not-a-real-key"])
def test_missing_or_unknown_key_is_401_and_nothing_reaches_a_provider(stack: Stack, secret: str | None) -> None:
    headers = {"content-type": "application/json"}
    if secret:
        headers["authorization"] = f"Bearer {secret}"
    body = json.dumps({"model": "support_draft", "messages": MESSAGES}).encode()
    status, _, err = post(stack, "/v1/chat/completions", body, headers)
    assert status == 401
    assert err["error"]["code"] == "invalid_api_key"
    assert sum(f.calls() for f in stack.fakes.values()) == 0


def test_revoked_key_is_refused_within_a_few_seconds(stack: Stack, customer: str) -> None:
    import subprocess
    import sys

    key_id, secret = stack.create_key(customer)
    client = stack.client(secret)
    client.chat.completions.create(model="support_draft", messages=MESSAGES)
    out = subprocess.run([sys.executable, "-m", "extproc.cli", "keys", "revoke", key_id, "--redis-url", stack.redis.url],
                         capture_output=True, text=True, check=True)
    assert key_id in out.stdout
    deadline = time.monotonic() + 10
    while True:
        try:
            client.chat.completions.create(model="support_draft", messages=MESSAGES)
        except openai.AuthenticationError as exc:
            assert error_of(exc)["code"] == "invalid_api_key"
            break
        assert time.monotonic() < deadline, "revoked key still served after 10 s"
        time.sleep(0.5)


def test_malformed_json_is_400_invalid_request_error(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, headers, err = post(stack, "/v1/chat/completions", b'{"model": "support_draft", "messages": [',
                                {"authorization": f"Bearer {secret}", "content-type": "application/json"})
    assert status == 400
    assert err["error"]["code"] == "invalid_request_error"
    assert headers["x-tollgate-customer"] == customer
    assert sum(f.calls() for f in stack.fakes.values()) == 0


def test_missing_model_is_400_naming_the_parameter(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, _, err = post(stack, "/v1/chat/completions", json.dumps({"messages": MESSAGES}).encode(),
                          {"authorization": f"Bearer {secret}"})
    assert status == 400
    assert (err["error"]["code"], err["error"]["param"]) == ("invalid_request_error", "model")


def test_absent_model_is_served_by_the_keys_default_route(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, default_route="legal_summary")
    status, headers, _ = post(stack, "/v1/chat/completions", json.dumps({"messages": MESSAGES}).encode(),
                              {"authorization": f"Bearer {secret}"})
    assert (status, headers["x-tollgate-route"]) == (200, "legal_summary")
    assert stack.fakes["p3"].requests[-1].body["model"] == "o3"


def test_missing_messages_is_400(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, _, err = post(stack, "/v1/chat/completions", json.dumps({"model": "support_draft"}).encode(),
                          {"authorization": f"Bearer {secret}"})
    assert (status, err["error"]["param"]) == (400, "messages")


def test_unknown_route_is_404_model_not_found(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    with pytest.raises(openai.NotFoundError) as info:
        stack.client(secret).chat.completions.create(model="no_such_route", messages=MESSAGES)
    assert error_of(info.value)["code"] == "model_not_found"
    assert sum(f.calls() for f in stack.fakes.values()) == 0


def test_route_not_in_plan_is_403_permission_denied(stack: Stack, customer: str) -> None:
    key_id, secret = stack.create_key(customer, plan="starter")
    with pytest.raises(openai.PermissionDeniedError) as info:
        stack.client(secret).chat.completions.create(model="legal_summary", messages=MESSAGES)
    assert error_of(info.value)["code"] == "permission_denied"
    assert info.value.response.headers["x-tollgate-key-id"] == key_id
    assert info.value.response.headers["x-tollgate-attempts"] == "0"
    assert stack.fakes["p3"].calls() == 0


def test_unknown_endpoint_is_404_in_openai_shape(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, _, err = post(stack, "/v1/images/generations", b"{}", {"authorization": f"Bearer {secret}"})
    assert status == 404
    assert set(err["error"]) == {"message", "type", "param", "code"}


def test_healthz_answers_without_a_key(stack: Stack) -> None:
    with urllib.request.urlopen(stack.envoy.base_url + "/healthz", timeout=5) as r:
        assert r.status == 200


def test_client_request_id_is_kept_and_echoed(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    client = stack.client(secret, default_headers={"x-request-id": "req-client-chosen-1"})
    raw = client.chat.completions.with_raw_response.create(model="support_draft", messages=MESSAGES)
    assert raw.headers["x-request-id"] == "req-client-chosen-1"


def test_provider_5xx_on_a_fail_closed_route_is_passed_on_with_attribution(stack: Stack, customer: str) -> None:
    from extproc.fakeprovider import Reply

    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(Reply(status=500))
    with pytest.raises(openai.InternalServerError) as info:
        stack.client(secret).chat.completions.create(model="legal_summary", messages=MESSAGES)
    assert info.value.response.headers["x-tollgate-final-model"] == "strong_reasoning"
    assert stack.fakes["p3"].calls() == 1


def test_unreachable_provider_is_an_upstream_unavailable_error(stack: Stack, customer: str) -> None:
    from extproc.fakeprovider import Reply

    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(Reply(close=True))
    with pytest.raises(openai.APIStatusError) as info:
        stack.client(secret).chat.completions.create(model="legal_summary", messages=MESSAGES)
    assert info.value.status_code in (502, 503, 504)
    assert error_of(info.value)["code"] == "upstream_unavailable"


def test_metrics_count_requests_and_tokens(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.client(secret).chat.completions.create(model="support_draft", messages=MESSAGES)
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.processor.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'tollgate_requests_total{code="200",final_model="low_cost_chat",primary_model="low_cost_chat",route="support_draft"}' in text
    assert 'tollgate_tokens_total{model="low_cost_chat",route="support_draft",type="completion"}' in text
    for phase in ("request_body", "response_headers"):  # a normal request: two messages
        assert f'tollgate_decision_seconds_count{{phase="{phase}"}}' in text
    assert secret not in text


def test_body_over_the_limit_is_413_request_too_large(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    big = json.dumps({"model": "support_draft", "messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]}).encode()
    status, headers, err = post(stack, "/v1/chat/completions", big, {"authorization": f"Bearer {secret}"})
    assert status == 413
    assert err["error"]["code"] == "request_too_large"
    # Envoy refuses it before the processor reads any of it: no key was looked up, so the
    # reply carries the request id but no attribution.
    assert headers["x-request-id"] and "x-tollgate-customer" not in headers
    assert sum(f.calls() for f in stack.fakes.values()) == 0
