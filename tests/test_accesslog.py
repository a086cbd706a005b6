"""The access-log wire layer: our als.proto subset parses what a real Envoy 1.40 sends, and
`add_access_log_service` hands every finished request to the callback."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import random
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from extproc import accesslog, protocol
from extproc.accesslog import LogEntry
from extproc.devstack import envoy_binary, free_port, wait_for_port
from extproc.pb import als_pb2 as pb

ANSWER = b'{"id":"chatcmpl-1","usage":{"prompt_tokens":3,"completion_tokens":4}}'

# Sets the metadata the integrator's filters set on a real request: one namespace, a string and a number.
SNAPSHOT_LUA = """
function envoy_on_request(h)
  h:streamInfo():dynamicMetadata():set("tollgate.exchange", "x", "snapshot")
  h:streamInfo():dynamicMetadata():set("tollgate.exchange", "n", 3)
end
"""


# --- pure: a hand-built message -----------------------------------------------------------------

def _two_entry_message() -> Any:
    msg = pb.StreamAccessLogsMessage()
    msg.identifier.log_name = "tollgate_settle"
    final = msg.http_logs.log_entry.add()
    final.request.request_id = "req-1"
    final.request.path = "/v1/chat/completions"
    final.request.request_body_bytes = 120
    final.response.response_code.value = 200
    final.response.response_code_details = "via_upstream"
    final.response.response_body_bytes = 345
    c = final.common_properties
    c.upstream_request_attempt_count = 2
    c.route_name = "chat"
    c.start_time.seconds, c.start_time.nanos = 1_700_000_000, 250_000_000
    c.duration.seconds, c.duration.nanos = 1, 5_000_000
    c.response_flags.upstream_remote_reset = True
    c.response_flags.upstream_retry_limit_exceeded = True
    c.metadata.filter_metadata["tollgate.exchange"].update({"x": "snapshot", "n": 3})
    running = msg.http_logs.log_entry.add()
    running.request.request_id = "req-2"
    running.common_properties.intermediate_log_entry = True
    return msg


def test_a_message_gives_its_final_entries_with_every_field() -> None:
    assert accesslog.entries(_two_entry_message()) == [LogEntry(
        request_id="req-1", path="/v1/chat/completions", response_code=200, response_code_details="via_upstream",
        request_body_bytes=120, response_body_bytes=345, attempt_count=2, downstream_reset=False,
        flags=frozenset({"upstream_remote_reset", "upstream_retry_limit_exceeded"}), route_name="chat",
        start_time_us=1_700_000_000_250_000, duration_us=1_005_000,
        metadata={"tollgate.exchange": {"x": "snapshot", "n": 3.0}},
    )]


def test_intermediate_entries_are_skipped() -> None:
    msg = _two_entry_message()
    assert [e.request_id for e in accesslog.entries(msg)] == ["req-1"]


@pytest.mark.parametrize(("kind", "kept"), [
    (pb.NotSet, True), (pb.DownstreamEnd, True), (pb.DownstreamStart, False), (pb.DownstreamPeriodic, False),
    (pb.UpstreamEnd, False), (pb.TcpConnectionEnd, False)])
def test_only_entries_written_when_the_request_ended_are_kept(kind: int, kept: bool) -> None:
    msg = pb.StreamAccessLogsMessage()
    msg.http_logs.log_entry.add().common_properties.access_log_type = kind
    assert len(accesslog.entries(msg)) == (1 if kept else 0)


def test_an_entry_without_a_response_code_reads_zero_and_the_client_reset() -> None:
    msg = pb.StreamAccessLogsMessage()
    left = msg.http_logs.log_entry.add()
    left.common_properties.response_flags.downstream_connection_termination = True
    (entry,) = accesslog.entries(msg)
    assert (entry.response_code, entry.downstream_reset, entry.flags) == (0, True, frozenset({"downstream_connection_termination"}))


def test_a_message_with_no_http_logs_gives_no_entries() -> None:
    msg = pb.StreamAccessLogsMessage()
    msg.identifier.log_name = "tollgate_settle"
    assert accesslog.entries(msg) == []


def test_nested_structs_lists_numbers_bools_strings_and_nulls_convert_to_plain_python() -> None:
    s = pb.Metadata().filter_metadata["ns"]  # a google.protobuf.Struct
    s.fields["name"].string_value = "acme"
    s.fields["micro"].number_value = 1234567
    s.fields["half"].number_value = 0.5
    s.fields["ok"].bool_value = True
    s.fields["off"].bool_value = False
    s.fields["nothing"].null_value = 0
    inner = s.fields["price"].struct_value
    inner.fields["in"].number_value = 2
    inner.fields["deep"].struct_value.fields["k"].string_value = "v"
    items = s.fields["tags"].list_value
    items.values.add().string_value = "a"
    items.values.add().number_value = 7
    items.values.add().struct_value.fields["z"].bool_value = True
    assert protocol.struct_to_dict(s) == {
        "name": "acme", "micro": 1234567.0, "half": 0.5, "ok": True, "off": False, "nothing": None,
        "price": {"in": 2.0, "deep": {"k": "v"}}, "tags": ["a", 7.0, {"z": True}],
    }


def test_converted_types_are_exact() -> None:
    """A number is a float, a bool stays a bool (not 1/0), a string a str: settlement converts."""
    s = pb.Metadata().filter_metadata["ns"]
    s.fields["n"].number_value = 3
    s.fields["b"].bool_value = True
    got = protocol.struct_to_dict(s)
    assert (type(got["n"]), type(got["b"])) == (float, bool)


def test_field_numbers_match_envoy_v3() -> None:
    """The numbers from envoy/service/accesslog/v3/als.proto and envoy/data/accesslog/v3/accesslog.proto.
    The real-Envoy tests below prove them on the wire."""
    def numbers(msg: Any) -> dict[str, int]:
        return {f.name: f.number for f in msg.DESCRIPTOR.fields}

    assert numbers(pb.StreamAccessLogsMessage) == {"identifier": 1, "http_logs": 2}
    assert numbers(pb.StreamAccessLogsMessage.Identifier) == {"log_name": 2}
    assert numbers(pb.StreamAccessLogsMessage.HTTPAccessLogEntries) == {"log_entry": 1}
    assert numbers(pb.HTTPAccessLogEntry) == {"common_properties": 1, "request": 3, "response": 4}
    assert numbers(pb.AccessLogCommon) == {
        "start_time": 5, "response_flags": 16, "metadata": 17, "route_name": 19, "duration": 23,
        "upstream_request_attempt_count": 24, "intermediate_log_entry": 27, "access_log_type": 33}
    assert numbers(pb.ResponseFlags) == {
        "no_healthy_upstream": 2, "upstream_request_timeout": 3, "local_reset": 4, "upstream_remote_reset": 5,
        "upstream_connection_failure": 6, "upstream_connection_termination": 7, "upstream_overflow": 8,
        "downstream_connection_termination": 15, "upstream_retry_limit_exceeded": 16, "stream_idle_timeout": 17,
        "upstream_max_stream_duration_reached": 20, "upstream_protocol_error": 24}
    assert numbers(pb.HTTPRequestProperties) == {"path": 5, "request_id": 9, "request_body_bytes": 12}
    assert numbers(pb.HTTPResponseProperties) == {"response_code": 1, "response_body_bytes": 3, "response_code_details": 6}
    assert numbers(pb.Metadata) == {"filter_metadata": 1}


def test_service_method_is_envoys() -> None:
    service = pb.DESCRIPTOR.services_by_name["AccessLogService"]
    assert service.full_name == "envoy.service.accesslog.v3.AccessLogService"
    method = service.methods_by_name["StreamAccessLogs"]
    assert (method.client_streaming, method.server_streaming) == (True, False)


# --- the gRPC service on a real grpc.aio server ---------------------------------------------------

@dataclass
class Receiver:
    """A grpc.aio server running `add_access_log_service` on its own event loop thread; it keeps
    every batch and the monotonic time each entry reached the callback."""

    port: int = 0
    batches: list[list[LogEntry]] = field(default_factory=list)
    arrived: dict[str, float] = field(default_factory=dict)
    fail_next: bool = False
    lock: threading.Condition = field(default_factory=threading.Condition)

    def on_entries(self, batch: list[LogEntry]) -> None:
        now = time.monotonic()
        with self.lock:
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("callback broke")
            self.batches.append(batch)
            for e in batch:
                self.arrived[e.request_id] = now
            self.lock.notify_all()

    def arrival(self, request_id: str, timeout_s: float = 5.0) -> float | None:
        """When the entry of `request_id` reached the callback (monotonic), waiting for it if need be."""
        with self.lock:
            self.lock.wait_for(lambda: request_id in self.arrived, timeout_s)
            return self.arrived.get(request_id)

    def all(self) -> list[LogEntry]:
        with self.lock:
            return [e for b in self.batches for e in b]

    def wait_for(self, n: int, timeout_s: float = 5.0) -> list[LogEntry]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.all()
            if len(got) >= n:
                return got
            time.sleep(0.005)
        return self.all()


@contextlib.contextmanager
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def start() -> None:
        server = grpc.aio.server()
        accesslog.add_access_log_service(server, rec.on_entries)
        rec.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        box["server"] = server
        ready.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield rec
    finally:
        asyncio.run_coroutine_threadsafe(box["server"].stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _send(port: int, messages: list[Any]) -> Any:
    async def go() -> Any:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_unary(
                f"/{accesslog.SERVICE}/{accesslog.METHOD}",
                request_serializer=pb.StreamAccessLogsMessage.SerializeToString,
                response_deserializer=pb.StreamAccessLogsResponse.FromString,
            )
            return await call(iter(messages), timeout=5)
    return asyncio.run(go())


def _message(*request_ids: str) -> Any:
    msg = pb.StreamAccessLogsMessage()
    for rid in request_ids:
        msg.http_logs.log_entry.add().request.request_id = rid
    return msg


def test_the_service_hands_each_message_to_the_callback_and_answers_at_the_end() -> None:
    with receiver() as rec:
        reply = _send(rec.port, [_message("a", "b"), _message("c")])
        assert reply == pb.StreamAccessLogsResponse()
        assert [[e.request_id for e in b] for b in rec.batches] == [["a", "b"], ["c"]]


def test_a_message_of_only_intermediate_entries_does_not_call_back() -> None:
    running = _message("r")
    running.http_logs.log_entry[0].common_properties.intermediate_log_entry = True
    with receiver() as rec:
        _send(rec.port, [running, _message("d")])
        assert [[e.request_id for e in b] for b in rec.batches] == [["d"]]


def test_a_failing_callback_does_not_end_the_stream() -> None:
    with receiver() as rec:
        rec.fail_next = True
        reply = _send(rec.port, [_message("lost"), _message("kept")])
        assert reply == pb.StreamAccessLogsResponse()
        assert [[e.request_id for e in b] for b in rec.batches] == [["kept"]]


# --- a real Envoy 1.40 ----------------------------------------------------------------------------

def access_logger_yaml(flush_interval: str) -> str:
    """The access logger under test (the integrator's config renders the same shape)."""
    return f"""\
          - name: envoy.access_loggers.http_grpc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig
              common_config:
                log_name: tollgate_settle
                transport_api_version: V3
                grpc_service: {{envoy_grpc: {{cluster_name: tollgate_als}}}}
                buffer_flush_interval: {flush_interval}
"""


def _cluster(name: str, port: int, http2: bool = False) -> str:
    options = ("""
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}""" if http2 else "")
    return f"""
  - name: {name}
    type: STATIC
    connect_timeout: 1s{options}
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]"""


def bootstrap(*, admin: int, front: int, answer: int, slow: int, als: int, flush_interval: str, periodic: bool) -> str:
    """Front listener: Lua sets the metadata, the router sends /slow to a server that never answers and
    everything else to a second listener answering 200 with JSON; the access log goes to `als`."""
    lua = "\n".join("                  " + line for line in SNAPSHOT_LUA.strip().splitlines())
    options = ("          access_log_options: {access_log_flush_interval: 0.05s, flush_access_log_on_new_request: true}\n"
               if periodic else "")
    return f"""\
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: front
    address: {{socket_address: {{address: 127.0.0.1, port_value: {front}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          access_log:
{access_logger_yaml(flush_interval)}{options}          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - name: slow
                match: {{prefix: "/slow"}}
                route: {{cluster: slow, timeout: 30s}}
              - name: chat
                match: {{prefix: "/"}}
                route: {{cluster: answer, timeout: 10s}}
          http_filters:
          - name: envoy.filters.http.lua
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
              default_source_code:
                inline_string: |
{lua}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  - name: answer
    address: {{socket_address: {{address: 127.0.0.1, port_value: {answer}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: answer
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                direct_response: {{status: 200, body: {{inline_string: '{ANSWER.decode()}'}}}}
                response_headers_to_add: [{{header: {{key: content-type, value: application/json}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:{_cluster("answer", answer)}{_cluster("slow", slow)}{_cluster("tollgate_als", als, http2=True)}
"""


@contextlib.contextmanager
def silent_upstream() -> Iterator[int]:
    """A TCP server that accepts and reads but never answers: the client gives up first."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = srv.accept()
                held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(srv.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        srv.close()


@dataclass
class Front:
    port: int
    admin: int
    rec: Receiver

    def stat(self, name: str) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/stats?filter=^{name}$", timeout=2) as r:
            line = r.read().decode().strip()
        return int(line.rsplit(":", 1)[1]) if line else 0


@contextlib.contextmanager
def envoy_with_als(flush_interval: str = "0.01s", periodic: bool = False) -> Iterator[Front]:
    with receiver() as rec, silent_upstream() as slow:
        admin, front, answer = free_port(), free_port(), free_port()
        fd, path = tempfile.mkstemp(prefix="tollgate-als-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            f.write(bootstrap(admin=admin, front=front, answer=answer, slow=slow, als=rec.port,
                              flush_interval=flush_interval, periodic=periodic))
        log = tempfile.TemporaryFile()  # noqa: SIM115 - closed below, after Envoy stops
        proc = subprocess.Popen([envoy_binary(), "-c", path, "--concurrency", "1", "--log-level", "warning",
                                 "--base-id", str(admin), "--disable-hot-restart"],
                                stdout=log, stderr=log)
        try:
            _wait_ready(proc, admin, log)
            wait_for_port(front, proc=proc)
            yield Front(front, admin, rec)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.unlink(path)
            log.close()


def _wait_ready(proc: subprocess.Popen[bytes], admin: int, log: Any) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"envoy exited {proc.returncode}: {log.read().decode()[-2000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=0.5) as r:
            if r.status == 200:
                return
        time.sleep(0.05)
    raise TimeoutError("envoy did not become ready")


def _post(conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers={"content-type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    return resp.status, resp.read()


@pytest.fixture(scope="module")
def front() -> Iterator[Front]:
    with envoy_with_als() as f:
        yield f


def test_real_envoy_sends_one_entry_per_request_with_its_metadata(front: Front) -> None:
    body = b'{"model":"m","messages":[]}'
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=5)
    before = len(front.rec.all())
    for headers in ({"x-request-id": "abc"}, {}, {}):
        assert _post(conn, "/v1/chat/completions", body, headers) == (200, ANSWER)
    conn.close()
    got = front.rec.wait_for(before + 3)[before:]
    assert len(got) == 3
    assert [e.response_code for e in got] == [200, 200, 200]
    assert [e.metadata for e in got] == [{"tollgate.exchange": {"x": "snapshot", "n": 3.0}}] * 3
    assert got[0].request_id == "abc"  # one connection, one worker: entries come in request order
    assert len({e.request_id for e in got}) == 3  # Envoy made the other two ids itself


def test_real_envoy_fills_the_request_and_response_fields(front: Front) -> None:
    """Proves the other field numbers on the wire: every value below is what Envoy must report."""
    body = b'{"model":"m","messages":[]}'  # 27 bytes
    started = time.time()
    # Headers and body in one write: http.client sends them apart, and the upstream's answer
    # could then end the request before Envoy read the body (request_body_bytes 0, seen 1 in 8).
    head = (f"POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: front\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nx-request-id: fields-1\r\nconnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", front.port), timeout=5) as sock:
        sock.sendall(head.encode() + body)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        assert answer.status == 200 and answer.read() == ANSWER
    front.rec.arrival("fields-1")
    (e,) = [e for e in front.rec.all() if e.request_id == "fields-1"]
    assert (e.path, e.request_body_bytes, e.response_body_bytes) == ("/v1/chat/completions?x=1", 27, len(ANSWER))
    assert (e.response_code_details, e.attempt_count, e.route_name) == ("via_upstream", 1, "chat")
    assert (e.downstream_reset, e.flags) == (False, frozenset())
    assert abs(e.start_time_us / 1e6 - started) < 2.0
    assert 0 < e.duration_us < 2_000_000


def test_real_envoy_reports_a_client_that_left_before_the_answer() -> None:
    """Start and periodic logs are on, so Envoy also sends entries for the request while it runs;
    the callback must see exactly one entry for it, the final one, marked as a downstream reset."""
    with envoy_with_als(periodic=True) as f:
        conn = http.client.HTTPConnection("127.0.0.1", f.port, timeout=0.3)
        with pytest.raises(TimeoutError):
            _post(conn, "/slow", b"{}", {"x-request-id": "gone"})
        conn.close()
        deadline = time.monotonic() + 5
        while not [e for e in f.rec.all() if e.request_id == "gone"] and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # any further (wrong) entry for it would arrive within a few flushes
        gone = [e for e in f.rec.all() if e.request_id == "gone"]
        sent = f.stat("access_logs.grpc_access_log.grpc_entries_flushed")
    assert sent >= 3  # start + at least one periodic (every 0.05 s over 0.3 s) + end
    assert len(gone) == 1
    assert (gone[0].downstream_reset, gone[0].response_code, gone[0].route_name) == (True, 0, "slow")
    assert gone[0].response_code_details == "downstream_remote_disconnect"
    assert gone[0].metadata == {"tollgate.exchange": {"x": "snapshot", "n": 3.0}}


# --- measurement (printed with -s, never asserted) ---------------------------------------------

@pytest.mark.parametrize("flush_interval", ["0.01s", "0.001s"])
def test_measure_delay_from_answer_to_callback(flush_interval: str) -> None:
    """Requests start at a random phase of the flush timer: sent right after the previous entry
    arrived, each would land just after a flush and wait the whole interval."""
    n = 50
    delays: list[float] = []
    phase = random.Random(12)
    with envoy_with_als(flush_interval) as f:
        conn = http.client.HTTPConnection("127.0.0.1", f.port, timeout=5)
        for i in range(n):
            rid = f"m-{i}"
            time.sleep(phase.uniform(0, 0.02))
            status, _ = _post(conn, "/v1/chat/completions", b"{}", {"x-request-id": rid})
            answered = time.monotonic()
            assert status == 200
            arrived = f.rec.arrival(rid)
            if arrived is not None:
                delays.append(arrived - answered)
        conn.close()
        batches = len(f.rec.batches)
    ms = sorted(d * 1000 for d in delays)
    print(f"\nALS buffer_flush_interval {flush_interval}: {len(delays)}/{n} entries arrived in {batches} messages; "
          f"answer->callback p50 {statistics.median(ms):.2f} ms, min {ms[0]:.2f}, max {ms[-1]:.2f} ms"
          if ms else f"\nALS buffer_flush_interval {flush_interval}: no entries arrived")
