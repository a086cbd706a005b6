"""Provider health (issue 10): circuits open on a failure rate from several customers, never
for one tenant's own failures or oversized requests; an open circuit follows the failure that
opened it; half-open probes close it again. Real Envoy, processor (two workers), Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.fakeprovider import FakeProvider, Reply
from tests.conftest import SEED, Stack, running_stack
from tests.test_fallback import Result, call, record

PRICE = {"input_per_mtok_usd": 0.15, "output_per_mtok_usd": 0.60}


def health_catalog(fakes: dict[str, FakeProvider]) -> dict[str, Any]:
    """Providers with real circuits. Several providers may share one fake (one circuit each)."""
    def provider(fake: str, **circuit: Any) -> dict[str, Any]:
        return {"address": fakes[fake].address, "tls": False, "timeout_s": 1, "tokens_per_s": 1000,
                "circuit": {"window_s": 30, "cooldown_s": 3, **circuit}}

    models = {
        "low_cost_chat": {"provider": "seed_primary", "upstream_model": "gpt-4o-mini", "tier": "low", "price": PRICE},
        "low_cost_chat_backup": {"provider": "seed_backup", "upstream_model": "small-chat-v2", "tier": "low", "price": PRICE},
    }
    routes = []
    for name in ("sized", "tenant", "rated"):
        models[f"{name}_chat"] = {"provider": name, "upstream_model": f"{name}-1", "tier": "standard", "price": PRICE}
        routes.append({"route": name, "primary_model": f"{name}_chat", "fallback": {"max_attempts": 1}})
    return {
        "providers": {
            "seed_primary": provider("p1", failures=4, customers=2),
            "seed_backup": provider("p2", failures=100000),
            "sized": provider("p3", failures=2, customers=2),
            "tenant": provider("p3", failures=2, customers=2),
            "rated": provider("p4", failures=2, customers=2, failure_rate=0.5),
        },
        "models": models,
        "plans": {"starter": {"routes": "*", "requests_per_minute": 100000}},
        "routes": routes,
    }


@pytest.fixture(scope="module")
def hstack(fakes: dict[str, FakeProvider], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    policy_dir: Path = tmp_path_factory.mktemp("health-policy")
    (policy_dir / "00-catalog.yaml").write_text(yaml.safe_dump(health_catalog(fakes), sort_keys=False))
    (policy_dir / "10-support_draft.yaml").write_text(SEED.read_text())  # the seed template, verbatim
    with running_stack(fakes, policy_dir, workers=2, name="health") as s:
        yield s


def keys(stack: Stack, customer: str, n: int) -> list[str]:
    return [stack.create_key(f"{customer}-{i}", plan="starter")[1] for i in range(n)]


def test_seed_template_serves_a_sustained_5xx_outage_from_the_same_tier(hstack: Stack, customer: str) -> None:
    a, b = keys(hstack, customer, 2)
    hstack.fakes["p1"].default = Reply(status=500)
    results: list[tuple[float, Result]] = []
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        results.append((time.monotonic(), call(hstack, (a, b)[len(results) % 2], "support_draft")))
        time.sleep(0.1)
    # A gateway overloaded by a busy test machine may fail closed (503 quota_unavailable): not
    # what this test is about, so such answers are left out.
    results = [(t, r) for t, r in results if not (r.status == 503 and r.body["error"]["code"] == "quota_unavailable")]
    statuses = [r.status for _, r in results]
    assert set(statuses) == {502, 200}
    opened_at = next(t for t, r in results if r.status == 200)
    # Two customers' failed requests (2 attempts each) reach failures 4 and open the circuit;
    # the other worker learns it within a second: a few failed requests, then none.
    assert statuses.count(502) <= 14
    later = [r.status for t, r in results if t > opened_at + 1.2]
    assert len(later) >= 10 and set(later) == {200}
    served = next(r for t, r in results if t > opened_at + 1.2 and r.headers["x-tollgate-attempts"] == "1")
    assert served.headers["x-tollgate-final-model"] == "low_cost_chat_backup"
    assert (served.headers["x-tollgate-fallback-reason"], served.headers["x-tollgate-attempts"]) == ("provider_unhealthy", "1")
    rec = record(hstack, served.request_id)
    assert [(x["model"], x["reason"]) for x in rec["attempt_list"]] == [("low_cost_chat", "provider_unhealthy"),
                                                                        ("low_cost_chat_backup", "ok")]
    assert "follows on_provider_5xx: retry_once_then_switch_same_price_tier" in rec["rule"]
    # Open, or half-open after the 3 s cooldown: the failing provider sees at most one probe
    # a second per worker, and a failed probe is not retried on it (the request switches).
    calls = hstack.fakes["p1"].calls()
    assert [call(hstack, (a, b)[i % 2], "support_draft").status for i in range(10)] == [200] * 10
    assert hstack.fakes["p1"].calls() - calls <= 2
    # After the cooldown (3 s) a probe finds it healthy again and it serves once more.
    hstack.fakes["p1"].default = Reply()
    time.sleep(4)
    finals = []
    for _ in range(8):
        time.sleep(0.3)
        finals.append(call(hstack, a, "support_draft").headers["x-tollgate-final-model"])
    assert finals[-3:] == ["low_cost_chat"] * 3


def test_one_customers_failures_alone_never_open_a_circuit(hstack: Stack, customer: str) -> None:
    (noisy,), (other,) = keys(hstack, customer + "-noisy", 1), keys(hstack, customer + "-other", 1)
    hstack.fakes["p3"].default = Reply(status=500)
    for _ in range(6):  # three times the circuit's failure threshold, all from one customer
        assert call(hstack, noisy, "tenant").status == 502
    time.sleep(1.3)  # every worker has refreshed the circuits
    hstack.fakes["p3"].default = Reply()
    res = call(hstack, other, "tenant")
    assert res.status == 200 and res.headers["x-tollgate-fallback-reason"] == "none"


def test_timeouts_of_requests_whose_size_explains_them_are_not_provider_failures(hstack: Stack, customer: str) -> None:
    first, second, third = keys(hstack, customer, 3)
    # 'sized': timeout_s 1, tokens_per_s 1000: max_tokens 4000 needs 4 s just to generate, so the
    # attempt's budget is 5 s; the provider takes 6 s: a timeout the request's size explains.
    hstack.fakes["p3"].default = Reply(delay_s=6)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda s: call(hstack, s, "sized", max_tokens=4000).status, [first, second, first, second]))
    assert got == [504] * 4  # two customers, four timeouts: would open the circuit if they counted
    time.sleep(1.3)
    hstack.fakes["p3"].default = Reply()
    res = call(hstack, third, "sized", max_tokens=10)
    assert res.status == 200 and res.headers["x-tollgate-fallback-reason"] == "none"


def test_a_low_failure_rate_does_not_open_a_circuit_and_a_high_one_does(hstack: Stack, customer: str) -> None:
    a, b, c = keys(hstack, customer, 3)
    for _ in range(6):
        assert call(hstack, a, "rated").status == 200
    time.sleep(1.3)  # successes reach Redis with each worker's next refresh
    hstack.fakes["p4"].script(Reply(status=500), Reply(status=500))
    assert [call(hstack, s, "rated").status for s in (a, b)] == [502, 502]  # 2 of 8 failed: 25% < 50%
    time.sleep(1.3)
    assert call(hstack, c, "rated").status == 200 and hstack.fakes["p4"].calls() == 9
    hstack.fakes["p4"].default = Reply(status=500)
    for s in (a, b, a, b, a, b):  # now 8 of 15 failed, from two customers
        call(hstack, s, "rated")
    time.sleep(1.3)
    res = call(hstack, c, "rated")
    assert res.status == 503 and res.headers["x-tollgate-fallback-reason"] == "provider_unhealthy"
