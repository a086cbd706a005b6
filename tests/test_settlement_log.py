"""Settlement from Envoy's access log, in-process: the entries Envoy sends, money in a real Redis.

A plain answer is priced by Envoy's Lua and settled by the processor from the access-log entry
(`settlement_log.settle_entry`). Each test admits a request through the downstream processor's
body phase, builds the entry Envoy would log from the metadata that phase left (plus what
json_to_metadata and the Lua add), and checks the money and the record. Prices by hand from the
catalog (tests/conftest.py): strong_reasoning (route legal_summary) $2.00 / $8.00 per Mtok.
"""

from __future__ import annotations

from typing import Any

import pytest

from extproc.accesslog import LogEntry
from extproc.downstream import Exchange
from extproc.policy import Policy
from extproc.settlement_log import settle_entry
from tests.inproc import Rig, body_message, dynamic_metadata, request_id_of, run, write_test_policy

MESSAGES = [{"role": "user", "content": "Summarise the contract."}]
LEGAL = {"model": "legal_summary", "messages": MESSAGES, "max_tokens": 50}
FUNDS = 1_000_000
# 1000 x $2.00/Mtok + 50 x $8.00/Mtok = 2000 + 400 micro-dollars
USAGE = {"prompt_tokens": 1000.0, "completion_tokens": 50.0}
COST = 2400


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    return write_test_policy(tmp_path_factory.mktemp("settlement-log-policy"))


def entry(request_id: str, metadata: dict[str, dict[str, Any]], code: int = 200) -> LogEntry:
    return LogEntry(request_id=request_id, path="/v1/chat/completions", response_code=code, response_code_details="via_upstream",
                    request_body_bytes=100, response_body_bytes=300, attempt_count=1, downstream_reset=False,
                    flags=frozenset(), route_name="provider:p3", start_time_us=0, duration_us=5000, metadata=metadata)


async def admitted(rig: Rig) -> tuple[str, str, dict[str, dict[str, Any]]]:
    """A funded prepaid customer's request through its body phase: (customer, request id,
    the dynamic metadata the body reply left, as Envoy logs it)."""
    customer, secret = await rig.key("prepaid")
    await rig.fund(customer, FUNDS)
    msg = body_message(LEGAL, secret)
    reply = await Exchange(rig.gw).on_request_body(msg)
    return customer, request_id_of(msg), dynamic_metadata(reply)


def priced(md: dict[str, dict[str, Any]], cost: float = float(COST)) -> dict[str, dict[str, Any]]:
    """The metadata after json_to_metadata read USAGE and Envoy's Lua priced it."""
    return {**md, "tollgate.usage": dict(USAGE), "tollgate.fast": {**md["tollgate.fast"], "cost": cost}}


async def money(rig: Rig, customer: str, rid: str) -> tuple[int, int, int, list[dict[str, str]]]:
    return await rig.balance(customer), await rig.spend(customer), await rig.reserved(customer), await rig.records(rid)


