"""Many long requests at once (issue 10): concurrent slow streams (each >= 10 s) through one
Envoy and one processor process: no Envoy overflow, no ext_proc stream errors, every stream
complete, bounded processor memory. Figures are printed (`pytest -s`).

`make test` runs it with 500 streams (bounded: about 30 s); `make load` runs the full 2,000
(TOLLGATE_LOAD_STREAMS), too heavy for a shared 2-core CI machine: the test's own client and
provider share the cores with Envoy, Redis and the processor."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx  # the openai SDK's HTTP client (a dependency already)
import pytest
import yaml

from tests.conftest import Stack, running_stack

STREAMS = int(os.environ.get("TOLLGATE_LOAD_STREAMS", "500"))
EVENTS = 2  # content events, GAP_S apart
GAP_S = float(os.environ.get("TOLLGATE_LOAD_GAP_S", "10"))
RAMP_S = float(os.environ.get("TOLLGATE_LOAD_RAMP_S", "6"))  # starts spread over this time: all in flight together
RSS_GROWTH_BOUND_MB = 250  # the processor's resident memory may grow at most this much under the load


class SlowSse:
    """An asyncio OpenAI-shaped provider whose every answer is a slow stream (no thread per
    connection, so thousands of streams cost little). Counts how many streams are open at once."""

    def __init__(self) -> None:
        self.open = 0
        self.peak = 0
        self.served = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, backlog=4096)
        self.port = self.server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: Envoy reuses upstream connections
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
                body = json.loads(await reader.readexactly(length))
                await self.stream(writer, body)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stream(self, writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            base = {"id": "chatcmpl-load", "object": "chat.completion.chunk", "created": 0, "model": body.get("model")}
            events = [{**base, "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]} for i in range(EVENTS)]
            events.append({**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": EVENTS, "total_tokens": 5 + EVENTS}})
            # The first event at once; then, GAP_S apart, the others (the last one together with
            # the usage chunk and [DONE], as providers often flush them).
            for i in range(EVENTS):
                if i:
                    await asyncio.sleep(GAP_S)
                last = events[i:] if i == EVENTS - 1 else [events[i]]
                data = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in last)
                if i == EVENTS - 1:
                    data += b"data: [DONE]\n\n"
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n" + (b"0\r\n\r\n" if i == EVENTS - 1 else b""))
                await writer.drain()
            self.served += 1
        finally:
            self.open -= 1


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the processor's workers), in MB."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    total = 0
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


async def one(client: httpx.AsyncClient, url: str, secret: str, delay: float) -> tuple[int, int, float]:
    await asyncio.sleep(delay)
    started = time.monotonic()
    body = {"model": "slow_stream", "messages": [{"role": "user", "content": "tell me slowly"}], "stream": True}
    async with client.stream("POST", url, json=body, headers={"authorization": f"Bearer {secret}"}) as resp:
        chunks = [line async for line in resp.aiter_lines() if line.startswith("data: {") and '"delta"' in line]
    return resp.status_code, len(chunks), time.monotonic() - started


@pytest.fixture(scope="module")
def load_stack(fakes: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, SlowSse, asyncio.AbstractEventLoop]]:
    loop = asyncio.new_event_loop()
    provider = SlowSse()
    loop.run_until_complete(provider.start())
    policy = {
        "providers": {"slow": {"address": f"127.0.0.1:{provider.port}", "tls": False, "timeout_s": 30}},
        "models": {"slow_chat": {"provider": "slow", "upstream_model": "slow-1", "tier": "low",
                                 "price": {"input_per_mtok_usd": 0.15, "output_per_mtok_usd": 0.60}}},
        "plans": {"load": {"routes": "*", "requests_per_minute": 1_000_000, "tokens_per_minute": 1_000_000_000}},
        "routes": [{"route": "slow_stream", "primary_model": "slow_chat", "fallback": {"max_attempts": 1}}],
    }
    policy_dir: Path = tmp_path_factory.mktemp("load-policy")
    (policy_dir / "policy.yaml").write_text(yaml.safe_dump(policy))
    with running_stack(fakes, policy_dir, workers=1, name="load") as s:
        yield s, provider, loop
    loop.run_until_complete(asyncio.sleep(0.5))  # handlers see their connections closed
    assert provider.server is not None
    provider.server.close()
    for task in asyncio.all_tasks(loop):
        task.cancel()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()


@pytest.mark.timeout(240)
def test_2000_concurrent_slow_streams_complete_without_overflow_errors_or_memory_growth(
        load_stack: tuple[Stack, SlowSse, asyncio.AbstractEventLoop]) -> None:
    stack, provider, loop = load_stack
    secrets = [stack.create_key(f"load-{i}", plan="load")[1] for i in range(20)]
    url = stack.envoy.base_url + "/v1/chat/completions"

    async def run(n: int, ramp_s: float) -> list[tuple[int, int, float]]:
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as client:
            return await asyncio.gather(*(one(client, url, secrets[i % len(secrets)], ramp_s * i / n) for i in range(n)))

    assert stack.processor.proc is not None
    processor_pid = stack.processor.proc.pid
    loop.run_until_complete(run(20, 0.0))  # warm-up: connections, key cache, code paths
    rss_before = rss_mb(processor_pid)
    provider.peak = 0
    started = time.monotonic()
    results = loop.run_until_complete(run(STREAMS, RAMP_S))
    elapsed = time.monotonic() - started
    rss_after = rss_mb(processor_pid)
    stats = stack.envoy.stats()

    bad = [r for r in results if r[0] != 200 or r[1] != EVENTS]
    durations = sorted(r[2] for r in results)
    overflow = {k: v for k, v in stats.items() if "overflow" in k and v}
    ext_proc_errors = {k: v for k, v in stats.items() if "ext_proc" in k and ("failed" in k or "timeout" in k or "error" in k) and v}
    print(f"\n{STREAMS} streams in {elapsed:.1f} s; provider peak concurrency {provider.peak}; "
          f"duration p50 {durations[len(durations) // 2]:.2f} s, max {durations[-1]:.2f} s; "
          f"processor RSS {rss_before:.0f} -> {rss_after:.0f} MB; overflow {overflow}; ext_proc errors {ext_proc_errors}")
    assert bad == [], f"{len(bad)} of {STREAMS} failed: {sorted({r[0] for r in bad})}"
    assert provider.peak >= STREAMS * 0.95  # they really were in flight together
    assert durations[0] >= GAP_S * (EVENTS - 1)
    assert overflow == {}
    assert ext_proc_errors == {}
    assert rss_after - rss_before <= RSS_GROWTH_BOUND_MB
