"""Render the complete Envoy bootstrap from the policy (`tollgate envoy-config`).

The bootstrap is derived, never hand-kept: one cluster per provider, one route per cluster
selected by the internal header `x-tollgate-cluster` that only the processor sets, and the
ext_proc filter that fails closed. Client-sent copies of internal headers are removed by the
connection manager's early header mutation, before any filter or route reads them, so even a
misbehaving processor cannot be steered by a client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from extproc import config, edge, errors
from extproc.contract import (
    ANSWER_FILTER,
    ANSWER_HEADER,
    ANSWER_STATS,
    APPLY_FILTER,
    APPLY_LUA,
    CLUSTER_HEADER,
    ENVOY_PREFIX,
    EXTPROC_CLUSTER,
    FAST_COST,
    FAST_HANDED,
    FAST_MAX_COUNT,
    HIDDEN_CONTENT_TYPE,
    HIDE_FILTER,
    INTERNAL_HEADERS,
    NS_APPLY,
    NS_ATTEMPTS,
    NS_EXCHANGE,
    NS_FAST,
    NS_LAST,
    NS_PLAN,
    NS_PLAN_AUTH,
    NS_REQUEST,
    NS_REWRITE,
    NS_USAGE,
    ORIGINAL_CONTENT_TYPE_HEADER,
    PLANNED_HEADER,
    PLANNED_LUA,
    PRICE_FILTER,
    PRICE_LUA,
    PROVIDER_ONLY,
    RELAY_FLAGS_HEADER,
    RELAY_LISTENER,
    REQUEST_ATTRIBUTES,
    RESPONSE_ATTRIBUTES,
    SETTLE_LOG,
    SNAPSHOT_KEY,
    TARGET_HEADER,
    UPSTREAM_ATTEMPT_ATTRIBUTE,
    USAGE_KEYS,
)
from extproc.errors import ApiError
from extproc.payload import ENDPOINTS
from extproc.policy.model import Policy, Provider
from extproc.timeouts import PER_TRY_TIMEOUT_HEADER

# The internal names shared with the processors live in `contract`; re-exported for callers.
__all__ = [
    "CLUSTER_HEADER",
    "EXTPROC_CLUSTER",
    "INTERNAL_HEADERS",
    "NS_ATTEMPTS",
    "NS_LAST",
    "NS_REQUEST",
    "NS_REWRITE",
    "RELAY_LISTENER",
    "TARGET_HEADER",
    "GrpcEndpoint",
    "dump",
    "render_bootstrap",
    "worker_endpoints",
]

# Records each attempt's status (and the relay's response flags) for the next attempt.
STATUS_RECORDER_LUA = f"""
function envoy_on_response(handle)
  local md = handle:streamInfo():dynamicMetadata()
  md:set("{NS_LAST}", "status", handle:headers():get(":status"))
  md:set("{NS_LAST}", "flags", handle:headers():get("{RELAY_FLAGS_HEADER}") or "")
