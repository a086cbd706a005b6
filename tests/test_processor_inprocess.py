"""The downstream processor in-process: Envoy's messages in, replies out, money in a real Redis.

Each test builds the messages Envoy sends (tests/inproc.py), passes them through
`phases.dispatch` to a fresh `downstream.Exchange`, and checks the reply and, where money
moves, the Redis state. Costs are priced by hand from the catalog (tests/conftest.py):
  low_cost_chat    p1 gpt-4o-mini  $0.15 / $0.60 per Mtok  (route support_draft, 2 attempts)
  strong_reasoning p3 o3           $2.00 / $8.00 per Mtok  (route legal_summary, 1 attempt)
Providers p1..p3: timeout_s 2, tokens_per_s 10000 (a non-stream per-try budget of
2 s + cap / 10000 tokens/s).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from extproc import phases
from extproc.downstream import Exchange
from extproc.pb import ext_proc_pb2 as pb
from extproc.policy import Policy
from tests.inproc import (
    Rig,
    answer_side,
    body_message,
    dynamic_metadata,
    immediate_json,
    request_id_of,
    response_body_message,
    response_headers_message,
    run,
    set_headers,
    write_test_policy,
)

MESSAGES = [{"role": "user", "content": "Summarise the contract."}]
LEGAL = {"model": "legal_summary", "messages": MESSAGES, "max_tokens": 50}


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    return write_test_policy(Path(tmp_path_factory.mktemp("inproc-policy")))


async def admitted(rig: Rig, body: dict[str, Any], plan: str = "prepaid", fund: int = 1_000_000) -> tuple[Exchange, str, str, pb.ProcessingResponse]:
    """A funded customer's request through its body phase: (exchange, customer, request id, reply)."""
    customer, secret = await rig.key(plan)
    if fund:
        await rig.fund(customer, fund)
    ex = Exchange(rig.gw)
    msg = body_message(body, secret)
    reply = await phases.dispatch(ex, msg)
    return answer_side(rig.gw, reply) or ex, customer, request_id_of(msg), reply


# --- request body ----------------------------------------------------------------------------


