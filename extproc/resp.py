"""A small Redis connection for the request path's round trips (`store.GroupCommit`).

Why not redis-py's pipeline here: building a `Pipeline`, packing its commands and applying
reply callbacks costs ~100 µs of Python per round trip (measured, a reserve with its hint);
the same round trip written by hand and parsed by hiredis costs ~35 µs. Every request makes
at least one such round trip (the reservation), so this is a tenth of the processor's CPU.

What it keeps from redis-py, on purpose:
- the same bytes on the wire (`pack` encodes arguments as `redis.Encoder` does);
- the same replies (hiredis, which redis-py uses too; the commands queued here have no reply
  callbacks), and the same errors (`ResponseError`, `NoScriptError`, `ConnectionError`);
- a connection that cannot be opened is tried again a few times; one lost with a batch in
  flight fails that batch (ConnectionError) and is opened again for the next: a batch that
  may have run is never sent twice by this module (its caller decides; quota.py undoes it).
What it leaves to redis-py: TLS and unix sockets (`for_client` returns None and GroupCommit
keeps the pipeline), Redis Cluster, and every command outside the request path.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError, DataError, NoScriptError, ResponseError

from extproc import config

CONNECT_TRIES = 3
CONNECT_BACKOFF_S = 0.008


def _arg(value: Any) -> bytes:
    """One argument as redis-py's Encoder writes it: bytes as they are, numbers by repr."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value).encode()
    raise DataError(f"Invalid input of type: '{type(value).__name__}'. Convert to a bytes, string, int or float first.")


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    parts = []
    for a in args:
        t = type(a)
        b = a.encode() if t is str else a if t is bytes else _arg(a)
        parts.append(b"$%d\r\n%b" % (len(b), b))
    return b"*%d\r\n" % len(args) + b"\r\n".join(parts) + b"\r\n"


class Commands:
    """Stands where a pipeline would for `store.Command` functions: records the commands the
    request path queues (scripts by SHA and the small chores around them). A command not
    listed here (or an option not offered) raises AttributeError or TypeError, and the batch
    goes through redis-py instead."""

    def __init__(self) -> None:
        self.args: list[tuple[Any, ...]] = []

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> None:
        self.args.append(("EVALSHA", sha, numkeys, *keys_and_args))

    def zadd(self, name: str, mapping: dict[Any, Any], nx: bool = False, xx: bool = False, ch: bool = False,
             gt: bool = False, lt: bool = False) -> None:
        """Options in redis-py's order (INCR, which changes the reply, is not offered)."""
        flags = (("NX", nx), ("XX", xx), ("CH", ch), ("GT", gt), ("LT", lt))
        pieces: list[Any] = [flag for flag, on in flags if on]
        for member, score in mapping.items():
            pieces += [score, member]
        self.args.append(("ZADD", name, *pieces))

    def zrem(self, name: str, *members: Any) -> None:
        self.args.append(("ZREM", name, *members))

    def hdel(self, name: str, *fields: Any) -> None:
        self.args.append(("HDEL", name, *fields))


def _expire(proto: _Protocol, waiting: asyncio.Future[list[Any]]) -> None:
    if not waiting.done():
        waiting.set_exception(TimeoutError("Redis did not answer in time"))
        proto.close()


def _reply(value: Any) -> Any:
    if isinstance(value, ResponseError) and str(value).startswith("NOSCRIPT"):
        return NoScriptError(str(value))
    return value


