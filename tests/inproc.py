"""In-process harness for the processors: real Redis, real policy, Envoy's messages built by hand.

Nothing goes through Envoy or gRPC: a test builds the `ProcessingRequest` messages Envoy would
send (attributes, header maps, dynamic metadata exactly as the rendered bootstrap makes Envoy
send them), hands them to a processor through `phases.dispatch`, and reads the replies. The
stores behind the processor are real (a Redis started for the test module); nothing is sent
upstream, so the providers' addresses in the catalog are never dialled.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from google.protobuf import struct_pb2

from extproc.contract import NS_EXCHANGE, SNAPSHOT_KEY
from extproc.downstream import Exchange
from extproc.gateway import Gateway
from extproc.health import Health
from extproc.keys import KeyStore
from extproc.pb import ext_proc_pb2 as pb
from extproc.policy import Policy, load_policy
from extproc.quota import Quota
from extproc.store import close, redis_client
from tests.conftest import SEED, catalog

# The key under which Envoy's ext_proc filter groups the attributes it sends.
ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"
# What the test gateway uses as each provider's credential (the real one reads env vars).
SECRETS = {"p1": "sk-provider-one", "p2": "sk-provider-two", "p3": "sk-provider-three", "p4": "sk-provider-four"}
CHAT = "/v1/chat/completions"

T = TypeVar("T")


@dataclass
class _Address:
    address: str


def write_test_policy(directory: Path) -> Policy:
    """The end-to-end tests' catalog (plus plan `downgrade_only`) and the seed route; provider
    addresses that nothing dials."""
    fakes: Any = {n: _Address(f"127.0.0.1:{1 + i}") for i, n in enumerate(("p1", "p2", "p3", "p4"))}
    doc = catalog(fakes)
    doc["plans"]["downgrade_only"] = {"routes": "*", "fallback": {"allow": ["downgrade"]}}  # no same-tier switch
    (directory / "00-catalog.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (directory / "10-support_draft.yaml").write_text(SEED.read_text())
    return load_policy([directory])


@dataclass
class Rig:
    """One test's gateway (as one processor process holds it) and a plain Redis client."""

    gw: Gateway
    redis: Any
    customers: list[str] = field(default_factory=list)

    async def key(self, plan: str, default_route: str | None = None, rpm: int | None = None) -> tuple[str, str]:
        """A new customer with one key on `plan`: (customer, secret)."""
        customer = "c-" + uuid.uuid4().hex[:12]
        created = await self.gw.keys.create(customer, customer + "-ws", plan, default_route, rpm=rpm)
        return customer, created.secret

    async def fund(self, customer: str, micro: int) -> None:
        await self.redis.incrby(f"tollgate:{{c:{customer}}}:balance", micro)

    async def number(self, key: str) -> int:
        value = await self.redis.get(key)
        return int(value) if value is not None else 0

    async def balance(self, customer: str) -> int:
        return await self.number(f"tollgate:{{c:{customer}}}:balance")

    async def reserved(self, customer: str) -> int:
        return await self.number(f"tollgate:{{c:{customer}}}:reserved")

    async def spend(self, customer: str) -> int:
        month = time.strftime("%Y%m", time.gmtime())
        return await self.number(f"tollgate:{{c:{customer}}}:spend:{month}")

    async def records(self, request_id: str) -> list[dict[str, str]]:
        """Every usage record of this request id in the usage stream."""
        entries = await self.redis.xrange("tollgate:usage")
        out = []
        for _, fields in entries:
            rec = {k.decode(): v.decode() for k, v in fields.items()}
            if rec.get("request_id") == request_id:
                out.append(rec)
        return out


def run(redis_url: str, policy: Policy, scenario: Callable[[Rig], Awaitable[T]]) -> T:
    """Run one scenario on a fresh event loop with its own Redis clients (as a worker has)."""

    async def main() -> T:
        plain = redis_client(redis_url)
        deadline = redis_client(redis_url, deadline_only=True)
        gw = Gateway(policy=policy, keys=KeyStore(plain), quota=Quota(deadline), health=Health(plain, policy),
                     provider_secrets=dict(SECRETS))
        try:
            return await scenario(Rig(gw, plain))
        finally:
            if gw.background:
                await asyncio.wait(gw.background, timeout=10)
            await close(plain)
            await close(deadline)

    return asyncio.run(main())


