"""The bench's table, its ratios against Portkey, and issue 12's four targets (met or missed)."""

from __future__ import annotations

import math
from typing import Any

TOLLGATE = "tollgate_chain"  # the seed route, every feature on: what "Tollgate" means in the ratios
NOOP = "tollgate_noop"  # the same Envoy config before a processor that does no work: the architecture's floor
PORTKEY, TOLLGATE_FALLBACK, PORTKEY_FALLBACK = "portkey", "tollgate_fallback", "portkey_fallback"
RPS_VS_PORTKEY_MIN = 1.2  # req/s at 32 connections >= 1.2x Portkey's
P50_OVER_PORTKEY_MAX_MS = 0.3  # p50 at 1 connection <= Portkey's + 0.3 ms
CPU_PER_REQUEST_MAX_MS = 0.6  # processor + Envoy + Redis
FALLBACK_RPS_VS_PORTKEY_MIN = 1.0  # the fallback path >= Portkey's fallback path


def _get(results: dict[str, dict[str, Any]], setup: str, field: str) -> float | None:
    value = results.get(setup, {}).get(field)
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _diff(a: float | None, b: float | None) -> float | None:
    return round(a - b, 3) if a is not None and b is not None else None


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios (None where a side was not measured) and each target's value, bound and verdict."""
    base = _get(results, "envoy_alone", "rps")
    for r in results.values():
        if "rps" in r and base:
            r["ratio_vs_envoy"] = round(r["rps"] / base, 3)
    t_p50, p_p50 = _get(results, TOLLGATE, "p50_1conn_ms"), _get(results, PORTKEY, "p50_1conn_ms")
    ratios = {
        "tollgate_rps_over_portkey": _ratio(_get(results, TOLLGATE, "rps"), _get(results, PORTKEY, "rps")),
        "tollgate_p50_1conn_minus_portkey_ms": _diff(t_p50, p_p50),
        "tollgate_fallback_rps_over_portkey_fallback": _ratio(_get(results, TOLLGATE_FALLBACK, "rps"), _get(results, PORTKEY_FALLBACK, "rps")),
        "tollgate_cpu_over_portkey": _ratio(_get(results, TOLLGATE, "cpu_ms_per_req"), _get(results, PORTKEY, "cpu_ms_per_req")),
        "tollgate_rps_over_envoy_alone": _ratio(_get(results, TOLLGATE, "rps"), base),
        "fallback_p50_1conn_over_normal": _ratio(_get(results, TOLLGATE_FALLBACK, "p50_1conn_ms"), t_p50),
        "floor_cpu_ms_per_req": _get(results, NOOP, "cpu_ms_per_req"),
        "floor_p50_1conn_minus_portkey_ms": _diff(_get(results, NOOP, "p50_1conn_ms"), p_p50),
        "tollgate_work_cpu_ms_per_req": _diff(_get(results, TOLLGATE, "cpu_ms_per_req"), _get(results, NOOP, "cpu_ms_per_req")),
        "tollgate_work_p50_1conn_ms": _diff(t_p50, _get(results, NOOP, "p50_1conn_ms")),
    }
    checks = [
        ("rps_32conn_vs_portkey", ratios["tollgate_rps_over_portkey"], ">=", RPS_VS_PORTKEY_MIN),
        ("p50_1conn_over_portkey_ms", ratios["tollgate_p50_1conn_minus_portkey_ms"], "<=", P50_OVER_PORTKEY_MAX_MS),
        ("cpu_ms_per_request", _get(results, TOLLGATE, "cpu_ms_per_req"), "<=", CPU_PER_REQUEST_MAX_MS),
        ("fallback_rps_vs_portkey_fallback", ratios["tollgate_fallback_rps_over_portkey_fallback"], ">=", FALLBACK_RPS_VS_PORTKEY_MIN),
    ]
    targets: dict[str, dict[str, Any]] = {}
    for name, value, op, bound in checks:
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        verdict = "not measured" if value is None else ("met" if met else "missed")
        targets[name] = {"value": value, "target": f"{op} {bound}", "verdict": verdict}
    return {"ratios": ratios, "targets": targets}


