"""The wire contract between the rendered Envoy config and the processors, in one place.

Every internal header, dynamic metadata namespace and metadata key that both the Envoy
bootstrap (`envoy_config`, its Lua filters) and the runtime (`downstream`, `upstream`) use is
named here, so that the two can never drift apart. Nothing here is public: clients never see
these names (SPEC's public headers are in `downstream.attribution`).

How one request travels (normal path: one ext_proc message, one Redis round trip):

  client -> [early header mutation: drop INTERNAL_HEADERS and every x-envoy-* header]
         -> ext_proc (request body + REQUEST_ATTRIBUTES) --reply: body + NS_APPLY, NS_REQUEST,
            NS_PLAN, NS_EXCHANGE, NS_FAST-->
         -> Lua APPLY_LUA (applies NS_APPLY, re-routes; client x-envoy-* went at the door)
         -> router -> provider cluster (or the fallback chain: PLANNED_LUA or the upstream
            processor, NS_ATTEMPTS)
  provider -> json_to_metadata (usage -> NS_USAGE)
           -> Lua PRICE_LUA: a plain answer is priced and attributed here (NS_FAST); any
              other gets ANSWER_HEADER -> ANSWER_FILTER (the answer processor, NS_EXCHANGE)
           -> client
  then Envoy's gRPC access log (SETTLE_LOG) -> settlement_log: settles what PRICE_LUA priced
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# --- internal headers --------------------------------------------------------------------------
CLUSTER_HEADER = "x-tollgate-cluster"  # which provider route serves the request (set by APPLY_LUA)
TARGET_HEADER = "x-tollgate-target"  # which provider the relay sends a later attempt to
STOP_HEADER = "x-tollgate-stop-reason"  # set by the upstream processor when it ends a chain
RELAY_FLAGS_HEADER = "x-tollgate-relay-flags"  # the relay's response flags, read by the status recorder
PLANNED_HEADER = "x-tollgate-planned"  # attempt 2 was set up from NS_PLAN: the upstream processor is skipped
ANSWER_HEADER = "x-tollgate-answer"  # set by PRICE_LUA on a response the answer processor must see
# Client-sent copies are removed by Envoy before any filter or route reads them.
INTERNAL_HEADERS = (CLUSTER_HEADER, TARGET_HEADER, PLANNED_HEADER)
# Every header a provider or client sends that starts with this is ours; others' copies are dropped.
ATTRIBUTION_PREFIX = "x-tollgate-"
# A provider's response headers a client never sees: our own names (a provider cannot forge
# them), and the operator's provider account (its rate limits would pose as the key's,
# SPEC §3; its organization, project and cookies). The gateway's own values are set after.
PROVIDER_ONLY = (ATTRIBUTION_PREFIX, "x-ratelimit-", "openai-organization", "openai-project", "set-cookie")
ROUTE_HEADER = "x-tollgate-route"  # a client's explicit route choice (SPEC §1.3)
ENVOY_PREFIX = "x-envoy-"  # Envoy's control headers: never honoured from a client

# --- dynamic metadata namespaces ---------------------------------------------------------------
NS_REQUEST = "tollgate.request"  # request context: downstream processor -> upstream processor
NS_ATTEMPTS = "tollgate.attempts"  # attempts so far: upstream processor -> later attempts, downstream
NS_LAST = "tollgate.last"  # the last attempt's status (Lua status recorder, no gRPC cost)
NS_REWRITE = "tollgate.rewrite"  # a later attempt's body head: old -> new (upstream processor -> Lua)
NS_APPLY = "tollgate.apply"  # headers to set ("" = remove) once the body is decided (-> APPLY_LUA)
NS_USAGE = "tollgate.usage"  # a JSON answer's usage, read by Envoy's json_to_metadata
NS_PLAN = "tollgate.plan"  # attempt 2 decided in advance per failure status (downstream -> PLANNED_LUA)
NS_PLAN_AUTH = "tollgate.plan_auth"  # attempt 2's provider credential per failure status (cleared by PRICE_LUA)
NS_EXCHANGE = "tollgate.exchange"  # the request's accounting state (SNAPSHOT_KEY): downstream -> answer processor, settlement
SNAPSHOT_KEY = "s"
NS_FAST = "tollgate.fast"  # what PRICE_LUA needs to answer alone; it writes back FAST_COST or FAST_HANDED
FAST_COST = "cost"  # PRICE_LUA priced the answer: the access-log settlement settles it
FAST_HANDED = "b"  # PRICE_LUA handed the answer to the answer processor, which settles it

# Keys in NS_USAGE (json_to_metadata writes them; the downstream processor reads them).
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")

# A big answer's content type, hidden from json_to_metadata (which would buffer it whole and
# overflow) and restored by the downstream processor.
ORIGINAL_CONTENT_TYPE_HEADER = "x-tollgate-content-type"
HIDDEN_CONTENT_TYPE = "application/x-tollgate-big"
HIDE_FILTER = "tollgate.hide_big_answer"  # a header_mutation filter, configured on `+big` routes only

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
ANSWER_FILTER = "tollgate.answer"  # the answer processor: ext_proc in a composite matching ANSWER_HEADER
ANSWER_STATS = "answer"  # its Envoy stats: http.tollgate.ext_proc.answer.*
PRICE_FILTER = "tollgate.price"  # PRICE_LUA
SETTLE_LOG = "tollgate_settle"  # the gRPC access log's name (envoy.access_loggers.http_grpc)
# Token counts PRICE_LUA prices itself: below this, and prices below FAST_MAX_PRICE, every
# product in its integer arithmetic stays exact in a double (< 2^53); larger go to the processor.
FAST_MAX_COUNT = 10**9
FAST_MAX_PRICE = 10**12

# After the processor answered the body message, apply what it decided to the headers (Envoy
# keeps no header map for a body reply when the header phase is skipped) and route again.
# Client-sent `x-envoy-*` and internal headers were already removed by the connection manager's
# early header mutation (every route); other client `x-tollgate-*` headers steer nothing and
# never pass a provider's allowlist gate. A body-less POST never reaches the processor (there is
# no body message); it is refused here.
APPLY_LUA = """
local NO_BODY = %(no_body)s

