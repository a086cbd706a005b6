"""Running it like production (issue 5): health probes, policy hot reload, graceful stop."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import openai
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openai.types.chat import ChatCompletionMessageParam

from extproc.fakeprovider import FakeProvider, Reply
from tests.conftest import Stack, running_stack
from tests.test_quota import money, records_of

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


def metrics_text(stack: Stack) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.processor.metrics_port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def test_processor_serves_the_standard_grpc_health_service(stack: Stack) -> None:
    for endpoint in stack.processor.endpoints:
        with grpc.insecure_channel(f"{endpoint.host}:{endpoint.port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_policy_file_change_reloads_without_restart_and_invalid_change_keeps_the_last_good(
        fakes: dict[str, FakeProvider], policy_dir: Path, customer: str, tmp_path: Path) -> None:
    live = tmp_path / "policy"
    shutil.copytree(policy_dir, live)
    route_file = live / "10-support_draft.yaml"
    with running_stack(fakes, live, workers=2, name="reload") as s:
        _, secret = s.create_key(customer)
        client = s.client(secret)

        def final_model() -> str:
            raw = client.chat.completions.with_raw_response.create(model="support_draft", messages=MESSAGES)
            return str(raw.headers["x-tollgate-final-model"])

        assert final_model() == "low_cost_chat"
        route_file.write_text(route_file.read_text().replace("primary_model: low_cost_chat", "primary_model: low_cost_chat_backup"))
        deadline = time.monotonic() + 10
        while not all(final_model() == "low_cost_chat_backup" for _ in range(4)):  # both workers
            assert time.monotonic() < deadline, "the new policy was not picked up"
            time.sleep(0.3)
        route_file.write_text("route: support_draft\nprimary_model: [broken\n")
        deadline = time.monotonic() + 10
        while 'tollgate_policy_reloads_total{result="invalid"}' not in metrics_text(s):
            assert time.monotonic() < deadline, "the invalid policy was not noticed"
            time.sleep(0.3)
        assert [final_model() for _ in range(4)] == ["low_cost_chat_backup"] * 4  # the last good policy serves
        assert s.processor.proc is not None and s.processor.proc.poll() is None
        log = Path(s.processor.log_path or "").read_text()
        assert "policy reload rejected, keeping the last good policy" in log and "10-support_draft.yaml:" in log


def test_sighup_reloads_the_policy(fakes: dict[str, FakeProvider], policy_dir: Path, customer: str, tmp_path: Path) -> None:
    live = tmp_path / "policy"
    shutil.copytree(policy_dir, live)
    with running_stack(fakes, live, workers=1, name="sighup") as s:
        assert s.processor.proc is not None
        s.processor.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while 'tollgate_policy_reloads_total{result="ok"}' not in metrics_text(s):
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_sigterm_lets_requests_in_flight_complete_and_leaves_nothing_reserved(
        fakes: dict[str, FakeProvider], policy_dir: Path, customer: str) -> None:
    with running_stack(fakes, policy_dir, workers=2, name="sigterm") as s:
        _, secret = s.create_key(customer)
        client = s.client(secret)
        fakes["p3"].default = Reply(delay_s=1.5)
        results: list[int] = []

        def one() -> None:
            try:
                client.chat.completions.create(model="legal_summary", messages=MESSAGES)
                results.append(200)
            except openai.APIStatusError as exc:
                results.append(exc.status_code)

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while fakes["p3"].calls() < 6:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert s.processor.proc is not None
        s.processor.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        assert results == [200] * 6
        assert s.processor.proc.wait(timeout=30) == 0
        m = money(s, customer)
        assert m["reserved"] == 0 and m["spend"] > 0
        assert len(records_of(s, customer)) == 6
        assert all(json.loads(json.dumps(r))["status"] == "200" for r in records_of(s, customer))
        # With the processor gone, the gateway fails closed: nothing reaches a provider.
        before = fakes["p3"].calls()
        try:
            client.chat.completions.create(model="legal_summary", messages=MESSAGES)
            raise AssertionError("served without a processor")
        except openai.APIStatusError as exc:
            assert exc.status_code == 503
            assert exc.response.json()["error"]["code"] == "quota_unavailable"
        assert fakes["p3"].calls() == before
