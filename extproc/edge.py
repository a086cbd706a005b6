"""What a provider may see: the header and query allowlist, enforced by Envoy on the wire.

A client's request carries much that is none of a provider's business (cookies, its own
`openai-organization`/`openai-project`, `x-api-key`, `x-forwarded-*`, query strings), and
Envoy adds its own headers (`x-forwarded-proto`, `x-envoy-expected-rq-timeout-ms`,
`x-envoy-attempt-count`). An allowlist is the only safe shape: a tiny Lua filter runs as the
last upstream HTTP filter of every provider cluster (and of every fallback aggregate), keeps
only the allowed headers, sets the provider's own `headers:` from the policy and keeps only
the query parameters the provider declares. It runs on every attempt, retries included, at
no gRPC cost; nothing the processor or a client does can widen it.
"""

from __future__ import annotations

import json
from typing import Any

from extproc.policy.model import Provider

# The client's headers a provider may see (SPEC §1.2), and what the gateway itself sets.
CLIENT_HEADERS = ("content-type", "accept", "user-agent", "x-request-id")
GATEWAY_HEADERS = ("authorization", "content-length")
# Header names a policy's `headers:` may not set: credentials and framing are the gateway's.
RESERVED_HEADERS = frozenset({*GATEWAY_HEADERS, "api-key", "host", "transfer-encoding", "connection", "upgrade", "te"})

_T = "type.googleapis.com/envoy."

_GATE_LUA = """
local ALLOWED = %(allowed)s
local SET = %(set)s
local QUERY = %(query)s
local PASS_HEADER = %(pass_header)s

function envoy_on_request(handle)
  local h = handle:headers()
  if PASS_HEADER ~= "" and h:get(PASS_HEADER) ~= nil then
    return  -- a later attempt on its way to the relay: the target provider's own gate filters it
  end
  local drop = {}
  for k, _ in pairs(h) do
    if string.sub(k, 1, 1) ~= ":" and not ALLOWED[k] then drop[#drop + 1] = k end
  end
  for _, k in ipairs(drop) do h:remove(k) end
  for _, kv in ipairs(SET) do h:replace(kv[1], kv[2]) end
  local path = h:get(":path") or "/"
  local q = string.find(path, "?", 1, true)
  if q ~= nil then
    local kept = {}
    for part in string.gmatch(string.sub(path, q + 1), "[^&]+") do
      if QUERY[string.match(part, "^[^=]*")] then kept[#kept + 1] = part end
    end
    local base = string.sub(path, 1, q - 1)
    if #kept > 0 then base = base .. "?" .. table.concat(kept, "&") end
    h:replace(":path", base)
  end
end
"""


def _lua_str(text: str) -> str:
    """A Lua string literal; the loader admits only printable ASCII, where JSON's escapes
    (backslash and quote) are Lua's too."""
    return json.dumps(text, ensure_ascii=True)


def _lua_set(names: list[str]) -> str:
    return "{" + ", ".join(f"[{_lua_str(n)}] = true" for n in names) + "}"


def gate_lua(provider: Provider, pass_header: str = "") -> str:
    """The gate's Lua source for one provider. `pass_header`: on a fallback aggregate, a
    request carrying this header is bound for the relay and is gated there instead."""
    own = [k for k, _ in provider.headers]
    return _GATE_LUA % {
        "allowed": _lua_set(sorted({*CLIENT_HEADERS, *GATEWAY_HEADERS, *own})),
        "set": "{" + ", ".join(f"{{{_lua_str(k)}, {_lua_str(v)}}}" for k, v in provider.headers) + "}",
        "query": _lua_set(sorted(provider.query_params)),
        "pass_header": _lua_str(pass_header),
    }


def gate_filter(provider: Provider, pass_header: str = "") -> dict[str, Any]:
    """The gate as an Envoy upstream HTTP filter (place it just before `upstream_codec`)."""
    return {
        "name": "tollgate.provider_gate",
        "typed_config": {
            "@type": _T + "extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": gate_lua(provider, pass_header)},
        },
    }


def upstream_codec() -> dict[str, Any]:
    return {"name": "envoy.filters.http.upstream_codec",
            "typed_config": {"@type": _T + "extensions.filters.http.upstream_codec.v3.UpstreamCodec"}}


# --- Envoy's own replies, in OpenAI's shape ----------------------------------------------------
# Envoy answers some requests itself before the processor sees them (a `#fragment` or `..` in
# the path, an `Upgrade` request, a malformed request line) or when the processor fails. Its
# local reply mapper rewrites those into OpenAI-shaped errors that say only what is known.
# Tollgate's own replies carry details `tollgate_*` and are left alone.

def _cel(expression: str) -> dict[str, Any]:
    return {"extension_filter": {
        "name": "envoy.access_loggers.extension_filters.cel",
        "typed_config": {"@type": _T + "extensions.access_loggers.filters.cel.v3.ExpressionFilter", "expression": expression},
    }}


def mapper(expression: str, code: str, message: str, type_: str, status: int | None = None) -> dict[str, Any]:
    """One local-reply mapper: replies matching the CEL `expression` get an OpenAI-shaped body."""
    m: dict[str, Any] = {
        "filter": _cel(expression),
        "body_format_override": {"json_format": {"error": {"message": message, "type": type_, "param": None, "code": code}}},
    }
    if status is not None:
        m["status_code"] = status
    return m


# Tollgate's own replies: the processor's (details tollgate_*), its failure (ext_proc*), and the
# apply filter's refusal of a body-less POST (lua_response, already OpenAI-shaped).
NOT_OURS = ("!response.code_details.startsWith('tollgate') && !response.code_details.startsWith('ext_proc') "
            "&& response.code_details != 'lua_response'")


def early_mappers() -> list[dict[str, Any]]:
    """Mappers that come before the processor-failure one: client errors Envoy detects, and
    a processor that failed after the request had gone to a provider."""
    return [
        mapper("response.code_details == 'upgrade_failed'", "invalid_request_error",
                "Protocol upgrades (WebSocket) are not supported; send a plain HTTP request.", "invalid_request_error", 400),
        mapper("response.code_details == 'path_normalization_failed'", "invalid_request_error",
                "The request path is not valid (a '#fragment', '..' segment or escaped slash is not allowed).",
                "invalid_request_error", 400),
        # The processor failed while a provider was already answering: do not claim otherwise.
        mapper("response.code_details.startsWith('ext_proc') && upstream.address != ''", "quota_unavailable",
                "The gateway's processor failed while this request was in progress; it may have reached a provider. "
                "Its reservation is settled when it expires.", "server_error", 503),
    ]


def late_mappers() -> list[dict[str, Any]]:
    """Any other reply of Envoy's own (not Tollgate's, not the processor's failure)."""
    return [
        mapper(f"response.code == 413 && {NOT_OURS}", "request_too_large",
                "The request body is larger than the gateway's limit.", "invalid_request_error"),
        mapper(f"response.code >= 400 && response.code < 500 && {NOT_OURS}", "invalid_request_error",
                "The gateway could not read the request (%RESPONSE_CODE_DETAILS%).", "invalid_request_error"),
        mapper(f"response.code >= 500 && {NOT_OURS}", "upstream_unavailable",
                "No provider could serve the request (%RESPONSE_CODE_DETAILS%).", "server_error"),
    ]
