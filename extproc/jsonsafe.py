"""Parse a client's JSON body safely: hostile input is a 400 naming the problem, never a 500.

Python's `json.loads` accepts things the gateway cannot pass on or even hold: lone UTF-16
surrogates (`"\\ud800"`, which cannot be encoded again), nesting deep enough to exhaust the
recursion limit, integers past Python's digit limit, and `NaN`/`Infinity` (not JSON, and a
provider would reject the rewritten body). `loads` refuses each with a `json.JSONDecodeError`
whose `msg` says what is wrong, so callers keep one `except` for every bad body.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 64  # arrays/objects inside each other; OpenAI bodies (tool schemas included) need far less
MAX_NUMBER_DIGITS = 100  # digits of one number literal
# An escaped surrogate, or one encoded as (invalid) UTF-8: json.loads decodes bytes with
# "surrogatepass", so both become lone surrogates.
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


class UnsafeJson(json.JSONDecodeError):
    """Valid-looking JSON the gateway refuses; `msg` names the problem."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg, "", 0)
        self.msg = msg  # without JSONDecodeError's ": line 1 column 1" suffix


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise UnsafeJson(f"a number has more than {MAX_NUMBER_DIGITS} digits")
    return int(text)


def _float(text: str) -> float:
    if len(text) > MAX_NUMBER_DIGITS + 10:
        raise UnsafeJson(f"a number has more than {MAX_NUMBER_DIGITS} digits")
    value = float(text)
    if not math.isfinite(value):
        raise UnsafeJson(f"the number {text[:20]} is out of range")
    return value


def _constant(name: str) -> Any:
    raise UnsafeJson(f"{name} is not a JSON value")


def _check(value: Any, strings: bool) -> None:
    """Depth of nesting and, when `strings`, that every string (keys too) is valid Unicode."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            if depth > MAX_DEPTH:
                raise UnsafeJson(f"objects and arrays are nested more than {MAX_DEPTH} levels deep")
            stack.extend((k, depth) for k in v)
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            if depth > MAX_DEPTH:
                raise UnsafeJson(f"objects and arrays are nested more than {MAX_DEPTH} levels deep")
            stack.extend((x, depth + 1) for x in v)
        elif strings and isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise UnsafeJson("a string contains a lone UTF-16 surrogate (such as \\ud800); text must be valid Unicode") from None


def loads(raw: bytes) -> Any:
    """`json.loads` for untrusted request bodies; raises json.JSONDecodeError (or
    UnicodeDecodeError for bytes that are not UTF-8) on anything the gateway refuses."""
    try:
        value = json.loads(raw, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise UnsafeJson(f"objects and arrays are nested more than {MAX_DEPTH} levels deep") from None
    # Cheap gates first: the full walk runs only when the raw text could hold a problem.
    deep = raw.count(b"[") + raw.count(b"{") > MAX_DEPTH
    # UTF-16/32 bodies (a NUL or byte-order mark up front) are always checked.
    surrogates = _SURROGATE.search(raw) is not None or b"\x00" in raw[:4] or raw[:2] in (b"\xff\xfe", b"\xfe\xff")
    if deep or surrogates:
        _check(value, surrogates)
    return value
