"""Attacks on resp.py (the request path's own Redis connection) and the GroupCommit that uses
it, against a real redis-server: replies cut at every byte, huge replies, big batches, error
and nil replies nested in arrays, Redis restarted, killed or stalled (SIGSTOP) around a batch,
and callers or the flusher cancelled while a batch is in flight. The rules: each batch gets
its own replies (never a stale one), a batch is never sent twice, and every caller gets an
answer or an error within the deadline."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Self, TypeVar

import hiredis
import pytest
import redis
import uvloop
from redis.exceptions import ConnectionError, RedisError, ResponseError

from extproc import config
from extproc.devstack import RedisServer
from extproc.fakeprovider import FakeProvider
from extproc.quota import Account, month_of
from extproc.resp import RespConnection, _Protocol, pack
from extproc.store import Scripts, close, redis_client
from tests.conftest import Stack, post_raw, running_stack
from tests.dropproxy import DropProxy
from tests.test_attack_billing import records_of

# A script that keeps Redis busy for `ms` milliseconds, then answers 'late'.
BUSY = ("local t = redis.call('TIME') while true do local n = redis.call('TIME') "
        "if (n[1] - t[1]) * 1000000 + n[2] - t[2] > tonumber(ARGV[1]) * 1000 then return 'late' end end")

T = TypeVar("T")

LOOPS = ["asyncio", "uvloop"]  # the processor runs on uvloop; tools and tests on asyncio


def run_on(loop: str, coro: Coroutine[Any, Any, Any]) -> Any:
    return uvloop.run(coro) if loop == "uvloop" else asyncio.run(coro)


def wire(url: str) -> RespConnection:
    conn = RespConnection.for_client(redis_client(url, deadline_only=True))
    assert conn is not None
    return conn


def on_fake_server(loop: str, answer: Callable[[int], bytes],
                   scenario: Callable[[RespConnection], Awaitable[T]]) -> tuple[T, FakeServer]:
    """`scenario` on a connection to a new FakeServer answering `answer` (closed, and the
    server stopped, after): its result and the server, for what the server saw."""
    server = FakeServer(answer).start()

    async def run() -> T:
        conn = wire(f"redis://127.0.0.1:{server.port}/0")
        try:
            return await scenario(conn)
        finally:
            conn.close()

    try:
        return run_on(loop, run()), server
    finally:
        server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, to stop, kill and restart."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


def pid_of(server: RedisServer) -> int:
    assert server.proc is not None
    return server.proc.pid


def raw_replies(port: int, commands: list[tuple[Any, ...]]) -> bytes:
    """The exact bytes Redis answers `commands` with (read over a plain socket)."""
    reader, out = hiredis.Reader(), b""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"".join(pack(c) for c in commands))
        got = 0
        while got < len(commands):
            chunk = s.recv(65536)
            assert chunk
            out += chunk
            reader.feed(chunk)
            while reader.gets() is not False:
                got += 1
    return out


# --- replies: shapes and cuts --------------------------------------------------------------

MIXED = [("SET", "att:k", "v"), ("GET", "att:k"), ("GET", "att:missing"), ("INCR", "att:n"),
         ("EVAL", "return {1, {'x', false}, redis.error_reply('boom'), {}}", 0), ("EVAL", "return redis.error_reply('top')", 0)]


def check_mixed(replies: list[Any]) -> None:
    ok, value, nil, n, nested, top = replies
    assert (ok, value, nil, n) == (b"OK", b"v", None, 1)
    assert nested[0] == 1 and nested[1] == [b"x", None] and nested[3] == []
    assert isinstance(nested[2], ResponseError) and str(nested[2]) == "ERR boom"  # Redis 7 puts ERR before a bare message
    assert isinstance(top, ResponseError) and str(top) == "ERR top"


def test_replies_cut_at_every_byte_boundary_are_read_whole(own_redis: RedisServer) -> None:
    data = raw_replies(own_redis.port, [("DEL", "att:n"), *MIXED])
    data = data[data.index(b"+OK"):]  # from the SET's reply on (DEL's is there so that INCR answers 1)

    async def feed(cuts: list[int]) -> list[Any]:
        proto = _Protocol()
        proto.waiting = asyncio.get_running_loop().create_future()
        proto.expected, proto.replies = len(MIXED), []
        bounds = [0, *cuts, len(data)]
        for a, b in itertools.pairwise(bounds):
            proto.data_received(data[a:b])
        assert proto.waiting is None and not proto.lost
        return proto.replies

    for i in range(1, len(data)):
        check_mixed(asyncio.run(feed([i])))
    check_mixed(asyncio.run(feed(list(range(1, len(data))))))  # one byte at a time


def test_the_same_replies_as_redis_py_for_mixed_nested_nil_and_error_replies(redis_url: str) -> None:
    async def run() -> tuple[list[Any], list[Any]]:
        client = redis_client(redis_url, deadline_only=True)
        conn = wire(redis_url)
        try:
            await client.delete("att:n")
            pipe = client.pipeline(transaction=False)
            for c in MIXED:
                pipe.execute_command(*c)
            theirs = list(await pipe.execute(raise_on_error=False))
            await client.delete("att:n")
            return theirs, await conn.run(list(MIXED))
        finally:
            conn.close()
            await client.aclose()

    theirs, ours = asyncio.run(run())
    check_mixed(ours)
    assert ours[:4] == [b"OK", b"v", None, 1] and theirs[1:4] == [b"v", None, 1]  # SET: redis-py's callback makes it True
    assert [type(x) for x in ours[4]] == [type(x) for x in theirs[4]] and type(ours[5]) is type(theirs[5])


def test_a_5_mb_reply_through_a_proxy_that_delivers_it_in_small_pieces(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    big = os.urandom(5 * 1024 * 1024)
    r.set("att:big", big)
    trickle = TrickleProxy(r.connection_pool.connection_kwargs["port"], chunk=1000).start()

    async def run() -> list[Any]:
        conn = wire(f"redis://127.0.0.1:{trickle.port}/0")
        try:
            first = await conn.run([("EVAL", "return redis.call('GET', KEYS[1])", 1, "att:big"), ("ECHO", "after")], deadline_s=30)
            return [*first, *(await conn.run([("ECHO", "next")], deadline_s=5))]
        finally:
            conn.close()

    try:
        got, after, nxt = asyncio.run(run())
    finally:
        trickle.stop()
    assert got == big and after == b"after" and nxt == b"next"


def test_a_batch_of_5000_commands_gets_5000_replies_in_order(redis_url: str) -> None:
    async def run() -> list[Any]:
        conn = wire(redis_url)
        try:
            return await conn.run([("ECHO", f"m{i}") for i in range(5000)], deadline_s=10)
        finally:
            conn.close()

    assert asyncio.run(run()) == [f"m{i}".encode() for i in range(5000)]


def test_an_empty_batch_answers_at_once_with_no_replies(redis_url: str) -> None:
    async def run() -> tuple[float, list[Any], list[Any]]:
        conn = wire(redis_url)
        try:
            started = time.monotonic()
            empty = await conn.run([], deadline_s=1)
            return time.monotonic() - started, empty, await conn.run([("ECHO", "x")], deadline_s=1)
        finally:
            conn.close()

    took, empty, after = asyncio.run(run())
    assert empty == [] and took < 0.5 and after == [b"x"]


def test_request_path_commands_answer_as_redis_py_did(redis_url: str) -> None:
    """EVALSHA (integer, bulk, array replies), ZADD/ZREM/HDEL (integers), through GroupCommit's
    own connection and through a redis-py pipeline: the same values."""
    script = "return {tonumber(ARGV[1]), ARGV[2], {ARGV[2]}}"

    async def run() -> tuple[list[Any], list[Any]]:
        client = redis_client(redis_url, deadline_only=True)
        scripts = Scripts(client)
        try:
            sha = await client.script_load(script)
            cmds: tuple[Callable[[Any], Any], ...] = (lambda c: c.evalsha(sha, 0, 7, "s"), lambda c: c.zadd("att:z", {"m": 5}, nx=True),
                    lambda c: c.zadd("att:z", {"m": 9}, xx=True, gt=True), lambda c: c.zrem("att:z", "m", "nope"),
                    lambda c: c.hdel("att:h", "f"))
            ours = await scripts.batch(*cmds)
            pipe = client.pipeline(transaction=False)
            for c in cmds:
                c(pipe)
            return ours, list(await pipe.execute())
        finally:
            await close(client)

    ours, theirs = asyncio.run(run())
    assert ours == [[7, b"s", [b"s"]], 1, 0, 1, 0]
    assert theirs == ours


# --- connection lost, killed, restarted ----------------------------------------------------

@pytest.mark.parametrize("loop", LOOPS)
def test_redis_restarted_while_idle_the_next_batch_reconnects_and_succeeds(own_redis: RedisServer, loop: str) -> None:
    async def run() -> tuple[list[Any], list[Any]]:
        client = redis_client(own_redis.url, deadline_only=True)
        scripts = Scripts(client, "hint_done")
        try:
            first = await scripts.batch(lambda c: c.hdel("att:h", "f"))
            own_redis.stop()
            own_redis.start()
            await asyncio.sleep(0.1)  # idle: the loss is seen before the next batch
            # The scripts are gone with the restart: loaded again, and this batch sent once more.
            call = await scripts.batch(lambda c: c.zadd("att:z", {"m": 7}),
                                       lambda c: scripts.call(c, "hint_done", ["att:z"], ["m", 7]))
            return first, call
        finally:
            await close(client)

    first, call = run_on(loop, run())
    assert first == [0] and call[1] == 1  # the hint was there with its score and hint_done removed it


def test_redis_killed_mid_batch_fails_it_without_resending_and_the_next_batch_works(own_redis: RedisServer) -> None:
    proxy = DropProxy(own_redis.port).start()
    proxy.watch(b"att:once")

    async def run() -> list[Any]:
        conn = wire(f"redis://127.0.0.1:{proxy.port}/0")
        try:
            slow = asyncio.create_task(conn.run([("INCR", "att:once"), ("EVAL", BUSY, 0, 3000)], deadline_s=10))
            await asyncio.sleep(0.3)
            assert own_redis.proc is not None
            own_redis.proc.kill()
            own_redis.proc.wait()
            with pytest.raises(ConnectionError):
                await slow
            own_redis.start()
            return await conn.run([("GET", "att:once"), ("ECHO", "fresh")], deadline_s=5)
        finally:
            conn.close()

    try:
        replies = asyncio.run(run())
    finally:
        proxy.stop()
    assert replies == [None, b"fresh"]  # a new Redis (nothing kept) and our batch's own replies
    assert proxy.forwarded[b"att:once"] == 2  # the INCR once, the GET once: the failed batch was not sent again


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_killed_while_idle_is_opened_again_logged_in_and_on_its_database(loop: str) -> None:
    server = RedisServer()
    server.start()
    r = redis.Redis(port=server.port)
    r.config_set("requirepass", "pw-attack")
    r = redis.Redis(port=server.port, password="pw-attack")

    async def run() -> tuple[list[Any], list[Any]]:
        conn = wire(f"redis://:pw-attack@127.0.0.1:{server.port}/5")
        try:
            first = await conn.run([("SET", "att:db", "five")], deadline_s=2)
            await asyncio.to_thread(r.client_kill_filter, _type="normal", skipme=True)
            await asyncio.sleep(0.1)
            return first, await conn.run([("GET", "att:db"), ("CLIENT", "INFO")], deadline_s=2)
        finally:
            conn.close()

    try:
        first, (value, info) = run_on(loop, run())
    finally:
        server.stop()
    assert first == [b"OK"] and value == b"five" and b" db=5 " in info


@pytest.mark.parametrize("loop", LOOPS)
def test_a_reply_nobody_asked_for_drops_the_connection_and_the_next_batch_gets_its_own(loop: str) -> None:
    """A server that sends an extra reply after the batch's (a stream that is not ours any
    more): the connection is dropped, not kept with a reply waiting for the next batch."""
    async def scenario(conn: RespConnection) -> tuple[list[Any], list[Any]]:
        first = await conn.run([("PING",)], deadline_s=1)
        await asyncio.sleep(0.1)
        return first, await conn.run([("PING",)], deadline_s=1)

    (first, second), server = on_fake_server(loop, lambda n: b"+first\r\n+extra\r\n" if n == 0 else b"+second\r\n", scenario)
    assert first == [b"first"] and second == [b"second"] and server.connections == 2


@pytest.mark.parametrize("loop", LOOPS)
def test_garbage_from_the_server_fails_the_batch_and_the_next_batch_reconnects(loop: str) -> None:
    async def scenario(conn: RespConnection) -> tuple[float, list[Any]]:
        started = time.monotonic()
        with pytest.raises((ConnectionError, hiredis.ProtocolError)):
            await conn.run([("PING",)], deadline_s=2)
        took = time.monotonic() - started
        return took, await conn.run([("PING",)], deadline_s=1)

    (took, after), _ = on_fake_server(loop, lambda n: b"?what\r\n" if n == 0 else b"+fine\r\n", scenario)
    assert took < 1 and after == [b"fine"]


# --- stalls and deadlines ------------------------------------------------------------------

def test_a_batch_that_had_to_connect_still_ends_within_one_deadline(own_redis: RedisServer) -> None:
    """Connecting (with its SELECT) and the round trip share ONE deadline: here Redis stalls
    while the connection is set up, then the batch itself is slow; the caller must have its
    error within the deadline, not after connect time plus a whole deadline more."""
    pid = pid_of(own_redis)

    async def run() -> float:
        conn = wire(f"redis://127.0.0.1:{own_redis.port}/2")  # SELECT 2 on connecting
        try:
            os.kill(pid, signal.SIGSTOP)
            threading.Timer(0.6, os.kill, (pid, signal.SIGCONT)).start()
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await conn.run([("EVAL", BUSY, 0, 700)], deadline_s=1.0)
            return time.monotonic() - started
        finally:
            conn.close()

    took = asyncio.run(run())
    assert took < 1.2, f"the caller waited {took:.2f}s with a 1 s deadline"


@pytest.mark.parametrize("loop", LOOPS)
def test_stalled_redis_fails_every_caller_within_the_deadline_and_after_it_each_batch_gets_its_own_replies(
        own_redis: RedisServer, loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "REDIS_DEADLINE_S", 0.5)
    pid = pid_of(own_redis)

    async def caller(scripts: Scripts, i: int) -> tuple[str, float]:
        started = time.monotonic()
        try:
            (reply,) = await scripts.batch(lambda c: c.evalsha(scripts.sha["hint_done"], 1, f"att:z{i}", f"m{i}"))
            return f"ok:{reply}", time.monotonic() - started
        except RedisError as exc:
            return type(exc).__name__, time.monotonic() - started

    async def run() -> tuple[list[tuple[str, float]], list[list[Any]]]:
        client = redis_client(own_redis.url, deadline_only=True)
        scripts = Scripts(client, "hint_done")
        try:
            await scripts.load()
            await scripts.batch(lambda c: c.hdel("att:h", "warm"))
            os.kill(pid, signal.SIGSTOP)
            try:
                outcomes = []
                for wave in range(3):  # callers arriving while a stalled batch is in flight, three times
                    tasks = [asyncio.create_task(caller(scripts, wave * 10 + i)) for i in range(10)]
                    outcomes += await asyncio.wait_for(asyncio.gather(*tasks), 5)
            finally:
                os.kill(pid, signal.SIGCONT)
            after = [await scripts.batch(lambda c, i=i: c.zadd(f"att:after{i}", {"a": 1, "b": 2, "c": 3}),
                                         lambda c, i=i: c.zrem(f"att:after{i}", *(["a"] * (i % 3 + 1))))
                     for i in range(6)]
            return outcomes, after
        finally:
            await close(client)

    outcomes, after = run_on(loop, run())
    assert {o for o, _ in outcomes} == {"TimeoutError"}
    # A caller waits at most for the batch in flight and then its own: two deadlines.
    assert max(t for _, t in outcomes) < 2 * 0.5 + 0.3
    assert after == [[3, 1]] * 6  # each its own reply, none a stale one of the stall


def test_a_batch_queued_behind_a_stalled_one_fails_within_its_own_deadline(own_redis: RedisServer,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller whose batch waits for the one in flight: its deadline counts from when it
    asked, not from when its batch could be sent (it would wait for the stalled batch's
    deadline and then its own)."""
    monkeypatch.setattr(config, "REDIS_DEADLINE_S", 0.5)
    pid = pid_of(own_redis)

    async def timed(scripts: Scripts, key: str) -> tuple[str, float]:
        started = time.monotonic()
        try:
            await scripts.batch(lambda c: c.hdel(key, "f"))
            return "answered", time.monotonic() - started
        except RedisError as exc:
            return type(exc).__name__, time.monotonic() - started

    async def run() -> list[tuple[str, float]]:
        client = redis_client(own_redis.url, deadline_only=True)
        scripts = Scripts(client)
        try:
            await scripts.batch(lambda c: c.hdel("att:h", "warm"))
            os.kill(pid, signal.SIGSTOP)
            try:
                first = asyncio.create_task(timed(scripts, "att:first"))
                await asyncio.sleep(0.3)
                queued = asyncio.create_task(timed(scripts, "att:queued"))
                return [await first, await queued]
            finally:
                os.kill(pid, signal.SIGCONT)
        finally:
            await close(client)

    (first, first_took), (queued, queued_took) = asyncio.run(run())
    assert first == queued == "TimeoutError"
    assert first_took < 0.5 + 0.15 and queued_took < 0.5 + 0.15, (first_took, queued_took)


