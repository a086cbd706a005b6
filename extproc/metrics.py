"""Prometheus metrics of SPEC §7, served on the processor's metrics port at `/metrics`.

With `--workers N > 1` every worker writes to a shared PROMETHEUS_MULTIPROC_DIR and the parent
serves the sum (prometheus_client's multiprocess mode), so one port answers for all workers.
Labels are bounded: routes, models, providers and reasons come from the policy; customer-level
spend lives in usage records, never in labels.
"""

from __future__ import annotations

import asyncio
import os
import resource

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import multiprocess as _multiprocess

REQUESTS = Counter(
    "tollgate_requests_total", "Requests answered, by final status code.", ["route", "primary_model", "final_model", "code"]
)
FALLBACKS = Counter(
    "tollgate_fallbacks_total", "Model changes after a failed attempt (from_model != to_model).", ["route", "from_model", "to_model", "reason"]
)
RETRIES = Counter(
    "tollgate_retries_total", "Another attempt on the same model after a failed attempt.", ["route", "model", "reason"]
)
UPSTREAM_ATTEMPTS = Counter(
    "tollgate_upstream_attempts_total", "Upstream attempts by outcome.", ["route", "model", "provider", "outcome"]
)
SPEND = Counter(
    "tollgate_spend_usd_total", "Settled spend in USD, by kind normal/retry/fallback.", ["route", "model", "provider", "kind"]
)
RESERVATION_OVERRUNS = Counter(
    "tollgate_reservation_overruns_total", "Requests whose provider billed more than the reservation (the cap).", ["route", "provider"]
)
REDIS_ROUND_TRIPS = Counter(
    "tollgate_redis_round_trips_total", "Pipelines sent to Redis on the request path (many requests share one under load)."
)
TOKENS = Counter("tollgate_tokens_total", "Tokens billed.", ["route", "model", "type"])
QUOTA_REJECTIONS = Counter(
    "tollgate_quota_rejections_total", "Requests refused before any upstream call.", ["route", "reason"]
)
DECISION_SECONDS = Histogram(
    "tollgate_decision_seconds",
    "Time the processor spends on one message, by phase.",
    ["phase"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
REDIS_ERRORS = Counter("tollgate_redis_errors_total", "Redis operations that failed.", ["operation"])
POLICY_RELOADS = Counter("tollgate_policy_reloads_total", "Policy reloads by result.", ["result"])
# One series per live worker (label `pid` with --workers > 1): the memory alerts watch it, since
# prometheus_client's own process_* metrics are not collected from multiprocess workers.
RESIDENT_MEMORY = Gauge("tollgate_process_resident_memory_bytes", "Resident memory of each processor worker.",
                        multiprocess_mode="liveall")


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serve /metrics in a background thread (all workers' sum in multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        start_http_server(port, addr=host, registry=registry)
    else:
        start_http_server(port, addr=host)


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return 0


async def sample_memory(interval_s: float = 10.0) -> None:
    """Keep tollgate_process_resident_memory_bytes current (a worker's background task)."""
    while True:
        RESIDENT_MEMORY.set(resident_bytes())
        await asyncio.sleep(interval_s)


def usd(micro: int) -> float:
    """Micro-dollars as a float for Prometheus only (storage stays integer)."""
    return micro / 1_000_000