# --- messages as Envoy sends them ------------------------------------------------------------


def _attributes(req: pb.ProcessingRequest, values: dict[str, Any]) -> None:
    req.attributes[ATTRIBUTES_KEY].update(values)


def body_message(body: dict[str, Any] | bytes, secret: str | None, *, path: str = CHAT, method: str = "POST",
                 request_id: str | None = None, route: str | None = None, api_key: str | None = None) -> pb.ProcessingRequest:
    """The downstream filter's one request message: the buffered body, and the headers the
    processor needs as CEL attributes (a header the client did not send is not there)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = pb.ProcessingRequest(request_body=pb.HttpBody(body=raw, end_of_stream=True))
    values: dict[str, Any] = {"request.path": path, "request.method": method,
                              "request.headers['x-request-id']": request_id or uuid.uuid4().hex}
    if secret is not None:
        values["request.headers['authorization']"] = f"Bearer {secret}"
    if api_key is not None:
        values["request.headers['api-key']"] = api_key
    if route is not None:
        values["request.headers['x-tollgate-route']"] = route
    _attributes(req, values)
    return req


def request_id_of(req: pb.ProcessingRequest) -> str:
    return str(req.attributes[ATTRIBUTES_KEY].fields["request.headers['x-request-id']"].string_value)


def header_map(headers: dict[str, str]) -> pb.HeaderMap:
    return pb.HeaderMap(headers=[pb.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])


def response_headers_message(status: int, *, content_type: str = "application/json", usage: dict[str, float] | None = None,
                             end_of_stream: bool = False, extra: dict[str, str] | None = None,
                             metadata: dict[str, dict[str, Any]] | None = None) -> pb.ProcessingRequest:
    """The response-headers message of a proxied answer (Envoy's router stamps
    `x-envoy-upstream-service-time`); `usage` as json_to_metadata writes it (NUMBER values)
    into `tollgate.usage`."""
    headers = {":status": str(status), "content-type": content_type, "x-envoy-upstream-service-time": "7", **(extra or {})}
    req = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=header_map(headers), end_of_stream=end_of_stream))
    namespaces = dict(metadata or {})
    if usage is not None:
        namespaces["tollgate.usage"] = usage
    for name, values in namespaces.items():
        req.metadata_context.filter_metadata[name].update(values)
    return req


def response_body_message(body: bytes, end_of_stream: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))


def attempt_message(attempt: int, metadata: dict[str, dict[str, Any]], headers: dict[str, str] | None = None) -> pb.ProcessingRequest:
    """An upstream (per-attempt) filter's request headers: the attempt count as an attribute
    and the dynamic metadata the earlier phases left."""
    h = {":path": CHAT, ":method": "POST", "authorization": "Bearer sk-provider-one", **(headers or {})}
    req = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=header_map(h), end_of_stream=False))
    _attributes(req, {"upstream.request_attempt_count": float(attempt)})
    for name, values in metadata.items():
        req.metadata_context.filter_metadata[name].update(values)
    return req


# --- reading replies ---------------------------------------------------------------------------


def plain(value: struct_pb2.Value | struct_pb2.Struct) -> Any:
    """A protobuf Struct/Value as plain Python (numbers stay floats, as Envoy keeps them)."""
    if isinstance(value, struct_pb2.Struct):
        return {k: plain(v) for k, v in value.fields.items()}
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return plain(value.struct_value)
    if kind == "list_value":
        return [plain(v) for v in value.list_value.values]
    if kind == "null_value":
        return None
    return getattr(value, kind)


def dynamic_metadata(reply: pb.ProcessingResponse) -> dict[str, Any]:
    out: dict[str, Any] = plain(reply.dynamic_metadata)
    return out


def answer_side(gw: Gateway, body_reply: pb.ProcessingResponse) -> Exchange | None:
    """What Envoy does with a request the body phase admitted: the answer processor's
    Exchange, rebuilt from the snapshot the body reply left in metadata (None when it left
    none: the request was answered at once)."""
    snap = dynamic_metadata(body_reply).get(NS_EXCHANGE, {}).get(SNAPSHOT_KEY)
    return Exchange.resume(gw, json.loads(snap)) if isinstance(snap, str) else None


def set_headers(mutation: pb.HeaderMutation) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def immediate_json(reply: pb.ProcessingResponse) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(reply.immediate_response.body)
    return out
