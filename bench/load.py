"""Mixed traffic through the real stack, for the soak (`make soak`) and the CI leak check.

`LoadStack` starts the real parts: Redis, a canned provider (an Envoy answering with
`direct_response`, so the provider never limits the rate and costs no Python CPU),
`tollgate serve` and the gateway's Envoy. `drive()` is a small asyncio HTTP/1.1 client on
keep-alive connections (far cheaper per request than an SDK, which matters on 2 cores) that
sends a fixed mix, one request per slot of `MIX` in turn:

  normal    chat completion on a single-attempt route               -> 200
  stream    `"stream": true` on a route whose provider answers SSE  -> 200 (STREAMED mode)
  fallback  primary answers 429, the seed's rule switches provider  -> 200 after 2 attempts
  refused   a key whose plan has a zero monthly budget              -> 429 insufficient_quota
  bad_key   an unknown key                                          -> 401 invalid_api_key
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from extproc.devstack import Envoy, Processor, RedisServer, envoy_binary, free_port, wait_for_port
from extproc.keys import KeyStore
from extproc.store import redis_client

T = "type.googleapis.com/envoy."
COMPLETION = json.dumps({
    "id": "chatcmpl-soak", "object": "chat.completion", "created": 0, "model": "soak",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
})
_CHUNK = {"id": "chatcmpl-soak", "object": "chat.completion.chunk", "created": 0, "model": "soak"}
SSE = "".join(f"data: {json.dumps(c)}\n\n" for c in (
    {**_CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}, "finish_reason": None}]},
    {**_CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    {**_CHUNK, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}},
)) + "data: [DONE]\n\n"
RATE_LIMITED = json.dumps({"error": {"message": "slow down", "type": "rate_limit_exceeded", "param": None, "code": "rate_limit_exceeded"}})

# One request per slot, in turn: 10 normal, 4 stream, 3 fallback, 2 refused, 1 bad key.
MIX = ("normal", "stream", "normal", "fallback", "normal", "refused", "normal", "stream", "normal", "fallback",
       "normal", "bad_key", "normal", "stream", "normal", "fallback", "normal", "refused", "normal", "stream")
EXPECTED_STATUS = {"normal": 200, "stream": 200, "fallback": 200, "refused": 429, "bad_key": 401}


def _listener(name: str, port: int, status: int, body: str, content_type: str) -> dict[str, Any]:
    hcm = {"@type": T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", "stat_prefix": name,
           "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"], "routes": [{"match": {"prefix": "/"},
                            "direct_response": {"status": status, "body": {"inline_string": body}},
                            "response_headers_to_add": [{"header": {"key": "content-type", "value": content_type}}]}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": T + "extensions.filters.http.router.v3.Router"}}]}
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}


def policy_for(ok_port: int, sse_port: int, limited_port: int) -> dict[str, Any]:
    never_opens = {"failures": 10**9}
    price = {"input_per_mtok_usd": 0.15, "output_per_mtok_usd": 0.6}
    return {
        "tiers": ["low", "standard", "premium"],
        "providers": {"fast": {"address": f"127.0.0.1:{ok_port}", "tls": False, "circuit": never_opens},
                      "sse": {"address": f"127.0.0.1:{sse_port}", "tls": False, "circuit": never_opens},
                      "limited": {"address": f"127.0.0.1:{limited_port}", "tls": False, "circuit": never_opens}},
        "models": {
            "low_cost_chat": {"provider": "fast", "upstream_model": "m", "tier": "low", "price": price},
            "stream_chat": {"provider": "sse", "upstream_model": "s", "tier": "standard", "price": price},
            "limited_chat": {"provider": "limited", "upstream_model": "l", "tier": "low", "price": price},
        },
        "plans": {"soak": {"routes": "*"}, "broke": {"routes": "*", "monthly_budget_usd": 0}},
        "routes": [
            {"route": "direct", "primary_model": "low_cost_chat", "fallback": {"max_attempts": 1}},
            {"route": "streams", "primary_model": "stream_chat", "fallback": {"max_attempts": 1}},
            {"route": "falls_back", "primary_model": "limited_chat", "fallback": {"on_rate_limit": "switch_same_price_tier", "max_attempts": 2}},
        ],
    }


@dataclass
class LoadStack:
    """Redis, the canned provider, `tollgate serve` (one worker: one process to measure) and Envoy."""

    workers: int = 1
    logdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tollgate-soak-")))
    redis: RedisServer | None = None
    provider: subprocess.Popen[bytes] | None = None
    processor: Processor | None = None
    envoy: Envoy | None = None
    keys: dict[str, str] = field(default_factory=dict)

    def start(self) -> LoadStack:
        try:
            return self._start()
        except BaseException:
            self.stop()  # a part that failed to start must not leave the others running
            raise

    def _start(self) -> LoadStack:
        ok, sse, limited, admin = free_port(), free_port(), free_port(), free_port()
        cfg = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
               "static_resources": {"listeners": [_listener("ok", ok, 200, COMPLETION, "application/json"),
                                                  _listener("sse", sse, 200, SSE, "text/event-stream"),
                                                  _listener("limited", limited, 429, RATE_LIMITED, "application/json")]}}
        (self.logdir / "provider.yaml").write_text(yaml.safe_dump(cfg))
        self.provider = subprocess.Popen([envoy_binary(), "-c", str(self.logdir / "provider.yaml"), "--concurrency", "1",
                                          "--log-level", "error", "--base-id", str(admin), "--disable-hot-restart"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(admin, proc=self.provider)
        policy = self.logdir / "policy.yaml"
        policy.write_text(yaml.safe_dump(policy_for(ok, sse, limited)))
        self.redis = RedisServer().start()
        self.processor = Processor([str(policy)], self.redis.url, workers=self.workers, log_path=str(self.logdir / "extproc.log"),
                                   env={"TOLLGATE_LOG_LEVEL": "WARNING"})
        self.processor.start()
        self.envoy = Envoy([str(policy)], self.processor.endpoints, log_path=str(self.logdir / "envoy.log")).start()
        self.keys = asyncio.run(_create_keys(self.redis.url))
        return self

    def stop(self) -> None:
        for part in (self.envoy, self.processor, self.redis):
            if part is not None:
                part.stop()
        if self.provider is not None and self.provider.poll() is None:
            self.provider.terminate()
            self.provider.wait()


async def _create_keys(redis_url: str) -> dict[str, str]:
    client = redis_client(redis_url)
    try:
        ks = KeyStore(client)
        return {"soak": (await ks.create("soak", "soak", "soak")).secret, "broke": (await ks.create("broke", "broke", "broke")).secret}
    finally:
        await client.aclose()


def raw_requests(host: str, keys: dict[str, str]) -> dict[str, bytes]:
    """The bytes of one request of each kind (HTTP/1.1, keep-alive)."""

    def post(route: str, key: str, stream: bool = False) -> bytes:
        body = json.dumps({"model": route, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16,
                           **({"stream": True} if stream else {})}).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                f"authorization: Bearer {key}\r\ncontent-length: {len(body)}\r\n\r\n")
        return head.encode() + body

    return {"normal": post("direct", keys["soak"]), "stream": post("streams", keys["soak"], stream=True),
            "fallback": post("falls_back", keys["soak"]), "refused": post("direct", keys["broke"]),
            "bad_key": post("direct", "tg-not-a-key-" + "x" * 20)}


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (content-length or chunked); returns its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(int(headers.get("content-length", "0")))
    return status


@dataclass
class Tally:
    """Requests sent so far and their (kind, status) counts."""

    sent: int = 0
    done: int = 0
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)

    def unexpected(self) -> dict[str, int]:
        return {f"{k}:{s}": n for (k, s), n in self.statuses.items() if EXPECTED_STATUS[k] != s}


async def drive(port: int, keys: dict[str, str], total: int, connections: int = 16, tally: Tally | None = None) -> Tally:
    """Send `total` requests of the mix over `connections` keep-alive connections."""
    t = tally or Tally()
    reqs = raw_requests(f"127.0.0.1:{port}", keys)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while t.sent < total:
                kind = MIX[t.sent % len(MIX)]
                t.sent += 1
                writer.write(reqs[kind])
                try:
                    status = await _read_response(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    status = 0
                t.statuses[(kind, status)] += 1
                t.done += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return t


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def redis_used_memory(url: str) -> tuple[int, int]:
    """Redis `used_memory` and number of keys (INFO), with a throwaway connection."""

    async def run() -> tuple[int, int]:
        client = redis_client(url)
        try:
            info = await client.info("memory")
            return int(info["used_memory"]), int(await client.dbsize())
        finally:
            await client.aclose()

    return asyncio.run(run())


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))
