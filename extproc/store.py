"""The Redis connection: one Redis, or a Redis Cluster (`redis+cluster://host:port`).

Tollgate's data is laid out for Redis Cluster from the start: every script's keys share one
hash slot (`{c:<customer>}` for money, `{p:<provider>}` for health, the usage stream's own slot
for publishing), so the same code runs on either. Short timeouts make a dead Redis a fast 503
instead of a stuck request; the client reconnects by itself when Redis comes back.
"""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError, NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from extproc import config, metrics
from extproc.keyspace import SCRIPT_KEYS, lua_prelude
from extproc.resp import Commands, RespConnection

RedisLike: TypeAlias = "aioredis.Redis | RedisCluster"
CLUSTER_SCHEME = "redis+cluster://"


def redis_client(url: str, *, deadline_only: bool = False) -> RedisLike:
    """A client with per-command socket timeouts (for tools and background work), or, with
    `deadline_only`, the request path's client: no per-read timeout and no health-check PING
    (measured: 11% of the processor's CPU at one connection); `Scripts` bounds each of its
    round trips with one deadline instead (`config.REDIS_DEADLINE_S`)."""
    timeout = None if deadline_only else config.REDIS_SOCKET_TIMEOUT_S
    if url.startswith(CLUSTER_SCHEME):
        return RedisCluster.from_url("redis://" + url[len(CLUSTER_SCHEME):], socket_timeout=timeout,
                                     socket_connect_timeout=config.REDIS_SOCKET_TIMEOUT_S)
    return aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=config.REDIS_SOCKET_TIMEOUT_S,
                                   health_check_interval=0 if deadline_only else 5)


def text(value: Any) -> str:
    """A Redis reply (bytes) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def is_cluster(client: RedisLike) -> bool:
    return isinstance(client, RedisCluster)


def load_script(name: str) -> str:
    """A script's text; scripts with named keys (keyspace.SCRIPT_KEYS) get their `K` table."""
    text = resources.files("extproc").joinpath("lua", f"{name}.lua").read_text()
    keys_type = SCRIPT_KEYS.get(name)
    return lua_prelude(keys_type) + text if keys_type else text


Command: TypeAlias = Callable[[Any], Any]  # queues one command on a client or pipeline


def _deadline_passed() -> RedisTimeout:
    """A round trip past its deadline, as the RedisError every caller already handles."""
    return RedisTimeout(f"Redis did not answer within {config.REDIS_DEADLINE_S:g}s")


@dataclass
class _Group:
    """One caller's commands inside a shared pipeline, and where its replies go."""

    commands: tuple[Command, ...]
    tolerate: int
    reply: asyncio.Future[list[Any]]


@dataclass
class GroupCommit:
    """Many callers' commands in one round trip: a caller's batch waits (at most one round
    trip) while an earlier pipeline is in flight, then goes with every batch queued
    meanwhile. At one request at a time nothing waits; under load the Redis cost per request
    falls with the number of requests in flight. Each caller still gets its own replies and
    its own errors; order within a caller's batch is kept (one Redis, one connection)."""

    redis: RedisLike
    scripts: list[Scripts] = field(default_factory=list)  # every script set using this client (reloaded on NoScript)
    queue: list[_Group] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None  # the task sending round trips, while there are batches
    batches: int = 0  # round trips made (observability and tests)
    wire: RespConnection | None = None  # its own connection for the request path's commands (resp.py)

    def __post_init__(self) -> None:
        if self.wire is None:
            self.wire = RespConnection.for_client(self.redis)

    async def submit(self, commands: tuple[Command, ...], tolerate: int) -> list[Any]:
        loop = asyncio.get_running_loop()
        group = _Group(commands, tolerate, loop.create_future())
        self.queue.append(group)
        if self.flusher is None:  # the running flusher takes this batch with its next round trip
            self.flusher = loop.create_task(self._flush())
        # The caller's own deadline, from now: queued behind a stalled round trip, it would
        # otherwise wait for that one's deadline and then for its own.
        timer = loop.call_later(config.REDIS_DEADLINE_S, self._expire, group)
        try:
            return await group.reply
        finally:
            timer.cancel()

    def _expire(self, group: _Group) -> None:
        if not group.reply.done():
            group.reply.set_exception(_deadline_passed())
        self.queue = [g for g in self.queue if g is not group]  # not sent yet: then never

    async def _flush(self) -> None:
        try:
            while self.queue:
                groups, self.queue = self.queue, []
                self.batches += 1
                metrics.REDIS_ROUND_TRIPS.inc()
                await self._send(groups)
        except BaseException:  # cancelled: the batches queued meanwhile would wait for a flusher that never comes
            queued, self.queue = self.queue, []
            for g in queued:
                if not g.reply.done():
                    g.reply.set_exception(RedisError("Redis round trips stopped"))
            raise
        finally:
            self.flusher = None

    async def _send(self, groups: list[_Group]) -> None:
        try:
            results = await self._execute(groups)
            retry = [g for g, r in zip(groups, results, strict=True) if any(isinstance(x, NoScriptError) for x in r)]
            if retry:  # Redis lost its scripts (a restart): load them once, run those batches again
                # Within a deadline: the request path's redis-py client has no socket timeout.
                async with asyncio.timeout(config.REDIS_DEADLINE_S):
                    for scripts in self.scripts:
                        await scripts.load()
                for g, r in zip(retry, await self._execute(retry), strict=True):
                    results[groups.index(g)] = r
        except BaseException as exc:  # every caller gets the error (the flusher cancelled too); none waits for ever
            err = exc if isinstance(exc, RedisError) else _deadline_passed() if isinstance(exc, TimeoutError) else RedisError(
                f"Redis round trip failed: {exc!r}")
            for g in groups:
                if not g.reply.done():
                    g.reply.set_exception(err)
            if not isinstance(exc, Exception):
                raise
            return
        for g, r in zip(groups, results, strict=True):
            if g.reply.done():
                continue  # its caller was cancelled; the commands ran all the same
            failed = next((x for x in r[g.tolerate:] if isinstance(x, Exception)), None)
            if failed is not None:
                g.reply.set_exception(failed)
            else:
                g.reply.set_result(r)

    async def _execute(self, groups: list[_Group]) -> list[list[Any]]:
        if self.wire is not None:
            recorded = Commands()
            try:
                for g in groups:
                    for command in g.commands:
                        command(recorded)
            except (AttributeError, TypeError):  # a command resp.Commands does not write: redis-py sends this batch
                pass
            else:
                return _per_group(groups, await self.wire.run(recorded.args, config.REDIS_DEADLINE_S))
        pipe = self.redis.pipeline(transaction=False)
        for g in groups:
            for command in g.commands:
                command(pipe)
        async with asyncio.timeout(config.REDIS_DEADLINE_S):
            flat = list(await pipe.execute(raise_on_error=False))
        return _per_group(groups, flat)


