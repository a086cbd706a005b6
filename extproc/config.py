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
