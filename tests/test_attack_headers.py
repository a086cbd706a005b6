"""A hostile client against the two-message path (issue 12): headers that would steer Envoy
(retries, timeouts, the provider's cluster), odd credentials, odd framings and methods. The
processor no longer sees the request headers, so every rule here is Envoy's (the early header
mutation, the apply filter contract.APPLY_LUA, the routes and the local-reply mappers)."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from extproc.fakeprovider import Received, Reply
from tests.conftest import PROVIDER_SECRETS, Stack

CHAT = {"model": "legal_summary", "messages": [{"role": "user", "content": "hi"}]}  # one attempt, provider p3


def raw(stack: Stack, method: str, path: str, headers: list[tuple[str, str]], body: bytes | None = None,
        chunked: bool = False, timeout: float = 15) -> tuple[int, dict[str, str], Any]:
    """One request with exact control of its headers (duplicates allowed) and framing."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.envoy.port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        if chunked:
            conn.putheader("transfer-encoding", "chunked")
        conn.endheaders()
        if body is not None and chunked:
            half = len(body) // 2
            for part in (body[:half], body[half:]):
                conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            conn.send(b"0\r\n\r\n")
        elif body is not None:
            conn.send(body)
        r = conn.getresponse()
        data = r.read()
        hdrs = {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()
    try:
        return r.status, hdrs, json.loads(data) if data else None
    except ValueError:
        return r.status, hdrs, data.decode("utf-8", "replace")


def post(stack: Stack, secret: str, extra: list[tuple[str, str]], body: dict[str, Any] | None = None,
         path: str = "/v1/chat/completions") -> tuple[int, dict[str, str], Any]:
    data = json.dumps(body or CHAT).encode()
    headers = [("authorization", f"Bearer {secret}"), ("content-type", "application/json"),
               ("content-length", str(len(data))), ("x-request-id", uuid.uuid4().hex), *extra]
    return raw(stack, "POST", path, headers, data)


def openai_error(status: int, answer: Any, code: str | None = None) -> None:
    assert isinstance(answer, dict) and set(answer) == {"error"}, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}, answer
    if code is not None:
        assert answer["error"]["code"] == code, answer
    assert status >= 400


def last(stack: Stack, provider: str) -> Received:
    reqs = stack.fakes[provider].requests
    assert reqs, f"{provider} got no request"
    return reqs[-1]


# --- Envoy's control headers and our internal ones --------------------------------------------

def test_client_retry_header_does_not_make_envoy_retry(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].default = Reply(status=500)
    status, _, answer = post(stack, secret, [("x-envoy-max-retries", "5"), ("x-envoy-retry-on", "5xx,reset"),
                                             ("x-envoy-retry-grpc-on", "unavailable")])
    openai_error(status, answer, "upstream_unavailable")
    assert stack.fakes["p3"].calls() == 1


@pytest.mark.parametrize("name", ["x-envoy-upstream-rq-timeout-ms", "x-envoy-upstream-rq-per-try-timeout-ms",
                                  "x-envoy-expected-rq-timeout-ms"])
def test_client_timeout_header_does_not_shorten_the_providers_time(stack: Stack, customer: str, name: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].default = Reply(delay_s=0.3)
    status, _, _ = post(stack, secret, [(name, "1")])
    assert status == 200


@pytest.mark.parametrize("name", ["x-tollgate-cluster", "X-Tollgate-Cluster", "x-tollgate-target", "X-TOLLGATE-TARGET"])
def test_client_cannot_pick_the_providers_cluster_in_any_case(stack: Stack, customer: str, name: str) -> None:
    _, secret = stack.create_key(customer)
    status, _, _ = post(stack, secret, [(name, "p1")])
    assert status == 200
    assert stack.fakes["p1"].calls() == 0 and stack.fakes["p3"].calls() == 1


