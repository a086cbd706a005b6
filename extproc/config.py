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

# --- Redis (store.py) -------------------------------------------------------------------------
# One deadline per round trip on the request path: a Redis that does not answer within it
# fails the request closed (503) instead of holding it.
REDIS_DEADLINE_S = 2.0
# Tools and background work use per-command socket timeouts instead.
REDIS_SOCKET_TIMEOUT_S = 1.0
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
