"""Prometheus for real (issue 5): Debian's prometheus scrapes a running stack; PromQL answers
about fallbacks, spend and quota rejections match the usage records of the same traffic."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam

from extproc.devstack import free_port, wait_for_port
from extproc.fakeprovider import FakeProvider, Reply
from tests.conftest import Stack, running_stack

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian prometheus not installed")
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


@contextmanager
def prometheus(stack: Stack) -> Iterator[str]:
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="tollgate-prom-"))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "tollgate", "static_configs": [{"targets": [f"127.0.0.1:{stack.processor.metrics_port}"]}]},
            {"job_name": "envoy", "metrics_path": "/stats/prometheus",
             "static_configs": [{"targets": [f"127.0.0.1:{stack.envoy.admin_port}"]}]},
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(["prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=open(workdir / "prometheus.log", "wb"))  # noqa: SIM115
    try:
        wait_for_port(port, proc=proc, timeout_s=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def query(prom: str, promql: str) -> dict[str, float]:
    """Instant query -> {label values joined by ',': value}."""
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as r:
        data = json.loads(r.read())
    assert data["status"] == "success", data
    return {",".join(v for k, v in sorted(s["metric"].items())): float(s["value"][1]) for s in data["data"]["result"]}


def wait_for(prom: str, promql: str, want: dict[str, float], timeout_s: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        got = query(prom, promql)
        if got == want:
            return got
        assert time.monotonic() < deadline, f"{promql}: {got} != {want}"
        time.sleep(0.5)


def records(stack: Stack) -> list[dict[str, Any]]:
    out = []
    for _, fields in stack.redis_sync().xrange("tollgate:usage"):
        rec = {k.decode(): v.decode() for k, v in fields.items()}
        rec["attempt_list"] = json.loads(rec["attempt_list"])
        out.append(rec)
    return out


def test_promql_answers_match_the_usage_records(fakes: dict[str, FakeProvider], policy_dir: Path, customer: str) -> None:
    with running_stack(fakes, policy_dir, workers=2, name="prometheus") as s, prometheus(s) as prom:
        _, secret = s.create_key(customer)
        _, broke = s.create_key(f"{customer}-broke", plan="tiny_budget")
        client = s.client(secret)

        def batch(rate_limited: int, failing: int, normal: int, refused: int) -> None:
            fakes["p1"].script(*([Reply(status=429)] * rate_limited))
            for _ in range(rate_limited):
                client.chat.completions.create(model="support_draft", messages=MESSAGES)
            for _ in range(failing):
                fakes["p1"].script(Reply(status=500))
                client.chat.completions.create(model="support_draft", messages=MESSAGES)
            for _ in range(normal):
                client.chat.completions.create(model="support_draft", messages=MESSAGES)
            for _ in range(refused):
                with pytest.raises(openai.RateLimitError):
                    s.client(broke).chat.completions.create(model="support_draft", messages=MESSAGES)

        # Two batches with a scrape between them, so rates see an increase.
        batch(rate_limited=2, failing=1, normal=2, refused=1)
        wait_for(prom, "sum by (reason) (tollgate_fallbacks_total)", {"rate_limit": 2})
        batch(rate_limited=2, failing=1, normal=3, refused=2)

        recs = records(s)
        assert len(recs) == 11  # 4 fallbacks + 2 retries + 5 normal; refusals have no record
        # Model changes and same-model retries by reason, from the records' attempt lists
        want_fallbacks: Counter[str] = Counter()
        want_retries: Counter[str] = Counter()
        for r in recs:
            for a, b in itertools.pairwise(r["attempt_list"]):
                (want_fallbacks if a["model"] != b["model"] else want_retries)[a["reason"]] += 1
        wait_for(prom, "sum by (reason) (tollgate_fallbacks_total)", dict(want_fallbacks))
        wait_for(prom, "sum by (reason) (tollgate_retries_total)", dict(want_retries))
        assert (dict(want_fallbacks), dict(want_retries)) == ({"rate_limit": 4}, {"provider_5xx": 2})

        # Fallback and retry rates by reason over the last minute
        rates = query(prom, "sum by (reason) (rate(tollgate_fallbacks_total[1m]))")
        assert rates["rate_limit"] > 0 and "provider_5xx" not in rates
        assert query(prom, "sum by (reason) (rate(tollgate_retries_total[1m]))")["provider_5xx"] > 0

        # Spend by route and kind, in USD, equals the records' micro-dollars
        want_spend: Counter[str] = Counter()
        for r in recs:
            kind = "retry" if int(r["retry_cost_micro_usd"]) else "fallback" if int(r["fallback_cost_micro_usd"]) else "normal"
            want_spend[f"{kind},{r['route']}"] += int(r["cost_micro_usd"])
        spend = query(prom, "sum by (route, kind) (tollgate_spend_usd_total)")
        assert set(spend) == set(want_spend) == {"normal,support_draft", "retry,support_draft", "fallback,support_draft"}
        for k, micro in want_spend.items():
            assert spend[k] == pytest.approx(micro / 1e6, rel=1e-9)

        # Quota rejections: every refused request, none of which reached a provider
        wait_for(prom, "sum by (reason) (tollgate_quota_rejections_total)", {"budget": 3})

        # Envoy's own stats are scraped too (the processor-errors alert reads them)
        deadline = time.monotonic() + 30
        while query(prom, 'sum(envoy_http_ext_proc_streams_started{envoy_http_conn_manager_prefix="tollgate"})').get("", 0) < 14:
            assert time.monotonic() < deadline, "Envoy's ext_proc stats were not scraped"
            time.sleep(0.5)
        assert query(prom, 'sum(envoy_http_ext_proc_streams_failed{envoy_http_conn_manager_prefix="tollgate"})') == {"": 0.0}
