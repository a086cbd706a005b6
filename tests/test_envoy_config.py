"""The Envoy bootstrap is rendered from the policy and accepted by the real Envoy binary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from extproc.devstack import envoy_binary
from extproc.envoy_config import CLUSTER_HEADER, GrpcEndpoint, render_bootstrap, worker_endpoints
from extproc.policy import load_policy

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "extproc" / "examples" / "policy"


def validate(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)], capture_output=True, text=True, timeout=60)


def test_rendered_bootstrap_passes_envoy_validate(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "extproc.cli", "envoy-config", "--policy", str(EXAMPLES),
                          "--extproc", "127.0.0.1:50051", "--workers", "2"], capture_output=True, text=True, check=True)
    config = tmp_path / "envoy.yaml"
    config.write_text(out.stdout)
    result = validate(config)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unix_socket_endpoints_pass_envoy_validate(tmp_path: Path) -> None:
    bootstrap = render_bootstrap(load_policy([EXAMPLES]), [GrpcEndpoint.parse("unix:/tmp/tollgate.sock")])
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(bootstrap))
    assert validate(config).returncode == 0


def test_checked_in_example_matches_the_renderer() -> None:
    """envoy/ holds the rendered example for the demo policy; it must not drift."""
    out = subprocess.run([sys.executable, "-m", "extproc.cli", "envoy-config", "--policy", str(EXAMPLES)],
                         capture_output=True, text=True, check=True)
    assert (ROOT / "envoy" / "envoy.yaml").read_text() == out.stdout, "run `make envoy-example`"


def test_one_cluster_per_provider_and_the_processor_cluster() -> None:
    policy = load_policy([EXAMPLES])
    bootstrap = render_bootstrap(policy, [GrpcEndpoint.parse("127.0.0.1:50051")])
    names = [c["name"] for c in bootstrap["static_resources"]["clusters"]]
    assert names[: 1 + len(policy.providers)] == ["tollgate_extproc", *policy.providers]


def test_fallback_chains_render_an_aggregate_per_first_provider_with_relay_slots() -> None:
    policy = load_policy([EXAMPLES])  # support_draft: max_attempts 2
    clusters = {c["name"]: c for c in render_bootstrap(policy, [GrpcEndpoint.parse("127.0.0.1:50051")])["static_resources"]["clusters"]}
    chain = clusters["via_primary_openai"]["cluster_type"]["typed_config"]["clusters"]
    assert chain == ["primary_openai", "tollgate_relay_1"]
    limits = clusters["via_primary_openai"]["circuit_breakers"]["thresholds"][0]
    assert limits["max_retries"] >= 10000  # Envoy's default of 3 would refuse fallbacks under load


def test_a_policy_without_fallback_renders_no_chains(tmp_path: Path) -> None:
    text = (EXAMPLES / "catalog.yaml").read_text().replace("max_attempts: 2", "max_attempts: 1")
    (tmp_path / "c.yaml").write_text(text)
    (tmp_path / "r.yaml").write_text((EXAMPLES / "support_draft.yaml").read_text().replace("max_attempts: 2", "max_attempts: 1"))
    bootstrap = render_bootstrap(load_policy([tmp_path / "c.yaml", tmp_path / "r.yaml"]), [GrpcEndpoint.parse("127.0.0.1:50051")])
    assert not any(c["name"].startswith("via_") for c in bootstrap["static_resources"]["clusters"])
    assert len(bootstrap["static_resources"]["listeners"]) == 1


def test_internal_cluster_header_is_stripped_before_any_filter() -> None:
    bootstrap = render_bootstrap(load_policy([EXAMPLES]), [GrpcEndpoint.parse("127.0.0.1:50051")])
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    mutations = hcm["early_header_mutation_extensions"][0]["typed_config"]["mutations"]
    assert {"remove": CLUSTER_HEADER} in mutations


def test_ext_proc_fails_closed() -> None:
    bootstrap = render_bootstrap(load_policy([EXAMPLES]), [GrpcEndpoint.parse("127.0.0.1:50051")])
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = hcm["http_filters"][0]["typed_config"]
    assert ext_proc["failure_mode_allow"] is False


def test_workers_expand_to_consecutive_endpoints() -> None:
    assert [str(e) for e in worker_endpoints(GrpcEndpoint.parse("127.0.0.1:7000"), 3)] == [
        "127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"]
