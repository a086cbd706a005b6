"""A small OpenAI-compatible provider for tests and the demo (`tollgate fake-provider`).

It answers chat, completions, embeddings and responses (JSON or Server-Sent Events with a
final usage chunk) and can be told to fail: any status (5xx, 429), slowly, or by closing the
connection. It records every request it received (path, headers, JSON body) so tests can
assert on what actually reached a provider.

Control, in-process: `FakeProvider.script(Reply(status=500), ...)` queues replies for the next
requests, `FakeProvider.default` answers the rest. Over HTTP (for the demo):
  POST /_fake/script  {"replies": [{"status": 500}, ...], "default": {...}}
  GET  /_fake/requests            POST /_fake/reset
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """How to answer one request."""

    status: int = 200
    delay_s: float = 0.0  # before the response headers
    chunk_delay_s: float = 0.0  # between streamed chunks
    completion_tokens: int = 8  # at most the request's max_tokens
    prompt_tokens: int | None = None  # None: about characters / 4 of the input
    close: bool = False  # drop the connection without answering
    retry_after: int | None = None


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.time)


class FakeProvider:
    def __init__(self, name: str = "fake", host: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.default = Reply()
        self.requests: list[Received] = []
        self._queue: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- control --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._queue.extend(replies)

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self.requests.clear()
            self.default = Reply()

    def calls(self, path: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if path is None or r.path == path)

    def next_reply(self) -> Reply:
        with self._lock:
            return self._queue.popleft() if self._queue else self.default

    def record(self, r: Received) -> None:
        with self._lock:
            self.requests.append(r)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> FakeProvider:
        provider = self

        class Handler(_Handler):
            fake = provider

        self._server = _QuietServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._server.request_queue_size = 1024
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"fake-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: later connections are refused (a connect failure)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (Envoy's per-try timeout) is expected, not an error."""
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def _words(n: int) -> list[str]:
    return [f"w{i}" for i in range(n)]


class _Handler(BaseHTTPRequestHandler):
    fake: FakeProvider
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # --- plumbing -------------------------------------------------------------------------

    def _send_json(self, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def do_GET(self) -> None:
        if self.path == "/_fake/requests":
            with self.fake._lock:
                self._send_json(200, [asdict(r) for r in self.fake.requests])
        elif self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": []})
        else:
            self._send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path.startswith("/_fake/"):
            self._control(raw)
            return
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = raw.decode("latin-1")
        self.fake.record(Received("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        reply = self.fake.next_reply()
        if reply.delay_s:
            time.sleep(reply.delay_s)
        if reply.close:
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if reply.status != 200:
            extra = {"retry-after": str(reply.retry_after)} if reply.retry_after is not None else {}
            kind = "rate_limit_exceeded" if reply.status == 429 else "server_error"
            self._send_json(reply.status, {"error": {"message": f"{self.fake.name} says {reply.status}", "type": kind, "param": None, "code": kind}}, extra)
            return
        body = body if isinstance(body, dict) else {}
        if body.get("stream"):
            self._stream(body, reply)
        else:
            self._send_json(200, self._complete(body, reply))

    def _control(self, raw: bytes) -> None:
        cmd = json.loads(raw or b"{}")
        if self.path == "/_fake/reset":
            self.fake.reset()
        elif self.path == "/_fake/script":
            self.fake.script(*(Reply(**r) for r in cmd.get("replies", [])))
            if "default" in cmd:
                self.fake.default = Reply(**cmd["default"])
        self._send_json(200, {"ok": True})

    # --- OpenAI shapes --------------------------------------------------------------------

    def _prompt_tokens(self, body: dict[str, Any], reply: Reply) -> int:
        if reply.prompt_tokens is not None:
            return reply.prompt_tokens
        text = json.dumps(body.get("messages") or body.get("prompt") or body.get("input") or "")
        return max(1, len(text) // 4)

    def _completion_tokens(self, body: dict[str, Any], reply: Reply) -> int:
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
        return min(reply.completion_tokens, limit) if isinstance(limit, int) else reply.completion_tokens

    def _complete(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        model = body.get("model", "unknown")
        prompt = self._prompt_tokens(body, reply)
        n = self._completion_tokens(body, reply)
        text = " ".join(_words(n))
        now = int(time.time())
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        if self.path == "/v1/embeddings":
            inputs = body.get("input")
            count = len(inputs) if isinstance(inputs, list) else 1
            data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3, 0.4]} for i in range(count)]
            return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}
        if self.path == "/v1/completions":
            return {
                "id": "cmpl-fake", "object": "text_completion", "created": now, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}], "usage": usage,
            }
        if self.path == "/v1/responses":
            return {
                "id": "resp_fake", "object": "response", "created_at": now, "model": model, "status": "completed",
                "output": [{"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
                            "content": [{"type": "output_text", "text": text, "annotations": []}]}],
                "usage": {"input_tokens": prompt, "output_tokens": n, "total_tokens": prompt + n},
            }
        return {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": now, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"[{self.fake.name}] {text}"}, "finish_reason": "stop"}],
            "usage": usage,
        }

    def _stream(self, body: dict[str, Any], reply: Reply) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        model = body.get("model", "unknown")
        prompt = self._prompt_tokens(body, reply)
        n = self._completion_tokens(body, reply)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        for i, word in enumerate(_words(n)):
            if i and reply.chunk_delay_s:
                time.sleep(reply.chunk_delay_s)
            if self.path == "/v1/completions":
                event = {**base, "object": "text_completion", "choices": [{"index": 0, "text": word + " ", "finish_reason": None}]}
            else:
                event = {**base, "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
            self._chunk(f"data: {json.dumps(event)}\n\n".encode())
        if include_usage:
            usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
            self._chunk(f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n".encode())
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")


def main(name: str, host: str, port: int) -> None:
    fake = FakeProvider(name, host, port).start()
    print(f"fake provider {name} on {fake.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()