def _per_group(groups: list[_Group], flat: list[Any]) -> list[list[Any]]:
    out, i = [], 0
    for g in groups:
        out.append(flat[i:i + len(g.commands)])
        i += len(g.commands)
    return out


# One GroupCommit per client: every module's batches on that client (quota, health) share
# round trips, e.g. a failed attempt's health note rides with its request's settlement.
_GROUPS: weakref.WeakKeyDictionary[Any, GroupCommit] = weakref.WeakKeyDictionary()


async def close(redis: RedisLike) -> None:
    """Close a client and the request path's own connection beside it (resp.py)."""
    group = _GROUPS.pop(redis, None)
    if group is not None and group.wire is not None:
        group.wire.close()
    await redis.aclose()


def group_commit(redis: RedisLike) -> GroupCommit:
    group = _GROUPS.get(redis)
    if group is None:
        group = _GROUPS[redis] = GroupCommit(redis)
    return group


class Scripts:
    """The Lua scripts, loaded once and called by SHA (in pipelines too). After a Redis
    restart the scripts are gone: `run` loads them again and retries once. Every round trip
    has one deadline (`config.REDIS_DEADLINE_S`); on one Redis, concurrent `batch` calls share
    round trips (`GroupCommit`)."""

    def __init__(self, redis: RedisLike, *names: str) -> None:
        self.redis = redis
        self.text = {n: load_script(n) for n in names}
        self.sha = {n: hashlib.sha1(t.encode()).hexdigest() for n, t in self.text.items()}
        self.group = group_commit(redis)
        self.group.scripts.append(self)

    async def load(self) -> None:
        for text in self.text.values():
            await self.redis.script_load(text)  # a cluster client loads on every primary

    def call(self, client: Any, name: str, keys: list[str], args: list[Any]) -> Any:
        """Queue (pipeline) or run (client) one script."""
        return client.evalsha(self.sha[name], len(keys), *keys, *args)

    async def run(self, fn: Any) -> Any:
        """Run `fn` (which queues scripts by SHA, e.g. in a pipeline); load them once if needed."""
        try:
            async with asyncio.timeout(config.REDIS_DEADLINE_S):
                try:
                    return await fn()
                except NoScriptError:
                    await self.load()
                    return await fn()
        except TimeoutError:
            raise _deadline_passed() from None

    async def batch(self, *commands: Any, tolerate: int = 0) -> list[Any]:
        """Run commands (functions of a client) in order: pipelined in one round trip on one
        Redis; one after another on a cluster, where pipelines may not carry scripts and
        commands to different nodes would not keep their order. The first `tolerate`
        commands are chores whose failure is ignored (their reply is then the exception);
        any other failure raises."""

        if not is_cluster(self.redis):
            return await self.group.submit(commands, tolerate)

        async def run() -> list[Any]:
            metrics.REDIS_ROUND_TRIPS.inc()
            if is_cluster(self.redis):
                out: list[Any] = []
                for i, command in enumerate(commands):
                    try:
                        out.append(await command(self.redis))
                    except RedisError as exc:
                        if i >= tolerate or isinstance(exc, (ConnectionError, RedisTimeout)):
                            raise
                        out.append(exc)
                return out
            pipe = self.redis.pipeline(transaction=False)
            for command in commands:
                command(pipe)
            results = list(await pipe.execute(raise_on_error=False))
            for r in results[tolerate:]:
                if isinstance(r, Exception):
                    raise r
            return results

        return list(await self.run(run))

    async def eval(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run one script on its own."""
        return await self.run(lambda: self.call(self.redis, name, keys, args))
