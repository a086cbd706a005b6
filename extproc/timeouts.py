"""How long an attempt may take (pure): budgets that fit generation, not a fixed cap.

A non-stream answer arrives all at once, after the provider generated every token: its
attempt gets the provider's `timeout_s` plus the time to generate the request's output cap at
the provider's expected `tokens_per_s`. A stream is bounded by silence, never by its length:
time to first byte (`ttfb_timeout_s`) and idle time between chunks (`idle_timeout_s`), so a
healthy stream of any length flows and a stalled one is cut.

Envoy enforces them: the per-try timeout (which Envoy stops enforcing once the response has
started going downstream, so for a stream it is exactly a time-to-first-byte bound) comes per
request from the processor in `x-envoy-upstream-rq-per-try-timeout-ms`; the idle bound is the
route's per-try idle timeout (`envoy_config`).
"""

from __future__ import annotations

import math

from extproc.policy.model import Provider

PER_TRY_TIMEOUT_HEADER = "x-envoy-upstream-rq-per-try-timeout-ms"


def attempt_budget_ms(provider: Provider, output_cap: int, stream: bool) -> int:
    """The per-try timeout of one attempt on `provider`: until the first byte of the answer."""
    if stream:
        return math.ceil(provider.ttfb_s * 1000)
    return math.ceil((provider.timeout_s + output_cap / provider.tokens_per_s) * 1000)


def size_explains_timeout(provider: Provider, output_cap: int, stream: bool) -> bool:
    """A non-stream request whose output cap alone takes longer than the provider's base
    timeout to generate spends its budget on its own size: its timeout says nothing about the
    provider's health (so one tenant's huge requests cannot open a circuit for everybody).
    A stream's first byte and its chunks do not wait for the whole output: never explained."""
    return not stream and output_cap / provider.tokens_per_s > provider.timeout_s
