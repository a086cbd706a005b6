"""The wire contract between the rendered Envoy config and the processors, in one place.

Every internal header, dynamic metadata namespace and metadata key that both the Envoy
bootstrap (`envoy_config`, its Lua filters) and the runtime (`downstream`, `upstream`) use is
named here, so that the two can never drift apart. Nothing here is public: clients never see
these names (SPEC's public headers are in `downstream.attribution`).

How one request travels (normal path, two ext_proc messages, one Redis round trip):

  client -> [early header mutation: drop INTERNAL_HEADERS]
         -> ext_proc (request body + REQUEST_ATTRIBUTES) --reply: body + NS_APPLY, NS_REQUEST-->
         -> Lua APPLY_LUA (strips client x-envoy-*/x-tollgate-*, applies NS_APPLY, re-routes)
         -> json_to_metadata (response: usage -> NS_USAGE)
         -> router -> provider cluster (or the fallback chain: upstream processor, NS_ATTEMPTS)
  provider -> json_to_metadata -> ext_proc (response headers + NS_USAGE, NS_ATTEMPTS) -> client
"""

from __future__ import annotations

# --- internal headers --------------------------------------------------------------------------
CLUSTER_HEADER = "x-tollgate-cluster"  # which provider route serves the request (set by APPLY_LUA)
TARGET_HEADER = "x-tollgate-target"  # which provider the relay sends a later attempt to
STOP_HEADER = "x-tollgate-stop-reason"  # set by the upstream processor when it ends a chain
RELAY_FLAGS_HEADER = "x-tollgate-relay-flags"  # the relay's response flags, read by the status recorder
# Client-sent copies are removed by Envoy before any filter or route reads them.
INTERNAL_HEADERS = (CLUSTER_HEADER, TARGET_HEADER)
# Every header a provider or client sends that starts with this is ours; others' copies are dropped.
ATTRIBUTION_PREFIX = "x-tollgate-"
ROUTE_HEADER = "x-tollgate-route"  # a client's explicit route choice (SPEC §1.3)
ENVOY_PREFIX = "x-envoy-"  # Envoy's control headers: never honoured from a client

# --- dynamic metadata namespaces ---------------------------------------------------------------
NS_REQUEST = "tollgate.request"  # request context: downstream processor -> upstream processor
NS_ATTEMPTS = "tollgate.attempts"  # attempts so far: upstream processor -> later attempts, downstream
NS_LAST = "tollgate.last"  # the last attempt's status (Lua status recorder, no gRPC cost)
NS_REWRITE = "tollgate.rewrite"  # a later attempt's body head: old -> new (upstream processor -> Lua)
NS_APPLY = "tollgate.apply"  # headers to set ("" = remove) once the body is decided (-> APPLY_LUA)
NS_USAGE = "tollgate.usage"  # a JSON answer's usage, read by Envoy's json_to_metadata
NS_ANSWER = "tollgate.answer"  # {"big": true}: the answer may not fit Envoy's buffer (-> BIG_ANSWER_LUA)

# Keys in NS_USAGE (json_to_metadata writes them; the downstream processor reads them).
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")

# A big answer's content type, hidden from json_to_metadata (which would buffer it whole and
# overflow) and restored by the downstream processor.
ORIGINAL_CONTENT_TYPE_HEADER = "x-tollgate-content-type"

# --- what the downstream processor's single request message carries ----------------------------
# With the request-header phase skipped, the headers the processor needs come as CEL
# attributes with the body message (ENVOY-NOTES: per-header attributes, not the whole map).
ATTR_PATH = "request.path"
ATTR_METHOD = "request.method"
REQUEST_HEADER_ATTRIBUTES = ("authorization", "api-key", "x-request-id", ROUTE_HEADER)
REQUEST_ATTRIBUTES = (ATTR_PATH, ATTR_METHOD, *(f"request.headers['{h}']" for h in REQUEST_HEADER_ATTRIBUTES))
# A response that Envoy itself replaced (e.g. a served answer too large for its buffer) is
# told apart by its details, sent with the response headers.
ATTR_CODE_DETAILS = "response.code_details"
RESPONSE_ATTRIBUTES = (ATTR_CODE_DETAILS,)
UPSTREAM_ATTEMPT_ATTRIBUTE = "upstream.request_attempt_count"  # marks an upstream filter's stream

# --- Envoy-side names ----------------------------------------------------------------------------
EXTPROC_CLUSTER = "tollgate_extproc"
RELAY_LISTENER = "tollgate_relay"
APPLY_FILTER = "tollgate.apply"  # the Lua filter's name, for per-route disabling

# After the processor answered the body message, apply what it decided to the headers (Envoy
# keeps no header map for a body reply when the header phase is skipped) and route again.
# Client-sent Envoy control headers and our own header names are dropped first, so nothing a
# client sends can steer retries, timeouts or attribution. A body-less POST never reaches the
# processor (there is no body message); it is refused here.
APPLY_LUA = """
local NO_BODY = %(no_body)s

function envoy_on_request(h)
  local body = h:body()
  local hd = h:headers()
  local drop = {}
  for k, _ in pairs(hd) do
    if string.sub(k, 1, %(envoy_len)d) == "%(envoy_prefix)s" or string.sub(k, 1, %(ours_len)d) == "%(ours_prefix)s" then
      drop[#drop + 1] = k
    end
  end
  for _, k in ipairs(drop) do hd:remove(k) end
  local m = h:streamInfo():dynamicMetadata():get("%(ns_apply)s")
  if m == nil then
    if body == nil or body:length() == 0 then
      h:respond({[":status"] = "400", ["content-type"] = "application/json"}, NO_BODY)
    end
    return  -- the processor did not choose a provider: the route answers 503
  end
  for k, v in pairs(m) do
    if v == "" then hd:remove(k) else hd:replace(k, v) end
  end
  hd:replace("content-length", tostring(body:length()))
  h:clearRouteCache()
end
"""

# Runs on the response before json_to_metadata: an answer that may not fit Envoy's buffer
# (the processor said so when it reserved, caps.answer_bytes_bound, or its content-length
# says so: a provider ignoring the output cap) is hidden from it by its content type, so it
# passes unbuffered; the processor then meters it itself. A provider's own copy of the
# header that keeps the original type is dropped first: only this filter sets it.
BIG_ANSWER_LUA = """
function envoy_on_response(h)
  local hd = h:headers()
  hd:remove("%(original)s")
  local a = h:streamInfo():dynamicMetadata():get("%(ns_answer)s")
  if (a == nil or not a["big"]) and (tonumber(hd:get("content-length") or "0") or 0) <= %(max_bytes)d then return end
  local ct = hd:get("content-type")
  if ct == nil then return end
  hd:replace("%(original)s", ct)
  hd:replace("content-type", "application/x-tollgate-big")
end
"""
