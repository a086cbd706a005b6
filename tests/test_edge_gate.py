"""The provider gate's allowlist, exactly (SPEC §1.2): what the rendered Lua lets through,
and every header name a policy may not set (pure: no processes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from extproc import edge
from extproc.policy.model import Provider
from tests.test_edge_policy import load

PROVIDER = Provider("p", "h", 1, False, headers=(("openai-project", "pr-1"), ("x-team", "t")), query_params=("api-version",))


def lua_set(lua: str, name: str) -> set[str]:
    (line,) = [x for x in lua.splitlines() if x.startswith(f"local {name} = ")]
    return set(re.findall(r'\["([^"]+)"\] = true', line))


def test_the_gate_allows_exactly_the_client_and_gateway_headers_and_the_providers_own() -> None:
    assert lua_set(edge.gate_lua(PROVIDER), "ALLOWED") == {
        "content-type", "accept", "user-agent", "x-request-id",  # the client's (SPEC §1.2)
        "authorization", "content-length",  # the gateway's own
        "openai-project", "x-team",  # the provider's `headers:`
    }


def test_the_gate_sets_the_providers_headers_in_policy_order() -> None:
    (line,) = [x for x in edge.gate_lua(PROVIDER).splitlines() if x.startswith("local SET = ")]
    assert line == 'local SET = {{"openai-project", "pr-1"}, {"x-team", "t"}}'


def test_the_gate_keeps_only_the_declared_query_parameters() -> None:
    assert lua_set(edge.gate_lua(PROVIDER), "QUERY") == {"api-version"}


@pytest.mark.parametrize("name", ["transfer-encoding", "connection", "upgrade", "te", "Host", "API-Key"])
def test_a_framing_or_credential_header_is_not_a_policy_header(tmp_path: Path, name: str) -> None:
    _, errors = load(tmp_path, extra=f"      {name}: v")
    assert len(errors) == 1 and f"providers.azure.headers.{name}" in errors[0]
