"""The downstream processors: one `Exchange` per HTTP request, on up to two gRPC streams.

A normal request costs Envoy one message (contract.py shows the path):

  request body     -> with the few headers it needs as attributes: authenticate (key cache;
                      Redis on a miss), validate, resolve the route, check the plan, RESERVE
                      (Redis, Lua), choose the provider; reply with the rewritten body, the
                      headers to apply (metadata for Envoy's apply filter), and the request's
                      accounting state (`snapshot`) with what Envoy's pricing Lua needs

A plain answer (200 JSON of attempt 1 with readable usage) is then priced by Envoy's Lua and
settled from Envoy's access log (`settlement_log`, which rebuilds this Exchange with
`resume`). Any other answer starts the answer processor, a second stream whose first message
is the response headers (`answer_exchange` rebuilds the Exchange there):

  response headers -> usage (read by Envoy's json_to_metadata) or not; a failure to rewrite,
                      a stream to meter, an answer without usage (`mode_override` switches
                      the body on); SETTLE (settle + record, Redis, Lua), attribution headers

GET /v1/models sends its headers instead (a per-route override) and is answered at once.

Redis round trips: one per request (reserve); settlements share round trips with other
requests (store.GroupCommit). Every path that reserved money ends in exactly one `finish`:
success, provider error, Envoy's own error, or the client going away (`close`). Decisions
come from pure functions (`decide`, `payload`, `caps`, `chains`); this module gathers facts,
calls them, and translates results into Envoy's protocol.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import time
import uuid
from typing import Any

from redis.exceptions import RedisError

from extproc import config, errors, metrics
from extproc.caps import CostBound, answer_bytes_bound, cost_bound
from extproc.chains import (
    FAILURE_STATUS,
    HEALTH_FAILURES,
    Tried,
    all_candidates,
    first_step,
    outcome_of_status,
    planned_second_steps,
    unavailable_error,
)
from extproc.contract import (
    ANSWER_HEADER,
    ATTR_CODE_DETAILS,
    CLUSTER_HEADER,
    FAST_MAX_PRICE,
    NS_APPLY,
    NS_ATTEMPTS,
    NS_EXCHANGE,
    NS_FAST,
    NS_PLAN,
    NS_PLAN_AUTH,
    NS_REQUEST,
    NS_USAGE,
    ORIGINAL_CONTENT_TYPE_HEADER,
    PLANNED_OUTCOMES,
    PROVIDER_ONLY,
    ROUTE_HEADER,
    SNAPSHOT_KEY,
    STOP_HEADER,
    AttemptsNote,
    PlannedStep,
    PlanNote,
    RequestNote,
)
from extproc.decide import KeyInfo, RouteChoice, authorize, resolve_route, visible_routes
from extproc.envoy_config import chain_cluster, route_target, stream_target
from extproc.errors import ApiError
from extproc.gateway import Gateway
from extproc.keys import secret_from_headers
from extproc.ledger import UsageRecord, settle, spend_kind
from extproc.money import format_usd
from extproc.payload import (
    ENDPOINTS,
    ParsedRequest,
    Usage,
    estimated_usage,
    model_head,
    parse_request,
    rewrite_body,
    usage_from_json,
    usage_from_metadata,
)
from extproc.pb import ext_proc_pb2 as pb
from extproc.phases import PassThrough
from extproc.policy.model import Price, Route
from extproc.protocol import attribute, immediate, metadata, namespace
from extproc.protocol import header as _opt
from extproc.protocol import headers_of as _headers_of
from extproc.protocol import request_headers as headers_from_attributes
from extproc.quota import Account, Limits, Reservation, ReserveResult, month_of, now_ms, reservation_ttl_ms, valid_id
from extproc.records import Attempt
from extproc.stream import StreamMeter, text_bytes
from extproc.timeouts import PER_TRY_TIMEOUT_HEADER, attempt_budget_ms, size_explains_timeout

log = logging.getLogger("tollgate.downstream")

# Refusals a reservation still waiting for its settlement can cause: reserve.lua answers
# "settling" where money or tokens a request in flight holds would cut the cap or refuse;
# requests per minute count requests, which settlement does not change.
SETTLED_LATER = ("settling",)




class Exchange(PassThrough):
    """One HTTP request's conversation with Envoy's downstream ext_proc filter."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.policy = gw.policy  # one policy for the whole request, even across a reload
        self.started = time.monotonic()
        self.started_ms = now_ms()
        self.path = ""
        self.request_id = ""
        self.key: KeyInfo | None = None
        self.header_route: str | None = None
        self.parsed: ParsedRequest | None = None
        self.route: Route | None = None  # known once resolved, even if then refused
        self.choice: RouteChoice | None = None
        self.reservation: Reservation | None = None
        self.bound: CostBound | None = None
        self.reservation_ttl_ms = 0
        self.extend_at = 0.0  # monotonic time when a flowing stream extends its reservation
        self.rate_headers: dict[str, str] = {}
        self.attempts: list[Attempt] = []
        self.skipped: Attempt | None = None  # the primary, when its circuit was open
        self.health_pending: list[tuple[str, str]] = []  # (provider, outcome) of attempts no processor saw fail
        self.answer_length = 0  # the answer's content-length, when it has one
        self.chained = False
        self.rule = ""
        self.replacement: ApiError | None = None  # a failed final answer, rewritten as ours
        self.stop_reason: str | None = None
        self.fallback_reason = "none"
        self.upstream_status = 0
        self.local_reply = False
        self.streaming = False  # the response body passes in STREAMED mode (SSE, or too large)
        self.meter: StreamMeter | None = None
        self.last_byte = 0.0  # monotonic time of the stream's last chunk (idle cut detection)
        self.pending_remove: list[str] = []
        self.restore: list[pb.HeaderValueOption] = []  # a big answer's content type, put back
        self.big = False  # the answer may not fit Envoy's buffer (caps.answer_bytes_bound)
        self.usage_source = "provider"  # or "estimated" (no usage came), "reservation" (answer lost)
        self.overrun = False  # the provider billed more than was reserved
        self.record_id = uuid.uuid4().hex  # publishes the usage record exactly once
        self.finished = False
        self.handed_over = False  # the response side belongs to Envoy's Lua and the answer processor

    # --- the phases (phases.Processor): server.py dispatches each message here -----------

    async def request_headers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        return await self.on_request_headers(req.request_headers)

    async def request_body(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        return await self.on_request_body(req)

    async def response_headers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        return await self.on_response_headers(req)

    async def response_body(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        return await self.on_response_body(req.response_body)

    # --- request path -------------------------------------------------------------------

    async def on_request_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        """Only GET /v1/models sends its headers (a per-route override): it has no body."""
        return await self.admit(_headers_of(msg), has_body=not msg.end_of_stream) or pb.ProcessingResponse(
            request_headers=pb.HeadersResponse())

    async def admit(self, h: dict[str, str], has_body: bool) -> pb.ProcessingResponse | None:
        """What the headers decide: the endpoint, the key, the request id. A reply when the
        request ends here (refused, or the model list), None when its body decides the rest."""
        self.path = h.get(":path", "").split("?", 1)[0]
        method = h.get(":method", "")
        self.request_id = h.get("x-request-id", "")
        is_models = self.path == "/v1/models" and method == "GET"
        if not is_models and not (self.path in ENDPOINTS and method == "POST"):
            return self.reject(errors.not_found(f"{method} {self.path}"))
        secret = secret_from_headers(h.get("authorization"), h.get("api-key"))
        if secret is None:
            return self.reject(errors.invalid_api_key())
        try:
            key = await self.gw.keys.lookup(secret)
        except RedisError:
            metrics.REDIS_ERRORS.labels("key_lookup").inc()
            return self.reject(errors.quota_unavailable())
        if key is None:
            return self.reject(errors.invalid_api_key("Incorrect API key provided, or the key was revoked."))
        self.key = key
        if is_models:
            return self.models_list(key)
        if not valid_id(self.request_id):
            return self.reject(errors.invalid_request("x-request-id must be 1-128 letters, digits or _ . : @ -.", param="x-request-id"))
        if not has_body:
            return self.reject(errors.invalid_request("A JSON request body is required."))
        self.header_route = h.get(ROUTE_HEADER) or None
        return None

    async def on_request_body(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        """The request's one message: its body, with the headers it needs as attributes."""
        msg = req.request_body
        if not self.path:
            refused = await self.admit(headers_from_attributes(req), has_body=True)
            if refused is not None:
                return refused
        parsed = parse_request(self.path, msg.body)
        if isinstance(parsed, ApiError):
            return self.reject(parsed)
        key = self.key
        assert key is not None
        route = resolve_route(self.policy, key, self.header_route, parsed.model)
        if isinstance(route, ApiError):
            return self.reject(route)
        self.route = route
        plan = authorize(self.policy, key, route)
        if isinstance(plan, ApiError):
            return self.reject(plan)
        primary = self.policy.models[route.primary_model]
        circuits = self.gw.health.view()
        step, skipped = first_step(self.policy, route, plan, circuits.unhealthy, circuits.opened_by)
        if skipped:
            self.skipped = Attempt(skipped[0].model, skipped[0].provider, 0, "provider_unhealthy")
            self.fallback_reason = "provider_unhealthy"
            self.rule = step.rule
        if not step.go:
            self.rule = step.rule
            return self.reject(errors.upstream_unavailable(503, f"The route's provider is unhealthy and its policy allows no fallback ({step.rule})."))
        target = self.policy.models[step.model]
        choice = RouteChoice(route, plan, primary, target, self.policy.providers[target.provider])
        self.parsed, self.choice = parsed, choice

        refusal = await self.reserve(parsed, choice, key)
        if refusal is not None:
            return self.reject(refusal)

        self.chained = route.max_attempts > 1
        assert self.reservation is not None
        body = rewrite_body(parsed, self.path, target.upstream_model, self.reservation.cap)
        cluster = chain_cluster(choice.provider.name) if self.chained else choice.provider.name
        cap = self.output_cap()
        # Attempt 1's provider's own budget; the relay bounds a later attempt by its provider's.
        budget = attempt_budget_ms(choice.provider, cap, parsed.stream)
        # Headers are applied by Envoy's apply filter (contract.APPLY_LUA): "" removes one.
        assert self.bound is not None
        big = not parsed.stream and answer_bytes_bound(
            self.path, parsed.body, cap, self.bound.choices, parsed.body_bytes) > self.gw.max_body_bytes
        apply = {CLUSTER_HEADER: route_target(cluster, parsed.stream, big), PER_TRY_TIMEOUT_HEADER: str(budget), "api-key": "",
                 "authorization": self.gw.credential(choice.provider.name)}
        notes: dict[str, dict[str, Any]] = {NS_APPLY: apply}
        self.big = big
        if self.chained:
            apply["x-envoy-max-retries"] = str(route.max_attempts - 1)
            skip = skipped[0] if skipped else None
            started, unhealthy = now_ms(), frozenset(circuits.after_first)
            notes[NS_REQUEST] = RequestNote(
                route.name, plan.name, target.name, choice.provider.name, started, key.customer, cap, parsed.stream,
                unhealthy, skip.model if skip else "", skip.provider if skip else "",
                skip.opened_by if skip else "").to_struct()
            second = self.plan_second(choice, skipped, unhealthy, started, cap, parsed.stream)
            notes[NS_PLAN], notes[NS_PLAN_AUTH] = second.to_struct(), second.credentials()
        notes[NS_EXCHANGE] = {SNAPSHOT_KEY: json.dumps(self.snapshot(), separators=(",", ":"))}
        fast = self.fast_note()
        if fast is not None:
            notes[NS_FAST] = fast
        # From here on this stream has nothing more to do: the answer is priced by Envoy's Lua
        # and settled from its access log, or taken by the answer processor (a new stream).
        self.handed_over = self.finished = True
        self.gw.hand_over(self.reservation.marker_key, self.reservation_ttl_ms / 1000)
        return pb.ProcessingResponse(
            request_body=pb.BodyResponse(response=pb.CommonResponse(body_mutation=pb.BodyMutation(body=body))),
            dynamic_metadata=metadata(notes),
        )

    def snapshot(self) -> dict[str, Any]:
        """This request's accounting state after the reservation: what the answer processor
        or the access-log settlement needs to finish it exactly as this processor would."""
        key, c, res, b, parsed = self.key, self.choice, self.reservation, self.bound, self.parsed
        assert key is not None and c is not None and res is not None and b is not None and parsed is not None
        return {"path": self.path, "rid": self.request_id, "t0": self.started_ms, "rec": self.record_id,
                "key": [key.key_id, key.customer, key.workspace, key.plan],
                "c": [c.route.name, c.plan.name, c.primary.name, c.target.name],
                "px": [c.target.price.input_micro_per_mtok, c.target.price.output_micro_per_mtok],
                "res": [res.month, res.prepaid, res.amount, res.cap],
                "b": [b.input_tokens, b.rate_tokens, b.output_tokens, b.min_output_tokens, b.choices, b.input_price, b.output_price],
                "ttl": self.reservation_ttl_ms, "rate": self.rate_headers, "rule": self.rule, "fr": self.fallback_reason,
                "skip": [self.skipped.model, self.skipped.provider] if self.skipped else None,
                "chained": self.chained, "stream": parsed.stream, "usage_chunk": parsed.wants_usage_chunk, "big": self.big}

    @classmethod
    def resume(cls, gw: Gateway, snap: dict[str, Any]) -> Exchange | None:
        """The Exchange `snapshot` described, ready for its response phase, under the newest
        policy (in force, or retired by a reload meanwhile) that has its route and models; None
        when none has (the reaper then records it as unsettled)."""
        ex = cls(gw)
        route_name, plan_name, primary_name, target_name = snap["c"]
        for p in (gw.policy, *gw.retired):
            route, plan = p.routes.get(route_name), p.plans.get(plan_name)
            primary, target = p.models.get(primary_name), p.models.get(target_name)
            if route is not None and plan is not None and primary is not None and target is not None and target.provider in p.providers:
                break
        else:
            return None
        ex.policy = p
        ex.path, ex.request_id, ex.started_ms, ex.record_id = snap["path"], snap["rid"], int(snap["t0"]), snap["rec"]
        ex.started = time.monotonic() - max(0, now_ms() - ex.started_ms) / 1000
        key_id, customer, workspace, key_plan = snap["key"]
        ex.key = KeyInfo(key_id, customer, workspace, key_plan)
        ex.route = route
        if "px" in snap:  # billed at the price it was admitted (and reserved, and Envoy priced) at, even after a reload
            target = dataclasses.replace(target, price=Price(int(snap["px"][0]), int(snap["px"][1])))
        ex.choice = RouteChoice(route, plan, primary, target, p.providers[target.provider])
        month, prepaid, amount, cap = snap["res"]
        ex.reservation = Reservation(Account(customer, workspace, key_id), ex.request_id, month, bool(prepaid), int(amount), int(cap))
        ex.bound = CostBound(*(int(v) for v in snap["b"]))
        ex.reservation_ttl_ms = int(snap["ttl"])
        ex.extend_at = time.monotonic() + ex.reservation_ttl_ms / 1000 * config.EXTEND_WHEN_LEFT
        ex.rate_headers = dict(snap["rate"])
        ex.rule, ex.fallback_reason = snap["rule"], snap["fr"]
        if snap["skip"]:
            ex.skipped = Attempt(snap["skip"][0], snap["skip"][1], 0, "provider_unhealthy")
        ex.chained, ex.big = bool(snap["chained"]), bool(snap["big"])
        body: dict[str, Any] = {"stream_options": {"include_usage": True}} if snap["usage_chunk"] else {}
        ex.parsed = ParsedRequest(body, target.name, bool(snap["stream"]), 0)
        ex.attempts = [Attempt(target.name, ex.choice.provider.name, 0, "unknown")]
        return ex

    def fast_note(self) -> dict[str, Any] | None:
        """NS_FAST: what Envoy's PRICE_LUA needs to answer a plain 200 JSON answer of attempt 1
        alone (prices, attribution headers); None when the answer processor must see it (a
        stream, or an answer that may not fit Envoy's buffer)."""
        c = self.choice
        assert c is not None
        return self.priced_alone(c.target.price, self.attribution_headers(cost_micro=None))

    def priced_alone(self, price: Price, headers: dict[str, str]) -> dict[str, Any] | None:
        """PRICE_LUA's note for an answer at `price` with `headers`, or None when Envoy must not
        price it: a stream, a big answer, or prices beyond its exact arithmetic."""
        parsed = self.parsed
        assert parsed is not None
        if parsed.stream or self.big or max(price.input_micro_per_mtok, price.output_micro_per_mtok) >= FAST_MAX_PRICE:
            return None
        return {"pi_h": price.input_micro_per_mtok // 1_000_000, "pi_l": price.input_micro_per_mtok % 1_000_000,
                "po_h": price.output_micro_per_mtok // 1_000_000, "po_l": price.output_micro_per_mtok % 1_000_000,
                "gen": 1 if self.generates() else 0, "h": headers}

    def planned_headers(self, model_name: str, provider_name: str, outcome: str) -> dict[str, str]:
        """How the attribution of a planned attempt 2's answer differs from attempt 1's (PRICE_LUA
        sets NS_FAST's, then these), as `learn_attempts` will tell it."""
        h = {"x-tollgate-attempts": "2", "x-tollgate-provider": provider_name, "x-tollgate-final-model": model_name}
        if self.skipped is None:
            h["x-tollgate-fallback-reason"] = outcome
        return h

    def plan_second(self, choice: RouteChoice, skipped: list[Tried], unhealthy: frozenset[str], started: int, cap: int,
                    stream: bool) -> PlanNote:
        """Attempt 2 per failure kind, decided now (chains.planned_second_steps), so a switch
        after a 5xx or a 429 costs Envoy's Lua, not a processor message (contract.PLANNED_LUA)."""
        policy, first = self.policy, choice.target
        steps = planned_second_steps(policy, choice.route, choice.plan, skipped, first, unhealthy, PLANNED_OUTCOMES)
        planned: dict[str, PlannedStep] = {}
        for key, step in steps.items():
            model = policy.models[step.model]
            provider = policy.providers[model.provider]
            fast = self.priced_alone(model.price, self.planned_headers(model.name, provider.name, PLANNED_OUTCOMES[key]))
            planned[key] = PlannedStep(stream_target(provider.name, stream), attempt_budget_ms(provider, cap, stream),
                                       self.gw.credential(provider.name), model.name, provider.name,
                                       model_head(model.upstream_model), step.rule, step.reason, fast or {})
        return PlanNote(first.name, first.provider, started, model_head(first.upstream_model), planned)

    async def reserve(self, parsed: ParsedRequest, choice: RouteChoice, key: KeyInfo) -> ApiError | None:
        """Reserve the most the request can cost (caps.py); an ApiError when it must not go
        upstream. The reservation's output cap is then written into the forwarded body."""
        route, plan = choice.route, choice.plan
        candidates = all_candidates(self.policy, route, plan)
        self.bound = bound = cost_bound(self.path, parsed.body, parsed.body_bytes, route.default_max_tokens, candidates)
        res = Reservation(Account(key.customer, key.workspace, key.key_id), self.request_id, month_of(self.started_ms / 1000), plan.prepaid)
        # In flight at most: every attempt using its whole time budget on the slowest provider
        # it may reach (a stream: its first byte or its longest silence; it extends the
        # reservation while it flows).
        budgets = [attempt_budget_ms(p, bound.output_tokens, parsed.stream) for p in (self.policy.providers[m.provider] for m in candidates)]
        if parsed.stream:
            budgets += [int(self.policy.providers[m.provider].idle_s * 1000) for m in candidates]
        ttl = reservation_ttl_ms(budgets, route.max_attempts, self.gw.reservation_grace_s)
        limits, unsettled = Limits.of(plan, key.rpm, key.tpm), self.record_base().fields(finished=False)
        try:
            result = await self.gw.quota.reserve(res, bound, limits, ttl, unsettled, settling=True)
            if result.status == "refused" and result.reason in SETTLED_LATER:
                # Answers are settled from Envoy's access log a few milliseconds after their
                # clients got them: a client sending its next request at once may find the last
                # one's cap still held. Cut its cap or refuse it only once those have landed.
                await asyncio.sleep(config.SETTLE_WAIT_S)
                result = await self.gw.quota.reserve(res, bound, limits, ttl, unsettled)
        except RedisError:
            metrics.REDIS_ERRORS.labels("reserve").inc()
            return errors.quota_unavailable()
        self.rate_headers = result.rate.headers()
        if result.status == "duplicate":
            return ApiError(409, "duplicate_request", f"The request id {self.request_id!r} was already used for a request that "
                            "was served or is still in flight; send a new x-request-id.", param="x-request-id")
        if result.status != "ok":
            self.gw.quota.forget_hint(res)
            return self.refusal(route.name, result, bound)
        self.reservation = Reservation(res.account, res.request_id, res.month, res.prepaid, result.amount, result.cap)
        self.reservation_ttl_ms = ttl
        self.extend_at = time.monotonic() + ttl / 1000 * config.EXTEND_WHEN_LEFT
        self.attempts = [Attempt(choice.target.name, choice.provider.name, 0, "unknown")]
        return None

    def refusal(self, route: str, result: ReserveResult, bound: CostBound) -> ApiError:
        """SPEC §4's 429s, saying what this request could cost and what is left."""
        metrics.QUOTA_REJECTIONS.labels(route, result.reason).inc()
        if result.reason in ("rpm", "tpm"):
            self.fallback_reason = "rate_limit"
            what = "requests" if result.reason == "rpm" else "tokens"
            return errors.rate_limited(f"Rate limit reached for {what} per minute on this key, workspace or customer.",
                                       -(-result.retry_after_ms // 1000))
        self.fallback_reason = "budget"
        where = "prepaid balance" if result.reason == "balance" else "monthly spend limit"
        output = f" and {bound.min_output_tokens} output token(s) per choice" if bound.min_output_tokens else ""
        return errors.insufficient_quota(
            f"This request could cost up to ${format_usd(result.need)} ({bound.input_tokens} input token(s) at most{output}), "
            f"but only ${format_usd(max(0, result.available))} is left in the {where} of this customer or workspace. "
            "Add funds, raise the limit, or send a shorter request.")

    # --- response path ------------------------------------------------------------------

    async def on_response_headers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        """Usually the request's last message: a JSON answer's usage came with it (Envoy's
        json_to_metadata read it), so it is settled here and the body passes untouched.
        Streams, failures to rewrite and answers without usage switch the body on."""
        msg = req.response_headers
        h = _headers_of(msg)
        self.upstream_status = int(h.get(":status", "0") or 0)
        # Envoy's router stamps every proxied response; a reply without it is Envoy's own.
        self.local_reply = "x-envoy-upstream-service-time" not in h
        if not self.path:  # Envoy refused the request before this processor saw it (too large,
            self.finished = True  # bad path, upgrade): its local reply mapper speaks for it.
            return self.headers_reply([], [ANSWER_HEADER])
        # Only the upstream processor ends a chain, and it notes so in metadata too: a
        # provider's own copy of the header must not pass its error through unshaped.
        notes = AttemptsNote.from_struct(namespace(req, NS_ATTEMPTS)) if self.chained else AttemptsNote()
        self.stop_reason = h.get(STOP_HEADER) if notes.stop is not None else None
        self.learn_attempts(notes, self.stop_reason)
        remove = [k for k in h if k.startswith(PROVIDER_ONLY)]  # providers cannot forge ours, nor show their account
        self.pending_remove = remove  # also when the answer is replaced by our error
        if self.big and ORIGINAL_CONTENT_TYPE_HEADER in h:  # a big answer, hidden from json_to_metadata
            h["content-type"] = h[ORIGINAL_CONTENT_TYPE_HEADER]
            self.restore = [_opt("content-type", h["content-type"])]
        if self.reservation is not None and attribute(req, ATTR_CODE_DETAILS) == "response_payload_too_large":
            # A served answer larger than Envoy's buffer: the client gets the mapper's 502, the
            # provider did the work, so it is billed at its reservation (the cap).
            self.upstream_status = 200
            self.usage_source = "reservation"
            cost = await self.finish(None, status=502, charge=self.reservation.amount)
            return self.headers_reply(self.attribution(cost), remove)
        if self.choice is not None and self.stop_reason is None and self.final_failed():
            self.replacement = self.failure_error()
        elif self.choice is not None and 300 <= self.upstream_status < 400 and not self.local_reply:
            # A provider's redirect would send the client (and its key, if it follows) elsewhere.
            self.replacement = errors.upstream_unavailable(502, "The provider answered with a redirect, which the gateway does not follow.")
            remove.append("location")
        if msg.end_of_stream:
            if self.replacement is not None or (self.local_reply and self.stop_reason is None):
                err = self.replacement or self.local_reply_error()
                # Envoy's own reply (no provider answered): the record says what the client got.
                await self.finish(None, status=err.status if self.local_reply else None)
                return self.replace_response(err, phase="headers")
            cost = await self.finish(None)
            return self.headers_reply(self.attribution(cost), remove)
        if self.replacement is None and not self.local_reply:
            is_sse = "text/event-stream" in h.get("content-type", "")
            self.answer_length = int(h.get("content-length") or 0)
            too_large = self.answer_length > self.gw.max_body_bytes
            if is_sse or too_large:
                return self.stream_through(is_sse, remove)
            usage = usage_from_metadata(namespace(req, NS_USAGE), self.generates()) if self.served() else None
            if usage is not None or not self.served():
                cost = await self.finish(usage)
                return self.headers_reply(self.attribution(cost), remove)
            if "content-length" not in h:  # of unknown size (chunked): metered as it passes, never buffered whole
                return self.stream_through(is_sse, remove)
        # The body is needed: an error to rewrite in OpenAI's shape, or an answer whose usage
        # Envoy could not read (none, or not JSON) to estimate from its text.
        resp = self.headers_reply([], [])
        resp.mode_override.CopyFrom(
            pb.ProcessingMode(request_body_mode=pb.ProcessingMode.NONE, response_body_mode=pb.ProcessingMode.BUFFERED))
        return resp

    def stream_through(self, is_sse: bool, remove: list[str]) -> pb.ProcessingResponse:
        """Let the body pass chunk by chunk (STREAMED): a stream at the provider's pace, or a
        JSON answer too large for Envoy's buffer. The meter bills it from its usage; a client
        that did not ask for a stream's usage chunk never sees it."""
        self.streaming = True
        self.last_byte = time.monotonic()
        parsed = self.parsed
        strip = is_sse and parsed is not None and not parsed.wants_usage_chunk and self.path != "/v1/responses"
        self.meter = StreamMeter(strip_usage=strip, json_body=not is_sse)
        if strip:
            remove = [*remove, "content-length"]
        resp = self.headers_reply(self.attribution(cost_micro=None), remove)
        resp.mode_override.CopyFrom(
            pb.ProcessingMode(request_body_mode=pb.ProcessingMode.NONE, response_body_mode=pb.ProcessingMode.STREAMED)
        )
        return resp

    def learn_attempts(self, notes: AttemptsNote, stop_reason: str | None) -> None:
        """Every attempt and how it ended: from the upstream processor's notes (chains) and
        the final response itself."""
        c = self.choice
        if c is None:
            return
        attempts: list[Attempt] = []
        # Attempts PLANNED_LUA classified: no processor saw them fail, so their health is noted here.
        self.health_pending = [(e.provider, e.outcome) for e in notes.attempts.values() if e.health_pending]
        for k, e in notes.attempts.items():
            model = e.model or (c.target.name if k == 1 else "")
            provider = e.provider or (c.provider.name if k == 1 else "")
            attempts.append(Attempt(model, provider, e.status, e.outcome or "unknown"))
            if e.rule:
                self.rule = e.rule
        if not attempts:
            attempts = [Attempt(c.target.name, c.provider.name, 0, "unknown")]
        if stop_reason is None:
            # The final response belongs to the last attempt.
            last = attempts[-1]
            attempts[-1] = Attempt(last.model, last.provider, self.upstream_status, self.final_outcome())
        self.attempts = attempts
        failures = [a.reason for a in attempts if a.reason not in ("ok", "unknown", "client_error")]
        if self.skipped is None:
            self.fallback_reason = failures[0] if failures else "none"
        if notes.stop is not None:
            self.rule = notes.stop.rule or self.rule
            if notes.stop.reason == "policy":
                self.fallback_reason = "policy"
        model_by_name = self.policy.models.get(attempts[-1].model)
        if model_by_name is not None and attempts[-1].model != c.target.name:
            self.choice = RouteChoice(c.route, c.plan, c.primary, model_by_name, self.policy.providers[model_by_name.provider])

    def final_outcome(self) -> str:
        s = self.upstream_status
        if self.local_reply:
            return {504: "timeout", 413: "client_error"}.get(s, "connect_failure")
        return outcome_of_status(s)

    def final_failed(self) -> bool:
        return self.attempts[-1].reason in FAILURE_STATUS if self.attempts else False

    def failure_error(self) -> ApiError:
        """Every allowed attempt failed (or the route fails closed): SPEC §4's upstream_unavailable."""
        return unavailable_error(self.attempts[-1].reason, len(self.attempts), self.rule)

    async def on_response_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        self.last_byte = time.monotonic()
        if not self.path:
            return pb.ProcessingResponse(response_body=pb.BodyResponse())
        if self.streaming:
            return await self.stream_chunk(msg)
        if self.replacement is not None:
            await self.finish(None, status=self.replacement.status if self.local_reply else None)
            return self.replace_response(self.replacement, phase="body")
        if self.local_reply and self.stop_reason is None:
            err = self.local_reply_error()
            await self.finish(None, status=err.status)
            return self.replace_response(err, phase="body")
        usage = self.body_usage(msg.body) if self.served() else None
        cost = await self.finish(usage)
        mutation = pb.HeaderMutation(set_headers=self.attribution(cost), remove_headers=self.pending_remove)
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(header_mutation=mutation)))

    async def stream_chunk(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        """One chunk of a streamed body: metered, maybe rewritten (usage chunk stripped);
        a long stream keeps its reservation alive; the last chunk settles."""
        meter = self.meter
        assert meter is not None
        out = meter.feed(msg.body)
        if msg.end_of_stream:
            out += meter.finish()
            await self.finish(self.stream_usage())
        elif self.reservation is not None and time.monotonic() >= self.extend_at:
            self.extend_at = time.monotonic() + self.reservation_ttl_ms / 1000 * config.EXTEND_WHEN_LEFT
            self.gw.spawn(self.extend(self.reservation))
        if out == msg.body:
            return pb.ProcessingResponse(response_body=pb.BodyResponse())
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(body_mutation=pb.BodyMutation(body=out))))

    async def extend(self, res: Reservation) -> None:
        try:
            await self.gw.quota.extend(res, self.reservation_ttl_ms)
        except RedisError:
            metrics.REDIS_ERRORS.labels("extend").inc()

    def generates(self) -> bool:
        """The endpoint generates text, so its usage must count output tokens."""
        return self.path != "/v1/embeddings"

    def served(self) -> bool:
        """A provider answered 2xx: it did the work, so the request is billed, never at 0."""
        return 200 <= self.upstream_status < 300 and not self.local_reply

    def body_usage(self, raw: bytes) -> Usage:
        """A served JSON answer's usage; without one (or unreadable), an estimate of its text."""
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError):
            obj = None
        usage = usage_from_json(obj, self.generates())
        if usage is not None:
            return usage
        self.usage_source = "estimated"
        generated = text_bytes(obj.get("choices", obj.get("output"))) if isinstance(obj, dict) else len(raw)
        return self.estimate(generated)

    async def close(self) -> None:
        """The stream ended. If the request was never accounted (the client went away, or
        Envoy reset the stream), account for it now: nothing reserved may stay open. A
        provider that answered 2xx did the work even if its body never got through: the
        stream is billed from what passed, a lost JSON answer at its reservation (the cap)."""
        if self.finished or self.reservation is None:
            return
        status = 502 if self.meter is not None and self.meter.json_body else 499  # Envoy's answer to an oversized body
        if self.stalled():  # cut by Envoy's idle timeout, billed for what went out
            last = self.attempts[-1]
            self.attempts[-1] = Attempt(last.model, last.provider, last.status, "timeout")
            await self.finish(self.stream_usage(), status=504)
        elif self.streaming and (self.meter is None or not self.meter.json_body or self.meter.usage is not None):
            # A JSON answer whose every byte went out: the client may close on its last byte,
            # before Envoy passes the end of the stream here. It got the answer, not a 499.
            whole = self.meter is not None and self.meter.json_body and 0 < self.answer_length <= self.meter.bytes
            await self.finish(self.stream_usage(), status=self.upstream_status if whole else 499)
        elif self.served():
            self.usage_source = "reservation"
            await self.finish(None, status=status, charge=self.reservation.amount)
        else:
            await self.finish(None, status=499)

    # --- accounting ---------------------------------------------------------------------

    def output_cap(self) -> int:
        """The output token cap written into the forwarded body (what its time budget assumes)."""
        assert self.reservation is not None
        return self.reservation.cap

    def note_health(self) -> None:
        """The final attempt's outcome feeds its provider's circuit (earlier attempts' were
        noted by the upstream processor). A timeout the request's own size explains is not
        the provider's failure; a provider's 4xx answer shows it is alive."""
        if not self.attempts or self.key is None or self.parsed is None or self.reservation is None:
            return
        for name, outcome in self.health_pending:
            if outcome in HEALTH_FAILURES and name in self.policy.providers:
                self.gw.spawn(self.gw.health.record_failure(name, self.key.customer, outcome))
        last = self.attempts[-1]
        provider = self.policy.providers.get(last.provider)
        if provider is None or last.reason == "unknown":
            return
        if last.reason in ("ok", "client_error"):
            self.gw.health.record_success(last.provider)
        elif last.reason in HEALTH_FAILURES and not (
                last.reason == "timeout" and size_explains_timeout(provider, self.output_cap(), self.parsed.stream)):
            self.gw.spawn(self.gw.health.record_failure(last.provider, self.key.customer, last.reason))

    def client_status(self) -> int:
        """The status the client received: the gateway's own error when it replaced the
        provider's answer (e.g. 502 for a provider's 500), else the upstream's."""
        if self.replacement is not None:
            return self.replacement.status
        if self.local_reply and self.stop_reason is None:
            return self.local_reply_error().status
        return self.upstream_status

    def stalled(self) -> bool:
        """A stream that went silent for its provider's idle timeout: Envoy cut it."""
        if self.choice is None or not self.streaming:
            return False
        return time.monotonic() - self.last_byte >= 0.9 * self.choice.provider.idle_s

    def stream_usage(self) -> Usage | None:
        """A streamed answer's usage; without it (cut short, or a provider that sends none),
        an estimate of the text that went out. None when nothing was served."""
        assert self.meter is not None
        if self.meter.usage is not None:
            return self.meter.usage
        if not self.served():
            return None
        self.usage_source = "estimated"
        return self.estimate(self.meter.text)

    def estimate(self, text_bytes: int) -> Usage:
        """Usage of a served answer that came without it, never above what the request was
        allowed: the provider was held to the cap, so the bill stays within the reservation."""
        assert self.bound is not None and self.reservation is not None
        guess = estimated_usage(self.bound.rate_tokens, text_bytes)
        return Usage(min(guess.prompt_tokens, self.bound.input_tokens),
                     min(guess.completion_tokens, self.reservation.cap * self.bound.choices))

    @property
    def chain(self) -> list[Attempt]:
        """Every candidate in order: the primary skipped for an open circuit, then the attempts."""
        return ([self.skipped] if self.skipped else []) + self.attempts

    async def finish(self, usage: Usage | None, status: int | None = None, charge: int | None = None) -> int:
        """Account for the request exactly once: cost, metrics, settle/release, record.
        `usage` None means nothing was served (released at 0) unless `charge` names the cost."""
        if self.finished or self.choice is None:
            return 0
        self.finished = True
        c = self.choice
        final_status = status or self.client_status()
        served = usage is not None or charge is not None
        cost = c.target.price.cost_micro(usage.prompt_tokens, usage.completion_tokens) if usage else (charge or 0)
        kind = spend_kind(c.primary.name, c.target.name, len(self.attempts))
        reserved = self.reservation.amount if self.reservation else 0
        self.overrun = cost > reserved
        if self.overrun:
            metrics.RESERVATION_OVERRUNS.labels(c.route.name, c.provider.name).inc()
        metrics.REQUESTS.labels(c.route.name, c.primary.name, c.target.name, str(final_status)).inc()
        for a in self.attempts:
            metrics.UPSTREAM_ATTEMPTS.labels(c.route.name, a.model, a.provider, a.reason).inc()
        for before, after in itertools.pairwise(self.chain):
            if before.model != after.model:
                metrics.FALLBACKS.labels(c.route.name, before.model, after.model, before.reason).inc()
            else:
                metrics.RETRIES.labels(c.route.name, after.model, before.reason).inc()
        self.note_health()
        if usage is not None:
            metrics.TOKENS.labels(c.route.name, c.target.name, "prompt").inc(usage.prompt_tokens)
            metrics.TOKENS.labels(c.route.name, c.target.name, "completion").inc(usage.completion_tokens)
            metrics.SPEND.labels(c.route.name, c.target.name, c.provider.name, kind).inc(metrics.usd(cost))
        if self.reservation is not None:
            record = self.record_final(usage, cost, kind, final_status)
            tokens = usage.prompt_tokens + usage.completion_tokens if usage else 0
            await settle(self.gw, self.reservation, cost, tokens, served, record.fields())
            self.gw.handed.pop(self.reservation.marker_key, None)
        return cost

    def record_base(self) -> UsageRecord:
        """The fields known before the upstream call (also what an unsettled record shows)."""
        key, c = self.key, self.choice
        assert key is not None and c is not None
        return UsageRecord(
            request_id=self.request_id, ts=str(self.started_ms), route=c.route.name, customer_id=key.customer,
            workspace_id=key.workspace, api_key_id=key.key_id, plan=c.plan.name, primary_model=c.primary.name,
            final_model=c.target.name, provider=c.provider.name, stream=bool(self.parsed and self.parsed.stream),
            endpoint=self.path, record_id=self.record_id, prepaid=c.plan.prepaid,
            attempt_list=[Attempt(c.target.name, c.provider.name, 0, "unknown")])

    def record_final(self, usage: Usage | None, cost: int, kind: str, status: int) -> UsageRecord:
        c = self.choice
        assert c is not None and self.reservation is not None
        rec = self.record_base()
        rec.final_model, rec.provider, rec.attempts = c.target.name, c.provider.name, len(self.attempts)
        rec.fallback_reason, rec.status, rec.kind, rec.cost_micro_usd = self.fallback_reason, status, kind, cost
        rec.prompt_tokens = usage.prompt_tokens if usage else 0
        rec.completion_tokens = usage.completion_tokens if usage else 0
        rec.reserved_micro_usd, rec.output_cap, rec.overrun = self.reservation.amount, self.reservation.cap, self.overrun
        rec.usage_source = self.usage_source if usage or cost else "none"
        rec.rule, rec.latency_ms, rec.attempt_list = self.rule, int((time.monotonic() - self.started) * 1000), self.chain
        return rec

    # --- replies ------------------------------------------------------------------------

    def attribution(self, cost_micro: int | None) -> list[pb.HeaderValueOption]:
        return [_opt(k, v) for k, v in self.attribution_headers(cost_micro).items()]

    def attribution_headers(self, cost_micro: int | None) -> dict[str, str]:
        """SPEC §3's response headers, as far as they are known (no cost: not priced yet)."""
        out = {"x-request-id": self.request_id} if self.request_id else {}
        if self.key is None:
            return out
        out.update({
            "x-tollgate-customer": self.key.customer,
            "x-tollgate-workspace": self.key.workspace,
            "x-tollgate-key-id": self.key.key_id,
            "x-tollgate-attempts": str(len(self.attempts)),  # real upstream attempts only
            "x-tollgate-fallback-reason": self.fallback_reason,
            "x-tollgate-provider": self.choice.provider.name if self.choice and self.attempts else "none",
        })
        if self.route is not None:
            out.update({
                "x-tollgate-route": self.route.name,
                "x-tollgate-primary-model": self.route.primary_model,
                "x-tollgate-final-model": self.choice.target.name if self.choice else self.route.primary_model,
            })
        if cost_micro is not None:
            out["x-tollgate-cost-usd"] = format_usd(cost_micro)
        out.update(self.rate_headers)
        return out

    def headers_reply(self, set_headers: list[pb.HeaderValueOption], remove: list[str]) -> pb.ProcessingResponse:
        return pb.ProcessingResponse(
            response_headers=pb.HeadersResponse(
                response=pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=[*self.restore, *set_headers], remove_headers=remove))
            )
        )

    def reject(self, err: ApiError) -> pb.ProcessingResponse:
        """Answer from the gateway itself; Envoy sends nothing upstream. Only called before any
        reservation exists, so there is nothing to settle."""
        route, model = (self.route.name, self.route.primary_model) if self.route else ("unknown", "none")
        metrics.REQUESTS.labels(route, model, model, str(err.status)).inc()
        self.finished = True
        return pb.ProcessingResponse(immediate_response=immediate(err, self.attribution(cost_micro=0)))

    def models_list(self, key: KeyInfo) -> pb.ProcessingResponse:
        data = [{"id": r, "object": "model", "created": 0, "owned_by": "tollgate"} for r in visible_routes(self.policy, key)]
        body = json.dumps({"object": "list", "data": data}).encode()
        self.finished = True
        headers = [_opt("content-type", "application/json"), *self.attribution(cost_micro=None)]
        return pb.ProcessingResponse(
            immediate_response=pb.ImmediateResponse(
                status=pb.HttpStatus(code=200), headers=pb.HeaderMutation(set_headers=headers), body=body, details="tollgate_models"
            )
        )

    def local_reply_error(self) -> ApiError:
        """Envoy's own replies (no upstream answered, or body too large) in OpenAI's shape."""
        if self.upstream_status == 413:
            return errors.request_too_large()
        status = self.upstream_status if self.upstream_status in (502, 503, 504) else 503
        return errors.upstream_unavailable(status, "No provider could serve the request.")

    def replace_response(self, err: ApiError, phase: str) -> pb.ProcessingResponse:
        body = err.body()
        headers = [
            _opt(":status", str(err.status)),
            _opt("content-type", "application/json"),
            _opt("content-length", str(len(body))),
            *self.attribution(cost_micro=0),
        ]
        ours = {o.header.key for o in headers}
        mutation = pb.HeaderMutation(set_headers=headers, remove_headers=[k for k in self.pending_remove if k not in ours])
        common = pb.CommonResponse(header_mutation=mutation, body_mutation=pb.BodyMutation(body=body))
        if phase == "headers":
            common.status = pb.CommonResponse.CONTINUE_AND_REPLACE
            return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=common))
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))


def answer_exchange(gw: Gateway, first: pb.ProcessingRequest) -> Exchange:
    """The answer processor's Exchange: the request's own, rebuilt from the snapshot the
    downstream processor left in metadata. Without one (a reply Envoy made before the
    processor reserved anything) it passes the response through."""
    raw = namespace(first, NS_EXCHANGE).get(SNAPSHOT_KEY)
    ex = Exchange.resume(gw, json.loads(raw)) if isinstance(raw, str) else None
    return ex if ex is not None else Exchange(gw)

