"""CPU time of process trees from /proc, so the bench can say what a request costs in CPU.

A gateway's cost is not only its latency: on a shared 2-core machine the CPU each request
burns is what limits throughput. Each setup's processes are sampled before and after a wrk
run; the difference over the requests served is its CPU per request.
"""

from __future__ import annotations

import os
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields after `comm` in /proc/<pid>/stat (comm may hold spaces and parentheses)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))  # fields[1] is ppid
    return children


def tree(pid: int) -> list[int]:
    """`pid` and its live descendants (a processor with workers is several processes)."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid`'s tree, plus the time of children it has already reaped
    (cutime + cstime): a child that exits between two samples is still counted once."""
    ticks = 0
    for p in tree(pid):
        fields = _stat_fields(p)
        if fields is None:
            continue
        # After comm: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / TICKS_PER_S


def sample(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process tree."""
    return {name: cpu_seconds(pid) for name, pid in pids.items()}
