"""Policy: the typed model (`model`), its loading from YAML (`load`) and the checklist (`check`)."""

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
