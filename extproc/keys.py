"""Customer API keys: created once, stored hashed in Redis, looked up through a short cache.

Layout (each key is a single Redis key, so any Redis Cluster slot works):
  tollgate:key:<sha256(secret)>  hash  key_id customer workspace plan default_route status created
  tollgate:keyid:<key_id>        string  sha256(secret)   (to list and revoke by public id)
  tollgate:keyids                set of key ids

The processor caches lookups (hits and misses) for `cache_ttl_s` seconds: revocation takes
effect everywhere within that time, and a steady stream of requests costs no Redis trip for
the key.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from extproc import config
from extproc.decide import KeyInfo
from extproc.quota import valid_id
from extproc.store import RedisLike
from extproc.store import text as _text

SECRET_PREFIX = "tg-"
CACHE_TTL_S = config.KEY_CACHE_TTL_S
_CACHE_MAX = config.KEY_CACHE_MAX


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _record_key(digest: str) -> str:
    return f"tollgate:key:{digest}"


def _decode(fields: dict[bytes | str, bytes | str]) -> KeyInfo:
    f = {_text(k): _text(v) for k, v in fields.items()}
    return KeyInfo(
        key_id=f["key_id"],
        customer=f["customer"],
        workspace=f["workspace"],
        plan=f["plan"],
        default_route=f.get("default_route") or None,
        active=f.get("status", "active") == "active",
        rpm=int(f["rpm"]) if f.get("rpm") else None,
        tpm=int(f["tpm"]) if f.get("tpm") else None,
    )


@dataclass
class CreatedKey:
    info: KeyInfo
    secret: str


class KeyStore:
    def __init__(self, redis: RedisLike, cache_ttl_s: float = CACHE_TTL_S) -> None:
        self.redis = redis
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, KeyInfo | None]] = {}

    async def create(self, customer: str, workspace: str, plan: str, default_route: str | None = None,
                     rpm: int | None = None, tpm: int | None = None) -> CreatedKey:
        for what, value in (("customer", customer), ("workspace", workspace), ("plan", plan)):
            if not valid_id(value):
                raise ValueError(f"{what} must be 1-128 letters, digits or _ . : @ -, got {value!r}")
        key_id = "key_" + secrets.token_hex(8)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        digest = hash_secret(secret)
        info = KeyInfo(key_id, customer, workspace, plan, default_route, rpm=rpm, tpm=tpm)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(
                _record_key(digest),
                mapping={
                    "key_id": key_id,
                    "customer": customer,
                    "workspace": workspace,
                    "plan": plan,
                    "default_route": default_route or "",
                    "status": "active",
                    "created": str(int(time.time())),
                    "rpm": "" if rpm is None else str(rpm),
                    "tpm": "" if tpm is None else str(tpm),
                },
            )
            pipe.set(f"tollgate:keyid:{key_id}", digest)
            pipe.sadd("tollgate:keyids", key_id)
            await pipe.execute()
        return CreatedKey(info, secret)

    async def list(self) -> list[KeyInfo]:
        ids = sorted(_text(k) for k in await self.redis.smembers("tollgate:keyids"))
        out = []
        for key_id in ids:
            digest = await self.redis.get(f"tollgate:keyid:{key_id}")
            if digest is None:
                continue
            fields = await self.redis.hgetall(_record_key(_text(digest)))
            if fields:
                out.append(_decode(fields))
        return out

    async def revoke(self, key_id: str) -> bool:
        digest = await self.redis.get(f"tollgate:keyid:{key_id}")
        if digest is None:
            return False
        await self.redis.hset(_record_key(_text(digest)), "status", "revoked")
        return True

    async def lookup(self, secret: str) -> KeyInfo | None:
        """The active key for a presented secret, or None. Raises on Redis errors."""
        digest = hash_secret(secret)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        fields = await self.redis.hgetall(_record_key(digest))
        info = _decode(fields) if fields else None
        if info is not None and not info.active:
            info = None
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[digest] = (now + self.cache_ttl_s, info)
        return info


def secret_from_headers(authorization: str | None, api_key: str | None) -> str | None:
    """`Authorization: Bearer <key>` or `api-key: <key>`."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    if api_key and api_key.strip():
        return api_key.strip()
    return None
