"""Policy: the typed model (`model`) and its loading from YAML (`load`, which names the other
parts: positions, merge, section parsers, issues with a kind)."""

from extproc.policy.load import PolicyError, load_policy
from extproc.policy.model import FallbackRule, Model, Plan, Policy, Price, Provider, Route

__all__ = [
    "FallbackRule",
    "Model",
    "Plan",
    "Policy",
    "PolicyError",
    "Price",
    "Provider",
    "Route",
    "load_policy",
]
