"""errors.py: the SPEC §4 shapes whose numbers are computed, not just named."""

from __future__ import annotations

import json

from extproc import errors


def test_rate_limited_is_a_429_with_its_retry_after_in_whole_seconds() -> None:
    err = errors.rate_limited("slow down", 30)
    assert (err.status, err.code, err.type) == (429, "rate_limit_exceeded", "requests")
    assert err.headers["retry-after"] == "30"


def test_rate_limited_never_says_retry_after_zero() -> None:
    assert errors.rate_limited("slow down", 0).headers["retry-after"] == "1"


def test_rate_limited_keeps_a_one_second_wait() -> None:
    assert errors.rate_limited("slow down", 1).headers["retry-after"] == "1"


def test_rate_limited_carries_the_rate_limit_headers_too() -> None:
    err = errors.rate_limited("slow down", 2, {"x-ratelimit-remaining-requests": "0"})
    assert err.headers == {"retry-after": "2", "x-ratelimit-remaining-requests": "0"}


def test_request_too_large_is_a_413_naming_the_limit() -> None:
    err = errors.request_too_large(1024)
    assert (err.status, err.code) == (413, "request_too_large")
    assert json.loads(err.body())["error"]["message"] == "The request body is larger than the gateway's limit of 1024 bytes."


def test_request_too_large_without_a_known_limit_names_none() -> None:
    assert errors.request_too_large().message == "The request body is larger than the gateway's limit."
