"""What a provider sees (SPEC §1.2): an allowlist of the client's headers plus the policy's
per-provider `headers:`, and only the query parameters the policy allows — on the first
attempt and on retries through the relay. Real Envoy, processor and Redis; the fake
providers record what reached them."""

from __future__ import annotations

import http.client
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam

from extproc.fakeprovider import FakeProvider, Received, Reply
from tests.conftest import SEED, Stack, catalog, running_stack

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
ORG = "org-operator-1"
PROJECT_P2 = "proj-backup-7"


@pytest.fixture(scope="module")
def edge_stack(fakes: dict[str, FakeProvider]) -> Iterator[Stack]:
    """The test catalog, with p1 sending an organization and allowing `api-version`, and p2
    sending a project of its own."""
    cat = catalog(fakes)
    cat["providers"]["p1"]["headers"] = {"OpenAI-Organization": ORG}
    cat["providers"]["p1"]["query_params"] = ["api-version"]
    cat["providers"]["p2"]["headers"] = {"openai-project": PROJECT_P2}
    policy_dir = Path(tempfile.mkdtemp(prefix="tollgate-edge-policy-"))
    (policy_dir / "00-catalog.yaml").write_text(yaml.safe_dump(cat, sort_keys=False))
    (policy_dir / "10-support_draft.yaml").write_text(SEED.read_text())
    with running_stack(fakes, policy_dir, workers=1, name="edge") as s:
        yield s


def send(stack: Stack, secret: str, headers: dict[str, str], path: str = "/v1/chat/completions",
         model: str = "support_draft") -> tuple[int, dict[str, Any]]:
    """A raw HTTP request (the SDK would add and normalise headers of its own)."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.envoy.port, timeout=10)
    body = json.dumps({"model": model, "messages": MESSAGES}).encode()
    conn.request("POST", path, body=body, headers={"authorization": f"Bearer {secret}", "content-type": "application/json",
                                                   **headers})
    r = conn.getresponse()
    data = json.loads(r.read())
    conn.close()
    return r.status, data


def last(stack: Stack, provider: str) -> Received:
    return stack.fakes[provider].requests[-1]


FORBIDDEN = {
    "cookie": "session=abc",
    "openai-project": "proj-client-chosen",
    "x-api-key": "sk-client-anthropic-style",
    "x-forwarded-for": "203.0.113.9",
    "x-forwarded-host": "evil.example",
    "x-forwarded-proto": "https",
    "x-custom-tracking": "1",
    "accept-encoding": "gzip",
}


@pytest.mark.parametrize("name", sorted(FORBIDDEN))
def test_client_header_outside_the_allowlist_does_not_reach_the_provider(edge_stack: Stack, customer: str, name: str) -> None:
    _, secret = edge_stack.create_key(customer)
    status, _ = send(edge_stack, secret, {name: FORBIDDEN[name]})
    assert status == 200
    assert name not in last(edge_stack, "p1").headers


def test_client_openai_organization_is_replaced_by_the_policys(edge_stack: Stack, customer: str) -> None:
    _, secret = edge_stack.create_key(customer)
    status, _ = send(edge_stack, secret, {"OpenAI-Organization": "org-client-chosen"})
    assert status == 200
    assert last(edge_stack, "p1").headers["openai-organization"] == ORG


def test_provider_without_policy_headers_never_gets_a_client_organization(edge_stack: Stack, customer: str) -> None:
    _, secret = edge_stack.create_key(customer)
    status, _ = send(edge_stack, secret, {"OpenAI-Organization": "org-client-chosen", "x-tollgate-route": "legal_summary"})
    assert status == 200
    assert "openai-organization" not in last(edge_stack, "p3").headers


def test_allowlisted_client_headers_reach_the_provider_unchanged(edge_stack: Stack, customer: str) -> None:
    _, secret = edge_stack.create_key(customer)
    status, _ = send(edge_stack, secret, {"accept": "application/json", "user-agent": "acme-bot/1.2", "x-request-id": "rid-edge-1"})
    assert status == 200
    h = last(edge_stack, "p1").headers
    assert (h["content-type"], h["accept"], h["user-agent"], h["x-request-id"]) == (
        "application/json", "application/json", "acme-bot/1.2", "rid-edge-1")


def test_provider_receives_exactly_the_allowlist_and_nothing_envoy_added(edge_stack: Stack, customer: str) -> None:
    _, secret = edge_stack.create_key(customer)
    status, _ = send(edge_stack, secret, {"accept": "*/*", "user-agent": "u", **FORBIDDEN})
    assert status == 200
    assert set(last(edge_stack, "p1").headers) == {
        "host", "content-type", "content-length", "accept", "user-agent", "x-request-id", "authorization", "openai-organization"}


def test_query_parameter_the_policy_allows_is_passed_on_alone(edge_stack: Stack, customer: str) -> None:
    _, secret = edge_stack.create_key(customer)
    status, _ = send(edge_stack, secret, {}, path="/v1/chat/completions?debug=1&api-version=2024-06-01&user=x")
    assert status == 200
    assert last(edge_stack, "p1").path == "/v1/chat/completions?api-version=2024-06-01"


def test_query_string_is_dropped_for_a_provider_that_allows_none(edge_stack: Stack, customer: str) -> None:
    _, secret = edge_stack.create_key(customer)
    status, _ = send(edge_stack, secret, {"x-tollgate-route": "legal_summary"}, path="/v1/chat/completions?api-version=1&a=b")
    assert status == 200
    assert last(edge_stack, "p3").path == "/v1/chat/completions"


def test_retry_through_the_relay_gets_the_second_providers_allowlist_and_headers(edge_stack: Stack, customer: str) -> None:
    _, secret = edge_stack.create_key(customer)
    edge_stack.fakes["p1"].script(Reply(status=500))
    status, _ = send(edge_stack, secret, {"x-tollgate-route": "switch_all", "user-agent": "u", **FORBIDDEN,
                                          "openai-organization": "org-client-chosen"},
                     path="/v1/chat/completions?api-version=1&debug=1")
    assert status == 200
    second = last(edge_stack, "p2")
    assert set(second.headers) == {"host", "content-type", "content-length", "user-agent", "x-request-id", "authorization",
                                   "openai-project"}
    assert second.headers["openai-project"] == PROJECT_P2
    assert second.path == "/v1/chat/completions"
    # The first attempt was gated too.
    assert last(edge_stack, "p1").headers["openai-organization"] == ORG


def test_single_attempt_route_provider_receives_exactly_the_allowlist(edge_stack: Stack, customer: str) -> None:
    _, secret = edge_stack.create_key(customer)
    status, _ = send(edge_stack, secret, {"x-tollgate-route": "legal_summary", "accept": "*/*", "user-agent": "u", **FORBIDDEN})
    assert status == 200
    assert set(last(edge_stack, "p3").headers) == {
        "host", "content-type", "content-length", "accept", "user-agent", "x-request-id", "authorization"}
