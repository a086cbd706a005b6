"""The bench's floor of Tollgate's own architecture: a processor that does no work.

It asks the real downstream processor (`downstream.Exchange`, in process, against the bench's
Redis) for its reply to the bench's request once, then answers every request message with
that same reply, and drops every access-log entry. Envoy runs Tollgate's rendered config in
front of it, so every Envoy filter does its usual work (ext_proc round trip, the apply and
pricing Lua, json_to_metadata, the access log) and the processor costs only grpc.aio's own
handling of one stream per request (and of the access-log batches, read and dropped unparsed). `tollgate_chain` minus this setup is what Tollgate's
Python and Redis work costs; this setup alone is what no processor written on grpc.aio can
go below.

Run: python -m bench.noop_processor PORT REDIS_URL POLICY_FILE KEY_SECRET MODEL (prints
"ready" once it serves).
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from extproc import phases
from extproc.accesslog import METHOD as ALS_METHOD
from extproc.accesslog import SERVICE as ALS_SERVICE
from extproc.contract import ATTR_METHOD, ATTR_PATH
from extproc.downstream import Exchange
from extproc.gateway import Gateway
from extproc.health import Health
from extproc.keys import KeyStore
from extproc.pb import ext_proc_pb2 as pb
from extproc.policy import load_policy
from extproc.quota import Quota
from extproc.server import RESET_WAIT_S, run_loop
from extproc.store import close, redis_client


def request_message(body: dict[str, Any], secret: str) -> pb.ProcessingRequest:
    """The bench's request as Envoy's downstream filter sends it: the body, and the headers the
    processor reads as attributes (contract.REQUEST_ATTRIBUTES)."""
    req = pb.ProcessingRequest(request_body=pb.HttpBody(body=json.dumps(body).encode(), end_of_stream=True))
    req.attributes["envoy.filters.http.ext_proc"].update({
        ATTR_PATH: "/v1/chat/completions", ATTR_METHOD: "POST", "request.headers['x-request-id']": uuid.uuid4().hex,
        "request.headers['authorization']": f"Bearer {secret}"})
    return req


async def canned_reply(redis_url: str, policy_file: str, secret: str, model: str) -> pb.ProcessingResponse:
    """The real processor's reply to the bench's request (one real reservation, left to the
    reaper: the bench's records are not looked at)."""
    policy = load_policy([policy_file])
    plain, deadline = redis_client(redis_url), redis_client(redis_url, deadline_only=True)
    try:
        gw = Gateway(policy=policy, keys=KeyStore(plain), quota=Quota(deadline), health=Health(plain, policy), provider_secrets={})
        body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}
        reply = await phases.dispatch(Exchange(gw), request_message(body, secret))
        if reply.WhichOneof("response") != "request_body":
            raise RuntimeError(f"the processor refused the bench's request: {reply}")
        return reply
    finally:
        await close(plain)
        await close(deadline)


async def serve(port: int, reply: pb.ProcessingResponse) -> None:
    async def process(_requests: Any, context: Any) -> None:
        await context.read()
        await asyncio.shield(context.write(reply))  # as the real processor does (server.is_last_message)
        await asyncio.sleep(RESET_WAIT_S)  # ended by Envoy's reset

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.stream_stream_rpc_method_handler(process, request_deserializer=pb.ProcessingRequest.FromString,
                                                    response_serializer=pb.ProcessingResponse.SerializeToString)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("envoy.service.ext_proc.v3.ExternalProcessor",
                                                                          {"Process": handler})])
    async def drop_access_logs(requests: AsyncIterator[bytes], _context: Any) -> bytes:
        async for _ in requests:  # kept as bytes: not even parsed
            pass
        return b""

    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        ALS_SERVICE, {ALS_METHOD: grpc.stream_unary_rpc_method_handler(drop_access_logs)})])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def main() -> None:
    port, redis_url, policy_file, secret, model = sys.argv[1:6]
    reply = asyncio.run(canned_reply(redis_url, policy_file, secret, model))
    run_loop(serve(int(port), reply))


if __name__ == "__main__":
    main()
