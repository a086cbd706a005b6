"""A bounded fuzz run through the real stack: random bodies, headers, paths and methods over
raw HTTP. Every answer is OpenAI-shaped JSON when it is an error; no 5xx other than the
documented `upstream_unavailable`; no traceback in the processor's log. Seeded (set
TOLLGATE_FUZZ_SEED to replay a run), a few hundred requests, well under a minute."""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from tests.conftest import Stack
from tests.test_edge_errors import LogWatch, raw_http

REQUESTS = int(os.environ.get("TOLLGATE_FUZZ_REQUESTS", "400"))
SEED = int(os.environ.get("TOLLGATE_FUZZ_SEED", "20261124"))

PATHS = ["/v1/chat/completions"] * 12 + ["/v1/completions", "/v1/embeddings", "/v1/responses"] * 2 + ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models", "/v1/unknown", "/",
         "/v1/chat/completions?api-version=1&x=%00", "/v1/chat/completions#frag", "/v1/../v1/chat/completions",
         "/v1/chat%2Fcompletions", "//v1/chat/completions", "/v1/chat/completions/", "/v1/chat/completions;x=1",
         "/v1/%2e%2e/admin"]
METHODS = ["POST"] * 8 + ["GET", "PUT", "DELETE", "OPTIONS", "PATCH"]
ROUTES = ["support_draft", "legal_summary", "embeddings", "switch_all", "nope", "", "x" * 300]
WEIRD_VALUES: list[Any] = [None, True, False, 0, -1, 1.5, 10**30, "", "x", "\u00e9\u4e2d", [], {}, [None], {"a": {}}, "a" * 2000]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.5:
        return rng.choice(WEIRD_VALUES)
    if roll < 0.75:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["role", "content", "type", "x", "model"]): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def valid_body(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {"model": rng.choice([*ROUTES[:4], "gpt-4o-mini", "low_cost_chat", "nope"]),
                            "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi"}
    if rng.random() < 0.3:
        body["stream"] = rng.choice([True, False])
    if rng.random() < 0.3:
        body[rng.choice(["max_tokens", "max_completion_tokens", "max_output_tokens"])] = rng.choice([1, 16, 10**9, -1, 0, 2.5, "8"])
    return body


def random_body(rng: random.Random) -> bytes:
    body = valid_body(rng)
    roll = rng.random()
    if roll < 0.25:
        return json.dumps(body).encode()
    if roll < 0.45:
        body[rng.choice([*body, "n", "tools", "stream_options", "user"])] = random_value(rng)
        return json.dumps(body).encode()
    if roll < 0.6:  # damaged bytes
        raw = bytearray(json.dumps(body).encode())
        for _ in range(rng.randint(1, 5)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw[: rng.randint(0, len(raw))] if rng.random() < 0.3 else raw)
    if roll < 0.7:
        return json.dumps(random_value(rng)).encode()
    hostile = rng.choice([
        b'{"model":"support_draft","messages":[{"role":"user","content":"\\udc00"}]}',
        b'{"model":"support_draft","messages":' + b"[" * 3000 + b"]" * 3000 + b"}",
        b'{"model":"support_draft","messages":[{"role":"user","content":"x"}],"max_tokens":' + b"7" * 3000 + b"}",
        b'{"model":"support_draft","messages":[{"role":"user","content":"x"}],"temperature":NaN}',
        b'{"model":"support_draft","messages":[{"role":"user","content":"x"}],"temperature":1e999}',
        b"\xef\xbb\xbf" + json.dumps(body).encode(),
        json.dumps(body).encode("utf-16"),
        b"",
        b"null",
        bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))),
    ])
    return hostile


def random_headers(rng: random.Random, secret: str) -> list[tuple[str, str]]:
    auth = rng.choice([f"Bearer {secret}"] * 6 + ["", "Bearer", "Basic abc", f"bearer  {secret} ", "Bearer tg-wrong"])
    headers = [("Authorization", auth)] if auth else [("api-key", secret)] if rng.random() < 0.5 else []
    pool = [
        ("content-type", rng.choice(["application/json", "text/plain", "application/json; charset=utf-16", "x/y"])),
        ("accept", rng.choice(["*/*", "text/event-stream", "application/json"])),
        ("x-tollgate-route", rng.choice(ROUTES)),
        ("x-tollgate-cluster", rng.choice(["p1", "p3", "via_p1", "dead"])),
        ("x-tollgate-target", "p3"),
        ("x-request-id", rng.choice(["", "ok-1", "bad id", "x" * 200, "a/b", f"r-{rng.random()}"])),
        ("x-envoy-retry-on", "5xx"), ("x-envoy-upstream-rq-timeout-ms", "1"), ("x-envoy-max-retries", "9"),
        ("cookie", "a=b"), ("openai-organization", "org-x"), ("x-forwarded-for", "1.2.3.4"),
        ("accept-encoding", "gzip, br"), ("expect", "100-continue"), ("te", "trailers"),
        (f"x-{rng.randrange(10**6)}", "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randint(0, 40)))),
        ("user-agent", "\u00e9t\u00e9"),
    ]
    headers += rng.sample(pool, rng.randint(0, 6))
    return headers


def encode(method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gw", *(f"{k}: {v}" for k, v in headers), f"Content-Length: {len(body)}",
             "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def test_random_requests_get_truthful_openai_errors_and_no_traceback(stack: Stack, customer: str) -> None:
    rng = random.Random(SEED)
    _, secret = stack.create_key(customer, default_route="support_draft")
    log = LogWatch(stack.processor.log_path or "")
    started = time.monotonic()
    statuses: dict[int, int] = {}
    for i in range(REQUESTS):
        method, path = rng.choice(METHODS), rng.choice(PATHS)
        body = random_body(rng) if method in ("POST", "PUT", "PATCH") or rng.random() < 0.2 else b""
        request = encode(method, path, random_headers(rng, secret), body)
        status, _headers, answer = raw_http(stack.envoy.port, request)
        statuses[status] = statuses.get(status, 0) + 1
        where = f"request {i} (seed {SEED}): {request[:300]!r} -> {status} {answer[:300]!r}"
        if status >= 400:
            err = json.loads(answer)["error"]
            assert set(err) == {"message", "type", "param", "code"}, where
            if status >= 500:
                assert err["code"] == "upstream_unavailable", where
                assert status in (502, 503, 504), where
        assert "sk-provider" not in answer.decode("latin-1"), where
    elapsed = time.monotonic() - started
    new_log = log.new()
    assert "Traceback" not in new_log, new_log[-3000:]
    assert elapsed < 60, f"{REQUESTS} requests took {elapsed:.1f}s"
    assert statuses.get(200, 0) > 0 and sum(n for s, n in statuses.items() if 400 <= s < 500) > 0, statuses
