"""The issue collector and the readers of single fields, shared by every section parser.

A reader returns the field's value when it is valid, and otherwise records an error at the
field's line and returns None (or the default), so one pass reports every problem."""

from __future__ import annotations

import re
from typing import Any

from extproc.money import usd_to_micro
from extproc.policy.issues import Issue, Kind, Level, Where
from extproc.policy.yamlpos import LocDict

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class Checker:
    """Collects issues; unresolved references wait for the end, when it is known whether a
    catalog is present (errors) or a lone route file is checked on its own (warnings)."""

    def __init__(self) -> None:
        self.issues: list[Issue] = []
        self.unresolved: list[tuple[Where, str, str]] = []

    def error(self, at: Where, key: str, message: str, kind: Kind = Kind.INVALID) -> None:
        self.issues.append(Issue.at("error", at, key, message, kind))

    def warn(self, at: Where, key: str, message: str, kind: Kind) -> None:
        self.issues.append(Issue.at("warning", at, key, message, kind))

    def ref(self, at: Where, key: str, message: str) -> None:
        self.unresolved.append((at, key, message))

    def unresolved_issues(self, has_catalog: bool) -> list[Issue]:
        level: Level = "error" if has_catalog else "warning"
        return [Issue.at(level, at, key, message, Kind.UNRESOLVED) for at, key, message in self.unresolved]

    def mapping(self, value: Any, at: Where, key: str) -> LocDict | None:
        if isinstance(value, LocDict):
            return value
        self.error(at, key, f"must be a mapping, got {kind_of(value)}")
        return None

    def known_keys(self, d: LocDict, key: str, allowed: set[str]) -> None:
        for k in d:
            if k not in allowed:
                self.warn(d.at(k), f"{key}.{k}", f"unknown field (known: {', '.join(sorted(allowed))})", Kind.UNKNOWN_FIELD)


def kind_of(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def whole(c: Checker, d: LocDict, key: str, field: str, minimum: int = 0) -> int | None:
    """A whole number >= `minimum`, or None when absent or invalid."""
    v = d.get(field)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        c.error(d.at(field), f"{key}.{field}", f"must be a whole number >= {minimum}, got {v!r}")
        return None
    return v


def boolean(c: Checker, d: LocDict, key: str, field: str, default: bool) -> bool:
    v = d.get(field, default)
    if not isinstance(v, bool):
        c.error(d.at(field), f"{key}.{field}", f"must be true or false, got {v!r}")
        return default
    return v


def seconds(c: Checker, d: LocDict, key: str, field: str, default: float | None, limit: float) -> float | None:
    """A positive number (seconds, or a rate) up to `limit`; the default when absent or invalid."""
    v = d.get(field, default)
    if v is None:
        return None
    if not is_number(v) or not 0 < v <= limit:
        c.error(d.at(field), f"{key}.{field}", f"must be a number between 0 and {limit:g}, got {v!r}")
        return default
    return float(v)


def usd_micro(c: Checker, d: LocDict, key: str, field: str) -> int | None:
    """A non-negative USD amount from YAML as exact micro-dollars (rounded up)."""
    v = d.get(field)
    if v is None:
        return None
    try:
        micro = usd_to_micro(v, round_up=True)
    except ValueError:
        c.error(d.at(field), f"{key}.{field}", f"must be a number of US dollars, got {v!r}")
        return None
    if micro < 0:
        c.error(d.at(field), f"{key}.{field}", f"must be a non-negative amount, got {v!r}")
        return None
    return micro


def name(c: Checker, at: Where, key: str, value: Any) -> str | None:
    if not isinstance(value, str) or not NAME_RE.match(value):
        c.error(at, key, f"must be a name of letters, digits, '_', '.', '-', got {value!r}")
        return None
    return value