def test_unknown_key_is_answered_at_once_with_401_invalid_api_key(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        return await phases.dispatch(Exchange(rig.gw), body_message(LEGAL, "tg-not-a-key"))

    reply = run(redis_url, policy, scenario)
    assert reply.immediate_response.status.code == 401
    assert immediate_json(reply) == {"error": {
        "message": "Incorrect API key provided, or the key was revoked.", "type": "invalid_request_error",
        "param": None, "code": "invalid_api_key"}}
    assert set_headers(reply.immediate_response.headers)["content-type"] == "application/json"


def test_missing_key_is_401_without_a_redis_lookup(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        return await phases.dispatch(Exchange(rig.gw), body_message(LEGAL, None))

    reply = run(redis_url, policy, scenario)
    assert reply.immediate_response.status.code == 401
    assert immediate_json(reply)["error"]["code"] == "invalid_api_key"


def test_api_key_header_authenticates_like_a_bearer_token(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        customer, secret = await rig.key("prepaid")
        await rig.fund(customer, 1_000_000)
        return await phases.dispatch(Exchange(rig.gw), body_message(LEGAL, None, api_key=secret))

    reply = run(redis_url, policy, scenario)
    assert reply.HasField("request_body") and not reply.HasField("immediate_response")


def test_body_reply_rewrites_model_to_the_providers_name_and_keeps_the_clients_cap(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        return (await admitted(rig, LEGAL))[3]

    reply = run(redis_url, policy, scenario)
    body = reply.request_body.response.body_mutation.body
    assert body.startswith(b'{"model":"o3"')  # model first: a later attempt rewrites the head
    assert json.loads(body) == {"model": "o3", "messages": MESSAGES, "max_tokens": 50}


def test_body_without_a_cap_gets_the_routes_default_output_cap(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        return (await admitted(rig, {"model": "legal_summary", "messages": MESSAGES}))[3]

    reply = run(redis_url, policy, scenario)
    body = json.loads(reply.request_body.response.body_mutation.body)
    assert body == {"model": "o3", "messages": MESSAGES, "max_completion_tokens": 1024}


def test_client_cap_above_the_honoured_one_is_lowered_to_it(redis_url: str, policy: Policy) -> None:
    request = {"model": "legal_summary", "messages": MESSAGES, "max_completion_tokens": 40, "max_tokens": 4000}

    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        return (await admitted(rig, request))[3]

    body = json.loads(run(redis_url, policy, scenario).request_body.response.body_mutation.body)
    assert (body["max_completion_tokens"], body["max_tokens"]) == (40, 40)


def test_body_reply_tells_envoy_the_cluster_the_provider_credential_and_to_drop_api_key(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        return (await admitted(rig, LEGAL))[3]

    md = dynamic_metadata(run(redis_url, policy, scenario))
    assert md["tollgate.apply"] == {
        "x-tollgate-cluster": "p3",
        "authorization": "Bearer sk-provider-three",
        "api-key": "",
        # p3: 2 s + 50 tokens / 10000 tokens/s = 2005 ms
        "x-envoy-upstream-rq-per-try-timeout-ms": "2005",
    }
    assert "tollgate.request" not in md  # one attempt: no chain for a later attempt to read


def test_provider_without_a_credential_gets_no_authorization(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        del rig.gw.provider_secrets["p3"]
        return (await admitted(rig, LEGAL))[3]

    md = dynamic_metadata(run(redis_url, policy, scenario))
    assert md["tollgate.apply"]["authorization"] == ""  # "" = removed: the client's key never goes on


def test_chained_route_goes_to_the_chain_cluster_and_notes_the_request_for_later_attempts(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> tuple[str, pb.ProcessingResponse]:
        _, customer, _, reply = await admitted(rig, {"model": "support_draft", "messages": MESSAGES, "max_tokens": 30},
                                                plan="starter", fund=0)
        return customer, reply

    customer, reply = run(redis_url, policy, scenario)
    md = dynamic_metadata(reply)
    apply = md["tollgate.apply"]
    assert apply["x-tollgate-cluster"] == "via_p1"
    assert apply["x-envoy-max-retries"] == "1"  # max_attempts 2
    note = md["tollgate.request"]
    assert {k: note[k] for k in ("route", "plan", "m1", "p1", "cap", "stream", "cust", "unhealthy")} == {
        "route": "support_draft", "plan": "starter", "m1": "low_cost_chat", "p1": "p1", "cap": 30.0, "stream": False,
        "cust": customer, "unhealthy": ""}


def test_chained_route_plans_the_switch_after_a_429_with_the_backup_providers_key(redis_url: str, policy: Policy) -> None:
    """The seed: a 429 switches to low_cost_chat_backup on p2 (planned for Envoy's Lua); a
    5xx retries p1 itself after a back-off, which only the processor does (not planned).
    p2's budget: timeout_s 2 + 30 tokens at the test catalog's 10,000 tokens/s = 2.003 s."""
    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        return (await admitted(rig, {"model": "support_draft", "messages": MESSAGES, "max_tokens": 30}, plan="starter", fund=0))[3]

    md = dynamic_metadata(run(redis_url, policy, scenario))
    plan = md["tollgate.plan"]
    assert set(plan) == {"m1", "p1", "t1", "old", "429"}
    assert (plan["m1"], plan["p1"], plan["old"]) == ("low_cost_chat", "p1", '{"model":"gpt-4o-mini"')
    step = dict(plan["429"])
    fast = step.pop("fast")
    assert step == {"target": "p2", "budget": "2003", "m": "low_cost_chat_backup", "p": "p2", "new": '{"model":"small-chat-v2"',
                    "rule": "on_rate_limit: switch_same_price_tier", "reason": "rate_limit"}
    # The credential goes apart (PRICE_LUA clears it once an answer comes).
    assert md["tollgate.plan_auth"] == {"429": "Bearer sk-provider-two"}
    # Should attempt 2 serve, Envoy prices it at $0.20 / $0.60 per Mtok, with these headers changed.
    assert (fast["pi_h"], fast["pi_l"], fast["po_h"], fast["po_l"]) == (0.0, 200_000.0, 0.0, 600_000.0)
    assert fast["h"] == {"x-tollgate-attempts": "2", "x-tollgate-provider": "p2", "x-tollgate-final-model": "low_cost_chat_backup",
                         "x-tollgate-fallback-reason": "rate_limit"}


def test_providers_with_an_open_circuit_are_noted_for_later_attempts(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> dict[str, Any]:
        for customer in ("c-one", "c-two"):  # p4's circuit opens after 2 failures from 2 customers
            await rig.gw.health.record_failure("p4", customer, "provider_5xx")
        await rig.gw.health.refresh()
        reply = (await admitted(rig, {"model": "support_draft", "messages": MESSAGES}, plan="starter", fund=0))[3]
        note: dict[str, Any] = dynamic_metadata(reply)["tollgate.request"]
        return note

    assert run(redis_url, policy, scenario)["unhealthy"] == "p4"


def test_stream_request_asks_for_the_usage_chunk_and_takes_the_stream_route(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        return (await admitted(rig, {**LEGAL, "stream": True}))[3]

    reply = run(redis_url, policy, scenario)
    body = json.loads(reply.request_body.response.body_mutation.body)
    assert body["stream_options"] == {"include_usage": True}
    assert dynamic_metadata(reply)["tollgate.apply"]["x-tollgate-cluster"] == "p3+stream"


def test_prepaid_balance_that_cannot_cover_the_cap_is_429_insufficient_quota(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> tuple[pb.ProcessingResponse, int, int]:
        _, customer, _, reply = await admitted(rig, LEGAL, fund=100)  # $0.0001; 50 o3 output tokens alone cost $0.0004
        return reply, await rig.balance(customer), await rig.reserved(customer)

    reply, balance, reserved = run(redis_url, policy, scenario)
    assert reply.immediate_response.status.code == 429
    err = immediate_json(reply)["error"]
    assert (err["code"], err["type"]) == ("insufficient_quota", "insufficient_quota")
    assert "only $0.000100 is left in the prepaid balance" in err["message"]
    assert "retry-after" not in set_headers(reply.immediate_response.headers)  # SPEC: no Retry-After
    assert (balance, reserved) == (100, 0)


def test_rate_limited_key_is_429_with_retry_after_rounded_up_to_whole_seconds(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        customer, secret = await rig.key("prepaid", rpm=1)
        await rig.fund(customer, 1_000_000)
        await phases.dispatch(Exchange(rig.gw), body_message(LEGAL, secret))
        await asyncio.sleep(0.005)  # the bucket refills a little: the wait is just under 60 s
        return await phases.dispatch(Exchange(rig.gw), body_message(LEGAL, secret))

    reply = run(redis_url, policy, scenario)
    assert reply.immediate_response.status.code == 429
    assert immediate_json(reply)["error"]["code"] == "rate_limit_exceeded"
    # 1 request a minute, used 5 ms ago: 59.995 s to wait, announced as 60 (never early)
    assert set_headers(reply.immediate_response.headers)["retry-after"] == "60"


def test_reservation_holds_money_until_the_answer_comes(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> int:
        _, customer, _, _ = await admitted(rig, LEGAL)
        return await rig.reserved(customer)

    assert run(redis_url, policy, scenario) > 0


# --- response headers: usage read by Envoy ----------------------------------------------------


USAGE = {"prompt_tokens": 1000.0, "completion_tokens": 50.0}
# o3: 1000 x $2.00/Mtok + 50 x $8.00/Mtok = 2000 + 400 micro-dollars
USAGE_COST_MICRO = 2400


def test_usage_in_metadata_sets_the_cost_header_to_the_hand_priced_cost(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        ex, *_ = await admitted(rig, LEGAL)
        return await phases.dispatch(ex, response_headers_message(200, usage=USAGE))

    reply = run(redis_url, policy, scenario)
    headers = set_headers(reply.response_headers.response.header_mutation)
    assert headers["x-tollgate-cost-usd"] == "0.002400"
    assert (headers["x-tollgate-route"], headers["x-tollgate-final-model"], headers["x-tollgate-provider"]) == (
        "legal_summary", "strong_reasoning", "p3")
    assert not reply.HasField("mode_override")  # the body passes untouched, unread


def test_usage_cost_rounds_up_to_a_whole_micro_dollar(redis_url: str, policy: Policy) -> None:
    request = {"model": "support_draft", "messages": MESSAGES, "max_tokens": 50}

    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        ex, *_ = await admitted(rig, request, plan="starter", fund=0)
        return await phases.dispatch(ex, response_headers_message(200, usage={"prompt_tokens": 1.0, "completion_tokens": 1.0}))

    reply = run(redis_url, policy, scenario)
    # low_cost_chat: 1 x 0.15 + 1 x 0.60 = 0.75 micro-dollars, billed as 1
    assert set_headers(reply.response_headers.response.header_mutation)["x-tollgate-cost-usd"] == "0.000001"


def test_usage_is_settled_into_balance_spend_and_one_record(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> tuple[int, int, int, list[dict[str, str]]]:
        ex, customer, rid, _ = await admitted(rig, LEGAL, fund=1_000_000)
        await phases.dispatch(ex, response_headers_message(200, usage=USAGE))
        return await rig.balance(customer), await rig.spend(customer), await rig.reserved(customer), await rig.records(rid)

    balance, spend, reserved, records = run(redis_url, policy, scenario)
    assert (balance, spend, reserved) == (1_000_000 - USAGE_COST_MICRO, USAGE_COST_MICRO, 0)
    assert len(records) == 1
    rec = records[0]
    assert (rec["cost_micro_usd"], rec["prompt_tokens"], rec["completion_tokens"], rec["status"], rec["usage_source"]) == (
        "2400", "1000", "50", "200", "provider")


def test_a_settled_request_is_not_settled_again_when_its_stream_closes(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> tuple[int, int, int]:
        ex, customer, rid, _ = await admitted(rig, LEGAL, fund=1_000_000)
        await phases.dispatch(ex, response_headers_message(200, usage=USAGE))
        await ex.close()  # what server.py does when Envoy resets the stream
        await phases.dispatch(ex, response_body_message(b"{}"))  # a stray body message
        return await rig.balance(customer), await rig.spend(customer), len(await rig.records(rid))

    assert run(redis_url, policy, scenario) == (1_000_000 - USAGE_COST_MICRO, USAGE_COST_MICRO, 1)


# A JSON answer over the 8 MiB buffer, metered as it passes (9 MiB of text, then its usage).
BIG_ANSWER = (b'{"choices":[{"message":{"content":"' + b"a" * (9 << 20)
              + b'"}}],"usage":{"prompt_tokens":1000,"completion_tokens":50}}')


async def _big_answer_closed_early(rig: Rig, sent: bytes, declared: int) -> dict[str, str]:
    ex, _, rid, _ = await admitted(rig, LEGAL, fund=1_000_000)
    await phases.dispatch(ex, response_headers_message(200, extra={"content-length": str(declared)}))
    await phases.dispatch(ex, response_body_message(sent, end_of_stream=False))
    await ex.close()  # the stream ended before Envoy passed on its end (the client closed)
    (rec,) = await rig.records(rid)
    return rec


def test_a_big_answer_whose_every_byte_went_out_is_recorded_as_served(redis_url: str, policy: Policy) -> None:
    """The client may close on the answer's last byte, before Envoy passes the end of the
    stream: it got the whole answer, so the record says 200 (not 499), billed from its usage."""
    rec = run(redis_url, policy, lambda rig: _big_answer_closed_early(rig, BIG_ANSWER, len(BIG_ANSWER)))
    assert (rec["status"], rec["cost_micro_usd"], rec["usage_source"]) == ("200", "2400", "provider")


def test_a_big_answer_cut_short_is_recorded_as_the_client_leaving(redis_url: str, policy: Policy) -> None:
    rec = run(redis_url, policy, lambda rig: _big_answer_closed_early(rig, BIG_ANSWER, len(BIG_ANSWER) + 1))
    assert (rec["status"], rec["cost_micro_usd"]) == ("499", "2400")


def test_a_settled_request_is_counted_once_in_the_request_metric(redis_url: str, policy: Policy) -> None:
    labels = {"route": "legal_summary", "primary_model": "strong_reasoning", "final_model": "strong_reasoning", "code": "200"}

    def count() -> float:
        return REGISTRY.get_sample_value("tollgate_requests_total", labels) or 0.0

    async def scenario(rig: Rig) -> float:
        ex, *_ = await admitted(rig, LEGAL)
        before = count()
        await phases.dispatch(ex, response_headers_message(200, usage=USAGE))
        await phases.dispatch(ex, response_body_message(b"{}"))  # a stray body message
        await ex.close()
        return count() - before

    assert run(redis_url, policy, scenario) == 1.0


def test_usage_beyond_the_cap_is_charged_in_full_and_flagged_overrun(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> tuple[int, list[dict[str, str]]]:
        ex, customer, rid, _ = await admitted(rig, LEGAL, fund=1_000_000)  # cap: 50 output tokens
        await phases.dispatch(ex, response_headers_message(200, usage={"prompt_tokens": 1000.0, "completion_tokens": 5000.0}))
        return await rig.balance(customer), await rig.records(rid)

    balance, records = run(redis_url, policy, scenario)
    # o3: 1000 x 2 + 5000 x 8 = 42000 micro-dollars
    assert balance == 1_000_000 - 42_000
    assert [(r["cost_micro_usd"], r["overrun"], r["output_cap"]) for r in records] == [("42000", "true", "50")]


def test_request_id_of_a_served_request_is_refused_409_when_sent_again(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> tuple[pb.ProcessingResponse, int]:
        customer, secret = await rig.key("prepaid")
        await rig.fund(customer, 1_000_000)
        body_reply = await phases.dispatch(Exchange(rig.gw), body_message(LEGAL, secret, request_id="req-once-1"))
        ex = answer_side(rig.gw, body_reply)
        assert ex is not None
        await phases.dispatch(ex, response_headers_message(200, usage=USAGE))
        again = await phases.dispatch(Exchange(rig.gw), body_message(LEGAL, secret, request_id="req-once-1"))
        return again, await rig.balance(customer)

    again, balance = run(redis_url, policy, scenario)
    assert again.immediate_response.status.code == 409
    assert immediate_json(again)["error"]["code"] == "duplicate_request"
    assert balance == 1_000_000 - USAGE_COST_MICRO  # charged once


def test_provider_sent_tollgate_headers_are_removed_from_the_answer(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        ex, *_ = await admitted(rig, LEGAL)
        forged = {"x-tollgate-cost-usd": "0.000000", "x-tollgate-customer": "someone-else"}
        return await phases.dispatch(ex, response_headers_message(200, usage=USAGE, extra=forged))

    mutation = run(redis_url, policy, scenario).response_headers.response.header_mutation
    assert {"x-tollgate-cost-usd", "x-tollgate-customer"} <= set(mutation.remove_headers)
    assert set_headers(mutation)["x-tollgate-cost-usd"] == "0.002400"


def test_answer_without_usage_metadata_asks_for_the_buffered_body(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        ex, *_ = await admitted(rig, LEGAL)  # of known size (a chunked one is metered as it passes)
        return await phases.dispatch(ex, response_headers_message(200, extra={"content-length": "100"}))

    reply = run(redis_url, policy, scenario)
    assert reply.mode_override.response_body_mode == pb.ProcessingMode.BUFFERED
    assert reply.mode_override.request_body_mode == pb.ProcessingMode.NONE
    assert "x-tollgate-cost-usd" not in set_headers(reply.response_headers.response.header_mutation)  # not yet known


def test_buffered_answer_with_usage_in_its_body_is_billed_from_it(redis_url: str, policy: Policy) -> None:
    answer = {"choices": [{"message": {"content": "ok"}}], "usage": {"prompt_tokens": 1000, "completion_tokens": 50}}

    async def scenario(rig: Rig) -> tuple[pb.ProcessingResponse, int]:
        ex, customer, _, _ = await admitted(rig, LEGAL, fund=1_000_000)
        await phases.dispatch(ex, response_headers_message(200, extra={"content-length": str(len(json.dumps(answer)))}))
        reply = await phases.dispatch(ex, response_body_message(json.dumps(answer).encode()))
        return reply, await rig.balance(customer)

    reply, balance = run(redis_url, policy, scenario)
    assert set_headers(reply.response_body.response.header_mutation)["x-tollgate-cost-usd"] == "0.002400"
    assert balance == 1_000_000 - USAGE_COST_MICRO


# --- streams -----------------------------------------------------------------------------------

CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"Hello"}}]}\n\n'
USAGE_CHUNK = b'data: {"choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":50}}\n\n'
DONE = b"data: [DONE]\n\n"


def test_event_stream_switches_the_body_to_streamed(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        ex, *_ = await admitted(rig, {**LEGAL, "stream": True})
        return await phases.dispatch(ex, response_headers_message(200, content_type="text/event-stream"))

    reply = run(redis_url, policy, scenario)
    assert reply.mode_override.response_body_mode == pb.ProcessingMode.STREAMED
    # the body will change length (the usage chunk goes), so its length header cannot stay
    assert "content-length" in reply.response_headers.response.header_mutation.remove_headers


def test_usage_chunk_is_stripped_when_the_client_did_not_ask_for_it(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> list[pb.ProcessingResponse]:
        ex, *_ = await admitted(rig, {**LEGAL, "stream": True})
        await phases.dispatch(ex, response_headers_message(200, content_type="text/event-stream"))
        first = await phases.dispatch(ex, response_body_message(CHUNK, end_of_stream=False))
        last = await phases.dispatch(ex, response_body_message(USAGE_CHUNK + DONE))
        return [first, last]

    first, last = run(redis_url, policy, scenario)
    assert not first.response_body.response.HasField("body_mutation")  # unchanged chunks pass as they are
    assert last.response_body.response.body_mutation.body == DONE


def test_usage_chunk_is_kept_when_the_client_asked_for_it(redis_url: str, policy: Policy) -> None:
    request = {**LEGAL, "stream": True, "stream_options": {"include_usage": True}}

    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        ex, *_ = await admitted(rig, request)
        await phases.dispatch(ex, response_headers_message(200, content_type="text/event-stream"))
        return await phases.dispatch(ex, response_body_message(USAGE_CHUNK + DONE))

    assert not run(redis_url, policy, scenario).response_body.response.HasField("body_mutation")


def test_stream_is_settled_from_its_usage_chunk_when_it_ends(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> tuple[int, int]:
        ex, customer, _, _ = await admitted(rig, {**LEGAL, "stream": True}, fund=1_000_000)
        await phases.dispatch(ex, response_headers_message(200, content_type="text/event-stream"))
        await phases.dispatch(ex, response_body_message(CHUNK, end_of_stream=False))
        mid = await rig.balance(customer)
        await phases.dispatch(ex, response_body_message(USAGE_CHUNK + DONE))
        return mid, await rig.balance(customer)

    mid, end = run(redis_url, policy, scenario)
    assert mid == 1_000_000  # nothing charged while it flows (only reserved)
    assert end == 1_000_000 - USAGE_COST_MICRO


# --- failed answers ----------------------------------------------------------------------------


def test_provider_500_on_a_fail_closed_route_is_rewritten_as_502_upstream_unavailable(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> tuple[pb.ProcessingResponse, pb.ProcessingResponse]:
        ex, *_ = await admitted(rig, LEGAL)
        headers = await phases.dispatch(ex, response_headers_message(500))
        body = await phases.dispatch(ex, response_body_message(b'{"error":"boom"}'))
        return headers, body

    headers, body = run(redis_url, policy, scenario)
    assert headers.mode_override.response_body_mode == pb.ProcessingMode.BUFFERED  # the body is replaced
    common = body.response_body.response
    assert json.loads(common.body_mutation.body) == {"error": {
        "message": "No provider could serve the request after 1 attempt(s) (provider_5xx).", "type": "server_error",
        "param": None, "code": "upstream_unavailable"}}
    h = set_headers(common.header_mutation)
    assert (h[":status"], h["content-type"], h["x-tollgate-cost-usd"]) == ("502", "application/json", "0.000000")
    assert h["content-length"] == str(len(common.body_mutation.body))


def test_provider_500_releases_the_reservation_and_records_the_502(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> tuple[int, int, int, list[dict[str, str]]]:
        ex, customer, rid, _ = await admitted(rig, LEGAL, fund=1_000_000)
        await phases.dispatch(ex, response_headers_message(500))
        await phases.dispatch(ex, response_body_message(b'{"error":"boom"}'))
        return await rig.balance(customer), await rig.spend(customer), await rig.reserved(customer), await rig.records(rid)

    balance, spend, reserved, records = run(redis_url, policy, scenario)
    assert (balance, spend, reserved) == (1_000_000, 0, 0)
    assert [(r["status"], r["cost_micro_usd"]) for r in records] == [("502", "0")]


def test_provider_4xx_is_passed_on_unbilled_without_rewriting(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> tuple[pb.ProcessingResponse, int]:
        ex, customer, _, _ = await admitted(rig, LEGAL, fund=1_000_000)
        reply = await phases.dispatch(ex, response_headers_message(400, usage=None))
        return reply, await rig.balance(customer)

    reply, balance = run(redis_url, policy, scenario)
    h = set_headers(reply.response_headers.response.header_mutation)
    assert h["x-tollgate-cost-usd"] == "0.000000" and ":status" not in h
    assert balance == 1_000_000


def test_envoys_own_503_without_a_provider_answer_is_rewritten_as_a_502_connect_failure(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        ex, *_ = await admitted(rig, LEGAL)
        msg = response_headers_message(503, content_type="text/plain", end_of_stream=True)
        del msg.response_headers.headers.headers[2]  # no x-envoy-upstream-service-time: Envoy's local reply
        return await phases.dispatch(ex, msg)

    reply = run(redis_url, policy, scenario)
    common = reply.response_headers.response
    assert common.status == pb.CommonResponse.CONTINUE_AND_REPLACE
    # No provider answered (Envoy could not connect): the attempt ended in connect_failure,
    # which SPEC's upstream_unavailable answers with 502.
    assert json.loads(common.body_mutation.body)["error"] == {
        "message": "No provider could serve the request after 1 attempt(s) (connect_failure).", "type": "server_error",
        "param": None, "code": "upstream_unavailable"}
    assert set_headers(common.header_mutation)[":status"] == "502"


# --- the end of a fallback chain -------------------------------------------------------------

SWITCH = {"model": "switch_all", "messages": MESSAGES, "max_tokens": 30}
# What the per-attempt processor left in tollgate.attempts when attempt 2 went to p2.
SWITCHED = {"1": {"m": "low_cost_chat", "p": "p1", "t": 1.0, "o": "provider_5xx", "s": 500.0},
            "2": {"m": "low_cost_chat_backup", "p": "p2", "t": 2.0, "rule": "on_provider_5xx: switch_same_price_tier",
                  "reason": "provider_5xx"}}


def test_answer_of_a_later_attempt_is_priced_and_attributed_to_the_model_that_served(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> tuple[pb.ProcessingResponse, list[dict[str, str]]]:
        ex, _, rid, _ = await admitted(rig, SWITCH, plan="starter_down", fund=0)
        reply = await phases.dispatch(ex, response_headers_message(200, usage=USAGE, metadata={"tollgate.attempts": SWITCHED}))
        return reply, await rig.records(rid)

    reply, records = run(redis_url, policy, scenario)
    h = set_headers(reply.response_headers.response.header_mutation)
    # low_cost_chat_backup: 1000 x 0.20 + 50 x 0.60 = 200 + 30 micro-dollars
    assert h["x-tollgate-cost-usd"] == "0.000230"
    assert (h["x-tollgate-final-model"], h["x-tollgate-provider"], h["x-tollgate-attempts"], h["x-tollgate-fallback-reason"]) == (
        "low_cost_chat_backup", "p2", "2", "provider_5xx")
    assert [(r["kind"], r["fallback_cost_micro_usd"], r["final_model"]) for r in records] == [("fallback", "230", "low_cost_chat_backup")]


def test_chain_stopped_by_policy_passes_its_error_on_unbilled_with_reason_policy(redis_url: str, policy: Policy) -> None:
    stop = {"1": {"m": "low_cost_chat", "p": "p1", "t": 1.0, "o": "provider_5xx", "s": 500.0},
            "stop": {"reason": "policy", "rule": "on_provider_5xx: switch_same_price_tier, not allowed by plan x"}}

    async def scenario(rig: Rig) -> tuple[pb.ProcessingResponse, int]:
        ex, customer, _, _ = await admitted(rig, SWITCH, plan="starter_down", fund=0)
        msg = response_headers_message(502, metadata={"tollgate.attempts": stop}, extra={"x-tollgate-stop-reason": "policy"})
        return await phases.dispatch(ex, msg), await rig.spend(customer)

    reply, spend = run(redis_url, policy, scenario)
    mutation = reply.response_headers.response.header_mutation
    h = set_headers(mutation)
    assert (h["x-tollgate-fallback-reason"], h["x-tollgate-cost-usd"], h["x-tollgate-attempts"]) == ("policy", "0.000000", "1")
    assert "x-tollgate-stop-reason" in mutation.remove_headers  # internal: never shown to the client
    assert ":status" not in h and not reply.HasField("mode_override")  # the upstream processor's error goes on as it is
    assert spend == 0


# --- the model list (the one request that sends its headers) -----------------------------------


def test_get_models_is_answered_from_the_headers_phase_with_the_keys_routes(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> pb.ProcessingResponse:
        _, secret = await rig.key("embeddings_only")
        headers = {":path": "/v1/models", ":method": "GET", "authorization": f"Bearer {secret}", "x-request-id": "r-models-1"}
        msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders(
            headers=pb.HeaderMap(headers=[pb.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]),
            end_of_stream=True))
        return await phases.dispatch(Exchange(rig.gw), msg)

    reply = run(redis_url, policy, scenario)
    assert reply.immediate_response.status.code == 200
    listed = immediate_json(reply)
    assert [m["id"] for m in listed["data"]] == ["embeddings"]
