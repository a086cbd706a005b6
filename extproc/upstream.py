"""The upstream (per-attempt) ext_proc filter's processor: one `AttemptExchange` per retry.

It runs on the aggregate cluster of a fallback chain (`envoy_config`), on retries only: attempt
1 goes straight to the first provider without it (the downstream processor notes what and
when). Every later attempt reaches the relay; this processor learns how the earlier attempts ended
(from dynamic metadata: its own notes and the Lua recorder's status), asks `chains.next_step`
where the next attempt goes, and either rewrites the attempt (target provider, credential,
body `model`) or stops the chain with an OpenAI-shaped error.

It is stateless across attempts: an attempt's stream may land on any processor process, so
everything it needs travels in dynamic metadata, the policy and the re-sent body.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from typing import Any

from extproc.chains import HEALTH_FAILURES, Step, Tried, next_step, outcome_of_status, unavailable_error
from extproc.contract import (
    NS_ATTEMPTS,
    NS_LAST,
    NS_REQUEST,
    NS_REWRITE,
    STOP_HEADER,
    TARGET_HEADER,
    UPSTREAM_ATTEMPT_ATTRIBUTE,
    AttemptNote,
    AttemptsNote,
    RequestNote,
    StopNote,
)
from extproc.envoy_config import stream_target
from extproc.gateway import Gateway
from extproc.payload import model_head
from extproc.pb import ext_proc_pb2 as pb
from extproc.phases import PassThrough
from extproc.protocol import attribute, header, immediate, metadata, namespace
from extproc.quota import now_ms
from extproc.timeouts import PER_TRY_TIMEOUT_HEADER, attempt_budget_ms, size_explains_timeout

SAME_PROVIDER_BACKOFF_S = 0.025  # before a retry on the provider that just failed (jittered 50-100%)


def classify_attempt(attempt: AttemptNote, last: dict[str, Any], now_ms: int, budget_ms: int) -> str:
    """How an attempt without a recorded outcome ended, from what Envoy left behind."""
    status = str(last.get("status") or "")
    flags = str(last.get("flags") or "")
    if not status:
        # No response at all: the per-try timer fired, or the connection was reset.
        started = attempt.started_ms or now_ms
        return "timeout" if now_ms - started >= 0.8 * budget_ms else "connect_failure"
    if "UT" in flags:
        return "timeout"
    if any(f in flags for f in ("UF", "UH", "UC", "LR", "URX")):
        return "connect_failure"
    return outcome_of_status(int(status))


class AttemptExchange(PassThrough):
    """One later attempt: its request headers are its only message (other phases pass through)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def request_headers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        return await self.on_request_headers(req)

    async def on_request_headers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        now = now_ms()
        n = int(attribute(req, UPSTREAM_ATTEMPT_ATTRIBUTE) or 1)
        if n == 1:  # only with a bootstrap that runs this filter on every attempt: nothing to do
            return pb.ProcessingResponse(request_headers=pb.HeadersResponse())
        return await self.later_attempt(req, n, now, RequestNote.from_struct(namespace(req, NS_REQUEST)))

    async def later_attempt(self, req: pb.ProcessingRequest, n: int, now: int, request: RequestNote) -> pb.ProcessingResponse:
        policy = self.gw.policy
        notes = AttemptsNote.from_struct(namespace(req, NS_ATTEMPTS))
        last = namespace(req, NS_LAST)
        cap, stream = request.cap, request.stream
        # Complete the record of every earlier attempt; the one just before may lack its outcome.
        for k in range(1, n):
            e = notes.attempts.get(k)
            if e is None and k == 1:  # attempt 1 runs without this filter: the downstream noted it
                e = AttemptNote(request.first_model, request.first_provider, request.first_at_ms or now)
            if e is None:
                e = AttemptNote("", "", outcome="connect_failure")
            if not e.outcome:
                p = policy.providers.get(e.provider)
                budget = attempt_budget_ms(p, cap, stream) if p else 30_000
                e = replace(e, outcome=classify_attempt(e, last, now, budget), status=int(last.get("status") or 0))
                if p is not None and e.outcome in HEALTH_FAILURES and not (e.outcome == "timeout" and size_explains_timeout(p, cap, stream)):
                    self.gw.spawn(self.gw.health.record_failure(p.name, request.customer, e.outcome))
            notes.attempts[k] = e
        history: list[Tried] = []
        if request.skipped_model:
            history.append(Tried(request.skipped_model, request.skipped_provider, "provider_unhealthy", real=False,
                                 opened_by=request.skipped_opened_by))
        history += [Tried(notes.attempts[k].model, notes.attempts[k].provider, notes.attempts[k].outcome) for k in range(1, n)]
        route = policy.routes.get(request.route)
        plan = policy.plans.get(request.plan)
        if route is None or plan is None:
            step = Step(False, reason="policy", rule="route or plan no longer in the policy")
        else:
            step = next_step(policy, route, plan, history, request.unhealthy)
        if not step.go:
            notes.stop = StopNote(step.reason, step.rule)
            err = unavailable_error(history[-1].outcome, n - 1, step.rule)
            return pb.ProcessingResponse(
                immediate_response=immediate(err, [header(STOP_HEADER, step.reason)]),
                dynamic_metadata=metadata({NS_ATTEMPTS: notes.to_struct()}),
            )
        model = policy.models[step.model]
        notes.attempts[n] = AttemptNote(model.name, model.provider, now, rule=step.rule, reason=step.reason)
        first = policy.models.get(request.first_model)
        rewrite = {"old": model_head(first.upstream_model), "new": model_head(model.upstream_model)} if first else {}
        # The relay bounds this attempt by its own provider's budget (and idle time, for streams).
        set_headers = [header(TARGET_HEADER, stream_target(model.provider, stream)),
                       header(PER_TRY_TIMEOUT_HEADER, str(attempt_budget_ms(policy.providers[model.provider], cap, stream)))]
        remove: list[str] = []
        credential = self.gw.credential(model.provider)
        if credential:
            set_headers.append(header("authorization", credential))
        else:
            remove.append("authorization")
        resp = pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(
                response=pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=set_headers, remove_headers=remove))
            ),
            dynamic_metadata=metadata({NS_ATTEMPTS: notes.to_struct(), NS_LAST: {"status": "", "flags": ""}, NS_REWRITE: rewrite}),
        )
        if history[-1].real and history[-1].provider == model.provider:
            # Back-off only where the rule retries the same provider; a switch goes at once.
            await asyncio.sleep(SAME_PROVIDER_BACKOFF_S * random.uniform(0.5, 1.0))
        return resp