end
"""


# A later attempt's body gets its provider's model name here, at no gRPC cost: the body the
# downstream processor wrote starts with `{"model":"<first attempt's model>"` (payload.rewrite_body);
# the upstream processor names the old and the new head in metadata. Attempt 1 has no such
# metadata and passes untouched (its body is never buffered here).
MODEL_REWRITE_LUA = f"""
function envoy_on_request(handle)
  local rw = handle:streamInfo():dynamicMetadata():get("{NS_REWRITE}")
  if rw == nil or rw["old"] == nil then return end
  local body = handle:body()
  local text = body:getBytes(0, body:length())
  local old = rw["old"]
  if text:sub(1, #old) ~= old then
    handle:logErr("tollgate: a retried body does not start with the expected model; sent unchanged")
    return
  end
  local new = rw["new"] .. text:sub(#old + 1)
  body:setBytes(new)
  handle:headers():replace("content-length", tostring(#new))
end
"""


def chain_cluster(provider: str) -> str:
    """The aggregate cluster whose first attempt goes to `provider` and later ones to the relay."""
    return f"via_{provider}"


STREAM_SUFFIX = "+stream"  # header values that select a provider's stream route (idle-bounded)


BIG_SUFFIX = "+big"  # ... and a non-stream answer that may not fit Envoy's buffer


def stream_target(name: str, stream: bool) -> str:
    """The internal header value for `name` (a provider, or a chain's aggregate): streams take
    routes with a per-try idle timeout; non-stream answers are silent until complete."""
    return name + STREAM_SUFFIX if stream else name


def route_target(name: str, stream: bool, big: bool = False) -> str:
    """The downstream route for `name`: a stream; a non-stream answer that fits Envoy's buffer
    (json_to_metadata reads its usage); or one that may not (`+big`, caps.answer_bytes_bound):
    its route hides it from json_to_metadata, whose buffering would overflow, by renaming its
    content type (restored by the processor, which reads the body itself)."""
    return name + BIG_SUFFIX if big and not stream else stream_target(name, stream)


VARIANTS = ((False, False), (True, False), (False, True))  # (stream, big) of every downstream route


# An answer json_to_metadata buffers may exceed its 8 MiB bound only if the provider ignores
# the cap (honest big answers take `+big` routes and stream through): provider routes give it
# room, so it is delivered and billed from its usage rather than lost in an overflow the
# processor never sees.
_ANSWER_ROOM = {"per_request_buffer_limit_bytes": config.ANSWER_BUFFER_LIMIT_BYTES}


def _variant(big: bool) -> dict[str, Any]:
    if not big:
        return {}
    return {"typed_per_filter_config": {HIDE_FILTER: {
        "@type": _T + "extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute",
        "mutations": {"response_mutations": [
            {"append": {"header": {"key": ORIGINAL_CONTENT_TYPE_HEADER, "value": "%RESP(content-type)%"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}},
            {"append": {"header": {"key": "content-type", "value": HIDDEN_CONTENT_TYPE}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}},
        ]},
    }}}


def _timeouts(p: Provider, stream: bool) -> dict[str, Any]:
    """Routes have no total cap (it would cut a flowing stream). The per-try timeout (the
    processor sends each request's own in a header; this is the fallback) ends when the
    response starts; a stream is then bounded by the idle time between chunks (`_idle`)."""
    return {"per_try_timeout": f"{p.ttfb_s if stream else p.timeout_s:g}s"}


def _idle(p: Provider, stream: bool) -> dict[str, Any]:
    """A stream route's idle timeout: the connection manager cuts a stream silent this long
    (measured: reliable, where the router's per_try_idle_timeout was not armed on some streams).
    It runs from the request on, so a stream's first byte is awaited at most this long too."""
    return {"idle_timeout": f"{p.idle_s:g}s"} if stream else {}


def relay_cluster(slot: int) -> str:
    return f"tollgate_relay_{slot}"
DEFAULT_MAX_BODY_BYTES = config.MAX_BODY_BYTES
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

_T = "type.googleapis.com/envoy."


@dataclass(frozen=True)
class GrpcEndpoint:
    """One processor worker: `host:port` or `unix:/path/to.sock`."""

    host: str = ""
    port: int = 0
    unix_path: str = ""

    @classmethod
    def parse(cls, text: str) -> GrpcEndpoint:
        if text.startswith("unix:"):
            return cls(unix_path=text[5:])
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"expected HOST:PORT or unix:PATH, got {text!r}")
        return cls(host=host.strip("[]"), port=int(port))

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"

    def envoy_address(self) -> dict[str, Any]:
        if self.unix_path:
            return {"pipe": {"path": self.unix_path}}
        return {"socket_address": {"address": self.host, "port_value": self.port}}


def worker_endpoints(first: GrpcEndpoint, workers: int) -> list[GrpcEndpoint]:
    """N workers listen on consecutive ports (or `<path>.<i>` sockets) from the first."""
    if first.unix_path:
        return [first] + [GrpcEndpoint(unix_path=f"{first.unix_path}.{i}") for i in range(1, workers)]
    return [GrpcEndpoint(first.host, first.port + i) for i in range(workers)]


# A name with both an IPv4 and an IPv6 address (localhost: 127.0.0.1 and ::1) is reached on
# IPv4: Envoy's default (AUTO) prefers IPv6, where a server bound to 127.0.0.1 is not listening.
DNS_LOOKUP_FAMILY = "V4_PREFERRED"


def _discovery(by_name: bool) -> dict[str, Any]:
    """How a cluster finds its hosts: given as IPs, or names resolved by DNS (IPv4 first)."""
    return {"type": "STRICT_DNS", "dns_lookup_family": DNS_LOOKUP_FAMILY} if by_name else {"type": "STATIC"}


def _is_ip(host: str) -> bool:
    parts = host.split(".")
    return (len(parts) == 4 and all(p.isdigit() and int(p) < 256 for p in parts)) or ":" in host


def _provider_cluster(p: Provider, max_body: int) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": p.name,
        **_discovery(not _is_ip(p.host)),
        "connect_timeout": "5s",
        "lb_policy": "ROUND_ROBIN",
        "per_connection_buffer_limit_bytes": max_body,
        "load_assignment": {
            "cluster_name": p.name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": p.host, "port_value": p.port}},
                                "hostname": p.host,
                            },
                            "metadata": {"filter_metadata": {"tollgate": {"provider": p.name}}},
                        }
                    ]
                }
            ],
        },
        "circuit_breakers": {
            "thresholds": [{"max_connections": 4096, "max_pending_requests": 4096, "max_requests": 4096, "max_retries": 4096}]
        },
        # The provider sees only the allowlisted headers and query parameters (`edge`).
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "http_filters": [edge.gate_filter(p), edge.upstream_codec()],
            }
        },
    }
    if p.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _T + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": p.host,
                "common_tls_context": {"validation_context": {"trusted_ca": {"filename": CA_BUNDLE}}},
            },
        }
    return cluster