def test_a_priced_entry_settles_balance_spend_and_one_record(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> tuple[int, int, int, list[dict[str, str]]]:
        customer, rid, md = await admitted(rig)
        await settle_entry(rig.gw, entry(rid, priced(md)))
        return await money(rig, customer, rid)

    balance, spend, reserved, records = run(redis_url, policy, scenario)
    assert (balance, spend, reserved) == (FUNDS - COST, COST, 0)
    (rec,) = records
    assert (rec["cost_micro_usd"], rec["prompt_tokens"], rec["completion_tokens"], rec["status"], rec["attempts"]) == (
        "2400", "1000", "50", "200", "1")
    assert (rec["final_model"], rec["provider"], rec["usage_source"], rec["kind"]) == ("strong_reasoning", "p3", "provider", "normal")
    assert rec["latency_ms"] == "5"  # the entry's duration (5,000 µs), not the time until it came


def test_an_entry_delivered_twice_is_settled_once(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> tuple[int, int, int, list[dict[str, str]]]:
        customer, rid, md = await admitted(rig)
        await settle_entry(rig.gw, entry(rid, priced(md)))
        await settle_entry(rig.gw, entry(rid, priced(md)))
        return await money(rig, customer, rid)

    balance, spend, reserved, records = run(redis_url, policy, scenario)
    assert (balance, spend, reserved, len(records)) == (FUNDS - COST, COST, 0, 1)


def test_two_deliveries_at_once_are_settled_once(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> tuple[int, int, int, list[dict[str, str]]]:
        import asyncio

        customer, rid, md = await admitted(rig)
        await asyncio.gather(settle_entry(rig.gw, entry(rid, priced(md))), settle_entry(rig.gw, entry(rid, priced(md))))
        return await money(rig, customer, rid)

    balance, spend, reserved, records = run(redis_url, policy, scenario)
    assert (balance, spend, reserved, len(records)) == (FUNDS - COST, COST, 0, 1)


def test_an_answer_handed_to_the_answer_processor_is_left_to_it(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> tuple[int, int, int, list[dict[str, str]]]:
        customer, rid, md = await admitted(rig)
        handed = {**md, "tollgate.fast": {**md["tollgate.fast"], "b": 1.0}}
        await settle_entry(rig.gw, entry(rid, handed, code=502))
        return await money(rig, customer, rid)

    balance, spend, reserved, records = run(redis_url, policy, scenario)
    assert (balance, spend, len(records)) == (FUNDS, 0, 0)
    assert reserved > 0  # still the answer processor's (or, if it died, the reaper's)


def test_a_request_whose_answer_never_reached_the_lua_is_released_as_the_client_leaving(redis_url: str, policy: Policy) -> None:
    """The client went away before the answer's headers: nothing was priced or handed over."""
    async def scenario(rig: Rig) -> tuple[int, int, int, list[dict[str, str]]]:
        customer, rid, md = await admitted(rig)
        await settle_entry(rig.gw, entry(rid, md, code=0))
        return await money(rig, customer, rid)

    balance, spend, reserved, records = run(redis_url, policy, scenario)
    assert (balance, spend, reserved) == (FUNDS, 0, 0)
    (rec,) = records
    assert (rec["status"], rec["cost_micro_usd"]) == ("499", "0")


def test_a_200_with_usage_the_lua_did_not_price_is_billed_from_its_usage(redis_url: str, policy: Policy) -> None:
    """Should Envoy's pricing Lua fail, the client still got a 200 whose usage Envoy read: it
    is billed, never settled as free."""
    async def scenario(rig: Rig) -> tuple[int, int, int, list[dict[str, str]]]:
        customer, rid, md = await admitted(rig)
        await settle_entry(rig.gw, entry(rid, {**md, "tollgate.usage": dict(USAGE)}, code=200))
        return await money(rig, customer, rid)

    balance, spend, reserved, records = run(redis_url, policy, scenario)
    assert (balance, spend, reserved) == (FUNDS - COST, COST, 0)
    assert [r["status"] for r in records] == ["200"]


def test_an_entry_without_a_snapshot_is_not_the_settlements(redis_url: str, policy: Policy) -> None:
    async def scenario(rig: Rig) -> tuple[int, int, int, list[dict[str, str]]]:
        customer, rid, md = await admitted(rig)
        await settle_entry(rig.gw, entry(rid, {k: v for k, v in priced(md).items() if k != "tollgate.exchange"}))
        return await money(rig, customer, rid)

    balance, spend, reserved, records = run(redis_url, policy, scenario)
    assert (balance, spend, len(records)) == (FUNDS, 0, 0)
    assert reserved > 0


def test_the_body_reply_gives_envoy_the_targets_prices_split_at_a_million(redis_url: str, policy: Policy) -> None:
    """What PRICE_LUA computes with: $2.00 = 2,000,000 and $8.00 = 8,000,000 micro-USD per Mtok."""
    async def scenario(rig: Rig) -> dict[str, Any]:
        _, _, md = await admitted(rig)
        fast: dict[str, Any] = md["tollgate.fast"]
        return fast

    fast = run(redis_url, policy, scenario)
    assert (fast["pi_h"], fast["pi_l"], fast["po_h"], fast["po_l"], fast["gen"]) == (2.0, 0.0, 8.0, 0.0, 1.0)
    assert (fast["h"]["x-tollgate-final-model"], fast["h"]["x-tollgate-provider"], fast["h"]["x-tollgate-attempts"]) == (
        "strong_reasoning", "p3", "1")
