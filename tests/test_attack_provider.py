"""A hostile provider forging the gateway's own headers, or answering in a shape that was not
asked for (issue 12's two-message path): the client still gets the gateway's attribution and
OpenAI-shaped errors, and the answer is billed."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest

from extproc.contract import RELAY_FLAGS_HEADER, STOP_HEADER
from extproc.fakeprovider import Reply
from tests.conftest import Stack
from tests.test_attack_billing import the_record

MESSAGES = [{"role": "user", "content": "hi"}]


def send(stack: Stack, secret: str, route: str = "legal_summary") -> tuple[int, dict[str, str], Any]:
    body = json.dumps({"model": route, "messages": MESSAGES}).encode()
    req = urllib.request.Request(f"{stack.base_url}/chat/completions", data=body, method="POST", headers={
        "authorization": f"Bearer {secret}", "content-type": "application/json", "x-request-id": uuid.uuid4().hex})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, headers, raw = r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as exc:
        status, headers, raw = exc.code, dict(exc.headers.items()), exc.read()
    headers = {k.lower(): v for k, v in headers.items()}
    try:
        return status, headers, json.loads(raw)
    except ValueError:
        return status, headers, raw.decode("utf-8", "replace")


FORGED = {"x-tollgate-cost-usd": "0.000000", "x-tollgate-customer": "someone-else", "x-tollgate-provider": "nobody",
          "x-tollgate-attempts": "9"}


def test_provider_forged_attribution_headers_never_reach_the_client(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(Reply(headers=FORGED))
    status, headers, _ = send(stack, secret)
    assert status == 200
    assert headers["x-tollgate-customer"] == customer and headers["x-tollgate-provider"] == "p3"
    assert headers["x-tollgate-attempts"] == "1" and float(headers["x-tollgate-cost-usd"]) > 0


def test_provider_forged_attribution_headers_on_an_answer_without_usage_never_reach_the_client(stack: Stack, customer: str) -> None:
    """The answer whose body the processor reads (no usage): its attribution comes with the body reply."""
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(Reply(headers=FORGED, usage=False))
    status, headers, _ = send(stack, secret)
    assert status == 200
    assert headers["x-tollgate-customer"] == customer and float(headers["x-tollgate-cost-usd"]) > 0


def test_provider_forged_stop_reason_does_not_pass_its_error_through(stack: Stack, customer: str) -> None:
    """The stop header is the upstream processor's (a chain it ended); a provider's copy must
    not turn its own 500 into the client's answer unshaped and unaccounted."""
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(Reply(status=500, headers={STOP_HEADER: "policy"}))
    status, headers, answer = send(stack, secret)
    assert status == 502, answer
    assert answer["error"]["code"] == "upstream_unavailable" and "p3 says" not in json.dumps(answer)
    assert STOP_HEADER not in headers


def test_provider_forged_stop_reason_on_a_chain_does_not_stop_the_fallback(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(status=500, headers={STOP_HEADER: "policy"}))
    status, _, answer = send(stack, secret, route="switch_all")
    assert status == 200, answer
    assert stack.fakes["p2"].calls() == 1 or stack.fakes["p1"].calls() == 2


def test_provider_forged_relay_flags_do_not_reach_the_client(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].script(Reply(headers={RELAY_FLAGS_HEADER: "UF"}))
    status, headers, _ = send(stack, secret, route="switch_all")
    assert status == 200 and RELAY_FLAGS_HEADER not in headers


def test_event_stream_answer_to_a_non_stream_request_is_billed(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    sse = ('data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hello"}}]}\n\n'
           'data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":7}}\n\n'
           "data: [DONE]\n\n")
    stack.fakes["p3"].script(Reply(raw_body=sse, content_type="text/event-stream"))
    status, _, _ = send(stack, secret)
    assert status == 200
    rec = the_record(stack, customer)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["cost_micro_usd"]) == ("12", "7", str(2 * 12 + 8 * 7))


def test_last_provider_of_a_chain_forging_the_stop_reason_gets_an_openai_shaped_error(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p1"].default = Reply(status=500, headers={STOP_HEADER: "policy"})
    stack.fakes["p2"].default = Reply(status=500, headers={STOP_HEADER: "policy"})
    status, _, answer = send(stack, secret, route="switch_all")
    assert status == 502, answer
    assert answer["error"]["code"] == "upstream_unavailable" and "says" not in json.dumps(answer)


@pytest.mark.parametrize(("route", "provider"), [("legal_summary", "p3"), ("switch_all", "p1")])
def test_provider_redirect_never_sends_the_client_elsewhere(stack: Stack, customer: str, route: str, provider: str) -> None:
    """A provider's 3xx would point the client (and its key: urllib keeps `authorization` on
    a redirect) at the provider's choice of server: the client gets an OpenAI-shaped error."""
    _, secret = stack.create_key(customer)
    stack.fakes[provider].script(Reply(status=302, headers={"location": "http://evil.example/v1/chat/completions"}))
    status, headers, answer = send(stack, secret, route=route)
    assert "location" not in headers
    assert status >= 400 and set(answer["error"]) == {"message", "type", "param", "code"}, answer


PROVIDER_ACCOUNT = {"x-ratelimit-remaining-tokens": "123", "x-ratelimit-limit-tokens": "150000000",
                    "x-ratelimit-remaining-requests": "7", "openai-organization": "org-operator", "openai-project": "proj_operator",
                    "set-cookie": "__cf_bm=provider; path=/"}


@pytest.mark.parametrize("usage", [True, False])
def test_provider_account_headers_never_reach_the_client(stack: Stack, customer: str, usage: bool) -> None:
    """x-ratelimit-* are the gateway's limits for this key (SPEC §3), not the operator's
    provider account; its organization, project and cookies are none of the client's business."""
    _, secret = stack.create_key(customer)  # premium: a requests-per-minute limit, none on tokens
    stack.fakes["p3"].script(Reply(headers=PROVIDER_ACCOUNT, usage=usage))
    status, headers, _ = send(stack, secret)
    assert status == 200
    leaked = {k: v for k, v in headers.items() if PROVIDER_ACCOUNT.get(k) == v}
    assert not leaked, leaked
    assert "x-ratelimit-remaining-requests" in headers  # the gateway's own
