"""`tollgate usage report`: one customer's invoice lines for a month, from the ledger.

Lines are route x final model x kind (normal / retry / fallback), with requests (every
usage record: served, failed and unsettled requests alike), tokens and cost; the total is
the sum of the lines, so they add up exactly. Money is integer micro-dollars (the table
also shows dollars).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import asdict
from typing import Any

from extproc.ledger_store import LedgerStore
from extproc.money import format_usd

MONTH_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")
FORMATS = ("table", "csv", "json")


def build(store: LedgerStore, customer: str, month: str) -> dict[str, Any]:
    """SPEC §8's shape: {customer, month, lines: [...], total_micro_usd}."""
    if not MONTH_RE.match(month):
        raise ValueError(f"month must be YYYY-MM, got {month!r}")
    lines = store.report_lines(customer, month)
    return {"customer": customer, "month": month, "lines": [asdict(line) for line in lines],
            "total_micro_usd": sum(line.cost_micro_usd for line in lines)}


def render(report: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report)
    cols = ["route", "model", "kind", "requests", "prompt_tokens", "completion_tokens", "cost_micro_usd"]
    if fmt == "csv":
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(cols)
        for line in report["lines"]:
            w.writerow([line[c] for c in cols])
        w.writerow(["total", "", "", "", "", "", report["total_micro_usd"]])
        return out.getvalue().rstrip("\n")
    rows = [[*(str(line[c]) for c in cols), format_usd(line["cost_micro_usd"])] for line in report["lines"]]
    rows.append(["total", "", "", str(sum(line["requests"] for line in report["lines"])), "", "",
                 str(report["total_micro_usd"]), format_usd(report["total_micro_usd"])])
    head = [*cols, "cost_usd"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt_row = "  ".join("{:<%d}" % w for w in widths)  # noqa: UP031
    title = f"customer {report['customer']}, month {report['month']}"
    return "\n".join([title, fmt_row.format(*head), *(fmt_row.format(*r) for r in rows)])