class _Protocol(asyncio.Protocol):
    """Replies of the one batch in flight (GroupCommit sends one at a time) go to its future."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.transport: asyncio.Transport | None = None
        self.waiting: asyncio.Future[list[Any]] | None = None
        self.expected = 0
        self.replies: list[Any] = []
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while self.waiting is not None:
            value = self.reader.gets()
            if value is False:
                return
            self.replies.append(_reply(value))
            if len(self.replies) == self.expected:
                waiting, self.waiting = self.waiting, None
                if not waiting.done():
                    waiting.set_result(self.replies)
        if self.reader.gets() is not False:  # a reply nobody asked for: the stream is not ours
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_exception(ConnectionError("Connection to Redis lost"))
        self.waiting = None

    def close(self) -> None:
        self.lost = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


@dataclass
class Address:
    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = None
    connect_timeout_s: float | None = None


def keep_alive(sock: Any) -> None:
    """TCP keepalive with config's idle time, interval and probe count (Linux names them; other
    systems keep their defaults)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", config.REDIS_KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", config.REDIS_KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", config.REDIS_KEEPALIVE_PROBES)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class RespConnection:
    """One TCP connection to one Redis, opened when first needed and again after a loss."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.proto: _Protocol | None = None

    @classmethod
    def for_client(cls, client: Any) -> RespConnection | None:
        """A connection to the same Redis as a redis-py client's, when it is plain TCP."""
        pool = getattr(client, "connection_pool", None)
        if pool is None or pool.connection_class is not Connection:
            return None
        kw = pool.connection_kwargs
        return cls(Address(kw.get("host", "localhost"), int(kw.get("port", 6379)), int(kw.get("db") or 0),
                           kw.get("username"), kw.get("password"), kw.get("socket_connect_timeout")))

    async def _open(self) -> _Protocol:
        a = self.address
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(a.connect_timeout_s):
                transport, proto = await loop.create_connection(_Protocol, a.host, a.port)
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(f"Error connecting to Redis at {a.host}:{a.port}: {exc}") from None
        keep_alive(transport.get_extra_info("socket"))
        self.proto = proto
        setup: list[tuple[Any, ...]] = []
        if a.username or a.password:  # as redis-py: a user name alone logs in with an empty password
            setup.append(("AUTH", a.username, a.password or "") if a.username else ("AUTH", a.password))
        if a.db:
            setup.append(("SELECT", a.db))
        if setup:
            for reply in await self._send(proto, setup, None):
                if isinstance(reply, Exception):
                    proto.close()
                    raise ConnectionError(f"Redis refused the connection's set-up: {reply}")
        return proto

    async def _send(self, proto: _Protocol, commands: list[tuple[Any, ...]], deadline_s: float | None) -> list[Any]:
        if proto.transport is None or proto.waiting is not None:
            proto.close()
            raise ConnectionError("Redis connection in an unexpected state")
        loop = asyncio.get_running_loop()
        waiting: asyncio.Future[list[Any]] = loop.create_future()
        proto.waiting = waiting
        proto.expected, proto.replies = len(commands), []
        # One timer rather than asyncio.timeout (a task lookup and a rescheduled handle: a
        # tenth of a settlement's CPU, measured).
        timer = loop.call_later(deadline_s, _expire, proto, waiting) if deadline_s is not None else None
        try:
            proto.transport.write(b"".join(pack(c) for c in commands))
            return await waiting
        except BaseException:
            proto.close()  # cancelled, past its deadline or lost: the stream's next bytes are not the next batch's
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def run(self, commands: list[tuple[Any, ...]], deadline_s: float | None = None) -> list[Any]:
        """Send commands in one round trip; their replies in order, an error reply as its
        exception (as a pipeline with raise_on_error=False); TimeoutError past `deadline_s`
        (connecting included). A batch whose connection is lost once sent is not sent again:
        it may have run, and its caller undoes it (quota.py)."""
        if not commands:  # no reply would ever come: nothing to wait for
            return []
        proto = self.proto
        if proto is None or proto.lost:
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with asyncio.timeout(deadline_s):
                proto = await self._connect()
            if deadline_s is not None:  # one deadline for connecting and the round trip together
                deadline_s = max(deadline_s - (loop.time() - started), 0.0)
        try:
            return await self._send(proto, commands, deadline_s)
        except ConnectionError:
            self.proto = None
            raise

    async def _connect(self) -> _Protocol:
        """Open the connection, trying again a few times (Redis restarting)."""
        self.proto = None
        for attempt in range(CONNECT_TRIES):
            try:
                return await self._open()
            except ConnectionError:
                self.proto = None
                if attempt == CONNECT_TRIES - 1:
                    raise
                await asyncio.sleep(CONNECT_BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.proto is not None:
            self.proto.close()
            self.proto = None