def test_a_queued_batch_past_its_deadline_is_never_sent(own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The round trip in flight runs long (a slow script, then NOSCRIPT and a script reload
    that Redis does not answer): a batch queued meanwhile fails at its deadline and is taken
    out of the queue, so it never reaches Redis after its caller was told it failed."""
    monkeypatch.setattr(config, "REDIS_DEADLINE_S", 0.5)
    direct = redis.Redis(port=own_redis.port)
    direct.script_flush()
    busy = direct.script_load(BUSY)
    proxy = DropProxy(own_redis.port).start()
    proxy.watch(b"att:never")
    proxy.hold(b"SCRIPT", until=lambda: False)

    async def run() -> tuple[str, float]:
        client = redis_client(f"redis://127.0.0.1:{proxy.port}/0", deadline_only=True)
        scripts = Scripts(client, "hint_done")
        try:
            slow = asyncio.create_task(scripts.batch(lambda c: c.evalsha(busy, 0, 400),
                                                     lambda c: scripts.call(c, "hint_done", ["att:z"], ["m", 1])))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            try:
                await scripts.batch(lambda c: c.hdel("att:never", "f"))
                outcome = "answered"
            except RedisError as exc:
                outcome = type(exc).__name__
            took = time.monotonic() - started
            with contextlib.suppress(RedisError):
                await slow
            await asyncio.sleep(0.5)  # the flusher is done: anything still queued would be sent now
            return outcome, took
        finally:
            await close(client)

    try:
        outcome, took = asyncio.run(run())
    finally:
        proxy.stop()
    assert outcome == "TimeoutError" and took < 0.5 + 0.15, (outcome, took)
    assert proxy.forwarded[b"att:never"] == 0


def test_scripts_reloaded_after_a_restart_are_bounded_by_the_deadline_too(own_redis: RedisServer,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis answers NOSCRIPT (restarted), then does not answer the SCRIPT LOAD: the callers
    must not wait for ever (the load goes through redis-py, whose request-path client has no
    socket timeout)."""
    monkeypatch.setattr(config, "REDIS_DEADLINE_S", 0.5)
    proxy = DropProxy(own_redis.port).start()
    proxy.hold(b"SCRIPT", until=lambda: False)  # held for 10 s

    async def run() -> tuple[str, float]:
        client = redis_client(f"redis://127.0.0.1:{proxy.port}/0", deadline_only=True)
        scripts = Scripts(client, "hint_done")
        started = time.monotonic()
        try:
            await asyncio.wait_for(scripts.batch(lambda c: scripts.call(c, "hint_done", ["att:z"], ["m"])), 9)
            return "answered", time.monotonic() - started
        except RedisError as exc:
            return type(exc).__name__, time.monotonic() - started
        except TimeoutError:
            return "hung", time.monotonic() - started
        finally:
            await close(client)

    try:
        outcome, took = asyncio.run(run())
    finally:
        proxy.stop()
    assert outcome == "TimeoutError" and took < 3 * 0.5 + 0.5, (outcome, took)


# --- cancellation --------------------------------------------------------------------------

@pytest.mark.parametrize("loop", LOOPS)
def test_a_caller_cancelled_in_flight_leaves_the_others_their_replies_and_the_connection_in_step(redis_url: str, loop: str) -> None:
    async def run() -> tuple[list[Any], list[Any], int]:
        client = redis_client(redis_url, deadline_only=True)
        scripts = Scripts(client)
        try:
            await scripts.batch(lambda c: c.hdel("att:h", "warm"))
            slow = asyncio.create_task(scripts.batch(lambda c: c.evalsha(await_sha, 0, 300)))
            await asyncio.sleep(0)
            other = asyncio.create_task(scripts.batch(lambda c: c.zadd(f"att:cz:{loop}", {"x": 1})))
            await asyncio.sleep(0.05)
            slow.cancel()
            mine = await other
            after = await scripts.batch(lambda c: c.zadd(f"att:cz:{loop}", {"y": 1, "z": 2}), lambda c: c.hdel("att:h", "nope"))
            return mine, after, scripts.group.batches
        finally:
            await close(client)

    await_sha = redis.Redis.from_url(redis_url).script_load(BUSY)
    mine, after, _ = run_on(loop, run())
    assert mine == [1] and after == [2, 0]


@pytest.mark.parametrize("loop", LOOPS)
def test_the_flusher_cancelled_in_flight_fails_its_callers_instead_of_leaving_them_waiting(redis_url: str, loop: str) -> None:
    async def run() -> tuple[str, str, list[Any]]:
        client = redis_client(redis_url, deadline_only=True)
        scripts = Scripts(client)
        sha = await client.script_load(BUSY)
        try:
            first = asyncio.create_task(scripts.batch(lambda c: c.evalsha(sha, 0, 300)))
            await asyncio.sleep(0.05)
            queued = asyncio.create_task(scripts.batch(lambda c: c.hdel("att:h", "q")))  # waits for the round trip in flight
            await asyncio.sleep(0.01)
            flusher = scripts.group.flusher
            assert flusher is not None
            flusher.cancel()
            outcomes = []
            for t in (first, queued):
                try:
                    await asyncio.wait_for(t, 2)
                    outcomes.append("answered")
                except RedisError:
                    outcomes.append("error")
                except TimeoutError:
                    outcomes.append("hung")
            return outcomes[0], outcomes[1], await scripts.batch(lambda c: c.zadd(f"att:fz:{loop}", {"a": 1}))
        finally:
            await close(client)

    first, queued, after = run_on(loop, run())
    assert first == "error" and queued in ("error", "answered") and after == [1]


# --- helpers: servers and proxies of our own -----------------------------------------------

class _TcpServer:
    """A loopback TCP server on a free port, each connection handled on a thread of its own."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []

    def start(self) -> Self:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        for s in [self.listener, *self.socks]:
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.socks.append(conn)
            self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError


class TrickleProxy(_TcpServer):
    """A TCP proxy to one Redis that passes Redis's replies on in pieces of `chunk` bytes, each
    sent on its own (TCP_NODELAY), so the client reads them in many small parts."""

    def __init__(self, target_port: int, chunk: int) -> None:
        super().__init__()
        self.target_port, self.chunk = target_port, chunk

    def handle(self, conn: socket.socket) -> None:
        server = socket.create_connection(("127.0.0.1", self.target_port))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socks.append(server)
        threading.Thread(target=self._pipe, args=(conn, server, 65536), daemon=True).start()
        threading.Thread(target=self._pipe, args=(server, conn, self.chunk), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, chunk: int) -> None:
        try:
            while data := src.recv(65536):
                for i in range(0, len(data), chunk):
                    dst.sendall(data[i:i + chunk])
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class FakeServer(_TcpServer):
    """Not Redis: a TCP server answering the n-th write it reads (counted over all its
    connections) with `answer(n)`; for what a real Redis never sends."""

    def __init__(self, answer: Callable[[int], bytes]) -> None:
        super().__init__()
        self.answer = answer
        self.writes = 0
        self.connections = 0

    def handle(self, conn: socket.socket) -> None:
        self.connections += 1
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                n, self.writes = self.writes, self.writes + 1
                conn.sendall(self.answer(n))
        except OSError:
            pass


# --- end to end: the real stack under load while Redis stalls and restarts ----------------

def test_stalls_and_a_restart_under_load_answer_200_or_503_and_leave_the_money_exact(
        fakes: dict[str, FakeProvider], policy_dir: Path, customer: str) -> None:
    """Four clients send requests without pause while Redis is stopped (SIGSTOP) for 5 s (past
    the 2 s deadline), resumed, and then restarted (durable: it keeps what it acknowledged).
    Two clients are a customer with money, two one whose budget is spent: a reply read as
    another batch's would serve the broke one or refuse the other. Every answer is the
    customer's own (200, or 429 insufficient_quota for the broke one) or a 503
    quota_unavailable, within a deadline (and the cancel wait); afterwards nothing stays reserved, every 200 has exactly one served
    record, and the month's spend is the sum of the records."""
    server = RedisServer(durable=True).start()
    env = {"TOLLGATE_RESERVATION_GRACE_S": "1", "TOLLGATE_REAPER_INTERVAL_S": "0.3"}
    broke = f"{customer}-broke"
    with running_stack(fakes, policy_dir, workers=1, redis_server=server, env=env, name="resp-load") as s:
        secrets = {customer: s.create_key(customer)[1], broke: s.create_key(broke, plan="tiny_budget")[1]}
        assert chat_once(s, secrets[customer], f"warm-{customer}")[0] == 200
        assert chat_once(s, secrets[broke], f"warm-{broke}") == (429, "insufficient_quota")
        answers: dict[str, list[tuple[str, int, str, float]]] = {customer: [], broke: []}
        stop = threading.Event()

        def client(who: str, n: int) -> None:
            i = 0
            while not stop.is_set():
                rid = f"load-{who}-{n}-{i}"
                started = time.monotonic()
                status, code = chat_once(s, secrets[who], rid)
                answers[who].append((rid, status, code, time.monotonic() - started))
                i += 1

        threads = [threading.Thread(target=client, args=(who, n)) for n, who in enumerate([customer, broke] * 2)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            os.kill(pid_of(server), signal.SIGSTOP)
            time.sleep(5.0)
            os.kill(pid_of(server), signal.SIGCONT)
            time.sleep(1.0)
            server.stop()
            time.sleep(0.3)
            server.start()
            time.sleep(2.0)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        mine = {(status, code) for _, status, code, _ in answers[customer]}
        theirs = {(status, code) for _, status, code, _ in answers[broke]}
        assert mine <= {(200, ""), (503, "quota_unavailable")} and (503, "quota_unavailable") in mine, mine
        assert theirs <= {(429, "insufficient_quota"), (503, "quota_unavailable")}, theirs
        every = answers[customer] + answers[broke]
        assert max(took for *_, took in every) < config.REDIS_DEADLINE_S + 1.5
        assert [a for a in answers[customer][-4:] if a[1] != 200] == [], "still failing 2 s after Redis came back"
        r = s.redis_sync()
        for who in (customer, broke):
            reserved_key = Account(who, f"{who}-ws", "").k("reserved")
            deadline = time.monotonic() + 20
            while int(r.get(reserved_key) or 0) != 0:
                assert time.monotonic() < deadline, f"{who}: money still reserved after the stall and the restart"
                time.sleep(0.1)
        records = records_of(s, customer)
        served = [rec for rec in records if rec["status"] == "200"]
        assert sorted(rec["request_id"] for rec in served) == sorted(
            [rid for rid, status, _, _ in answers[customer] if status == 200] + [f"warm-{customer}"])
        spend = int(r.get(Account(customer, f"{customer}-ws", "").k(f"spend:{month_of(time.time())}")) or 0)
        assert spend == sum(int(rec["cost_micro_usd"]) for rec in records) > 0
        assert [rec for rec in records_of(s, broke) if rec["status"] == "200"] == []


def chat_once(stack: Stack, secret: str, rid: str) -> tuple[int, str]:
    body = json.dumps({"model": "legal_summary", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, answer = post_raw(f"{stack.base_url}/chat/completions", body, secret, {"x-request-id": rid}, timeout=20)
    code = answer["error"]["code"] if status != 200 and isinstance(answer, dict) else ""
    return status, code
