"""Flat memory (issue 14): the processor must not grow per request.

The leak check drives 30,000 requests of mixed traffic (normal, streams, fallbacks, quota
refusals, bad keys) through the real parts - Redis, `tollgate serve` (one worker: one process to
measure) and Envoy - and fits the processor's RSS over the requests after warm-up. The
provider is an Envoy answering canned completions (`bench.load`), not the Python fake
providers: 30,000 requests must fit in about a minute on two cores.

The bound is generous (noise of the allocator, RSS measured in pages) yet below what the
grpc.aio leak this fixed cost (~130 B/request); a list kept per request (a few hundred bytes
at least) fails it. `make soak N=500000` is the long version, with the +-5% rule.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from bench.load import LoadStack, Tally, drive, rss_bytes
from bench.soak import slope
from extproc.pb import ext_proc_pb2 as pb
from extproc.server import is_last_message

WARMUP = 6_000
TOTAL = 30_000
STEP = 2_000
BOUND_BYTES_PER_REQUEST = 60


@pytest.fixture(scope="module")
def load_stack() -> Iterator[LoadStack]:
    s = LoadStack().start()
    yield s
    s.stop()


def test_processor_rss_stays_flat_over_30000_mixed_requests(load_stack: LoadStack) -> None:
    assert load_stack.envoy is not None and load_stack.processor is not None and load_stack.processor.proc is not None
    pid, port = load_stack.processor.proc.pid, load_stack.envoy.port
    tally = Tally()
    asyncio.run(drive(port, load_stack.keys, WARMUP, tally=tally))
    done, rss = [float(tally.done)], [float(rss_bytes(pid))]
    while tally.done < TOTAL:
        asyncio.run(drive(port, load_stack.keys, tally.done + STEP, tally=tally))
        done.append(float(tally.done))
        rss.append(float(rss_bytes(pid)))
    # Every kind of traffic was exercised; a shared, overloaded machine may time out a handful.
    assert sum(tally.unexpected().values()) < TOTAL // 1000, tally.statuses
    per_request = slope(done, rss)
    growth = ", ".join(f"{int(d)}: {r / 1e6:.1f} MB" for d, r in zip(done, rss, strict=True))
    assert per_request < BOUND_BYTES_PER_REQUEST, f"processor grows {per_request:.0f} B/request ({growth})"


def _req(kind: str, eos: bool) -> pb.ProcessingRequest:
    if kind in ("request_headers", "response_headers"):
        return pb.ProcessingRequest(**{kind: pb.HttpHeaders(end_of_stream=eos)})
    return pb.ProcessingRequest(**{kind: pb.HttpBody(end_of_stream=eos)})


CONTINUE = pb.ProcessingResponse(response_body=pb.BodyResponse())
IMMEDIATE = pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(status=pb.HttpStatus(code=401)))


def test_an_immediate_response_is_the_last_message() -> None:
    assert is_last_message("request_headers", _req("request_headers", False), IMMEDIATE, upstream=False)


def test_the_end_of_the_response_is_the_last_downstream_message() -> None:
    assert is_last_message("response_body", _req("response_body", True), CONTINUE, upstream=False)
    assert is_last_message("response_headers", _req("response_headers", True), CONTINUE, upstream=False)


def test_a_chunk_before_the_end_is_not_the_last_message() -> None:
    assert not is_last_message("response_body", _req("response_body", False), CONTINUE, upstream=False)


def test_response_headers_are_last_unless_the_reply_asks_for_the_body() -> None:
    """The normal path ends at the response headers (the body passes untouched); a reply that
    switches the body on (a stream, an error to rewrite) expects body messages next."""
    body_on = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    body_on.mode_override.CopyFrom(pb.ProcessingMode(response_body_mode=pb.ProcessingMode.STREAMED))
    headers_only = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    assert not is_last_message("response_headers", _req("response_headers", False), body_on, upstream=False)
    assert is_last_message("response_headers", _req("response_headers", False), headers_only, upstream=False)


def test_the_request_headers_are_last_only_on_an_upstream_attempt() -> None:
    """An upstream attempt costs one message (its headers); the body is rewritten by Lua."""
    assert is_last_message("request_headers", _req("request_headers", False), CONTINUE, upstream=True)
    assert not is_last_message("request_headers", _req("request_headers", False), CONTINUE, upstream=False)
    assert not is_last_message("request_body", _req("request_body", True), CONTINUE, upstream=False)
