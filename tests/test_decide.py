"""Routing decisions and request parsing are pure functions: tested without I/O."""

from __future__ import annotations

from pathlib import Path

from extproc import payload
from extproc.decide import KeyInfo, authorize, resolve_route, visible_routes
from extproc.errors import ApiError
from extproc.policy import load_policy
from extproc.policy.model import Plan, Route
from extproc.stream import StreamMeter

POLICY = load_policy([Path(__file__).resolve().parent.parent / "extproc" / "examples" / "policy"])


def key(plan: str = "starter", default_route: str | None = None) -> KeyInfo:
    return KeyInfo("key_1", "c1", "w1", plan, default_route)


def choose_route(k: KeyInfo, header: str | None, model: str | None) -> Route | Plan | ApiError:
    """Resolve then authorize, as the processor does: the route, or the refusal."""
    route = resolve_route(POLICY, k, header, model)
    if isinstance(route, ApiError):
        return route
    plan = authorize(POLICY, k, route)
    return plan if isinstance(plan, ApiError) else route


def test_header_route_wins_over_body_model() -> None:
    choice = choose_route(key("premium"), "legal_summary", "support_draft")
    assert isinstance(choice, Route) and choice.name == "legal_summary"


def test_body_model_naming_a_route_selects_it() -> None:
    choice = choose_route(key(), None, "support_draft")
    assert isinstance(choice, Route) and choice.primary_model == "low_cost_chat"


def test_default_route_serves_a_policy_model_name_that_is_not_a_route() -> None:
    choice = choose_route(key(default_route="support_draft"), None, "strong_reasoning")
    assert isinstance(choice, Route) and choice.name == "support_draft"


def test_default_route_serves_an_upstream_model_name() -> None:
    choice = choose_route(key(default_route="support_draft"), None, "gpt-4o-mini")
    assert isinstance(choice, Route) and choice.name == "support_draft"


def test_default_route_serves_an_absent_model() -> None:
    choice = choose_route(key(default_route="support_draft"), None, None)
    assert isinstance(choice, Route) and choice.name == "support_draft"


def test_unknown_model_is_model_not_found_even_with_a_default_route() -> None:
    err = choose_route(key(default_route="support_draft"), None, "gpt-does-not-exist")
    assert isinstance(err, ApiError) and (err.status, err.code, err.param) == (404, "model_not_found", "model")
    assert "gpt-does-not-exist" in err.message


def test_unknown_route_without_default_is_model_not_found() -> None:
    err = choose_route(key(), None, "gpt-4o")
    assert isinstance(err, ApiError) and (err.status, err.code) == (404, "model_not_found")


def test_route_outside_the_plan_is_permission_denied() -> None:
    err = choose_route(key("starter"), None, "legal_summary")
    assert isinstance(err, ApiError) and (err.status, err.code) == (403, "permission_denied")


def test_key_with_a_plan_missing_from_policy_is_permission_denied() -> None:
    err = choose_route(key("gold"), None, "support_draft")
    assert isinstance(err, ApiError) and err.code == "permission_denied"


def test_visible_routes_follow_the_plan() -> None:
    assert visible_routes(POLICY, key("starter")) == ["batch_classification", "embeddings", "support_draft"]


def test_parse_rejects_non_object_body() -> None:
    err = payload.parse_request("/v1/chat/completions", b"[1,2]")
    assert isinstance(err, ApiError) and err.status == 400


def test_parse_rejects_wrong_types() -> None:
    for body in (b'{"model": 3, "messages": [{}]}', b'{"model": "m", "messages": "hi"}',
                 b'{"model": "m", "messages": [{}], "stream": "yes"}', b'{"model": "m", "messages": [{}], "max_tokens": -1}'):
        assert isinstance(payload.parse_request("/v1/chat/completions", body), ApiError), body


def test_rewrite_sets_the_provider_model_and_asks_streams_for_usage() -> None:
    parsed = payload.parse_request("/v1/chat/completions", b'{"model":"r","stream":true,"messages":[{"role":"user","content":"x"}]}')
    assert not isinstance(parsed, ApiError)
    body = payload.rewrite_body(parsed, "/v1/chat/completions", "gpt-4o-mini", 100)
    assert b'"model":"gpt-4o-mini"' in body and b'"stream_options":{"include_usage":true}' in body


def test_sse_scanner_finds_usage_split_across_chunks() -> None:
    scanner = StreamMeter()
    event = b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\ndata: [DONE]\n\n'
    scanner.feed(event[:25])
    scanner.feed(event[25:])
    scanner.finish()
    assert scanner.usage == payload.Usage(7, 3)


def test_usage_of_responses_api_uses_input_and_output_tokens() -> None:
    assert payload.usage_from_json({"usage": {"input_tokens": 5, "output_tokens": 9}}) == payload.Usage(5, 9)
