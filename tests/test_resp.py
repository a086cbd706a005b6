"""resp.py, the request path's own Redis connection, against a real Redis: the bytes it writes,
the replies and errors it returns, and what it does when the connection breaks."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.exceptions import ConnectionError, DataError, NoScriptError, ResponseError

from extproc.devstack import free_port, redis_binary, wait_for_port
from extproc.resp import Commands, RespConnection, pack
from extproc.store import Scripts, close, redis_client


def wire(redis_url: str) -> RespConnection:
    conn = RespConnection.for_client(redis_client(redis_url, deadline_only=True))
    assert conn is not None
    return conn


def test_pack_writes_a_command_as_an_array_of_bulk_strings() -> None:
    assert pack(("SET", "k", 12)) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n"


def test_pack_writes_text_as_utf8_floats_by_repr_and_bytes_as_they_are() -> None:
    assert pack(("é", 0.5, b"\x00\xff")) == b"*3\r\n$2\r\n\xc3\xa9\r\n$3\r\n0.5\r\n$2\r\n\x00\xff\r\n"


def test_pack_refuses_a_bool_as_redis_py_does() -> None:
    with pytest.raises(DataError):
        pack(("SET", "k", True))


def test_zadd_options_go_before_the_score_member_pairs() -> None:
    c = Commands()
    c.zadd("hints", {"m1": 5, "m2": 7}, xx=True, gt=True)
    c.zadd("outbox", {"cust": 9}, nx=True)
    assert c.args == [("ZADD", "hints", "XX", "GT", 5, "m1", 7, "m2"), ("ZADD", "outbox", "NX", 9, "cust")]


def test_a_command_it_does_not_write_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        Commands().set("k", "v")  # type: ignore[attr-defined]


def test_replies_come_in_order_and_an_error_reply_is_returned_as_its_exception(redis_url: str) -> None:
    async def run() -> list[Any]:
        conn = wire(redis_url)
        try:
            return await conn.run([("SET", "resp:a", "text"), ("GET", "resp:a"), ("INCR", "resp:a"), ("RPUSH", "resp:l", 1, 2)])
        finally:
            conn.close()

    ok, value, failed, length = asyncio.run(run())
    assert (ok, value, length) == (b"OK", b"text", 2)
    assert isinstance(failed, ResponseError) and "not an integer" in str(failed)


def test_an_unknown_script_is_a_noscript_error(redis_url: str) -> None:
    async def run() -> list[Any]:
        conn = wire(redis_url)
        try:
            return await conn.run([("EVALSHA", "0" * 40, 0)])
        finally:
            conn.close()

    (reply,) = asyncio.run(run())
    assert isinstance(reply, NoScriptError)


def test_a_batch_cut_off_by_its_deadline_leaves_no_late_reply_for_the_next_batch(redis_url: str) -> None:
    """The cancelled batch's reply still arrives; on the same connection it would be taken for
    the next batch's. The connection is dropped instead, and the next batch gets its own."""
    async def run() -> list[Any]:
        conn = wire(redis_url)
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await conn.run([("EVAL", "local t = redis.call('TIME') while true do local n = redis.call('TIME') "
                                     "if (n[1] - t[1]) * 1000000 + n[2] - t[2] > 300000 then return 'late' end end", 0)])
            return await conn.run([("ECHO", "mine")])
        finally:
            conn.close()

    assert asyncio.run(run()) == [b"mine"]


def test_a_connection_lost_with_a_batch_in_flight_fails_it_and_does_not_send_it_again(redis_url: str) -> None:
    plain = redis.Redis.from_url(redis_url)
    plain.delete("resp:sent")

    async def run() -> Any:
        conn = wire(redis_url)
        try:
            slow = asyncio.create_task(conn.run([("INCR", "resp:sent"), ("BLPOP", "resp:empty", 5)]))
            await asyncio.sleep(0.2)
            await asyncio.to_thread(plain.client_kill_filter, _type="normal", skipme=True)
            with pytest.raises(ConnectionError):
                await slow
            return await conn.run([("GET", "resp:sent")])  # a new connection
        finally:
            conn.close()

    assert asyncio.run(run()) == [b"1"]


@pytest.fixture
def redis_with_password() -> Iterator[tuple[int, str]]:
    port, password = free_port(), "s3cret-pass"
    proc = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--requirepass", password], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=proc)
        yield port, password
    finally:
        proc.terminate()
        proc.wait()


