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

import gzip
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
    completion_tokens: int | None = 8  # per choice, at most the request's cap; None: all the cap allows
    prompt_tokens: int | None = None  # None: about characters / 4 of the input
    close: bool = False  # drop the connection without answering
    retry_after: int | None = None
    prompt_per_byte: bool = False  # report one prompt token per UTF-8 byte of the input (the worst case)
    honour_cap: bool = True  # False: a dishonest provider that ignores the output cap
    usage: bool = True  # False: answer without `usage` (and streams without a usage chunk)
    uncapped_tokens: int = 100_000  # what "all it allows" means when the request names no cap
    content_type: str = "application/json"  # of JSON answers (OpenAI sends no charset; others do); "": none
    raw_body: str | None = None  # a 200 JSON answer's exact text, instead of the generated one (buggy providers)
    gzip: bool = False  # a 200 JSON answer gzip-compressed, with `content-encoding: gzip`
    chunked: bool = False  # a 200 JSON answer in chunked transfer encoding, without content-length
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers (a provider forging ours)


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

    def _send_json(self, status: int, obj: Any, extra: dict[str, str] | None = None, content_type: str = "application/json") -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", content_type)
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
            extra = {**({"retry-after": str(reply.retry_after)} if reply.retry_after is not None else {}), **reply.headers}
            kind = "rate_limit_exceeded" if reply.status == 429 else "server_error"
            self._send_json(reply.status, {"error": {"message": f"{self.fake.name} says {reply.status}", "type": kind, "param": None, "code": kind}}, extra)
            return
        body = body if isinstance(body, dict) else {}
        if body.get("stream"):
            self._stream(body, reply)
        elif reply.raw_body is not None or reply.gzip or reply.chunked or not reply.content_type or reply.headers:
            self._send_raw(reply, reply.raw_body.encode() if reply.raw_body is not None else json.dumps(self._complete(body, reply)).encode())
        else:
            self._send_json(200, self._complete(body, reply), reply.headers, content_type=reply.content_type)

    def _send_raw(self, reply: Reply, data: bytes) -> None:
        """A 200 answer shaped as a buggy or unusual provider sends it."""
        self.send_response(200)
        if reply.content_type:
            self.send_header("content-type", reply.content_type)
        for k, v in reply.headers.items():
            self.send_header(k, v)
        if reply.gzip:
            data = gzip.compress(data)
            self.send_header("content-encoding", "gzip")
        if reply.chunked:
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            step = -(-len(data) // 4) if reply.chunk_delay_s else 65536  # slowly: four chunks, chunk_delay_s apart
            for i in range(0, len(data), step):
                if i and reply.chunk_delay_s:
                    time.sleep(reply.chunk_delay_s)
                self._chunk(data[i:i + step])
            self._chunk(b"")
            return
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

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
        fields = [body.get(f) for f in PROMPT_FIELDS if body.get(f) is not None]
        text = json.dumps(fields, separators=(",", ":"), ensure_ascii=False)
        if reply.prompt_per_byte:
            return len(text.encode())
        return max(1, len(text) // 4)

    def _completion_tokens(self, body: dict[str, Any], reply: Reply) -> int:
        """Per choice: the reply's count, at most the cap the provider honours for this
        endpoint (like OpenAI), or everything the cap allows."""
        if self.path == "/v1/responses":
            limit = body.get("max_output_tokens")
        elif self.path == "/v1/completions":
            limit = body.get("max_tokens")
        else:
            limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if not isinstance(limit, int) or not reply.honour_cap:
            limit = None
        if self.path == "/v1/embeddings":
            return 0
        wanted = reply.completion_tokens
        if wanted is None:
            wanted = limit if limit is not None else reply.uncapped_tokens
        # A fake must not exhaust the test machine: past this it answers less (like a model stop).
        return min(wanted, limit if limit is not None else wanted, MAX_FAKE_TOKENS)

    @staticmethod
    def _choices(body: dict[str, Any]) -> tuple[int, int]:
        """(choices returned, choices generated and billed): n, and best_of for completions."""
        n, best_of = body.get("n"), body.get("best_of")
        shown = n if isinstance(n, int) else 1
        return shown, max(shown, best_of if isinstance(best_of, int) else 1)

    def _complete(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        model = body.get("model", "unknown")
        prompt = self._prompt_tokens(body, reply)
        per_choice = self._completion_tokens(body, reply)
        shown, billed = self._choices(body)
        n = per_choice * billed
        text = "" if self.path == "/v1/embeddings" else " ".join(_words(per_choice))
        now = int(time.time())
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        if self.path == "/v1/embeddings":
            inputs = body.get("input")
            count = len(inputs) if isinstance(inputs, list) else 1
            data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3, 0.4]} for i in range(count)]
            out: dict[str, Any] = {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}
        elif self.path == "/v1/completions":
            out = {
                "id": "cmpl-fake", "object": "text_completion", "created": now, "model": model,
                "choices": [{"index": i, "text": text, "finish_reason": "length", "logprobs": None} for i in range(shown)], "usage": usage,
            }
        elif self.path == "/v1/responses":
            out = self._response_object(body, model, text, prompt, n, now)
        else:
            out = {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": now, "model": model,
                "choices": [self._chat_choice(body, i, f"[{self.fake.name}] {text}") for i in range(shown)],
                "usage": usage,
            }
        if not reply.usage:
            out.pop("usage", None)
        return out

    @staticmethod
    def _chat_choice(body: dict[str, Any], index: int, text: str) -> dict[str, Any]:
        tools = body.get("tools")
        if isinstance(tools, list) and tools and isinstance(tools[0], dict):
            name = (tools[0].get("function") or {}).get("name", "tool")
            call = {"id": f"call_fake_{index}", "type": "function", "function": {"name": name, "arguments": json.dumps({"text": text})}}
            return {"index": index, "message": {"role": "assistant", "content": None, "tool_calls": [call]}, "finish_reason": "tool_calls"}
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}

    @staticmethod
    def _response_object(body: dict[str, Any], model: str, text: str, prompt: int, n: int, now: int) -> dict[str, Any]:
        """A Responses-API object, in OpenAI's field order (usage after output and echoes)."""
        return {
            "id": "resp_fake", "object": "response", "created_at": now, "status": "completed", "model": model,
            "instructions": body.get("instructions"),
            "output": [{"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "tools": body.get("tools") or [],
            "usage": {"input_tokens": prompt, "output_tokens": n, "total_tokens": prompt + n},
            "metadata": body.get("metadata") or {},
        }

    def _event(self, data: dict[str, Any], name: str | None = None) -> None:
        head = f"event: {name}\n" if name else ""
        self._chunk(f"{head}data: {json.dumps(data)}\n\n".encode())

    def _stream(self, body: dict[str, Any], reply: Reply) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.end_headers()
        model = body.get("model", "unknown")
        prompt = self._prompt_tokens(body, reply)
        per_choice = self._completion_tokens(body, reply)
        shown, billed = self._choices(body)
        n = per_choice * billed
        if self.path == "/v1/responses":
            self._stream_responses(body, reply, model, prompt, per_choice)
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and reply.usage
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        for i, word in enumerate(_words(per_choice)):
            if i and reply.chunk_delay_s:
                time.sleep(reply.chunk_delay_s)
            for c in range(shown):
                if self.path == "/v1/completions":
                    event = {**base, "object": "text_completion", "choices": [{"index": c, "text": word + " ", "finish_reason": None}]}
                else:
                    event = {**base, "choices": [{"index": c, "delta": {"content": word + " "}, "finish_reason": None}]}
                if include_usage:
                    event["usage"] = None  # as OpenAI does when the client asked for usage
                self._event(event)
        if include_usage:
            usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
            self._event({**base, "choices": [], "usage": usage})
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _stream_responses(self, body: dict[str, Any], reply: Reply, model: str, prompt: int, n: int) -> None:
        """Responses-API stream events: created, text deltas, completed (with usage)."""
        now = int(time.time())
        final = self._response_object(body, model, " ".join(_words(n)), prompt, n, now)
        seq = 0
        self._event({"type": "response.created", "sequence_number": seq,
                     "response": {**final, "status": "in_progress", "output": [], "usage": None}}, "response.created")
        for i, word in enumerate(_words(n)):
            if i and reply.chunk_delay_s:
                time.sleep(reply.chunk_delay_s)
            seq += 1
            self._event({"type": "response.output_text.delta", "sequence_number": seq, "item_id": "msg_fake", "output_index": 0,
                         "content_index": 0, "delta": word + " "}, "response.output_text.delta")
        if not reply.usage:
            final.pop("usage")
        self._event({"type": "response.completed", "sequence_number": seq + 1, "response": final}, "response.completed")
        self._chunk(b"")


MAX_FAKE_TOKENS = 5_000_000  # words per choice the fake generates at most
# The request fields a provider turns into prompt tokens.
PROMPT_FIELDS = ("messages", "prompt", "input", "instructions", "tools", "functions", "response_format", "text")


def main(name: str, host: str, port: int) -> None:
    fake = FakeProvider(name, host, port).start()
    print(f"fake provider {name} on {fake.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()
