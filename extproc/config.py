"""Defaults in one place: every number the gateway uses when the policy or the command line
does not say otherwise. Documented in docs/ and the README; change them here only."""

from __future__ import annotations

# --- the money cap (caps.py, reserve.lua) --------------------------------------------------
# A request whose output cap must shrink below this many tokens to fit the money left is
# refused (429 insufficient_quota) instead of being served a useless stub. A client asking for
# fewer gets what it asked for.
MIN_USEFUL_OUTPUT_TOKENS = 16
# The largest output cap the gateway ever writes (a model's max_output_tokens may lower it).
MAX_OUTPUT_TOKENS = 1_000_000
# A typical English token is ~4 UTF-8 bytes: used only where an estimate (not a bound) is
# right: tokens-per-minute limits, and billing a served answer that came without `usage`.
BYTES_PER_TOKEN = 4
# Per-part prompt-token ceilings for media referenced by URL or id (their bytes are not in
# the body). Models may set their own (`image_part_tokens`, `file_part_tokens`).
IMAGE_PART_TOKENS = 2_048
FILE_PART_TOKENS = 32_768
# Prompt tokens a provider may add that the body does not carry (an earlier response or
# conversation, a stored prompt, web or file search): a model's context_window, else this.
UNSEEN_CONTEXT_TOKENS = 128_000
# `n` / `best_of` above these are refused (OpenAI's own limits).
MAX_CHOICES = 128

# --- bodies ----------------------------------------------------------------------------------
# Envoy buffers request and response bodies up to this (larger requests get 413; larger
# non-stream answers pass through in STREAMED mode and are billed from their usage).
MAX_BODY_BYTES = 8 * 1024 * 1024

# --- reservations (quota.py) ----------------------------------------------------------------
# A reservation may stay in flight for every attempt timing out, plus this grace, before the
# reaper turns it into an `unsettled` record. A flowing stream extends it.
RESERVATION_GRACE_S = 60.0
# How often a processor looks for reservations whose hint was lost (a full scan of the
# customers' reservation indexes; cheap when there is nothing to find).
ORPHAN_SWEEP_INTERVAL_S = 60.0
# A stream extends its reservation when less than this share of its lifetime is left.
EXTEND_WHEN_LEFT = 0.5
# Envoy's gRPC access log, which carries plain answers to their settlement (envoy_config.
# settlement_log): how long an entry may wait in Envoy before it is sent, and the batch size
# that sends it at once. Until its entry arrives, a request's reservation holds its money.
SETTLE_LOG_FLUSH_S = 0.01
SETTLE_LOG_BUFFER_BYTES = 16384
# A request refused for money or tokens is reserved once more after this wait, so that the
# client's previous answers, settled from the access log, have landed (downstream.reserve).
SETTLE_WAIT_S = 0.05
# Policies replaced by a reload that a processor keeps, newest first: a request admitted under
# one is still settled under it (downstream.Exchange.resume) when its answer comes after a reload.
RETIRED_POLICIES_KEPT = 8
# How often (in hand-overs) a process forgets handed-over requests whose reservation expired.
HANDED_SWEEP_EVERY = 1000

# --- Redis (store.py) -------------------------------------------------------------------------
# One deadline per round trip on the request path: a Redis that does not answer within it
# fails the request closed (503) instead of holding it.
REDIS_DEADLINE_S = 2.0
# Tools and background work use per-command socket timeouts instead.
REDIS_SOCKET_TIMEOUT_S = 1.0
# TCP keepalive on the request path's own connection (resp.py): probes after this much idle
# time keep a firewall or load balancer from dropping it silently, and find a dead peer (then
# the next batch reconnects instead of waiting out its deadline).
REDIS_KEEPALIVE_IDLE_S = 30
REDIS_KEEPALIVE_INTERVAL_S = 10
REDIS_KEEPALIVE_PROBES = 3
# One pass of the reaper (expire, drain, sweep) gives up after this and tries again later.
REAPER_PASS_DEADLINE_S = 30.0

# --- answers Envoy reads itself (caps.answer_fits) ---------------------------------------------
# A non-stream JSON answer's usage is read by Envoy (json_to_metadata), which buffers the whole
# answer; one that might not fit the buffer takes a route where the processor reads it instead
# (streamed through if large). Bounds on answer bytes, deliberately generous: a token is at most
# this many bytes once JSON-escaped (the longest real tokens are ~128 bytes of spaces or code),
# far more with per-token log probabilities, and an embedding vector is at most this long.
ANSWER_BYTES_PER_TOKEN = 256
ANSWER_BYTES_PER_TOKEN_WITH_LOGPROBS = 8_192
ANSWER_BYTES_PER_EMBEDDING = 160_000  # 4,096 dimensions x ~39 bytes per float
ANSWER_OVERHEAD_BYTES = 64 * 1024  # ids, roles, finish reasons, usage
# What Envoy may buffer of one answer on a provider route (a provider ignoring the cap):
# beyond it the answer is lost to an overflow reply the processor never sees.
ANSWER_BUFFER_LIMIT_BYTES = 64 * 1024 * 1024

