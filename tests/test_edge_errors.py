"""Errors that tell the truth, in OpenAI's shape, with the right status and no traceback in the
processor's log: bad paths, protocol upgrades, hostile JSON, a provider resetting the
connection, a processor killed mid-request. Real Envoy, processor and Redis; raw HTTP so the
client sends exactly the bytes under test."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from extproc import jsonsafe
from extproc.fakeprovider import FakeProvider, Reply
from extproc.quota import request_key
from extproc.records import decode_entry
from tests.conftest import Stack, running_stack

CHAT = b'{"model":"support_draft","messages":[{"role":"user","content":"hi"}]}'


def raw_http(port: int, data: bytes, timeout_s: float = 15) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf or buf.startswith(b"HTTP/1.1 1"):
            if buf.startswith(b"HTTP/1.1 1") and b"\r\n\r\n" in buf:
                buf = buf.partition(b"\r\n\r\n")[2]  # an interim response (100 Continue)
                continue
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if "content-length" in headers:
            while len(body) < int(headers["content-length"]):
                chunk = s.recv(65536)
                if not chunk:
                    break
                body += chunk
        elif headers.get("transfer-encoding") == "chunked":
            while not body.endswith(b"0\r\n\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                body += chunk
            body = _unchunk(body)
        return int(lines[0].split()[1]), headers, body


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_text, _, rest = data.partition(b"\r\n")
        size = int(size_text, 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return out


def post(stack: Stack, secret: str, path: bytes, body: bytes, extra: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    return raw_http(stack.envoy.port, b"POST " + path + b" HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + secret.encode()
                    + b"\r\nContent-Type: application/json\r\n" + extra + b"Content-Length: " + str(len(body)).encode()
                    + b"\r\n\r\n" + body)


def openai_error(body: bytes) -> dict[str, Any]:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return dict(err)


class LogWatch:
    """What the processor logged since the watch began."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.start = Path(path).stat().st_size

    def new(self) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return f.read().decode("utf-8", "replace")


# --- pure: the JSON safety rules -----------------------------------------------------------------

@pytest.mark.parametrize(("raw", "says"), [
    (b'{"a":"\\ud800"}', "lone UTF-16 surrogate"),
    (b'{"a":"\xed\xa0\x80"}', "lone UTF-16 surrogate"),
    (b"[" * 5000 + b"]" * 5000, "nested more than 64 levels"),
    (b"[" * 65 + b"]" * 65, "nested more than 64 levels"),
    (b'{"a":' + b"9" * 5000 + b"}", "more than 100 digits"),
    (b'{"a":NaN}', "NaN is not a JSON value"),
    (b'{"a":1e999}', "out of range"),
])
def test_jsonsafe_refuses_hostile_json_naming_the_problem(raw: bytes, says: str) -> None:
    with pytest.raises(json.JSONDecodeError) as info:
        jsonsafe.loads(raw)
    assert says in info.value.msg


def test_jsonsafe_accepts_a_surrogate_pair_and_depth_64() -> None:
    assert jsonsafe.loads(b'{"a":"\\ud83d\\ude00"}') == {"a": "\U0001F600"}
    assert jsonsafe.loads(b"[" * 64 + b"]" * 64) is not None


# --- through Envoy ----------------------------------------------------------------------------------

def test_fragment_in_the_path_is_400_invalid_request(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, headers, body = post(stack, secret, b"/v1/chat/completions#frag", CHAT)
    assert status == 400 and headers["content-type"] == "application/json"
    assert openai_error(body)["code"] == "invalid_request_error"
    assert "fragment" in openai_error(body)["message"]


def test_websocket_upgrade_is_400_invalid_request(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    status, _, body = post(stack, secret, b"/v1/chat/completions", CHAT,
                           b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
    assert status == 400
    assert "WebSocket" in openai_error(body)["message"]
    assert stack.fakes["p1"].calls() == 0


@pytest.mark.parametrize(("body", "says"), [
    (b'{"model":"support_draft","messages":[{"role":"user","content":"\\ud800"}]}', "surrogate"),
    (b'{"model":"support_draft","messages":[{"role":"user","content":"x"}],"x":' + b"[" * 5000 + b"]" * 5000 + b"}", "nested"),
    (b'{"model":"support_draft","messages":[{"role":"user","content":"x"}],"x":' + b"9" * 5000 + b"}", "digits"),
])
def test_hostile_json_is_400_naming_the_problem_without_a_traceback(stack: Stack, customer: str, body: bytes, says: str) -> None:
    _, secret = stack.create_key(customer)
    log = LogWatch(stack.processor.log_path or "")
    status, _, answer = post(stack, secret, b"/v1/chat/completions", body)
    assert status == 400
    err = openai_error(answer)
    assert err["code"] == "invalid_request_error" and says in err["message"]
    assert "Traceback" not in log.new()
    assert stack.fakes["p1"].calls() == 0


def test_connection_reset_before_headers_is_json_502_and_the_record_says_502(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    stack.fakes["p3"].script(Reply(close=True))
    status, headers, body = post(stack, secret, b"/v1/chat/completions",
                                 b'{"model":"legal_summary","messages":[{"role":"user","content":"hi"}]}')
    assert status == 502
    assert openai_error(body)["code"] == "upstream_unavailable"
    r = stack.redis_sync()
    deadline = time.monotonic() + 5
    entry = None
    while entry is None and time.monotonic() < deadline:
        entry = next(iter(r.hvals(request_key(headers["x-request-id"]))), None)
        time.sleep(0.05)
    assert entry is not None
    ((eid, fields),) = r.xrange("tollgate:usage", min=entry, max=entry)
    assert decode_entry(eid, fields)["status"] == "502"


@pytest.fixture
def lone_stack(fakes: dict[str, FakeProvider], policy_dir: Path) -> Iterator[Stack]:
    """A stack of its own with one processor process (the test kills it)."""
    with running_stack(fakes, policy_dir, workers=1, name="edge-kill") as s:
        yield s


def test_processor_killed_mid_request_does_not_claim_the_request_was_not_sent(lone_stack: Stack, customer: str) -> None:
    _, secret = lone_stack.create_key(customer)
    lone_stack.fakes["p3"].script(Reply(delay_s=1.5))
    answer: dict[str, Any] = {}

    def call() -> None:
        answer["r"] = post(lone_stack, secret, b"/v1/chat/completions",
                           b'{"model":"legal_summary","messages":[{"role":"user","content":"hi"}]}')

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 5
    while not lone_stack.fakes["p3"].calls() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lone_stack.fakes["p3"].calls() == 1  # the request reached the provider
    assert lone_stack.processor.proc is not None
    os.kill(lone_stack.processor.proc.pid, signal.SIGKILL)
    t.join(20)
    status, _, body = answer["r"]
    assert status == 503
    err = openai_error(body)
    assert "not sent" not in err["message"]
    assert "may have reached a provider" in err["message"]