function envoy_on_request(h)
  local body = h:body()
  local hd = h:headers()
  local md = h:streamInfo():dynamicMetadata()
  local m = md:get("%(ns_apply)s")
  if m == nil then
    if body == nil or body:length() == 0 then
      h:respond({[":status"] = "400", ["content-type"] = "application/json"}, NO_BODY)
    end
    return  -- the processor did not choose a provider: the route answers 503
  end
  for k, v in pairs(m) do
    if v == "" then hd:remove(k) else hd:replace(k, v) end
  end
  -- Applied: the provider's credential leaves the metadata, which Envoy's access log ships whole.
  for _, k in ipairs({"authorization", "api-key"}) do
    if m[k] ~= nil and m[k] ~= "" then md:set("%(ns_apply)s", k, "") end
  end
  hd:replace("content-length", tostring(body:length()))
  h:clearRouteCache()
end
"""


# A chain's second attempt without a processor message. The downstream processor decided in
# advance where attempt 2 goes if attempt 1 answers a 5xx (not 504) or a 429 (the outcomes a
# status alone tells), when that switches provider (a retry on the same provider waits a
# back-off, which only the processor does). On attempt 2 this upstream Lua filter picks the plan
# for the status the recorder saw, sets what the upstream processor would set (target, time
# budget, credential, the body's new model via NS_REWRITE, the attempt notes) and marks the
# request so the retries-only processor is skipped. Anything else (no status: a timeout or a
# reset; a 504; attempt 3 and later) is left to the processor. `os.time()` has second
# resolution: attempt 2's start is only used to tell a later timeout from a connect failure.
PLANNED_LUA = """
function envoy_on_request(h)
  local hd = h:headers()
  hd:remove("%(planned)s")
  if hd:get("x-envoy-attempt-count") ~= "2" then return end
  local md = h:streamInfo():dynamicMetadata()
  local plan = md:get("%(ns_plan)s")
  local last = md:get("%(ns_last)s")
  if plan == nil or last == nil then return end
  local status = tonumber(last["status"] or "")
  if status == nil then return end
  local key, outcome
  if status == 429 then
    key, outcome = "429", "rate_limit"
  elseif status >= 500 and status ~= 504 then
    key, outcome = "5xx", "provider_5xx"
  end
  local p = key and plan[key]
  if p == nil then return end
  hd:replace("%(target)s", p["target"])
  hd:replace("%(per_try)s", p["budget"])
  local auth = (md:get("%(ns_plan_auth)s") or {})[key] or ""
  if auth == "" then hd:remove("authorization") else hd:replace("authorization", auth) end
  hd:replace("%(planned)s", "1")
  md:set("%(ns_attempts)s", "1", {m = plan["m1"], p = plan["p1"], t = plan["t1"], o = outcome, s = status, hp = 1})
  md:set("%(ns_attempts)s", "2", {m = p["m"], p = p["p"], t = os.time() * 1000, rule = p["rule"], reason = p["reason"], k = key})
  md:set("%(ns_last)s", "status", "")
  md:set("%(ns_last)s", "flags", "")
  md:set("%(ns_rewrite)s", "old", plan["old"])
  md:set("%(ns_rewrite)s", "new", p["new"])