def _provider_route(p: Provider, stream: bool, big: bool) -> dict[str, Any]:
    value = route_target(p.name, stream, big)
    return {
        **_variant(big),
        "name": f"provider:{value}",
        "match": {"prefix": "/", "headers": [{"name": CLUSTER_HEADER, "string_match": {"exact": value}}]},
        # A literal rewrite happens before the upstream filters (the provider gate removes the
        # x-envoy-original-host it leaves); auto_host_rewrite would add that header after them.
        "route": {"cluster": p.name, "timeout": "0s", "host_rewrite_literal": p.host,
                  "retry_policy": {"num_retries": 0, **_timeouts(p, stream)}, **_idle(p, stream)},
        "request_headers_to_remove": [CLUSTER_HEADER],
        **_ANSWER_ROOM,
    }


def _chain_route(p: Provider, per_try_timeout_s: float, stream: bool, big: bool) -> dict[str, Any]:
    """Attempt 1 goes straight to the provider; Envoy retries onto the relay slots in order
    (previous_priorities) and the upstream processor decides what each retry is.

    No back-off here: a retry that switches provider goes at once; the upstream processor
    itself waits before a retry on the same provider (`upstream.SAME_PROVIDER_BACKOFF_S`)."""
    value = route_target(chain_cluster(p.name), stream, big)
    return {
        **_variant(big),
        "name": f"chain:{value}",
        "match": {"prefix": "/", "headers": [{"name": CLUSTER_HEADER, "string_match": {"exact": value}}]},
        "route": {
            "cluster": chain_cluster(p.name),
            "timeout": "0s",
            "auto_host_rewrite": True,
            "retry_policy": {
                "retry_on": "5xx,reset,connect-failure,retriable-status-codes",
                "retriable_status_codes": [429],
                "num_retries": 9,
                "per_try_timeout": f"{per_try_timeout_s:g}s",
                "retry_priority": {
                    "name": "envoy.retry_priorities.previous_priorities",
                    "typed_config": {
                        "@type": _T + "extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                        "update_frequency": 1,
                    },
                },
                # Envoy's jittered back-off waits random() % interval ms: 1 ms means 0 ms.
                "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.001s"},
            },
            **_idle(p, stream),
        },
        "request_headers_to_remove": [CLUSTER_HEADER],
        **_ANSWER_ROOM,
    }


ROUTER_FILTER = {"name": "envoy.filters.http.router", "typed_config": {"@type": _T + "extensions.filters.http.router.v3.Router"}}