# --- policy defaults (policy/model.py, policy/*.py): what a policy file may leave out --------
# Price tiers, cheapest first, when a policy names none.
POLICY_TIERS = ("low", "standard", "premium")
# A provider's base time budget per attempt (`timeout_s`), also the default for the stream
# bounds (`ttfb_timeout_s`, `idle_timeout_s`).
PROVIDER_TIMEOUT_S = 30.0
# Output tokens per second a provider is expected to generate at least (`tokens_per_s`): a
# non-stream attempt's budget is `timeout_s` plus its output cap at this rate.
PROVIDER_TOKENS_PER_S = 50.0
# A provider's circuit opens when, within `window_s`, at least `failures` attempts failed, at
# least `failure_rate` of its attempts (a decimal string), from at least `customers` distinct
# customers; it then stays open `cooldown_s`.
CIRCUIT_FAILURES = 5
CIRCUIT_FAILURE_RATE = "0.5"
CIRCUIT_CUSTOMERS = 2
CIRCUIT_WINDOW_S = 30
CIRCUIT_COOLDOWN_S = 30
# How long a served request id stays spent (409 duplicate_request) and `explain` finds it by id:
# 24 h, the window payment APIs give idempotency keys. Policy `settings.idempotency_window_s`.
IDEMPOTENCY_WINDOW_S = 24 * 3600
# A reserve call whose reply never came is cancelled (quota.Quota.reserve); if Redis has not run
# it yet, a tombstone this long stops it from reserving when it does (a stall rarely lasts long).
CANCEL_TOMBSTONE_MS = 600_000
# The 503 for a failed reserve call waits this long at most for its cancel, so the client's
# immediate retry (maybe on another worker) finds the request id free; a stalled Redis gets the
# cancel in the background instead.
CANCEL_WAIT_S = 0.25
# Completion tokens reserved for a request that sets no output cap (route `default_max_tokens`).
ROUTE_DEFAULT_MAX_TOKENS = 1024

# --- provider health (health.py) ----------------------------------------------------------------
# A circuit's window is counted in this many time buckets (a sliding window, near enough).
CIRCUIT_BUCKETS = 10
# While a circuit is half-open, each process lets one request through as a probe this often.
CIRCUIT_PROBE_INTERVAL_S = 1.0
# How often each process reads the circuits (and flushes its success counts) in the background.
HEALTH_REFRESH_INTERVAL_S = 1.0

# --- customer keys (keys.py) --------------------------------------------------------------------
# Key lookups (hits and misses) are cached this long: revocation takes effect within it.
KEY_CACHE_TTL_S = 3.0
# Cached lookups kept at most per process.
KEY_CACHE_MAX = 50_000

# --- usage export (export.py) -------------------------------------------------------------------
EXPORT_GROUP = "ledger"  # the consumer group (one per ledger)
EXPORT_BATCH = 500  # stream entries exported per batch
EXPORT_BLOCK_MS = 1000  # how long a follow-mode read waits for new entries
EXPORT_CLAIM_IDLE_MS = 60_000  # a stopped exporter's pending entries are taken over after this
# Once a record is in the ledger its publish-once marker only has to outlive a drainer that
# might publish the same outbox entry again (seconds); the ledger would absorb even that.
EXPORTED_MARKER_TTL_S = 300
# The exporter's Redis socket timeout (a batch command may take longer than a request's).
EXPORT_SOCKET_TIMEOUT_S = 5.0

# --- command line (cli.py) ----------------------------------------------------------------------
REDIS_URL = "redis://127.0.0.1:6379/0"  # when neither --redis-url nor TOLLGATE_REDIS_URL is given
EXTPROC_LISTEN = "127.0.0.1:50051"  # `serve --listen`, and the processor `envoy-config` points Envoy at
METRICS_PORT = 9464  # `serve --metrics-port`

# --- settlement (ledger.py) --------------------------------------------------------------------
# A settlement Redis refused is retried after these delays (s); after the last, the reaper
# turns the reservation into an `unsettled` record.
SETTLE_RETRY_DELAYS_S = (0.5, 1, 2, 4, 8, 16, 32)
