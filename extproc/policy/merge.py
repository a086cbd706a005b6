"""Merge policy documents, in the order given, into one typed `Merged`.

Catalog sections that are mappings merge by name (a later entry of the same name replaces an
earlier one); any other section value replaces the earlier one. Routes come from `routes:`
lists and from lone route files (the seed template); a later route of the same name replaces
an earlier one. Every merged entry keeps the file and line it was written at, so an error
names the right file even when the section is spread over several.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from extproc.policy.issues import Issue, Kind, Where
from extproc.policy.yamlpos import LocDict, LocList

CATALOG_SECTIONS = ("tiers", "providers", "models", "plans", "settings")
TOP_LEVEL_KEYS = frozenset({*CATALOG_SECTIONS, "routes"})


@dataclass(frozen=True)
class Section:
    """One top-level catalog section after merging: its value and where its key was written."""

    value: Any
    at: Where


@dataclass
class Merged:
    """The documents together: each catalog section (None when no file has it), the route
    mappings in order, the catalog documents (whose top-level keys are checked) and the
    problems of the documents' shape found while merging."""

    sections: dict[str, Section] = field(default_factory=dict)
    routes: list[LocDict] = field(default_factory=list)
    catalog_docs: list[LocDict] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)

    def section(self, name: str) -> Section | None:
        return self.sections.get(name)


def is_lone_route(doc: LocDict) -> bool:
    """A file that is one route (like the seed template), not a catalog."""
    return "route" in doc and "routes" not in doc


def merge(docs: list[LocDict]) -> Merged:
    out = Merged()
    named: dict[str, LocDict] = {}
    loose: list[LocDict] = []  # route mappings without a name: their parser reports it
    for doc in docs:
        if is_lone_route(doc):
            _add_route(doc, named, loose)
            continue
        out.catalog_docs.append(doc)
        for key, value in doc.items():
            if key == "routes":
                _add_routes(out, doc, value, named, loose)
            elif key in CATALOG_SECTIONS:
                _add_section(out, key, value, doc.at(key))
    out.routes = list(named.values()) + loose
    return out


def _add_route(item: LocDict, named: dict[str, LocDict], loose: list[LocDict]) -> None:
    name = item.get("route")
    if isinstance(name, str):
        named[name] = item
    else:
        loose.append(item)


def _add_routes(out: Merged, doc: LocDict, value: Any, named: dict[str, LocDict], loose: list[LocDict]) -> None:
    if not isinstance(value, LocList):
        out.issues.append(Issue.at("error", doc.at("routes"), "routes", "must be a list of route mappings", Kind.INVALID))
        return
    for item in value:
        if isinstance(item, LocDict):
            _add_route(item, named, loose)
        else:
            out.issues.append(Issue.at("error", value.where, "routes",
                                       f"every item must be a mapping with a 'route' name, got {item!r}", Kind.INVALID))


def _add_section(out: Merged, key: str, value: Any, at: Where) -> None:
    earlier = out.sections.get(key)
    if earlier is not None and isinstance(earlier.value, LocDict) and isinstance(value, LocDict):
        earlier.value.update(value)
        earlier.value.key_where.update(value.key_where)
        return
    # A copy, so merging later files never changes a parsed document.
    out.sections[key] = Section(value.copy_located() if isinstance(value, LocDict) else value, at)
