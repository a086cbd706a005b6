"""The downstream ext_proc filter's processor: one `Exchange` per HTTP request.

Envoy sends four messages per request (request headers, request body, response headers,
response body) on one gRPC stream; `Exchange` keeps what was learned in each phase and
answers with mutations. Decisions come from pure functions (`decide`, `payload`); this module
only gathers facts, calls them and translates the result into Envoy's protocol.

  request headers  -> authenticate (key cache, Redis on a miss); GET /v1/models answered here
  request body     -> validate, resolve route, choose the provider, rewrite model/credential
  response headers -> streams switch to STREAMED mode; attribution headers for streams
  response body    -> usage -> cost; attribution headers (with cost); records and metrics
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from extproc import errors, metrics
from extproc.decide import KeyInfo, RouteChoice, authorize, resolve_route, visible_routes
from extproc.envoy_config import CLUSTER_HEADER
from extproc.errors import ApiError
from extproc.keys import KeyStore, secret_from_headers
from extproc.payload import ENDPOINTS, ParsedRequest, SseUsageScanner, Usage, parse_request, rewrite_body, usage_from_body
from extproc.pb import ext_proc_pb2 as pb
from extproc.policy.model import Policy, Route

log = logging.getLogger("tollgate.downstream")

OVERWRITE = pb.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
ATTRIBUTION_PREFIX = "x-tollgate-"
ROUTE_HEADER = "x-tollgate-route"


def format_usd(micro: int) -> str:
    """Integer micro-dollars as an exact decimal string, e.g. 1234 -> '0.001234'."""
    sign = "-" if micro < 0 else ""
    micro = abs(micro)
    return f"{sign}{micro // 1_000_000}.{micro % 1_000_000:06d}"


def _opt(key: str, value: str) -> pb.HeaderValueOption:
    return pb.HeaderValueOption(header=pb.HeaderValue(key=key, raw_value=value.encode()), append_action=OVERWRITE)


def _headers_of(msg: pb.HttpHeaders) -> dict[str, str]:
    return {h.key: (h.raw_value or h.value.encode()).decode("latin-1") for h in msg.headers.headers}


@dataclass
class Gateway:
    """What every exchange of one process shares: the policy, the key store, provider secrets."""

    policy: Policy
    keys: KeyStore
    provider_secrets: dict[str, str] = field(default_factory=dict)


class Exchange:
    """One HTTP request's conversation with Envoy's downstream ext_proc filter."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.policy = gw.policy  # one policy for the whole request, even across a reload
        self.started = time.monotonic()
        self.path = ""
        self.request_id = ""
        self.key: KeyInfo | None = None
        self.header_route: str | None = None
        self.client_internal_headers: list[str] = []
        self.parsed: ParsedRequest | None = None
        self.route: Route | None = None  # known once resolved, even if then refused
        self.choice: RouteChoice | None = None
        self.attempts = 0
        self.upstream_status = 0
        self.local_reply = False
        self.streaming = False
        self.scanner: SseUsageScanner | None = None
        self.pending_remove: list[str] = []
        self.finished = False

    # --- request path -------------------------------------------------------------------

    async def on_request_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        h = _headers_of(msg)
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
        if msg.end_of_stream:
            return self.reject(errors.invalid_request("A JSON request body is required."))
        self.header_route = h.get(ROUTE_HEADER) or None
        self.client_internal_headers = [k for k in h if k.startswith(ATTRIBUTION_PREFIX) and k != CLUSTER_HEADER]
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse())

    async def on_request_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        parsed = parse_request(self.path, msg.body)
        if isinstance(parsed, ApiError):
            return self.reject(parsed)
        assert self.key is not None
        route = resolve_route(self.policy, self.key, self.header_route, parsed.model)
        if isinstance(route, ApiError):
            return self.reject(route)
        self.route = route
        plan = authorize(self.policy, self.key, route)
        if isinstance(plan, ApiError):
            return self.reject(plan)
        primary = self.policy.models[route.primary_model]
        choice = RouteChoice(route, plan, primary, primary, self.policy.providers[primary.provider])
        self.parsed, self.choice = parsed, choice
        body = rewrite_body(parsed, self.path, choice.target.upstream_model)
        set_headers = [
            _opt(CLUSTER_HEADER, choice.provider.name),
            _opt("content-length", str(len(body))),
        ]
        remove = ["api-key", *self.client_internal_headers]
        provider_secret = self.gw.provider_secrets.get(choice.provider.name)
        if provider_secret:
            set_headers.append(_opt("authorization", f"Bearer {provider_secret}"))
        else:
            remove.append("authorization")
        self.attempts = 1
        return pb.ProcessingResponse(
            request_body=pb.BodyResponse(
                response=pb.CommonResponse(
                    header_mutation=pb.HeaderMutation(set_headers=set_headers, remove_headers=remove),
                    body_mutation=pb.BodyMutation(body=body),
                    clear_route_cache=True,
                )
            )
        )

    # --- response path ------------------------------------------------------------------

    async def on_response_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        h = _headers_of(msg)
        self.upstream_status = int(h.get(":status", "0") or 0)
        # Envoy's router stamps every proxied response; a reply without it is Envoy's own.
        self.local_reply = "x-envoy-upstream-service-time" not in h
        remove = [k for k in h if k.startswith(ATTRIBUTION_PREFIX)]  # providers cannot forge ours
        if msg.end_of_stream:
            if self.local_reply:
                err = self.local_reply_error()
                self.finish(None)
                return self.replace_response(err, phase="headers")
            self.finish(None)
            return self.headers_reply(self.attribution(cost_micro=0), remove)
        if not self.local_reply and "text/event-stream" in h.get("content-type", ""):
            self.streaming = True
            self.scanner = SseUsageScanner()
            resp = self.headers_reply(self.attribution(cost_micro=None), remove)
            resp.mode_override.CopyFrom(
                pb.ProcessingMode(
                    request_body_mode=pb.ProcessingMode.NONE,
                    response_body_mode=pb.ProcessingMode.STREAMED,
                )
            )
            return resp
        self.pending_remove = remove
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse())

    async def on_response_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        if self.streaming:
            assert self.scanner is not None
            self.scanner.feed(msg.body)
            if msg.end_of_stream:
                self.scanner.finish()
                self.finish(self.scanner.usage)
            return pb.ProcessingResponse(response_body=pb.BodyResponse())
        if self.local_reply:
            err = self.local_reply_error()
            self.finish(None)
            return self.replace_response(err, phase="body")
        usage = usage_from_body(msg.body) if 200 <= self.upstream_status < 300 else None
        cost = self.finish(usage)
        mutation = pb.HeaderMutation(set_headers=self.attribution(cost), remove_headers=self.pending_remove)
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(header_mutation=mutation)))

    async def close(self) -> None:
        """The stream ended (normally, or the client went away): nothing may stay open."""
        if not self.finished and self.choice is not None:
            self.finish(None, status=499)

    # --- helpers ------------------------------------------------------------------------

    def finish(self, usage: Usage | None, status: int | None = None) -> int:
        """Account for the request once: cost, metrics. Returns the settled cost."""
        if self.finished or self.choice is None:
            return 0
        self.finished = True
        c = self.choice
        cost = c.target.price.cost_micro(usage.prompt_tokens, usage.completion_tokens) if usage else 0
        code = str(status or self.upstream_status)
        metrics.REQUESTS.labels(c.route.name, c.primary.name, c.target.name, code).inc()
        if usage is not None:
            metrics.TOKENS.labels(c.route.name, c.target.name, "prompt").inc(usage.prompt_tokens)
            metrics.TOKENS.labels(c.route.name, c.target.name, "completion").inc(usage.completion_tokens)
            metrics.SPEND.labels(c.route.name, c.target.name, c.provider.name, "normal").inc(metrics.usd(cost))
        return cost

    def attribution(self, cost_micro: int | None) -> list[pb.HeaderValueOption]:
        out = [_opt("x-request-id", self.request_id)] if self.request_id else []
        if self.key is not None:
            out += [
                _opt("x-tollgate-customer", self.key.customer),
                _opt("x-tollgate-workspace", self.key.workspace),
                _opt("x-tollgate-key-id", self.key.key_id),
            ]
        if self.key is None:
            return out
        out += [
            _opt("x-tollgate-attempts", str(self.attempts)),
            _opt("x-tollgate-fallback-reason", "none"),
            _opt("x-tollgate-provider", self.choice.provider.name if self.choice and self.attempts else "none"),
        ]
        if self.route is not None:
            out += [
                _opt("x-tollgate-route", self.route.name),
                _opt("x-tollgate-primary-model", self.route.primary_model),
                _opt("x-tollgate-final-model", self.choice.target.name if self.choice else self.route.primary_model),
            ]
        if cost_micro is not None:
            out.append(_opt("x-tollgate-cost-usd", format_usd(cost_micro)))
        return out

    def headers_reply(self, set_headers: list[pb.HeaderValueOption], remove: list[str]) -> pb.ProcessingResponse:
        return pb.ProcessingResponse(
            response_headers=pb.HeadersResponse(
                response=pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=set_headers, remove_headers=remove))
            )
        )

    def reject(self, err: ApiError) -> pb.ProcessingResponse:
        """Answer from the gateway itself; Envoy sends nothing upstream."""
        if self.choice is not None and not self.finished:
            self.finish(None, status=err.status)
        elif self.choice is None:
            route, model = (self.route.name, self.route.primary_model) if self.route else ("unknown", "none")
            metrics.REQUESTS.labels(route, model, model, str(err.status)).inc()
        self.finished = True
        headers = [_opt("content-type", "application/json"), *self.attribution(cost_micro=0)]
        headers += [_opt(k, v) for k, v in err.headers.items()]
        return pb.ProcessingResponse(
            immediate_response=pb.ImmediateResponse(
                status=pb.HttpStatus(code=err.status),
                headers=pb.HeaderMutation(set_headers=headers),
                body=err.body(),
                details=f"tollgate_{err.code}",
            )
        )

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
        self.attempts = max(self.attempts, 1) if self.choice is not None else 0
        return errors.upstream_unavailable(status, "No provider could serve the request.")

    def replace_response(self, err: ApiError, phase: str) -> pb.ProcessingResponse:
        body = err.body()
        headers = [
            _opt(":status", str(err.status)),
            _opt("content-type", "application/json"),
            _opt("content-length", str(len(body))),
            *self.attribution(cost_micro=0),
        ]
        common = pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=headers), body_mutation=pb.BodyMutation(body=body))
        if phase == "headers":
            common.status = pb.CommonResponse.CONTINUE_AND_REPLACE
            return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=common))
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))
