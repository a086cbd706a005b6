"""`make soak N=500000`: a long run of mixed traffic; does memory stay flat?

Drives N requests of `bench.load.MIX` (normal, streams, fallbacks, quota refusals, bad keys)
through Envoy -> `tollgate serve` (one worker) -> Redis, and every 10 s samples the processor's
RSS, Envoy's RSS and Redis `used_memory`. Results go to bench/soak-results.json and a small
table. The verdict line applies the rule of issue 14: after warm-up (the first 10% of the
requests) every processor RSS sample stays within +-5% of the first one, and it reports the
growth per request (least-squares slope of RSS over requests) for the processor and Redis.
Timings are reported, never asserted; the CI-sized check is tests/test_memory.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.load import LoadStack, Tally, drive, redis_used_memory, rss_bytes

RESULTS = Path(__file__).with_name("soak-results.json")
TOLERANCE = 0.05


@dataclass
class Sample:
    t_s: float
    requests: int
    processor_rss: int
    envoy_rss: int
    redis_used: int
    redis_keys: int


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two distinct xs)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


@dataclass
class Verdict:
    warmup_requests: int
    base_rss: int
    min_rss: int
    max_rss: int
    max_deviation: float
    processor_bytes_per_request: float
    redis_bytes_per_request: float
    envoy_bytes_per_request: float
    passed: bool


def judge(samples: list[Sample], warmup: int, tolerance: float = TOLERANCE) -> Verdict:
    """The +-5% rule on the samples after warm-up, and growth per request."""
    after = [s for s in samples if s.requests >= warmup] or samples[-1:]
    base = after[0].processor_rss
    rss = [s.processor_rss for s in after]
    dev = max(abs(r - base) / base for r in rss)
    xs = [float(s.requests) for s in after]
    return Verdict(warmup, base, min(rss), max(rss), round(dev, 4),
                   round(slope(xs, [float(r) for r in rss]), 2), round(slope(xs, [float(s.redis_used) for s in after]), 1),
                   round(slope(xs, [float(s.envoy_rss) for s in after]), 2), dev <= tolerance)


def run(total: int, interval_s: float, connections: int) -> tuple[list[Sample], Tally]:
    stack = LoadStack().start()
    assert stack.processor is not None and stack.processor.proc is not None and stack.envoy is not None
    assert stack.envoy.proc is not None and stack.redis is not None
    ppid, epid, url = stack.processor.proc.pid, stack.envoy.proc.pid, stack.redis.url
    tally = Tally()
    samples: list[Sample] = []
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        used, keys = redis_used_memory(url)
        samples.append(Sample(round(time.monotonic() - started, 1), tally.done, rss_bytes(ppid), rss_bytes(epid), used, keys))
        s = samples[-1]
        print(f"  {s.t_s:7.0f}s {s.requests:>9,} req  processor {s.processor_rss / 1e6:6.1f} MB  envoy {s.envoy_rss / 1e6:6.1f} MB"
              f"  redis {s.redis_used / 1e6:7.1f} MB", flush=True)

    def sampler() -> None:
        while not stop.wait(interval_s):
            sample()

    try:
        sample()
        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        asyncio.run(drive(stack.envoy.port, stack.keys, total, connections, tally))
        stop.set()
        thread.join()
        time.sleep(1)
        sample()
    finally:
        stop.set()
        stack.stop()
    return samples, tally


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.soak")
    ap.add_argument("--requests", type=int, default=500_000)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--connections", type=int, default=16)
    args = ap.parse_args(argv)
    print(f"soak: {args.requests:,} requests of mixed traffic, sampling every {args.interval:g} s", flush=True)
    t0 = time.monotonic()
    samples, tally = run(args.requests, args.interval, args.connections)
    elapsed = time.monotonic() - t0
    verdict = judge(samples, warmup=args.requests // 10)
    kinds: dict[str, int] = {}
    for (kind, status), n in sorted(tally.statuses.items()):
        kinds[f"{kind} {status}"] = n
    RESULTS.write_text(json.dumps({"requests": tally.done, "seconds": round(elapsed, 1), "responses": kinds,
                                   "unexpected": tally.unexpected(), "verdict": asdict(verdict),
                                   "samples": [asdict(s) for s in samples]}, indent=1) + "\n")
    print(f"\n{'requests':>10} {'processor RSS':>14} {'envoy RSS':>10} {'redis used':>11}")
    step = max(1, len(samples) // 12)
    for s in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        print(f"{s.requests:>10,} {s.processor_rss / 1e6:>11.1f} MB {s.envoy_rss / 1e6:>7.1f} MB {s.redis_used / 1e6:>8.1f} MB")
    print(f"\nresponses: {kinds}; unexpected: {tally.unexpected() or 'none'}; {tally.done / elapsed:.0f} req/s")
    print(f"processor RSS after warm-up ({verdict.warmup_requests:,} req): {verdict.base_rss / 1e6:.1f} MB, "
          f"range {verdict.min_rss / 1e6:.1f}-{verdict.max_rss / 1e6:.1f} MB, max deviation {verdict.max_deviation:.1%}")
    print(f"growth per request: processor {verdict.processor_bytes_per_request:.1f} B, envoy {verdict.envoy_bytes_per_request:.1f} B, "
          f"redis {verdict.redis_bytes_per_request:.0f} B")
    print(f"{'PASS' if verdict.passed else 'FAIL'}: processor RSS within +-{TOLERANCE:.0%} after warm-up; results in {RESULTS}")
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