end
"""


# The response side of a plain answer, served by Envoy alone: a 200 JSON answer of attempt 1
# (or of an attempt 2 PLANNED_LUA set up, from its plan step's "fast") whose usage json_to_metadata read (numbers it can price exactly) is priced here, from the
# target's prices the downstream processor put in NS_FAST, with Price.cost_micro's rounding
# (prices split into whole millions and the rest, so every product stays an exact integer in a
# double). The attribution headers come from NS_FAST too; the provider's own copies go. The
# cost goes back into NS_FAST, and the gRPC access log carries it to the processor, which
# settles the request from the same metadata (answers.settle_entry). Anything else (another
# status, Envoy's own reply, a later attempt, no or odd usage, a stream, a big answer) is
# marked with ANSWER_HEADER, which starts the answer processor (a composite filter matching it).
PRICE_LUA = """
local PROVIDER_ONLY = {%(provider_only)s}
local MAX = %(max_count)d
-- The prefixes by their first byte: most response headers need one table lookup, no compare.
local BY_FIRST = {}
for _, pre in ipairs(PROVIDER_ONLY) do
  local b = string.byte(pre, 1)
  BY_FIRST[b] = BY_FIRST[b] or {}
  table.insert(BY_FIRST[b], pre)
end

local function count(v)
  if type(v) ~= "number" or v < 0 or v > MAX or v ~= math.floor(v) then return nil end
  return v + 0  -- a JSON -0 counts 0: -0 would make the cost header "-0.000000"
end

local function first(u, a, b)
  local v = u[a]
  if v == nil then v = u[b] end
  return v
end

-- Attempt 2's credentials (NS_PLAN_AUTH) are of no use once an answer comes: out of the
-- metadata, which Envoy's access log ships whole.
local function forget_credentials(md)
  local auth = md:get("%(ns_plan_auth)s")
  if auth == nil then return end
  for k, v in pairs(auth) do
    if v ~= "" then md:set("%(ns_plan_auth)s", k, "") end
  end
end

