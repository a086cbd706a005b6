"""What one ext_proc stream talks to: a `Processor` with one method per phase.

Envoy sends each message of a stream with exactly one phase set (`ProcessingRequest.request`
oneof); `dispatch` looks the phase up in `PHASES` and calls that method of the stream's
processor. Both of Tollgate's processors implement this shape: `downstream.Exchange` (one per
HTTP request) and `upstream.AttemptExchange` (one per later attempt of a fallback chain).
`PassThrough` answers every phase with "continue unchanged", so a processor only writes the
phases it acts on. Phases outside the table (trailers, which Tollgate never asks Envoy for)
are answered by `empty_reply` as well.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from extproc.pb import ext_proc_pb2 as pb


class Processor(Protocol):
    """One stream's processor: each phase's message in, that phase's reply out."""

    async def request_headers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse: ...
    async def request_body(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse: ...
    async def response_headers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse: ...
    async def response_body(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse: ...


def empty_reply(kind: str | None) -> pb.ProcessingResponse:
    """Continue unchanged: the reply of the message's own phase with nothing in it."""
    if kind == "request_headers":
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse())
    if kind == "request_trailers":
        return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
    if kind == "response_trailers":
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
    if kind == "response_headers":
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    if kind == "response_body":
        return pb.ProcessingResponse(response_body=pb.BodyResponse())
    return pb.ProcessingResponse(request_body=pb.BodyResponse())


class PassThrough:
    """The default for every phase: continue unchanged (a processor overrides what it acts on)."""

    async def request_headers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        return empty_reply("request_headers")

    async def request_body(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        return empty_reply("request_body")

    async def response_headers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        return empty_reply("response_headers")

    async def response_body(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        return empty_reply("response_body")


Handler = Callable[[pb.ProcessingRequest], Awaitable[pb.ProcessingResponse]]

# Phase name (the `request` oneof of ProcessingRequest) -> the processor's method for it.
PHASES: dict[str, Callable[[Processor], Handler]] = {
    "request_headers": lambda p: p.request_headers,
    "request_body": lambda p: p.request_body,
    "response_headers": lambda p: p.response_headers,
    "response_body": lambda p: p.response_body,
}


async def dispatch(processor: Processor, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
    """The reply to one message: its phase's method, or continue unchanged for other phases."""
    kind = req.WhichOneof("request")
    method = PHASES.get(kind) if kind is not None else None
    if method is None:
        return empty_reply(kind)
    return await method(processor)(req)
