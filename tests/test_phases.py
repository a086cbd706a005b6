"""phases: every message reaches its own phase's method; phases a processor leaves alone pass
unchanged; server.py picks the stream's processor from its first message."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from extproc import phases
from extproc.downstream import Exchange
from extproc.pb import ext_proc_pb2 as pb
from extproc.phases import PassThrough
from extproc.upstream import AttemptExchange
from tests.inproc import ATTRIBUTES_KEY, write_test_policy


class Recorder(PassThrough):
    """Answers every phase with a reply that names the method that ran (in an immediate
    response's details)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def _named(self, name: str) -> pb.ProcessingResponse:
        self.seen.append(name)
        return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(details=name))

    async def request_headers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        return self._named("request_headers")

    async def request_body(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        return self._named("request_body")

    async def response_headers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        return self._named("response_headers")

    async def response_body(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        return self._named("response_body")


MESSAGES = {
    "request_headers": pb.ProcessingRequest(request_headers=pb.HttpHeaders()),
    "request_body": pb.ProcessingRequest(request_body=pb.HttpBody()),
    "response_headers": pb.ProcessingRequest(response_headers=pb.HttpHeaders()),
    "response_body": pb.ProcessingRequest(response_body=pb.HttpBody()),
}


@pytest.mark.parametrize("phase", sorted(MESSAGES))
def test_each_phase_reaches_its_own_method(phase: str) -> None:
    recorder = Recorder()
    reply = asyncio.run(phases.dispatch(recorder, MESSAGES[phase]))
    assert (recorder.seen, reply.immediate_response.details) == ([phase], phase)


@pytest.mark.parametrize(("message", "expected"), [
    (MESSAGES["request_headers"], pb.ProcessingResponse(request_headers=pb.HeadersResponse())),
    (MESSAGES["request_body"], pb.ProcessingResponse(request_body=pb.BodyResponse())),
    (MESSAGES["response_headers"], pb.ProcessingResponse(response_headers=pb.HeadersResponse())),
    (MESSAGES["response_body"], pb.ProcessingResponse(response_body=pb.BodyResponse())),
])
def test_pass_through_continues_each_phase_unchanged(message: pb.ProcessingRequest, expected: pb.ProcessingResponse) -> None:
    assert asyncio.run(phases.dispatch(PassThrough(), message)) == expected


@pytest.mark.parametrize(("message", "expected"), [
    (pb.ProcessingRequest(request_trailers=pb.HttpTrailers()), pb.ProcessingResponse(request_trailers=pb.TrailersResponse())),
    (pb.ProcessingRequest(response_trailers=pb.HttpTrailers()), pb.ProcessingResponse(response_trailers=pb.TrailersResponse())),
])
def test_trailers_pass_unchanged_without_reaching_the_processor(message: pb.ProcessingRequest, expected: pb.ProcessingResponse) -> None:
    recorder = Recorder()
    assert asyncio.run(phases.dispatch(recorder, message)) == expected
    assert recorder.seen == []


def test_a_stream_announcing_an_upstream_attempt_gets_the_per_attempt_processor(tmp_path: Path) -> None:
    from extproc.server import Processor

    write_test_policy(tmp_path)
    server = Processor([str(tmp_path)], "redis://127.0.0.1:1/0")  # no Redis call: only picks processors
    attempt = pb.ProcessingRequest(request_headers=pb.HttpHeaders())
    attempt.attributes[ATTRIBUTES_KEY].update({"upstream.request_attempt_count": 2.0})
    request = pb.ProcessingRequest(request_body=pb.HttpBody())
    request.attributes[ATTRIBUTES_KEY].update({"request.path": "/v1/chat/completions"})
    assert isinstance(server.processor_for(attempt), AttemptExchange)
    assert isinstance(server.processor_for(request), Exchange)
