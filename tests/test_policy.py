"""The policy schema of SPEC §5: the seed loads verbatim, errors name file, line and key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from extproc.policy import PolicyError, load_policy
from extproc.policy.load import check_policy

EXAMPLES = Path(__file__).resolve().parent.parent / "extproc" / "examples" / "policy"
SEED = EXAMPLES / "support_draft.yaml"


def tollgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extproc.cli", *args], capture_output=True, text=True, timeout=60)


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_seed_template_loads_verbatim_with_the_catalog() -> None:
    policy = load_policy([EXAMPLES / "catalog.yaml", SEED])
    route = policy.routes["support_draft"]
    assert route.primary_model == "low_cost_chat"
    assert route.fallback.rule("on_provider_5xx").action == "retry_once_then_switch_same_price_tier"
    assert route.fallback.rule("on_rate_limit").action == "switch_same_price_tier"
    assert route.fallback.rule("on_budget_exceeded").action == "fail_closed"
    assert route.max_attempts == 2
    assert route.billing_owner == "customer_api_key"
    assert route.record_primary_and_final_model is True


def test_an_event_the_route_does_not_name_fails_closed() -> None:
    route = load_policy([EXAMPLES]).routes["support_draft"]
    assert route.fallback.rule("on_timeout").action == "fail_closed"


def test_prices_are_exact_integer_micro_dollars_per_million_tokens() -> None:
    model = load_policy([EXAMPLES]).models["low_cost_chat"]
    assert (model.price.input_micro_per_mtok, model.price.output_micro_per_mtok) == (150_000, 600_000)
    assert model.price.cost_micro(1000, 1000) == 750  # 1000*0.15e-6 + 1000*0.60e-6 USD
    assert model.price.cost_micro(1, 0) == 1  # rounds up, never to zero


def test_lone_seed_checks_clean_with_unresolved_references_as_warnings() -> None:
    out = tollgate("policy", "check", str(SEED))
    assert out.returncode == 0, out.stderr
    assert "low_cost_chat" in out.stdout and "warning" in out.stdout


def test_seed_with_catalog_that_lacks_its_model_is_refused(tmp_path: Path) -> None:
    catalog = (EXAMPLES / "catalog.yaml").read_text().replace("  low_cost_chat:\n", "  renamed_chat:\n")
    out = tollgate("policy", "check", str(write(tmp_path, "catalog.yaml", catalog)), str(SEED))
    assert out.returncode == 1
    assert f"{SEED}:2:" in out.stderr and "low_cost_chat" in out.stderr


def test_a_directory_merges_its_files_in_name_order() -> None:
    out = tollgate("policy", "check", str(EXAMPLES), "--json")
    assert out.returncode == 0
    assert json.loads(out.stdout)["ok"] is True


def test_invalid_value_names_file_line_and_key(tmp_path: Path) -> None:
    bad = write(tmp_path, "route.yaml", "route: r1\nprimary_model: m\nfallback:\n  on_provider_5xx: explode\n  max_attempts: two\n")
    with pytest.raises(PolicyError) as info:
        load_policy([EXAMPLES / "catalog.yaml", bad])
    text = str(info.value)
    assert f"{bad}:4: error: routes[r1].fallback.on_provider_5xx: unknown action 'explode'" in text
    assert f"{bad}:5: error: routes[r1].fallback.max_attempts" in text


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    bad = write(tmp_path, "broken.yaml", "route: r1\nprimary_model: [unclosed\n")
    out = tollgate("policy", "check", str(bad))
    assert out.returncode == 1
    assert f"{bad}:" in out.stderr


def test_unknown_tier_is_an_error(tmp_path: Path) -> None:
    text = (EXAMPLES / "catalog.yaml").read_text().replace("tier: premium", "tier: platinum")
    _, issues = check_policy([write(tmp_path, "c.yaml", text)])
    assert any(i.level == "error" and i.key == "models.strong_reasoning.tier" for i in issues)


def test_checklist_warns_about_missing_attempt_cap_and_budget_fallback(tmp_path: Path) -> None:
    route = write(tmp_path, "r.yaml", "route: r1\nprimary_model: low_cost_chat\nfallback:\n  on_budget_exceeded: downgrade\n")
    _, issues = check_policy([EXAMPLES / "catalog.yaml", route])
    warnings = [i.message for i in issues if i.level == "warning"]
    assert any("max_attempts" in w for w in warnings)
    assert any("budget exhaustion should fail closed" in w for w in warnings)


def test_checklist_warns_about_upgrade_without_cost_multiplier(tmp_path: Path) -> None:
    text = (EXAMPLES / "catalog.yaml").read_text().replace(
        "fallback: {allow: [same_tier, downgrade, upgrade], max_cost_multiplier: 3}", "fallback: {allow: [same_tier, upgrade]}")
    _, issues = check_policy([write(tmp_path, "c.yaml", text)])
    assert any(i.level == "warning" and "max_cost_multiplier" in i.message for i in issues)


def test_plan_naming_an_undefined_route_is_only_a_warning(tmp_path: Path) -> None:
    text = (EXAMPLES / "catalog.yaml").read_text().replace("routes: [support_draft,", "routes: [ghost_route, support_draft,")
    policy, issues = check_policy([write(tmp_path, "c.yaml", text), SEED])
    assert policy is not None
    assert any(i.level == "warning" and "ghost_route" in i.message for i in issues)


def test_the_full_example_of_the_spec_loads_verbatim() -> None:
    spec = Path(__file__).resolve().parent / "data" / "spec_full_policy.yaml"
    policy = load_policy([spec])
    assert set(policy.routes) == {"support_draft", "legal_summary"}
    assert policy.plans["premium"].max_cost_multiplier == "3"
    assert policy.providers["primary_openai"].tls and not policy.providers["backup_vendor"].tls
    out = tollgate("envoy-config", "--policy", str(spec))
    assert out.returncode == 0, out.stderr


def test_serve_refuses_an_invalid_policy_with_exit_1(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", "route: r1\n")
    out = tollgate("serve", "--policy", str(bad), "--redis-url", "redis://127.0.0.1:1/0")
    assert out.returncode == 1
    assert "primary_model" in out.stderr


def test_cli_usage_error_is_exit_2() -> None:
    assert tollgate("keys", "create").returncode == 2


def test_check_warns_when_the_seeds_retry_and_switch_cannot_both_fit_in_max_attempts() -> None:
    out = tollgate("policy", "check", str(EXAMPLES))
    assert out.returncode == 0, out.stderr  # a warning: the seed must load verbatim
    line = next(x for x in out.stdout.splitlines() if "fallback.on_provider_5xx" in x)
    assert "support_draft.yaml:4: warning:" in line
    assert "retry and switch need max_attempts >= 3, got 2" in line
    assert "retried once on the same provider" in line and "without switching" in line  # what happens instead


def test_check_does_not_warn_when_retry_and_switch_fit(tmp_path: Path) -> None:
    route = write(tmp_path, "r.yaml", SEED.read_text().replace("max_attempts: 2", "max_attempts: 3"))
    _, issues = check_policy([EXAMPLES / "catalog.yaml", route])
    assert not [i for i in issues if "retry and switch" in i.message]


def test_provider_timeouts_and_circuit_settings_load_with_defaults_in_one_place(tmp_path: Path) -> None:
    text = (EXAMPLES / "catalog.yaml").read_text().replace(
        "    api_key_env: BACKUP_API_KEY\n",
        "    api_key_env: BACKUP_API_KEY\n    tokens_per_s: 80\n    ttfb_timeout_s: 5\n    idle_timeout_s: 12\n"
        "    circuit: {failures: 7, failure_rate: 0.25, customers: 3}\n")
    policy = load_policy([write(tmp_path, "c.yaml", text)])
    backup, primary = policy.providers["backup_vendor"], policy.providers["primary_openai"]
    assert (backup.tokens_per_s, backup.ttfb_s, backup.idle_s) == (80.0, 5.0, 12.0)
    assert (backup.circuit_failures, backup.circuit_failure_rate, backup.circuit_customers) == (7, "0.25", 3)
    assert (primary.tokens_per_s, primary.ttfb_s, primary.idle_s) == (50.0, 30.0, 30.0)  # defaults: 50 tokens/s, timeout_s
    assert (primary.circuit_failures, primary.circuit_failure_rate, primary.circuit_customers) == (5, "0.5", 2)


def test_a_negative_tokens_per_s_is_an_error_naming_the_key(tmp_path: Path) -> None:
    text = (EXAMPLES / "catalog.yaml").read_text().replace("    api_key_env: BACKUP_API_KEY\n", "    api_key_env: BACKUP_API_KEY\n    tokens_per_s: -3\n")
    _, issues = check_policy([write(tmp_path, "c.yaml", text)])
    assert any(i.level == "error" and i.key == "providers.backup_vendor.tokens_per_s" for i in issues)