function envoy_on_response(h)
  local hd = h:headers()
  hd:remove("%(answer)s")
  local md = h:streamInfo():dynamicMetadata()
  forget_credentials(md)
  local fast = md:get("%(ns_fast)s")
  local price, changed = fast, nil
  local attempts = fast and md:get("%(ns_attempts)s")
  if attempts ~= nil then
    -- A later attempt: priced here only if it is attempt 2 as PLANNED_LUA set it up (its note
    -- names the plan step, whose "fast" has its prices and the headers that change); any
    -- other goes on.
    local a2, plan = attempts["2"], md:get("%(ns_plan)s")
    local step = nil
    if a2 ~= nil and attempts["3"] == nil and a2["k"] ~= nil and plan ~= nil then step = plan[a2["k"]] end
    price = step and step["fast"] or nil
    changed = price and price["h"] or nil
  end
  local u = price and md:get("%(ns_usage)s")
  local p, c
  if u ~= nil and hd:get(":status") == "200" and hd:get("x-envoy-upstream-service-time") ~= nil then
    p = count(first(u, "prompt_tokens", "input_tokens"))
    local cv = first(u, "completion_tokens", "output_tokens")
    if cv == nil and fast["gen"] ~= 1 then cv = 0 end
    c = count(cv)
  end
  if p == nil or c == nil then
    if fast == nil and md:get("%(ns_exchange)s") == nil then return end  -- not a request the gateway reserved for
    hd:add("%(answer)s", "process")
    md:set("%(ns_fast)s", "%(handed)s", 1)
    return
  end
  local x = p * price["pi_l"] + c * price["po_l"]
  local q = math.floor(x / 1000000)
  if q * 1000000 < x then q = q + 1 end
  local cost = p * price["pi_h"] + c * price["po_h"] + q
  local drop = {}
  for k, _ in pairs(hd) do
    local candidates = BY_FIRST[string.byte(k, 1)]
    if candidates ~= nil then
      for _, pre in ipairs(candidates) do
        if string.sub(k, 1, #pre) == pre then drop[#drop + 1] = k; break end
      end
    end
  end
  for _, k in ipairs(drop) do hd:remove(k) end
  -- Every header set here but x-request-id is one the loop above removed: added, not replaced.
  local final = fast["h"]
  if changed ~= nil then
    final = {}
    for k, v in pairs(fast["h"]) do final[k] = v end
    for k, v in pairs(changed) do final[k] = v end
  end
  for k, v in pairs(final) do
    if k == "x-request-id" then hd:replace(k, v) else hd:add(k, v) end
  end
  hd:add("x-tollgate-cost-usd", string.format("%%.0f.%%06.0f", math.floor(cost / 1000000), cost %% 1000000))
  md:set("%(ns_fast)s", "%(cost)s", cost)
end
"""

# --- typed notes: what the processors tell each other through dynamic metadata ----------------
# On the wire the keys stay short (metadata travels with every message); in code they have names.

def _text(d: dict[str, Any], key: str) -> str:
    v = d.get(key)
    return "" if v is None else str(v)


def _int(d: dict[str, Any], key: str, default: int = 0) -> int:
    try:
        return int(float(d.get(key) or default))
    except (TypeError, ValueError):
        return default


@dataclass(frozen=True)
class RequestNote:
    """NS_REQUEST: the request's context, from the downstream processor to every later attempt
    (a chain only; the per-attempt processor is stateless)."""

    route: str
    plan: str
    first_model: str  # attempt 1 goes out without the per-attempt processor: noted here
    first_provider: str
    first_at_ms: int
    customer: str
    cap: int  # the output cap written into the body (what every attempt's time budget assumes)
    stream: bool
    unhealthy: frozenset[str] = frozenset()  # open circuits, besides the first provider's
    skipped_model: str = ""  # the primary, when its circuit was open
    skipped_provider: str = ""
    skipped_opened_by: str = ""

    def to_struct(self) -> dict[str, Any]:
        out: dict[str, Any] = {"route": self.route, "plan": self.plan, "m1": self.first_model, "p1": self.first_provider,
                               "t1": self.first_at_ms, "cust": self.customer, "cap": self.cap, "stream": self.stream,
                               "unhealthy": ",".join(sorted(self.unhealthy))}
        if self.skipped_model:
            out.update({"skip": self.skipped_model, "skip_p": self.skipped_provider, "skip_o": self.skipped_opened_by})
        return out

    @classmethod
    def from_struct(cls, d: dict[str, Any]) -> RequestNote:
        return cls(_text(d, "route"), _text(d, "plan"), _text(d, "m1"), _text(d, "p1"), _int(d, "t1"), _text(d, "cust"),
                   _int(d, "cap"), bool(d.get("stream")), frozenset(_text(d, "unhealthy").split(",")) - {""},
                   _text(d, "skip"), _text(d, "skip_p"), _text(d, "skip_o"))


@dataclass(frozen=True)
class AttemptNote:
    """One attempt in NS_ATTEMPTS: where it went, when, why, and (once known) how it ended."""

    model: str
    provider: str
    started_ms: int = 0
    outcome: str = ""  # "" until the next attempt (or the downstream processor) classifies it
    status: int = 0
    rule: str = ""  # the policy rule that chose this attempt
    reason: str = ""
    health_pending: bool = False  # classified by PLANNED_LUA: its provider's health is noted downstream

    def to_struct(self) -> dict[str, Any]:
        out: dict[str, Any] = {"m": self.model, "p": self.provider, "t": self.started_ms}
        if self.outcome:
            out.update({"o": self.outcome, "s": self.status})
        if self.health_pending:
            out["hp"] = 1
        if self.rule:
            out["rule"] = self.rule
        if self.reason:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_struct(cls, d: dict[str, Any]) -> AttemptNote:
        return cls(_text(d, "m"), _text(d, "p"), _int(d, "t"), _text(d, "o"), _int(d, "s"), _text(d, "rule"), _text(d, "reason"),
                   bool(d.get("hp")))


@dataclass(frozen=True)
class StopNote:
    """Why the per-attempt processor ended a chain (it answers the request itself)."""

    reason: str
    rule: str


@dataclass
class AttemptsNote:
    """NS_ATTEMPTS: every attempt so far by number (1-based), and the stop, if the chain ended."""

    attempts: dict[int, AttemptNote] = field(default_factory=dict)
    stop: StopNote | None = None

    def to_struct(self) -> dict[str, Any]:
        out: dict[str, Any] = {str(n): a.to_struct() for n, a in self.attempts.items()}
        if self.stop is not None:
            out["stop"] = {"reason": self.stop.reason, "rule": self.stop.rule}
        return out

    @classmethod
    def from_struct(cls, d: dict[str, Any]) -> AttemptsNote:
        attempts = {int(k): AttemptNote.from_struct(v) for k, v in d.items() if k.isdigit() and isinstance(v, dict)}
        stop = d.get("stop")
        return cls(dict(sorted(attempts.items())), StopNote(_text(stop, "reason"), _text(stop, "rule")) if isinstance(stop, dict) else None)


# The statuses PLANNED_LUA acts on, by its plan keys, and the outcome each one is.
PLANNED_OUTCOMES = {"5xx": "provider_5xx", "429": "rate_limit"}


@dataclass(frozen=True)
class PlannedStep:
    """Where attempt 2 goes after one kind of failure (a key of PLANNED_OUTCOMES)."""

    target: str  # the relay's target header value
    budget_ms: int  # the attempt's per-try timeout
    credential: str  # the provider's authorization header ("" = none: removed)
    model: str
    provider: str
    head: str  # the body's new head, `{"model":"<upstream model>"`
    rule: str
    reason: str
    fast: dict[str, Any] = field(default_factory=dict)  # NS_FAST's content should this attempt serve ({}: none)

    def to_struct(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target, "budget": str(self.budget_ms), "m": self.model,
                               "p": self.provider, "new": self.head, "rule": self.rule, "reason": self.reason}
        if self.fast:
            out["fast"] = self.fast
        return out


@dataclass(frozen=True)
class PlanNote:
    """NS_PLAN: attempt 1 (for its note) and attempt 2 per failure kind, for PLANNED_LUA. Its
    provider credentials go apart (NS_PLAN_AUTH, `credentials`), like NS_APPLY's: no processor
    or log may be sent them, and Envoy's gRPC access log sends the final metadata whole, so
    APPLY_LUA clears NS_APPLY's once applied and PRICE_LUA clears NS_PLAN_AUTH when an answer
    comes (a request ended before any answer keeps them: tests/test_attack_one_message.py)."""

    first_model: str
    first_provider: str
    first_at_ms: int
    first_head: str  # the head the downstream processor wrote
    steps: dict[str, PlannedStep]

    def to_struct(self) -> dict[str, Any]:
        out: dict[str, Any] = {"m1": self.first_model, "p1": self.first_provider, "t1": self.first_at_ms, "old": self.first_head}
        out.update({k: s.to_struct() for k, s in self.steps.items()})
        return out

    def credentials(self) -> dict[str, str]:
        """NS_PLAN_AUTH: each step's credential ("" = none: removed), apart from the plan."""
        return {k: s.credential for k, s in self.steps.items()}
