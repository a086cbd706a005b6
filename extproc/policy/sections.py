"""The shape every named catalog section shares (`providers`, `models`, `plans`): a mapping of
name -> mapping, each entry parsed on its own; plus the two small sections, tiers and settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from extproc import config
from extproc.policy.checker import Checker, name, whole
from extproc.policy.merge import Section
from extproc.policy.model import Settings
from extproc.policy.yamlpos import LocDict

T = TypeVar("T")
# Parses one entry: (checker, its name, its mapping, its key for messages) -> the value, or None.
EntryParser = Callable[[Checker, str, LocDict, str], T | None]


def parse_named(c: Checker, section: Section | None, title: str, parse_entry: EntryParser[T]) -> dict[str, T]:
    """Every valid entry of a `name: {...}` section, in file order; problems become issues.
    A section left empty (`providers:` with nothing under it) has no entries."""
    out: dict[str, T] = {}
    if section is None or section.value is None:
        return out
    entries = c.mapping(section.value, section.at, title)
    if entries is None:
        return out
    for entry_name, value in entries.items():
        key = f"{title}.{entry_name}"
        at = entries.at(entry_name)
        if name(c, at, key, entry_name) is None:
            continue
        d = c.mapping(value, at, key)
        if d is None:
            continue
        parsed = parse_entry(c, entry_name, d, key)
        if parsed is not None:
            out[entry_name] = parsed
    return out


def parse_tiers(c: Checker, section: Section | None) -> tuple[str, ...]:
    """Price tiers, cheapest first; the default three when absent or invalid."""
    if section is None:
        return config.POLICY_TIERS
    tv = section.value
    if isinstance(tv, list) and tv and all(isinstance(t, str) for t in tv) and len(set(tv)) == len(tv):
        return tuple(tv)
    c.error(section.at, "tiers", f"must be a list of distinct tier names, cheapest first, got {tv!r}")
    return config.POLICY_TIERS


def parse_settings(c: Checker, section: Section | None) -> Settings:
    if section is None or section.value is None:
        return Settings()
    d = c.mapping(section.value, section.at, "settings")
    if d is None:
        return Settings()
    c.known_keys(d, "settings", {"idempotency_window_s"})
    window = whole(c, d, "settings", "idempotency_window_s", minimum=1)
    return Settings() if window is None else Settings(idempotency_window_s=window)
