"""YAML with positions: mappings and lists that remember the file and line they came from, so
every complaint about a policy can name where to look."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from extproc.policy.issues import Issue, Kind, PolicyError, Where


class LocDict(dict[str, Any]):
    """A mapping that remembers where it and each of its keys were written (keys merged in
    from another file keep that file's position)."""

    where: Where
    key_where: dict[str, Where]

    def __init__(self, where: Where) -> None:
        super().__init__()
        self.where, self.key_where = where, {}

    @property
    def file(self) -> str:
        return self.where.file

    def at(self, field: str | None = None) -> Where:
        """Where `field` was written; the mapping itself when absent or not given."""
        return self.key_where.get(field, self.where) if field is not None else self.where

    def put(self, key: str, value: Any, where: Where) -> None:
        self[key] = value
        self.key_where[key] = where

    def copy_located(self) -> LocDict:
        out = LocDict(self.where)
        out.update(self)
        out.key_where.update(self.key_where)
        return out


class LocList(list[Any]):
    """A sequence that remembers where it was written."""

    where: Where

    def __init__(self, items: Sequence[Any], where: Where) -> None:
        super().__init__(items)
        self.where = where


def _to_python(node: yaml.Node, file: str) -> Any:
    where = Where(file, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out = LocDict(where)
        for key_node, value_node in node.value:
            out.put(str(_to_python(key_node, file)), _to_python(value_node, file), Where(file, key_node.start_mark.line + 1))
        return out
    if isinstance(node, yaml.SequenceNode):
        return LocList([_to_python(n, file) for n in node.value], where)
    return yaml.SafeLoader("").construct_object(node, deep=True)


def read_yaml(path: Path) -> Any:
    """One document with positions; `PolicyError` naming the line of a syntax error."""
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        raise PolicyError([Issue("error", str(path), line, "(yaml)", str(exc).replace("\n", " "), Kind.YAML)]) from None
    return None if node is None else _to_python(node, str(path))


def expand_sources(paths: Sequence[str | Path]) -> list[Path]:
    """Files in the order given; a directory contributes its *.yaml/*.yml files sorted by name."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix in (".yaml", ".yml") and q.is_file()))
        else:
            out.append(p)
    return out
