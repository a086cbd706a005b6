"""A provider's `headers:` and `query_params:` in the policy: loaded as written, refused with
file, line and key when they would let the policy set credentials or framing, and rendered
into the Envoy gate (pure: no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc import edge
from extproc.policy.load import check_policy
from extproc.policy.model import Provider

CATALOG = """\
providers:
  azure:
    address: 127.0.0.1:9999
    headers:
      OpenAI-Organization: org-123
{extra}
    query_params: {query}
models:
  m: {{provider: azure, upstream_model: x, tier: low, price: {{input_per_mtok_usd: 1, output_per_mtok_usd: 1}}}}
routes:
  - {{route: r, primary_model: m, fallback: {{max_attempts: 1}}}}
"""


def load(tmp_path: Path, extra: str = "", query: str = "[api-version]") -> tuple[object, list[str]]:
    f = tmp_path / "catalog.yaml"
    f.write_text(CATALOG.format(extra=extra, query=query))
    policy, issues = check_policy([f])
    return policy, [str(i) for i in issues if i.level == "error"]


def test_provider_headers_and_query_params_load_with_names_in_lower_case(tmp_path: Path) -> None:
    policy, errors = load(tmp_path)
    assert errors == []
    p = policy.providers["azure"]  # type: ignore[attr-defined]
    assert (p.headers, p.query_params) == ((("openai-organization", "org-123"),), ("api-version",))


@pytest.mark.parametrize("name", ["Authorization", "api-key", "content-length", "host", "x-tollgate-cluster", "x-envoy-retry-on"])
def test_a_header_the_gateway_owns_is_an_error_naming_file_line_and_key(tmp_path: Path, name: str) -> None:
    _, errors = load(tmp_path, extra=f"      {name}: v")
    assert len(errors) == 1
    assert "catalog.yaml:6:" in errors[0] and f"providers.azure.headers.{name}" in errors[0]


def test_a_header_value_with_a_line_break_is_an_error(tmp_path: Path) -> None:
    _, errors = load(tmp_path, extra='      x-team: "a\\r\\nb"')
    assert len(errors) == 1 and "printable ASCII" in errors[0]


def test_query_params_must_be_a_list_of_names(tmp_path: Path) -> None:
    _, errors = load(tmp_path, query="api-version")
    assert len(errors) == 1 and "providers.azure.query_params" in errors[0]


def test_the_gate_allows_the_allowlist_and_the_providers_own_names_only() -> None:
    lua = edge.gate_lua(Provider("p", "h", 1, False, headers=(("openai-project", "pr-1"),), query_params=("api-version",)))
    assert '["openai-project"] = true' in lua and '{"openai-project", "pr-1"}' in lua
    assert '["api-version"] = true' in lua
    for name in ("content-type", "accept", "user-agent", "x-request-id", "authorization", "content-length"):
        assert f'["{name}"] = true' in lua
    assert "cookie" not in lua and "x-forwarded" not in lua