def _f(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not math.isnan(value) else "-"


def print_report(results: dict[str, dict[str, Any]], summary: dict[str, Any]) -> None:
    head = (f"{'setup':18} {'req/s@32':>9} {'p50@32':>8} {'p99@32':>8} {'p50@1':>8} {'CPU/req':>8} "
            f"{'provider':>9} {'errors':>7} {'vs Envoy':>9}")
    print("\n" + head + "\n" + f"{'':18} {'':>9} {'ms':>8} {'ms':>8} {'ms':>8} {'ms':>8} {'CPU ms':>9} {'':>7}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:18} not measured: {r['error'][:90]}")
            continue
        print(f"{name:18} {_f(r['rps'], '9.0f')} {_f(r['p50_ms'], '8.2f')} {_f(r['p99_ms'], '8.2f')} {_f(r['p50_1conn_ms'], '8.3f')} "
              f"{_f(r['cpu_ms_per_req'], '8.3f')} {_f(r['provider_cpu_ms_per_req'], '9.3f')} {_f(r['error_rate'], '7.2%')} "
              f"{_f(r.get('ratio_vs_envoy'), '9.3f')}")
    print("\nCPU/req is the gateway's own processes (Tollgate: processor + Envoy + Redis; Portkey: node; "
          "Envoy alone: envoy) over the 32-connection rounds; the provider's CPU is apart.")
    for name, r in results.items():
        if len(r.get("cpu_parts_ms_per_req", {})) > 1:
            split = ", ".join(f"{k} {v:.3f}" for k, v in r["cpu_parts_ms_per_req"].items())
            print(f"  {name}: {split} ms/req")
    ratios = summary["ratios"]
    print(f"\nTollgate = {TOLLGATE} (seed route: keys, quotas, spend, records all on); Portkey does routing only.")
    print(f"  Tollgate / Portkey req/s (32 conns):                    {_f(ratios['tollgate_rps_over_portkey'], '.3f')}")
    print(f"  Tollgate p50 - Portkey p50 (1 conn):                    {_f(ratios['tollgate_p50_1conn_minus_portkey_ms'], '+.3f')} ms")
    print(f"  Tollgate fallback / Portkey fallback req/s (32 conns):  {_f(ratios['tollgate_fallback_rps_over_portkey_fallback'], '.3f')}")
    print(f"  Tollgate / Portkey CPU per request (steadiest figure):  {_f(ratios['tollgate_cpu_over_portkey'], '.3f')}")
    print(f"  Tollgate / Envoy alone req/s:                           {_f(ratios['tollgate_rps_over_envoy_alone'], '.3f')}")
    print(f"  fallback path p50 / normal path p50 (1 conn):           {_f(ratios['fallback_p50_1conn_over_normal'], '.2f')}x")
    print(f"\nThe floor ({NOOP}: Tollgate's Envoy config, a processor that does no work):")
    print(f"  its CPU per request:                                    {_f(ratios['floor_cpu_ms_per_req'], '.3f')} ms")
    print(f"  its p50 - Portkey p50 (1 conn):                         {_f(ratios['floor_p50_1conn_minus_portkey_ms'], '+.3f')} ms")
    print(f"  Tollgate's own work (Python, Redis): CPU per request    {_f(ratios['tollgate_work_cpu_ms_per_req'], '.3f')} ms")
    print(f"  Tollgate's own work: p50 at 1 conn                      {_f(ratios['tollgate_work_p50_1conn_ms'], '+.3f')} ms")
    print("\nTargets (issue 12):")
    labels = {"rps_32conn_vs_portkey": "req/s at 32 conns vs Portkey", "p50_1conn_over_portkey_ms": "p50 at 1 conn over Portkey's (ms)",
              "cpu_ms_per_request": "CPU per request (ms)", "fallback_rps_vs_portkey_fallback": "fallback req/s vs Portkey's fallback"}
    for name, t in summary["targets"].items():
        print(f"  {labels[name]:40} {_f(t['value'], '.3f'):>8}  target {t['target']:8}  {t['verdict'].upper()}")