def test_client_internal_and_envoy_headers_never_reach_the_provider(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    sent = [("x-tollgate-foo", "1"), ("X-Tollgate-Cost-Usd", "0"), ("x-envoy-internal", "true"),
            ("x-envoy-force-trace", "1"), ("x-envoy-original-path", "/admin"), ("x-tollgate-content-type", "text/plain")]
    assert post(stack, secret, sent)[0] == 200
    seen = last(stack, "p3").headers
    assert not [k for k in seen if k.startswith(("x-tollgate-", "x-envoy-"))], seen


def test_client_sent_original_content_type_header_is_not_echoed_as_ours(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, hdrs, _ = post(stack, secret, [("x-tollgate-content-type", "text/html")])
    assert status == 200 and hdrs["content-type"].startswith("application/json")


def test_provider_sent_original_content_type_header_does_not_change_the_answers_type(stack: Stack, customer: str) -> None:
    """Only the big-answer filter may set the header the processor restores a type from."""
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].default = Reply(chunked=True, content_type="application/json")
    status, hdrs, _ = post(stack, secret, [])
    assert status == 200 and hdrs["content-type"] == "application/json"
    assert not [k for k in hdrs if k.startswith("x-tollgate-content")]


# --- credentials ----------------------------------------------------------------------------------

def test_provider_gets_only_its_own_key_when_the_client_sends_api_key_and_authorization(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, _, _ = post(stack, secret, [("api-key", secret)])
    assert status == 200
    seen = last(stack, "p3").headers
    assert "api-key" not in seen
    assert seen["authorization"] == f"Bearer {PROVIDER_SECRETS['TG_TEST_P3_KEY']}"


def test_duplicated_authorization_is_refused_or_replaced_never_forwarded(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, _, answer = post(stack, secret, [("authorization", "Bearer sk-someone-else")])
    if status == 200:
        seen = last(stack, "p3").headers
        assert seen["authorization"] == f"Bearer {PROVIDER_SECRETS['TG_TEST_P3_KEY']}"
    else:
        openai_error(status, answer, "invalid_api_key")
        assert stack.fakes["p3"].calls() == 0


def test_too_many_headers_are_refused_without_a_provider(stack: Stack, customer: str) -> None:
    """Past Envoy's 100 headers its HTTP/1 codec closes the connection (measured: no reply)."""
    _, secret = stack.create_key(customer)
    try:
        status, _, answer = post(stack, secret, [(f"x-junk-{i}", "a") for i in range(150)])
        openai_error(status, answer)
    except (ConnectionError, http.client.HTTPException):
        pass
    assert stack.fakes["p3"].calls() == 0


def test_huge_header_is_refused_without_a_provider(stack: Stack, customer: str) -> None:
    """Past Envoy's 60 KiB of headers: an error or a closed connection (Envoy stops reading)."""
    _, secret = stack.create_key(customer)
    try:
        status, _, answer = post(stack, secret, [("x-junk", "a" * 100_000)])
        openai_error(status, answer)
    except (ConnectionError, http.client.HTTPException):
        pass
    assert stack.fakes["p3"].calls() == 0


# --- framings ---------------------------------------------------------------------------------------

def test_chunked_request_body_reaches_the_provider_whole_with_its_length(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    data = json.dumps(CHAT).encode()
    status, _, _ = raw(stack, "POST", "/v1/chat/completions",
                       [("authorization", f"Bearer {secret}"), ("content-type", "application/json")], data, chunked=True)
    assert status == 200
    got = last(stack, "p3")
    assert got.body["model"] == "o3" and got.body["messages"] == CHAT["messages"]
    assert "transfer-encoding" not in got.headers and int(got.headers["content-length"]) > 0


def test_content_length_shorter_than_the_body_is_refused_in_openai_shape(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    data = json.dumps(CHAT).encode()
    status, _, answer = raw(stack, "POST", "/v1/chat/completions",
                            [("authorization", f"Bearer {secret}"), ("content-type", "application/json"),
                             ("content-length", str(len(data) - 5))], data)
    openai_error(status, answer)
    assert stack.fakes["p3"].calls() == 0


def test_expect_100_continue_is_served(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, _, _ = post(stack, secret, [("expect", "100-continue")])
    assert status == 200


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_http2_prior_knowledge_is_served_and_billed(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-o", "-", "-w", "\n%{http_code} %{http_version}",
                          "-H", f"authorization: Bearer {secret}", "-H", "content-type: application/json",
                          "-H", "x-envoy-max-retries: 3", "-H", "x-tollgate-cluster: p1",
                          "--data-binary", json.dumps(CHAT), f"http://127.0.0.1:{stack.envoy.port}/v1/chat/completions"],
                         capture_output=True, text=True, timeout=30, check=True)
    body, _, tail = out.stdout.rpartition("\n")
    assert tail == "200 2", out.stdout[-300:]
    assert json.loads(body)["usage"]["completion_tokens"] == 8
    assert stack.fakes["p1"].calls() == 0 and stack.fakes["p3"].calls() == 1


# --- methods and paths --------------------------------------------------------------------------------

def test_post_without_a_body_is_refused_in_openai_shape(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, _, answer = raw(stack, "POST", "/v1/chat/completions", [("authorization", f"Bearer {secret}"), ("content-length", "0")])
    assert status == 400
    openai_error(status, answer, "invalid_request_error")


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"])
def test_other_methods_on_an_endpoint_are_refused_in_openai_shape_without_a_provider(stack: Stack, customer: str, method: str) -> None:
    _, secret = stack.create_key(customer)
    status, _, answer = raw(stack, method, "/v1/chat/completions", [("authorization", f"Bearer {secret}")])
    assert 400 <= status < 500
    if method != "HEAD":
        openai_error(status, answer)
    assert sum(f.calls() for f in stack.fakes.values()) == 0


def test_get_with_a_body_on_an_endpoint_is_refused_without_a_provider(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    data = json.dumps(CHAT).encode()
    status, _, answer = raw(stack, "GET", "/v1/chat/completions",
                            [("authorization", f"Bearer {secret}"), ("content-type", "application/json"), ("content-length", str(len(data)))], data)
    openai_error(status, answer)
    assert status in (404, 405)
    assert sum(f.calls() for f in stack.fakes.values()) == 0


def test_post_to_the_models_list_is_refused_in_openai_shape(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, _, answer = post(stack, secret, [], path="/v1/models")
    openai_error(status, answer)
    assert status in (404, 405)


def test_trailing_slash_is_an_unknown_endpoint_in_openai_shape(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, _, answer = post(stack, secret, [], path="/v1/chat/completions/")
    assert status == 404
    openai_error(status, answer, "not_found")
    assert stack.fakes["p3"].calls() == 0


def test_query_string_on_an_endpoint_is_served(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, _, _ = post(stack, secret, [], path="/v1/chat/completions?x=1")
    assert status == 200
    assert last(stack, "p3").path == "/v1/chat/completions"


@pytest.mark.parametrize("path", ["/v1/models", "/v1/nothing-here", "/v1/chat/completions"])
def test_client_cannot_choose_the_path_envoys_access_log_shows(stack: Stack, customer: str, path: str) -> None:
    """The access log prints `x-envoy-original-path` when present: a client's own copy would
    hide what it really asked for. (This request's line is found by its id, or by its query
    string where the id is Envoy's own.)"""
    _, secret = stack.create_key(customer)
    rid = uuid.uuid4().hex
    method = "GET" if path == "/v1/models" else "POST"
    data = json.dumps(CHAT).encode() if method == "POST" else None
    headers = [("authorization", f"Bearer {secret}"), ("x-envoy-original-path", f"/spoofed-{rid}"), ("x-request-id", rid),
               ("content-type", "application/json"), *([("content-length", str(len(data)))] if data else [])]
    raw(stack, method, path if path.endswith("completions") else f"{path}?q={rid}", headers, data)
    log = Path(stack.envoy.log_path or "")
    deadline = time.monotonic() + 5
    while not (lines := [ln for ln in log.read_text(errors="replace").splitlines() if rid in ln]):
        assert time.monotonic() < deadline, "no access log line"
        time.sleep(0.1)
    assert f'"{method} {path}' in lines[0] and "spoofed" not in lines[0], lines[0]


def test_request_with_both_chunked_and_content_length_is_refused_without_a_provider(stack: Stack, customer: str) -> None:
    """The classic smuggling shape: Envoy refuses it (in OpenAI's shape) or serves one body."""
    _, secret = stack.create_key(customer)
    data = json.dumps(CHAT).encode()
    try:
        status, _, answer = raw(stack, "POST", "/v1/chat/completions",
                                [("authorization", f"Bearer {secret}"), ("content-type", "application/json"),
                                 ("content-length", "4")], data, chunked=True)
    except (ConnectionError, http.client.HTTPException):
        status, answer = 0, None
    if status != 200:
        assert stack.fakes["p3"].calls() == 0
        if status:
            openai_error(status, answer)
    else:
        assert stack.fakes["p3"].calls() == 1


def test_request_trailers_never_steer_the_request(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    data = json.dumps(CHAT).encode()
    conn = http.client.HTTPConnection("127.0.0.1", stack.envoy.port, timeout=15)
    try:
        conn.putrequest("POST", "/v1/chat/completions", skip_accept_encoding=True)
        for k, v in (("authorization", f"Bearer {secret}"), ("content-type", "application/json"), ("transfer-encoding", "chunked")):
            conn.putheader(k, v)
        conn.endheaders()
        conn.send(f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\nx-tollgate-cluster: p1\r\nx-envoy-max-retries: 5\r\n\r\n")
        status = conn.getresponse().status
    finally:
        conn.close()
    assert status == 200
    assert stack.fakes["p1"].calls() == 0 and stack.fakes["p3"].calls() == 1
    assert "x-tollgate-cluster" not in last(stack, "p3").headers
