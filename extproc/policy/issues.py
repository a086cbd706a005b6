"""What the policy loader reports: issues with a level, a kind and a position.

The level says whether the policy may be served (`error` refuses it); the kind says what sort
of problem it is, so callers decide by kind, never by matching message text (`load_policy`
refuses a served policy whose `unresolved` references were only warnings in a lone route file).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

Level = Literal["error", "warning"]


class Kind(StrEnum):
    """What sort of problem an issue is (printed in `policy check --json` as `kind`)."""

    FILE = "file"  # a file that cannot be read, or no files at all
    YAML = "yaml"  # not valid YAML
    INVALID = "invalid"  # a wrong type, a value out of range, a required field missing
    INCOMPLETE = "incomplete"  # a served policy without a catalog
    UNKNOWN_FIELD = "unknown_field"  # a field the schema does not know (a typo, most likely)
    UNRESOLVED = "unresolved"  # a route or model names a model or provider the policy does not define
    UNDEFINED_PLAN_ROUTE = "undefined_plan_route"  # a plan lists a route the policy does not define
    CHECKLIST = "checklist"  # legal, but it will not behave as it probably reads (the seed's checklist)
    NO_EFFECT = "no_effect"  # a field the gateway parses but whose value changes nothing


@dataclass(frozen=True)
class Where:
    """A position in a policy file (line 1-based; 0 when there is no line, e.g. a missing file)."""

    file: str
    line: int


@dataclass(frozen=True)
class Issue:
    level: Level
    file: str
    line: int
    key: str
    message: str
    kind: Kind = Kind.INVALID

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.level}: {self.key}: {self.message}"

    @classmethod
    def at(cls, level: Level, where: Where, key: str, message: str, kind: Kind) -> Issue:
        return cls(level, where.file, where.line, key, message, kind)

    def as_error(self) -> Issue:
        return Issue("error", self.file, self.line, self.key, self.message, self.kind)


class PolicyError(Exception):
    """An invalid policy; the message names file, line and key of every error."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = issues
        super().__init__("invalid policy:\n" + "\n".join(f"  {i}" for i in issues))