def _ext_proc_filter(message_timeout_s: float, modes: dict[str, str], *, forwarding: list[str], receiving: list[str],
                     request_attributes: list[str] | None = None, response_attributes: list[str] | None = None,
                     stat_prefix: str = "") -> dict[str, Any]:
    """Tollgate's ext_proc filter: fails closed (503 when the processor is down or slow)."""
    config: dict[str, Any] = {
        "@type": _T + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}, "timeout": f"{message_timeout_s:g}s"},
        "failure_mode_allow": False,
        "status_on_error": {"code": 503},
        "message_timeout": f"{message_timeout_s:g}s",
        "allow_mode_override": True,
        # The processor sets per-request Envoy controls (per-try timeout, max retries) and
        # removes client-sent x-envoy-* headers: without this Envoy silently ignores both.
        "mutation_rules": {"allow_envoy": True},
        "processing_mode": {**modes, "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"},
        "metadata_options": {"forwarding_namespaces": {"untyped": forwarding}, "receiving_namespaces": {"untyped": receiving}},
    }
    if request_attributes:
        config["request_attributes"] = request_attributes
    if response_attributes:
        config["response_attributes"] = response_attributes
    if stat_prefix:  # Envoy's stats: http.<hcm>.ext_proc.<stat_prefix>.*
        config["stat_prefix"] = stat_prefix
    return {"name": "envoy.filters.http.ext_proc", "typed_config": config}


def _downstream_filters(message_timeout_s: float) -> list[dict[str, Any]]:
    """A normal request costs one processor message: its body (with the few headers it needs
    as attributes). A plain answer (200 JSON of attempt 1, usage readable) is priced and
    attributed by PRICE_LUA from what that message left in metadata, and settled from the
    gRPC access log (`settlement_log`). Every other answer starts the answer processor: a
    second ext_proc filter, created on the response only, in a composite matching the
    ANSWER_HEADER PRICE_LUA sets (its body is switched on from its headers reply when needed)."""
    return [
        _ext_proc_filter(
            message_timeout_s,
            {"request_header_mode": "SKIP", "request_body_mode": "BUFFERED", "response_header_mode": "SKIP",
             "response_body_mode": "NONE"},
            forwarding=[],
            receiving=[NS_REQUEST, NS_APPLY, NS_PLAN, NS_PLAN_AUTH, NS_EXCHANGE, NS_FAST],
            request_attributes=list(REQUEST_ATTRIBUTES),
        ),
        {"name": APPLY_FILTER, "typed_config": {"@type": _T + "extensions.filters.http.lua.v3.Lua",
                                                "default_source_code": {"inline_string": apply_lua()}}},
        # Encoding runs the list backwards: from here up, filters see the response after
        # json_to_metadata read the usage and PRICE_LUA priced it or marked it.
        _on_match(ANSWER_FILTER, _response_header_is(ANSWER_HEADER, "process"), _ext_proc_filter(
            message_timeout_s,
            {"request_header_mode": "SKIP", "request_body_mode": "NONE", "response_header_mode": "SEND",
             "response_body_mode": "NONE"},
            forwarding=[NS_ATTEMPTS, NS_USAGE, NS_EXCHANGE],
            receiving=[],
            response_attributes=list(RESPONSE_ATTRIBUTES),
            stat_prefix=ANSWER_STATS,
        )),
        {"name": PRICE_FILTER, "typed_config": {"@type": _T + "extensions.filters.http.lua.v3.Lua",
                                                "default_source_code": {"inline_string": price_lua()}}},
        # Reads the answer's usage (and holds its headers until the JSON body is parsed).
        {"name": "envoy.filters.http.json_to_metadata", "typed_config": {
            "@type": _T + "extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
            "response_rules": {
                # Values keep their JSON type (NUMBER would turn "0" or true into numbers the
                # processor's own parser refuses): only numbers are counts.
                # With or without parameters: many providers send `application/json; charset=utf-8`.
                "allow_content_types_regex": {"regex": "application/json(\\s*;.*)?"},
                "rules": [
                {"selectors": [{"key": "usage"}, {"key": key}],
                 "on_present": {"metadata_namespace": NS_USAGE, "key": key, "type": "PROTOBUF_VALUE"}}
                for key in USAGE_KEYS
            ]},
        }},
        # Does nothing but on `+big` routes (their per-route config, `_variant`): runs first on
        # the response, so json_to_metadata never sees a big answer's JSON content type.
        {"name": HIDE_FILTER, "typed_config": {"@type": _T + "extensions.filters.http.header_mutation.v3.HeaderMutation",
                                               "mutations": {}}},
        ROUTER_FILTER,
    ]


def price_lua() -> str:
    """contract.PRICE_LUA with the names filled in."""
    return PRICE_LUA % {"provider_only": ", ".join(json.dumps(p) for p in PROVIDER_ONLY), "max_count": FAST_MAX_COUNT,
                        "answer": ANSWER_HEADER, "ns_exchange": NS_EXCHANGE, "ns_fast": NS_FAST, "ns_usage": NS_USAGE,
                        "ns_attempts": NS_ATTEMPTS, "handed": FAST_HANDED, "cost": FAST_COST, "ns_plan": NS_PLAN,
                        "ns_plan_auth": NS_PLAN_AUTH}


