"""Reading a streamed response as it passes (pure, no I/O): usage, text, and OpenAI's rule
that a client which did not ask for the usage chunk never sees it.

`StreamMeter.feed` takes each chunk Envoy hands the processor and returns the bytes to send on.
Lines are reassembled across chunks; a line of any size is searched for `usage` without
being held whole (past `LONG_LINE` bytes only a sliding window is kept), so a Responses-API
`response.completed` event of many megabytes is still billed from its own usage. The same
scanner reads a non-stream JSON body too large to buffer (`json_body=True`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from extproc.payload import Usage, usage_from_json

LONG_LINE = 1 << 20  # past this a line is scanned in a window, never held whole
WINDOW = 64 << 10  # how much of a long line is kept between chunks (a usage object is tiny)
# A `usage` object: flat, or with one level of nested detail objects. Inside a JSON string the
# quotes would be escaped (\"usage\"), so model text can never match.
USAGE_RE = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\})')


def text_bytes(obj: Any) -> int:
    """UTF-8 bytes of the generated text in a response or stream event: strings under
    `choices` / `output` / `delta` / `text`, not ids, roles or other fixed fields. Iterative,
    so a hostile provider's deeply nested JSON cannot exhaust the stack."""
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(v for k, v in item.items() if k not in _NOT_TEXT)
    return total


_NOT_TEXT = frozenset({"id", "object", "role", "type", "finish_reason", "status", "model", "index", "logprobs",
                       "created", "created_at", "item_id", "output_index", "content_index", "sequence_number",
                       "annotations", "usage", "system_fingerprint", "service_tier"})


def _generated(event: Any) -> Any:
    """The part of an event (or whole response) that carries generated text."""
    if not isinstance(event, dict):
        return None
    if "choices" in event:
        return event["choices"]
    if event.get("type") == "response.output_text.delta" or event.get("type", "").endswith(".delta"):
        return event.get("delta")
    if "output" in event:
        return event["output"]
    return None


class StreamMeter:
    """Usage and generated text of one streamed response; strips the usage chunk the
    gateway asked for when the client did not (`strip_usage`)."""

    def __init__(self, *, strip_usage: bool = False, json_body: bool = False) -> None:
        self.strip_usage = strip_usage
        self.json_body = json_body
        self.usage: Usage | None = None
        self.text = 0  # UTF-8 bytes of generated text seen
        self.bytes = 0  # bytes of the response seen
        self._line = bytearray()  # the current incomplete line (short lines only)
        self._long = False  # the current line passed LONG_LINE: kept as a window only
        self._drop_blank = False  # a dropped event's terminating blank line follows
        self._window = b""  # the tail of a long line, searched again with the next piece

    def feed(self, chunk: bytes) -> bytes:
        """Scan a chunk; returns what to forward (the chunk itself unless stripping)."""
        self.bytes += len(chunk)
        if self.json_body:
            self._scan_long(chunk)
            return chunk
        out = bytearray() if self.strip_usage else None
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                self._partial(chunk[start:], out)
                break
            self._partial(chunk[start:nl + 1], out, complete=True)
            start = nl + 1
        return chunk if out is None else bytes(out)

    def finish(self) -> bytes:
        """The stream ended: account for (and release) a last line without a newline."""
        if self.json_body:
            self._end_long()
            return b""
        if not self._line and not self._long:
            return b""
        out = bytearray() if self.strip_usage else None
        self._partial(b"", out, complete=True)
        return b"" if out is None else bytes(out)

    # --- lines ----------------------------------------------------------------------------

    def _partial(self, piece: bytes, out: bytearray | None, complete: bool = False) -> None:
        if self._long:
            self._scan_long(piece)
            if out is not None:
                out += piece  # a long line is forwarded as it comes (never a usage-only chunk)
            if complete:
                self._end_long()
            return
        self._line += piece
        if not complete:
            if len(self._line) > LONG_LINE:  # too long to hold: forward and scan in a window
                self._long = True
                held = bytes(self._line)
                self._line.clear()
                self._window = b""
                self._scan_long(held)
                if out is not None:
                    out += held
            return
        line = bytes(self._line)
        self._line.clear()
        kept = self._complete_line(line)
        if out is not None:
            out += kept

    def _complete_line(self, line: bytes) -> bytes:
        """Account for one whole line; returns it, rewritten, or b"" to drop it."""
        body = line.rstrip(b"\r\n")
        if not body:
            if self._drop_blank:
                self._drop_blank = False
                return b""
            return line
        if not body.startswith(b"data:") or body.startswith(b"data: [DONE]"):
            return line
        try:
            event = json.loads(body[5:])
        except (UnicodeDecodeError, ValueError, RecursionError):
            return line
        self.text += text_bytes(_generated(event))
        if b'"usage"' not in body:
            return line
        found = usage_from_json(event)
        if found is not None:
            self.usage = found
        if not self.strip_usage or not isinstance(event, dict) or "usage" not in event:
            return line
        # The client did not ask for usage: the usage-only chunk goes, and no other chunk
        # carries a `usage` field (exactly as OpenAI streams without include_usage).
        if event.get("choices") == []:
            self._drop_blank = True
            return b""
        del event["usage"]
        return b"data: " + json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode() + line[len(body):]

    # --- lines too long to hold -------------------------------------------------------------

    def _scan_long(self, piece: bytes) -> None:
        self.text += len(piece)  # no event to read text from: every byte may be text
        data = self._window + piece
        last = None
        for m in USAGE_RE.finditer(data):
            last = m
        if last is not None:
            try:
                found = usage_from_json({"usage": json.loads(last.group(1))})
            except (UnicodeDecodeError, ValueError, RecursionError):
                found = None
            if found is not None:
                self.usage = found
        self._window = data[-WINDOW:]

    def _end_long(self) -> None:
        self._long = False
        self._window = b""
