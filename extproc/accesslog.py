"""Envoy's gRPC access log service (ALS) as plain Python: settlement reads finished requests from it.

Envoy (`envoy.access_loggers.http_grpc`) streams batches of entries, one per finished request,
each carrying the request's dynamic metadata. This module only turns the wire into `LogEntry`
values and hands every batch to a callback; what to do with them is the caller's business.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from extproc.pb import als_pb2 as pb
from extproc.protocol import struct_to_dict

log = logging.getLogger(__name__)

SERVICE = "envoy.service.accesslog.v3.AccessLogService"
METHOD = "StreamAccessLogs"

@dataclass(frozen=True)
class LogEntry:
    """One finished request as Envoy logged it. Absent fields are zero / empty, as on the wire."""

    request_id: str
    path: str
    response_code: int  # 0 when Envoy sent none (e.g. the client left before an answer)
    response_code_details: str
    request_body_bytes: int
    response_body_bytes: int
    attempt_count: int  # upstream attempts; 0 when the request never went upstream
    downstream_reset: bool  # the client went away before the answer was complete
    flags: frozenset[str]  # every set ResponseFlags field, by name
    route_name: str
    start_time_us: int  # Unix time in microseconds
    duration_us: int
    metadata: dict[str, dict[str, Any]]  # dynamic metadata: namespace -> plain Python values


def _flags(f: Any) -> frozenset[str]:
    """The set flags: proto3 lists only true bools, so a clean request costs one empty call."""
    return frozenset(field.name for field, _ in f.ListFields())


def to_entry(e: Any, namespaces: frozenset[str] | None = None) -> LogEntry:
    """One HTTPAccessLogEntry as a LogEntry (with only the metadata `namespaces`, if given:
    converting the rest costs time for nothing)."""
    common, request, response = e.common_properties, e.request, e.response
    flags = _flags(common.response_flags)
    start, duration = common.start_time, common.duration
    return LogEntry(
        request_id=request.request_id,
        path=request.path,
        response_code=response.response_code.value,
        response_code_details=response.response_code_details,
        request_body_bytes=request.request_body_bytes,
        response_body_bytes=response.response_body_bytes,
        attempt_count=common.upstream_request_attempt_count,
        downstream_reset="downstream_connection_termination" in flags,
        flags=flags,
        route_name=common.route_name,
        start_time_us=start.seconds * 1_000_000 + start.nanos // 1000,
        duration_us=duration.seconds * 1_000_000 + duration.nanos // 1000,
        metadata={ns: struct_to_dict(s) for ns, s in common.metadata.filter_metadata.items()
                  if namespaces is None or ns in namespaces},
    )


# The entry types written once per request, when it ended (NotSet: an Envoy older than the field).
FINAL_TYPES = frozenset({pb.NotSet, pb.DownstreamEnd})


def is_final(e: Any) -> bool:
    """Whether an HTTPAccessLogEntry is the one written when its request ended. Envoy 1.40 marks start
    and periodic entries both ways (intermediate_log_entry and their type); the type also keeps out
    per-attempt entries (UpstreamEnd) should an upstream log ever share this service."""
    common = e.common_properties
    return not common.intermediate_log_entry and common.access_log_type in FINAL_TYPES


def entries(msg: Any, namespaces: frozenset[str] | None = None) -> list[LogEntry]:
    """The final HTTP entries of one StreamAccessLogsMessage. Start and periodic entries of a request
    still running are skipped: settlement needs each request once, when it ended."""
    return [to_entry(e, namespaces) for e in msg.http_logs.log_entry if is_final(e)]


class Streams:
    """The access-log streams being served: Envoy never ends one, so a stopping server ends them
    (`close`: each handler returns its response, which ends the RPC; cancelling a handler's task
    does not, measured: grpc.aio then waits out the server's whole grace)."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()

    def close(self) -> None:
        self.closing.set()


def add_access_log_service(server: grpc.aio.Server, on_entries: Callable[[list[LogEntry]], None],
                           namespaces: frozenset[str] | None = None) -> Streams:
    """Serve StreamAccessLogs on `server`: every message's entries go to `on_entries` (synchronous:
    the caller schedules any async work). Envoy keeps one stream open and never expects a reply
    before it closes the stream, so the response is sent only at EOF (or when the returned
    `Streams` is closed)."""
    streams = Streams()

    async def stream_access_logs(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        reader = asyncio.ensure_future(_serve(requests))
        closing = asyncio.ensure_future(streams.closing.wait())
        await asyncio.wait({reader, closing}, return_when=asyncio.FIRST_COMPLETED)
        reader.cancel()
        closing.cancel()
        return pb.StreamAccessLogsResponse()

    async def _serve(requests: AsyncIterator[Any]) -> None:
        async for msg in requests:
            batch = entries(msg, namespaces)
            if not batch:
                continue
            try:
                on_entries(batch)
            except Exception:  # one bad batch must not close the stream Envoy sends everything on
                log.exception("access-log callback failed on %d entries", len(batch))

    handler = grpc.stream_unary_rpc_method_handler(
        stream_access_logs,
        request_deserializer=pb.StreamAccessLogsMessage.FromString,
        response_serializer=pb.StreamAccessLogsResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler})])
    return streams