def test_it_logs_in_and_selects_the_database_of_the_clients_url(redis_with_password: tuple[int, str]) -> None:
    port, password = redis_with_password

    async def run() -> list[Any]:
        conn = wire(f"redis://:{password}@127.0.0.1:{port}/3")
        try:
            return await conn.run([("SET", "resp:db", "three"), ("CLIENT", "INFO")])
        finally:
            conn.close()

    ok, info = asyncio.run(run())
    assert ok == b"OK" and b" db=3 " in info
    assert redis.Redis(port=port, password=password, db=3).get("resp:db") == b"three"


def test_a_wrong_password_is_a_connection_error(redis_with_password: tuple[int, str]) -> None:
    port, _ = redis_with_password

    async def run() -> list[Any]:
        conn = wire(f"redis://:wrong@127.0.0.1:{port}/0")
        try:
            return await conn.run([("PING",)])
        finally:
            conn.close()

    with pytest.raises(ConnectionError, match="set-up"):
        asyncio.run(run())


def test_a_redis_that_is_not_there_is_a_connection_error_after_a_few_tries() -> None:
    async def run() -> list[Any]:
        conn = wire(f"redis://127.0.0.1:{free_port()}/0")
        return await conn.run([("PING",)])

    started = time.monotonic()
    with pytest.raises(ConnectionError):
        asyncio.run(run())
    assert time.monotonic() - started < 1


def test_the_request_paths_batches_go_over_this_connection_and_others_over_redis_py(redis_url: str) -> None:
    async def run() -> tuple[list[Any], list[Any], list[bool]]:
        client = redis_client(redis_url, deadline_only=True)
        scripts = Scripts(client)
        wire = scripts.group.wire
        assert wire is not None
        try:
            opened = [wire.proto is not None]
            recorded = await scripts.batch(lambda c: c.zadd("resp:z", {"m": 3}), lambda c: c.zrem("resp:z", "m"),
                                           lambda c: c.hdel("resp:h", "f"))
            opened.append(wire.proto is not None)
            other = await scripts.batch(lambda c: c.set("resp:other", "x"))
            return recorded, other, opened
        finally:
            await close(client)

    recorded, other, opened = asyncio.run(run())
    assert recorded == [1, 1, 0] and opened == [False, True]  # the recorded batch opened the connection
    assert other == [True]  # redis-py's reply callback turned SET's OK into True: it went through a pipeline


def test_a_tls_or_unix_socket_client_keeps_redis_py() -> None:
    assert RespConnection.for_client(redis_client("rediss://127.0.0.1:6390/0", deadline_only=True)) is None
    assert RespConnection.for_client(redis_client("unix:///tmp/nowhere.sock", deadline_only=True)) is None


def test_a_batch_past_its_deadline_raises_timeout_and_the_next_batch_gets_its_own_reply(redis_url: str) -> None:
    async def run() -> tuple[float, list[Any]]:
        conn = wire(redis_url)
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await conn.run([("EVAL", "local t = redis.call('TIME') while true do local n = redis.call('TIME') "
                                 "if (n[1] - t[1]) * 1000000 + n[2] - t[2] > 300000 then return 'late' end end", 0)], deadline_s=0.05)
            waited = time.monotonic() - started
            return waited, await conn.run([("ECHO", "mine")], deadline_s=2)
        finally:
            conn.close()

    waited, replies = asyncio.run(run())
    assert waited < 0.25 and replies == [b"mine"]


def test_a_user_name_without_a_password_logs_in_as_that_user(redis_url: str) -> None:
    """redis://user@host: redis-py sends AUTH user "" (an ACL user may need no password)."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    redis.Redis(port=port).acl_setuser("resp-nopass", enabled=True, nopass=True, commands=["+@all"], keys=["*"])

    async def run() -> list[Any]:
        conn = wire(f"redis://resp-nopass@127.0.0.1:{port}/0")
        try:
            return await conn.run([("ACL", "WHOAMI")])
        finally:
            conn.close()

    assert asyncio.run(run()) == [b"resp-nopass"]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_connection_probes_an_idle_peer_with_tcp_keepalive(redis_url: str, loop: str) -> None:
    import socket

    import uvloop

    async def run() -> tuple[int, int, int, int]:
        conn = wire(redis_url)
        try:
            await conn.run([("PING",)])
            assert conn.proto is not None and conn.proto.transport is not None
            sock = conn.proto.transport.get_extra_info("socket")
            return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))
        finally:
            conn.close()

    options = uvloop.run(run()) if loop == "uvloop" else asyncio.run(run())
    # Probes after 30 s idle, every 10 s, 3 unanswered ones end the connection (config.py).
    assert options == (1, 30, 10, 3)
