"""The per-attempt (upstream) processor in-process: a later attempt's request headers in, the
attempt's target, credential and body rewrite (or the chain's end) out.

Each test writes the dynamic metadata the earlier phases leave for attempt n, as Envoy forwards
it: `tollgate.request` (the downstream processor's note), `tollgate.attempts` (this processor's
notes of attempts 2..n-1), `tollgate.last` (the Lua status recorder: the last attempt's
`:status` as a string, and the relay's response flags). Expected targets are read off the
catalog (tests/conftest.py) by hand:
  low_cost_chat p1 gpt-4o-mini (low) | low_cost_chat_backup p2 small-chat-v2 (low)
  standard_chat p2 mid-chat-v1 (standard); every provider: timeout_s 2, tokens_per_s 10000.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from extproc import phases
from extproc.pb import ext_proc_pb2 as pb
from extproc.policy import Policy
from extproc.quota import now_ms
from extproc.upstream import AttemptExchange
from tests.inproc import Rig, attempt_message, dynamic_metadata, immediate_json, run, set_headers, write_test_policy

CAP = 30
# A non-stream attempt's per-try budget on any test provider: 2 s + 30 tokens / 10000 tokens/s.
BUDGET_MS = "2003"


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    return write_test_policy(Path(tmp_path_factory.mktemp("inproc-upstream-policy")))


def request_note(route: str, plan: str, m1: str, p1: str, t1: int, **extra: Any) -> dict[str, Any]:
    """What the downstream processor notes in `tollgate.request` for a chained route."""
    return {"route": route, "plan": plan, "m1": m1, "p1": p1, "t1": t1, "unhealthy": "", "cap": CAP, "stream": False,
            "cust": "c-upstream", **extra}


def attempt(redis_url: str, policy: Policy, n: int, metadata: dict[str, dict[str, Any]],
            secrets: dict[str, str] | None = None) -> pb.ProcessingResponse:
    """Attempt n's request headers through `phases.dispatch`, with the gateway's secrets."""

    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        if secrets is not None:
            rig.gw.provider_secrets = secrets
        return await phases.dispatch(AttemptExchange(rig.gw), attempt_message(n, metadata))

    return run(redis_url, policy, scenario)


def after_p1_failed(status: str = "500", flags: str = "", t1: int | None = None, **note: Any) -> dict[str, dict[str, Any]]:
    """Attempt 2 of route switch_all (plan starter_down): attempt 1 went to low_cost_chat on p1."""
    return {"tollgate.request": request_note("switch_all", "starter_down", "low_cost_chat", "p1",
                                             now_ms() - 10 if t1 is None else t1, **note),
            "tollgate.last": {"status": status, "flags": flags}}


# Attempt 1 of switch_all as attempt 2's processor completed it in `tollgate.attempts`.
P1_FAILED = {"m": "low_cost_chat", "p": "p1", "t": 1.0, "o": "provider_5xx", "s": 500.0}


def headers_of(reply: pb.ProcessingResponse) -> dict[str, str]:
    return set_headers(reply.request_headers.response.header_mutation)


# --- attempt 2 goes on -------------------------------------------------------------------------


def test_attempt_2_after_a_5xx_targets_the_same_tier_provider_with_its_own_credential(redis_url: str, policy: Policy) -> None:
    reply = attempt(redis_url, policy, 2, after_p1_failed("500"))
    assert headers_of(reply) == {"x-tollgate-target": "p2", "authorization": "Bearer sk-provider-two",
                                 "x-envoy-upstream-rq-per-try-timeout-ms": BUDGET_MS}
    assert not reply.HasField("immediate_response")


def test_attempt_2_rewrites_the_body_head_from_the_first_to_the_new_upstream_model(redis_url: str, policy: Policy) -> None:
    md = dynamic_metadata(attempt(redis_url, policy, 2, after_p1_failed("500")))
    assert md["tollgate.rewrite"] == {"old": '{"model":"gpt-4o-mini"', "new": '{"model":"small-chat-v2"'}


def test_attempt_2_notes_attempt_1s_outcome_and_its_own_target(redis_url: str, policy: Policy) -> None:
    t1 = now_ms() - 10
    md = dynamic_metadata(attempt(redis_url, policy, 2, after_p1_failed("500", t1=t1)))
    notes = md["tollgate.attempts"]
    assert notes["1"] == {"m": "low_cost_chat", "p": "p1", "t": float(t1), "o": "provider_5xx", "s": 500.0}
    assert {k: notes["2"][k] for k in ("m", "p", "reason", "rule")} == {
        "m": "low_cost_chat_backup", "p": "p2", "reason": "provider_5xx", "rule": "on_provider_5xx: switch_same_price_tier"}
    assert md["tollgate.last"] == {"status": "", "flags": ""}  # cleared for this attempt's own status


def test_target_without_a_credential_has_the_authorization_header_removed(redis_url: str, policy: Policy) -> None:
    reply = attempt(redis_url, policy, 2, after_p1_failed("500"), secrets={"p1": "sk-provider-one"})
    assert "authorization" not in headers_of(reply)
    assert list(reply.request_headers.response.header_mutation.remove_headers) == ["authorization"]


def test_stream_attempt_takes_the_providers_stream_route(redis_url: str, policy: Policy) -> None:
    reply = attempt(redis_url, policy, 2, after_p1_failed("500", stream=True))
    assert headers_of(reply)["x-tollgate-target"] == "p2+stream"


def test_retry_same_goes_back_to_the_same_provider(redis_url: str, policy: Policy) -> None:
    md = {"tollgate.request": request_note("retry_twice", "starter_down", "low_cost_chat", "p1", now_ms() - 10),
          "tollgate.last": {"status": "502", "flags": ""}}
    reply = attempt(redis_url, policy, 2, md)
    assert headers_of(reply)["x-tollgate-target"] == "p1"
    assert dynamic_metadata(reply)["tollgate.rewrite"] == {"old": '{"model":"gpt-4o-mini"', "new": '{"model":"gpt-4o-mini"'}


def test_retry_on_the_provider_that_just_failed_waits_a_back_off_first(redis_url: str, policy: Policy) -> None:
    md = {"tollgate.request": request_note("retry_twice", "starter_down", "low_cost_chat", "p1", now_ms() - 10),
          "tollgate.last": {"status": "502", "flags": ""}}

    async def scenario(rig: Rig) -> float:
        started = time.perf_counter()
        await phases.dispatch(AttemptExchange(rig.gw), attempt_message(2, md))
        return time.perf_counter() - started

    assert run(redis_url, policy, scenario) >= 0.0125  # 25 ms jittered to 50-100%


# --- how attempt 1 ended, from what Envoy left -------------------------------------------------


def test_no_status_after_most_of_the_budget_is_a_timeout(redis_url: str, policy: Policy) -> None:
    # 1.7 s since attempt 1 began: past 0.8 x 2003 ms = 1602 ms, inside the budget itself
    md = dynamic_metadata(attempt(redis_url, policy, 2, after_p1_failed("", t1=now_ms() - 1700)))
    assert md["tollgate.attempts"]["1"]["o"] == "timeout"


def test_no_status_before_most_of_the_budget_is_a_connect_failure(redis_url: str, policy: Policy) -> None:
    # 1.4 s since attempt 1 began: short of 0.8 x 2003 ms = 1602 ms
    md = dynamic_metadata(attempt(redis_url, policy, 2, after_p1_failed("", t1=now_ms() - 1400)))
    assert md["tollgate.attempts"]["1"]["o"] == "connect_failure"


def test_relay_flag_ut_is_a_timeout_whatever_the_status(redis_url: str, policy: Policy) -> None:
    md = dynamic_metadata(attempt(redis_url, policy, 2, after_p1_failed("503", flags="UT")))
    assert md["tollgate.attempts"]["1"]["o"] == "timeout"


def test_relay_flag_uf_makes_a_503_a_connect_failure(redis_url: str, policy: Policy) -> None:
    md = dynamic_metadata(attempt(redis_url, policy, 2, after_p1_failed("503", flags="UF")))
    assert md["tollgate.attempts"]["1"]["o"] == "connect_failure"


def test_429_is_a_rate_limit(redis_url: str, policy: Policy) -> None:
    md = dynamic_metadata(attempt(redis_url, policy, 2, after_p1_failed("429")))
    assert md["tollgate.attempts"]["1"]["o"] == "rate_limit"


# --- the chain stops ---------------------------------------------------------------------------


def test_downgrade_the_plan_does_not_allow_stops_the_chain_with_reason_policy(redis_url: str, policy: Policy) -> None:
    md = {"tollgate.request": request_note("downgrade_route", "premium_no_down", "standard_chat", "p2", now_ms() - 10),
          "tollgate.last": {"status": "500", "flags": ""}}
    reply = attempt(redis_url, policy, 2, md)
    assert reply.immediate_response.status.code == 502
    rule = "on_provider_5xx: downgrade, not allowed by plan premium_no_down"
    assert immediate_json(reply) == {"error": {
        "message": f"No provider could serve the request after 1 attempt(s) (provider_5xx); {rule}.", "type": "server_error",
        "param": None, "code": "upstream_unavailable"}}
    assert set_headers(reply.immediate_response.headers)["x-tollgate-stop-reason"] == "policy"
    assert dynamic_metadata(reply)["tollgate.attempts"]["stop"] == {"reason": "policy", "rule": rule}


def test_plan_without_same_tier_stops_a_switch_with_reason_policy(redis_url: str, policy: Policy) -> None:
    md = {"tollgate.request": request_note("switch_all", "downgrade_only", "low_cost_chat", "p1", now_ms() - 10),
          "tollgate.last": {"status": "500", "flags": ""}}
    reply = attempt(redis_url, policy, 2, md)
    assert set_headers(reply.immediate_response.headers)["x-tollgate-stop-reason"] == "policy"
    assert immediate_json(reply)["error"]["message"].endswith(
        "on_provider_5xx: switch_same_price_tier, not allowed by plan downgrade_only.")


def test_no_candidate_left_stops_the_chain_with_the_first_failures_reason(redis_url: str, policy: Policy) -> None:
    md = after_p1_failed("500")
    md["tollgate.attempts"] = {"1": P1_FAILED, "2": {"m": "low_cost_chat_backup", "p": "p2", "t": float(now_ms() - 5), "rule": "r",
                                                     "reason": "provider_5xx"}}
    reply = attempt(redis_url, policy, 3, md)
    assert reply.immediate_response.status.code == 502
    assert immediate_json(reply)["error"]["message"] == (
        "No provider could serve the request after 2 attempt(s) (provider_5xx); "
        "on_provider_5xx: switch_same_price_tier; no candidate left.")
    assert set_headers(reply.immediate_response.headers)["x-tollgate-stop-reason"] == "provider_5xx"


def test_max_attempts_reached_stops_the_chain(redis_url: str, policy: Policy) -> None:
    md = {"tollgate.request": request_note("downgrade_route", "premium", "standard_chat", "p2", now_ms() - 10),
          "tollgate.attempts": {"1": {"m": "standard_chat", "p": "p2", "t": float(now_ms() - 20), "o": "provider_5xx", "s": 500.0},
                                "2": {"m": "low_cost_chat", "p": "p1", "t": float(now_ms() - 5), "rule": "r", "reason": "provider_5xx"}},
          "tollgate.last": {"status": "500", "flags": ""}}
    reply = attempt(redis_url, policy, 3, md)
    assert reply.immediate_response.status.code == 502
    assert immediate_json(reply)["error"]["message"].endswith("on_provider_5xx: downgrade; max_attempts 2 reached.")


def test_last_failure_a_timeout_answers_504(redis_url: str, policy: Policy) -> None:
    md = after_p1_failed("500")
    md["tollgate.attempts"] = {"1": P1_FAILED, "2": {"m": "low_cost_chat_backup", "p": "p2", "t": float(now_ms() - 5), "rule": "r",
                                                     "reason": "provider_5xx"}}
    md["tollgate.last"] = {"status": "504", "flags": "UT"}  # attempt 2 timed out; attempt 1 had failed with a 500
    reply = attempt(redis_url, policy, 3, md)
    assert reply.immediate_response.status.code == 504
    assert "after 2 attempt(s) (timeout)" in immediate_json(reply)["error"]["message"]


def test_provider_with_an_open_circuit_at_the_start_is_not_a_later_target(redis_url: str, policy: Policy) -> None:
    reply = attempt(redis_url, policy, 2, after_p1_failed("500", unhealthy="p2"))
    assert set_headers(reply.immediate_response.headers)["x-tollgate-stop-reason"] == "provider_5xx"


def test_route_gone_from_the_policy_stops_the_chain(redis_url: str, policy: Policy) -> None:
    md = {"tollgate.request": request_note("no_such_route", "starter_down", "low_cost_chat", "p1", now_ms() - 10),
          "tollgate.last": {"status": "500", "flags": ""}}
    reply = attempt(redis_url, policy, 2, md)
    assert set_headers(reply.immediate_response.headers)["x-tollgate-stop-reason"] == "policy"
    assert json.loads(reply.immediate_response.body)["error"]["message"].endswith("route or plan no longer in the policy.")


# --- phases the per-attempt processor does not act on ------------------------------------------


def test_attempt_1_passes_unchanged(redis_url: str, policy: Policy) -> None:
    reply = attempt(redis_url, policy, 1, after_p1_failed("500"))
    assert reply == pb.ProcessingResponse(request_headers=pb.HeadersResponse())


def test_other_phases_of_an_attempt_stream_pass_unchanged(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> list[pb.ProcessingResponse]:
        ex = AttemptExchange(rig.gw)
        return [await phases.dispatch(ex, pb.ProcessingRequest(response_headers=pb.HttpHeaders())),
                await phases.dispatch(ex, pb.ProcessingRequest(response_body=pb.HttpBody())),
                await phases.dispatch(ex, pb.ProcessingRequest(request_body=pb.HttpBody()))]

    assert run(redis_url, policy, scenario) == [pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
                                                 pb.ProcessingResponse(response_body=pb.BodyResponse()),
                                                 pb.ProcessingResponse(request_body=pb.BodyResponse())]
