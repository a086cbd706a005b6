"""The Redis connection: one Redis, or a Redis Cluster (`redis+cluster://host:port`).

Tollgate's data is laid out for Redis Cluster from the start: every script's keys share one
hash slot (`{c:<customer>}` for money, `{p:<provider>}` for health, the usage stream's own slot
for publishing), so the same code runs on either. Short timeouts make a dead Redis a fast 503
instead of a stuck request; the client reconnects by itself when Redis comes back.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError, NoScriptError, RedisError, TimeoutError

RedisLike: TypeAlias = "aioredis.Redis | RedisCluster"
CLUSTER_SCHEME = "redis+cluster://"


def redis_client(url: str) -> RedisLike:
    if url.startswith(CLUSTER_SCHEME):
        return RedisCluster.from_url("redis://" + url[len(CLUSTER_SCHEME):], socket_timeout=1.0, socket_connect_timeout=1.0)
    return aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0, health_check_interval=5)


def text(value: Any) -> str:
    """A Redis reply (bytes) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def is_cluster(client: RedisLike) -> bool:
    return isinstance(client, RedisCluster)


def load_script(name: str) -> str:
    return resources.files("extproc").joinpath("lua", f"{name}.lua").read_text()


class Scripts:
    """The Lua scripts, loaded once and called by SHA (in pipelines too). After a Redis
    restart the scripts are gone: `run` loads them again and retries once."""

    def __init__(self, redis: RedisLike, *names: str) -> None:
        self.redis = redis
        self.text = {n: load_script(n) for n in names}
        self.sha = {n: hashlib.sha1(t.encode()).hexdigest() for n, t in self.text.items()}

    async def load(self) -> None:
        for text in self.text.values():
            await self.redis.script_load(text)  # a cluster client loads on every primary

    def call(self, client: Any, name: str, keys: list[str], args: list[Any]) -> Any:
        """Queue (pipeline) or run (client) one script."""
        return client.evalsha(self.sha[name], len(keys), *keys, *args)

    async def run(self, fn: Any) -> Any:
        """Run `fn` (which queues scripts by SHA, e.g. in a pipeline); load them once if needed."""
        try:
            return await fn()
        except NoScriptError:
            await self.load()
            return await fn()

    async def batch(self, *commands: Any, tolerate: int = 0) -> list[Any]:
        """Run commands (functions of a client) in order: pipelined in one round trip on one
        Redis; one after another on a cluster, where pipelines may not carry scripts and
        commands to different nodes would not keep their order. The first `tolerate`
        commands are chores whose failure is ignored (their reply is then the exception);
        any other failure raises."""

        async def run() -> list[Any]:
            if is_cluster(self.redis):
                out: list[Any] = []
                for i, command in enumerate(commands):
                    try:
                        out.append(await command(self.redis))
                    except RedisError as exc:
                        if i >= tolerate or isinstance(exc, (ConnectionError, TimeoutError)):
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