def settlement_log() -> dict[str, Any]:
    """Envoy's gRPC access log to the processor: one entry per request the processor reserved
    for (it left a snapshot), batched; the processor settles what PRICE_LUA priced."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {"metadata_filter": {"matcher": {"filter": NS_EXCHANGE, "path": [{"key": SNAPSHOT_KEY}],
                                                   "value": {"present_match": True}}}},
        "typed_config": {
            "@type": _T + "extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": SETTLE_LOG,
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}},
                "buffer_flush_interval": f"{config.SETTLE_LOG_FLUSH_S:g}s",
                "buffer_size_bytes": config.SETTLE_LOG_BUFFER_BYTES,
            },
        },
    }


def apply_lua() -> str:
    """The request-side Lua filter (contract.APPLY_LUA) with its names filled in."""
    no_body = errors.invalid_request("A JSON request body is required.").body().decode()
    return APPLY_LUA % {"no_body": json.dumps(no_body), "ns_apply": NS_APPLY}


def _apply_off() -> dict[str, Any]:
    """Per-route config: the apply filter does not run (the route needs no provider)."""
    return {APPLY_FILTER: {"@type": _T + "extensions.filters.http.lua.v3.LuaPerRoute", "disabled": True}}


def _no_processor() -> dict[str, Any]:
    """Per-route config: neither the processor nor the apply filter runs."""
    return {"envoy.filters.http.ext_proc": {"@type": _T + "extensions.filters.http.ext_proc.v3.ExtProcPerRoute", "disabled": True},
            **_apply_off()}


def _entry_routes(no_route: ApiError) -> list[dict[str, Any]]:
    """Routes a request matches before the processor chose a provider: GET /v1/models (its
    headers go to the processor, which answers it), the POST endpoints (the processor reads
    the body; if it chooses nothing the answer is 503), and 404 for anything else."""
    json_type = [{"header": {"key": "content-type", "value": "application/json"}}]
    models = {
        "name": "models",
        "match": {"path": "/v1/models", "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
        "direct_response": {"status": 503, "body": {"inline_string": no_route.body().decode()}},
        "response_headers_to_add": json_type,
        "typed_per_filter_config": {
            "envoy.filters.http.ext_proc": {
                "@type": _T + "extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                "overrides": {"processing_mode": {
                    "request_header_mode": "SEND", "request_body_mode": "NONE", "response_header_mode": "SKIP",
                    "response_body_mode": "NONE", "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"}},
            },
            **_apply_off(),
        },
    }
    endpoints = [{
        "name": f"unselected:{path}",
        "match": {"path": path, "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]},
        "direct_response": {"status": 503, "body": {"inline_string": no_route.body().decode()}},
        "response_headers_to_add": json_type,
    } for path in ENDPOINTS]
    unknown = {
        "name": "unknown_endpoint",
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": "{}"}},
        "response_headers_to_add": json_type,
        "typed_per_filter_config": _no_processor(),
    }
    return [models, *endpoints, unknown]


def planned_lua() -> str:
    """contract.PLANNED_LUA with the names filled in."""
    return PLANNED_LUA % {"planned": PLANNED_HEADER, "ns_plan": NS_PLAN, "ns_plan_auth": NS_PLAN_AUTH, "ns_last": NS_LAST,
                          "ns_attempts": NS_ATTEMPTS,
                          "ns_rewrite": NS_REWRITE, "target": TARGET_HEADER, "per_try": PER_TRY_TIMEOUT_HEADER}


def _header_is(name: str, value: str, kind: str = "Request") -> dict[str, Any]:
    return {"single_predicate": {
        "input": {"name": name, "typed_config": {"@type": _T + f"type.matcher.v3.Http{kind}HeaderMatchInput", "header_name": name}},
        "value_match": {"exact": value},
    }}


def _response_header_is(name: str, value: str) -> dict[str, Any]:
    return _header_is(name, value, "Response")


def _on_match(name: str, predicate: dict[str, Any], filter_config: dict[str, Any]) -> dict[str, Any]:
    """Run a filter only where `predicate` matches (a composite filter): on the attempts it
    matches (the first attempt, the normal path, pays a header match, not the filter), or on
    the responses it matches (the filter is created then and sees the response only)."""
    return {
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "extension_config": {"name": "composite", "typed_config": {"@type": _T + "extensions.filters.http.composite.v3.Composite"}},
            "xds_matcher": {"matcher_list": {"matchers": [{
                "predicate": predicate,
                "on_match": {"action": {"name": "run", "typed_config": {
                    "@type": _T + "extensions.filters.http.composite.v3.ExecuteFilterAction",
                    "typed_config": filter_config,
                }}},
            }]}},
        },
    }


# Attempt 2 only: where PLANNED_LUA may set it up.
SECOND_ATTEMPT = _header_is("x-envoy-attempt-count", "2")
# Retries, except a second attempt PLANNED_LUA set up (its mark persists into attempt 3,
# which the processor must see, so the mark counts on attempt 2 only).
UNPLANNED_RETRY = {"and_matcher": {"predicate": [
    {"not_matcher": _header_is("x-envoy-attempt-count", "1")},
    {"not_matcher": {"and_matcher": {"predicate": [SECOND_ATTEMPT, _header_is(PLANNED_HEADER, "1")]}}},
]}}


def _upstream_filters(message_timeout_s: float, p: Provider) -> list[dict[str, Any]]:
    return [
        {
            "name": "tollgate.status_recorder",
            "typed_config": {
                "@type": _T + "extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": STATUS_RECORDER_LUA},
            },
        },
        _on_match("tollgate.planned_retry", SECOND_ATTEMPT, {"name": "envoy.filters.http.lua", "typed_config": {
            "@type": _T + "extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": planned_lua()},
        }}),
        _on_match("tollgate.retries_only", UNPLANNED_RETRY, _ext_proc_filter(
            message_timeout_s,
            # One message per retry: its headers. The body's `model` is rewritten by Lua below.
            {"request_header_mode": "SEND", "response_header_mode": "SKIP", "request_body_mode": "NONE", "response_body_mode": "NONE"},
            forwarding=[NS_REQUEST, NS_ATTEMPTS, NS_LAST],
            receiving=[NS_ATTEMPTS, NS_LAST, NS_REWRITE],
            request_attributes=[UPSTREAM_ATTEMPT_ATTRIBUTE],
        )),
        {
            "name": "tollgate.model_rewrite",
            "typed_config": {
                "@type": _T + "extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": MODEL_REWRITE_LUA},
            },
        },
        # Attempt 1 goes straight to `p` (its cluster's own filters do not run through the
        # aggregate): gate it here; retries bound for the relay are gated by their target.
        edge.gate_filter(p, pass_header=TARGET_HEADER),
        edge.upstream_codec(),
    ]


def _aggregate_cluster(p: Provider, slots: int, message_timeout_s: float) -> dict[str, Any]:
    return {
        "name": chain_cluster(p.name),
        "connect_timeout": "5s",
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {
            "name": "envoy.clusters.aggregate",
            "typed_config": {
                "@type": _T + "extensions.clusters.aggregate.v3.ClusterConfig",
                "clusters": [p.name, *(relay_cluster(i) for i in range(1, slots))],
            },
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "http_filters": _upstream_filters(message_timeout_s, p),
            }
        },
        # Envoy's default allows 3 concurrent retries per cluster: under load most fallbacks
        # would be refused (UO). Fallback is the point of a chain, so allow as many as requests.
        "circuit_breakers": {
            "thresholds": [{"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000, "max_retries": 100000}]
        },
    }


def _relay_cluster(slot: int, max_body: int) -> dict[str, Any]:
    name = relay_cluster(slot)
    return {
        "name": name,
        "connect_timeout": "1s",
        "per_connection_buffer_limit_bytes": max_body,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"envoy_internal_address": {"server_listener_name": RELAY_LISTENER}}}}]}],
        },
        "circuit_breakers": {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}]},
    }


def _relay_listener(policy: Policy, max_body: int) -> dict[str, Any]:
    """An Envoy internal listener (unreachable from any socket) that sends a later attempt to
    the provider the upstream processor named in `x-tollgate-target`, with that provider's
    own timeout, and reports its own failures (connect, timeout) in a response header."""
    routes = [
        {
            "name": f"relay:{stream_target(p.name, stream)}",
            "match": {"prefix": "/", "headers": [{"name": TARGET_HEADER, "string_match": {"exact": stream_target(p.name, stream)}}]},
            "route": {"cluster": p.name, "timeout": "0s", "auto_host_rewrite": True,
                      "retry_policy": {"num_retries": 0, **_timeouts(p, stream)}, **_idle(p, stream)},
            "request_headers_to_remove": [TARGET_HEADER],
        }
        for p in policy.providers.values()
        for stream in (False, True)
    ]
    routes.append({"name": "relay:none", "match": {"prefix": "/"}, "direct_response": {"status": 503}})
    hcm = {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "tollgate_relay",
        "route_config": {
            "name": "relay",
            "response_headers_to_add": [{"header": {"key": RELAY_FLAGS_HEADER, "value": "%RESPONSE_FLAGS%"}}],
            "virtual_hosts": [{"name": "relay", "domains": ["*"], "routes": routes}],
        },
        # The relay's router adds no x-envoy-* headers of its own (a provider sees none).
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": _T + "extensions.filters.http.router.v3.Router", "suppress_envoy_headers": True}}],
    }
    return {
        "name": RELAY_LISTENER,
        "internal_listener": {},
        "per_connection_buffer_limit_bytes": max_body,
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def _stats_listener(address: str, port: int) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [{"match": {"path": path}, "route": {"cluster": "tollgate_envoy_admin"}} for path in ("/stats/prometheus", "/ready")]
    routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 404}})
    hcm = {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "tollgate_stats",
        "route_config": {"name": "stats", "virtual_hosts": [{"name": "stats", "domains": ["*"], "routes": routes}]},
        "http_filters": [ROUTER_FILTER],
    }
    return {
        "name": "tollgate_stats",
        "address": {"socket_address": {"address": address, "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def _admin_cluster(address: str, port: int) -> dict[str, Any]:
    return {
        "name": "tollgate_envoy_admin",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "tollgate_envoy_admin",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": address, "port_value": port}}}}]}],
        },
    }


def render_bootstrap(
    policy: Policy,
    extproc: list[GrpcEndpoint],
    *,
    port: int = 8080,
    admin_port: int = 9901,
    listen_address: str = "0.0.0.0",
    admin_address: str = "127.0.0.1",
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    message_timeout_s: float = 5.0,
    access_log: bool = False,
    stats_port: int | None = None,
    drain_timeout_s: float = 15.0,
) -> dict[str, Any]:
    """A complete Envoy bootstrap as a plain dict (dump it as YAML or JSON).

    `stats_port` adds a listener that exposes only the admin's /stats/prometheus and /ready,
    so Prometheus and probes can reach them while the admin itself stays on loopback."""
    no_route = ApiError(503, "upstream_unavailable", "The gateway did not select a provider.", type="server_error")
    from extproc.chains import max_chain_attempts

    slots = max_chain_attempts(policy)
    per_try = max((p.timeout_s for p in policy.providers.values()), default=30.0)
    per_try_stream = max((p.ttfb_s for p in policy.providers.values()), default=30.0)
    routes: list[dict[str, Any]] = [
        {
            "name": "healthz",
            "match": {"path": "/healthz"},
            "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
            "typed_per_filter_config": _no_processor(),
        },
        *(_provider_route(p, stream, big) for p in policy.providers.values() for stream, big in VARIANTS),
        *(_chain_route(p, per_try_stream if stream else per_try, stream, big)
          for p in (policy.providers.values() if slots > 1 else ()) for stream, big in VARIANTS),
        *_entry_routes(no_route),
    ]
    hcm: dict[str, Any] = {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "tollgate",
        "codec_type": "AUTO",
        "preserve_external_request_id": True,
        "always_set_request_id_in_response": True,
        # On drain (SIGTERM after /drain_listeners, or hot restart) connections are closed
        # gracefully within this time, matching the processor's grace for streams in flight.
        "drain_timeout": f"{drain_timeout_s:g}s",
        "early_header_mutation_extensions": [
            {
                "name": "envoy.http.early_header_mutation.header_mutation",
                "typed_config": {
                    "@type": _T + "extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                    # Client-sent Envoy control headers go too, on every route (also where the
                    # apply filter does not run: a client's x-envoy-original-path would be the
                    # path the access log shows).
                    "mutations": [*({"remove": h} for h in INTERNAL_HEADERS),
                                  {"remove_on_match": {"key_matcher": {"prefix": ENVOY_PREFIX}}}],
                },
            }
        ],
        "route_config": {"name": "tollgate", "virtual_hosts": [{
            "name": "tollgate", "domains": ["*"], "routes": routes,
            "include_request_attempt_count": True,  # the upstream filter runs on retries only
        }]},
        # With the processor down or too slow, Envoy refuses the request itself (fail closed);
        # say so in OpenAI's shape instead of an empty body. Tollgate's own replies carry
        # details "tollgate_*" and are left alone.
        "local_reply_config": {"mappers": [
            *edge.early_mappers(),
            edge.mapper("response.code_details.startsWith('ext_proc')", "quota_unavailable",
                        "The gateway cannot check this request right now; it was not sent to any provider.", "server_error", 503),
            # A non-stream answer larger than the response buffer: the provider served (and
            # the request is billed at its reservation), the client is told what to change.
            edge.mapper("response.code_details == 'response_payload_too_large'", "upstream_unavailable",
                        f"The provider's answer is larger than the gateway's {max_body_bytes >> 20} MiB response buffer; "
                        "ask for fewer choices or tokens, or stream it (stream: true).", "server_error", 502),
            edge.mapper("response.code == 404 && response.code_details == 'direct_response'", "not_found",
                        "Unknown endpoint '%REQ(:METHOD)% %REQ(:PATH)%'.", "invalid_request_error"),
            *edge.late_mappers(),
        ]},
        "http_filters": _downstream_filters(message_timeout_s),
    }
    hcm["access_log"] = [settlement_log()]
    if access_log:
        hcm["access_log"] += [
            {
                "name": "envoy.access_loggers.stderr",
                "typed_config": {
                    "@type": _T + "extensions.access_loggers.stream.v3.StderrAccessLog",
                    "log_format": {
                        "text_format_source": {
                            "inline_string": "[%START_TIME%] %REQ(X-REQUEST-ID)% \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%\" "
                            "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %UPSTREAM_CLUSTER% %DURATION%ms\n"
                        }
                    },
                },
            }
        ]
    extproc_cluster = {
        "name": EXTPROC_CLUSTER,
        # A processor named by host name (localhost, a service name) is resolved like a provider.
        **_discovery(not all(e.unix_path or _is_ip(e.host) for e in extproc)),
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": EXTPROC_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": e.envoy_address()}} for e in extproc]}],
        },
        "circuit_breakers": {"thresholds": [{"max_connections": 4096, "max_pending_requests": 4096, "max_requests": 100000}]},
    }
    chain_clusters: list[dict[str, Any]] = []
    listeners: list[dict[str, Any]] = []
    bootstrap_extensions: list[dict[str, Any]] = []
    if slots > 1:
        chain_clusters = [_relay_cluster(i, max_body_bytes) for i in range(1, slots)]
        chain_clusters += [_aggregate_cluster(p, slots, message_timeout_s) for p in policy.providers.values()]
        listeners = [_relay_listener(policy, max_body_bytes)]
        bootstrap_extensions = [{
            "name": "envoy.bootstrap.internal_listener",
            "typed_config": {"@type": _T + "extensions.bootstrap.internal_listener.v3.InternalListener"},
        }]
    if stats_port:
        listeners.append(_stats_listener(listen_address, stats_port))
        chain_clusters.append(_admin_cluster("127.0.0.1" if admin_address == "0.0.0.0" else admin_address, admin_port))
    return {
        "admin": {"address": {"socket_address": {"address": admin_address, "port_value": admin_port}}},
        **({"bootstrap_extensions": bootstrap_extensions} if bootstrap_extensions else {}),
        "static_resources": {
            "listeners": [
                {
                    "name": "tollgate",
                    "address": {"socket_address": {"address": listen_address, "port_value": port}},
                    "per_connection_buffer_limit_bytes": max_body_bytes,
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                },
                *listeners,
            ],
            "clusters": [
                extproc_cluster,
                *(_provider_cluster(p, max_body_bytes) for p in policy.providers.values()),
                *chain_clusters,
            ],
        },
    }


def dump(bootstrap: dict[str, Any]) -> str:
    """YAML for people; JSON is valid YAML, and this keeps the output stable and exact."""
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(bootstrap)), sort_keys=False, width=120)
