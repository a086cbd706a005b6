"""The policy loader's parts, pure: YAML with positions, the typed merge, the shared section
shape, issues decided by kind (never by message text) and the fields reported as having no effect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from extproc.policy import PolicyError, load_policy
from extproc.policy.checker import Checker
from extproc.policy.issues import Issue, Kind
from extproc.policy.load import check_policy, serving_errors
from extproc.policy.merge import CATALOG_SECTIONS, Section, merge
from extproc.policy.model import Policy
from extproc.policy.sections import parse_named
from extproc.policy.yamlpos import LocDict, read_yaml

EXAMPLES = Path(__file__).resolve().parent.parent / "extproc" / "examples" / "policy"
CATALOG = EXAMPLES / "catalog.yaml"


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def doc(tmp_path: Path, name: str, text: str) -> LocDict:
    d = read_yaml(write(tmp_path, name, text))
    assert isinstance(d, LocDict)
    return d


# --- YAML with positions -------------------------------------------------------------------


def test_a_mapping_remembers_the_file_and_line_of_each_key(tmp_path: Path) -> None:
    d = doc(tmp_path, "a.yaml", "# comment\nroute: r1\n\nprimary_model: m\n")
    assert (d.at("route").file, d.at("route").line) == (str(tmp_path / "a.yaml"), 2)
    assert d.at("primary_model").line == 4
    assert d.at("absent").line == 2  # the mapping itself starts at line 2


def test_a_yaml_syntax_error_is_an_issue_of_kind_yaml_with_its_line(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        read_yaml(write(tmp_path, "bad.yaml", "route: r1\nprimary_model: [unclosed\n"))
    (issue,) = info.value.issues
    assert (issue.kind, issue.level, issue.line) == (Kind.YAML, "error", 3)


# --- merge ---------------------------------------------------------------------------------


def test_merge_gives_typed_sections_and_routes_without_sentinel_keys(tmp_path: Path) -> None:
    a = doc(tmp_path, "a.yaml", "tiers: [low]\nproviders:\n  p1: {address: 'h:1'}\nroutes:\n  - {route: r1, primary_model: m}\n")
    b = doc(tmp_path, "b.yaml", "route: r2\nprimary_model: m\n")
    merged = merge([a, b])
    assert set(merged.sections) == {"tiers", "providers"}
    assert set(merged.sections) <= set(CATALOG_SECTIONS)
    assert merged.sections["tiers"] == Section(["low"], merged.sections["tiers"].at)
    assert [r["route"] for r in merged.routes] == ["r1", "r2"]
    assert merged.catalog_docs == [a]  # b is a lone route file
    assert merged.issues == []


def test_merged_map_entries_keep_the_file_they_were_written_in(tmp_path: Path) -> None:
    a = doc(tmp_path, "a.yaml", "providers:\n  p1: {address: 'h:1'}\n")
    b = doc(tmp_path, "b.yaml", "# b\n\nproviders:\n  p2: {address: 'h:2'}\n")
    providers = merge([a, b]).sections["providers"].value
    assert list(providers) == ["p1", "p2"]
    assert (providers.at("p1").file, providers.at("p1").line) == (str(tmp_path / "a.yaml"), 2)
    assert (providers.at("p2").file, providers.at("p2").line) == (str(tmp_path / "b.yaml"), 4)


def test_merging_never_changes_a_parsed_document(tmp_path: Path) -> None:
    a = doc(tmp_path, "a.yaml", "providers:\n  p1: {address: 'h:1'}\n")
    b = doc(tmp_path, "b.yaml", "providers:\n  p2: {address: 'h:2'}\n")
    merge([a, b])
    assert list(a["providers"]) == ["p1"]


def test_a_later_route_of_the_same_name_replaces_the_earlier_one(tmp_path: Path) -> None:
    a = doc(tmp_path, "a.yaml", "routes:\n  - {route: r1, primary_model: m1}\n")
    b = doc(tmp_path, "b.yaml", "route: r1\nprimary_model: m2\n")
    assert [r["primary_model"] for r in merge([a, b]).routes] == ["m2"]


def test_a_routes_item_that_is_not_a_mapping_is_a_merge_issue_naming_file_and_line(tmp_path: Path) -> None:
    a = doc(tmp_path, "a.yaml", "tiers: [low]\nroutes:\n  - just_a_name\n")
    (issue,) = merge([a]).issues
    assert (issue.level, issue.kind, issue.file, issue.line, issue.key) == ("error", Kind.INVALID, str(tmp_path / "a.yaml"), 3, "routes")


def test_routes_that_is_not_a_list_is_a_merge_issue_at_its_key(tmp_path: Path) -> None:
    a = doc(tmp_path, "a.yaml", "tiers: [low]\n\nroutes: {route: r1}\n")
    (issue,) = merge([a]).issues
    assert (issue.line, issue.key, issue.message) == (3, "routes", "must be a list of route mappings")


def test_an_error_in_the_second_file_of_a_split_section_names_that_file(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "providers:\n  p1: {address: 'h:1'}\n")
    b = write(tmp_path, "b.yaml", "providers:\n  p2: {address: 'h:2'}\n  p3: nope\n")
    _, issues = check_policy([tmp_path / "a.yaml", b])
    errors = [i for i in issues if i.key == "providers.p3"]
    assert [(i.file, i.line) for i in errors] == [(str(b), 3)]


# --- the shared section shape --------------------------------------------------------------


def test_a_named_section_parses_each_valid_entry_and_reports_the_rest(tmp_path: Path) -> None:
    d = doc(tmp_path, "a.yaml", "things:\n  good: {n: 1}\n  'bad name': {n: 2}\n  scalar: 3\n")
    c = Checker()
    got = parse_named(c, Section(d["things"], d.at("things")), "things", lambda c, name, e, key: e["n"])
    assert got == {"good": 1}
    assert [(i.key, i.line) for i in c.issues] == [("things.bad name", 3), ("things.scalar", 4)]


def test_a_named_section_that_is_not_a_mapping_is_one_error_at_its_key(tmp_path: Path) -> None:
    d = doc(tmp_path, "a.yaml", "x: 1\nthings: [a, b]\n")
    c = Checker()
    assert parse_named(c, Section(d["things"], d.at("things")), "things", lambda c, name, e, key: 1) == {}
    assert [(i.key, i.line, i.message) for i in c.issues] == [("things", 2, "must be a mapping, got LocList")]


# --- kinds: serving decides by kind, not by message text -------------------------------------


def _policy() -> Policy:
    return load_policy([EXAMPLES])


def test_serving_refuses_an_unresolved_reference_warning_whatever_its_wording() -> None:
    w = Issue("warning", "r.yaml", 2, "routes[r].primary_model", "some other wording", Kind.UNRESOLVED)
    assert serving_errors(_policy(), [w]) == [Issue("error", "r.yaml", 2, "routes[r].primary_model", "some other wording", Kind.UNRESOLVED)]


def test_serving_keeps_a_warning_of_another_kind_even_when_it_says_does_not_define() -> None:
    w = Issue("warning", "c.yaml", 9, "plans.p.routes", "names route 'x', which the policy does not define", Kind.UNDEFINED_PLAN_ROUTE)
    assert serving_errors(_policy(), [w]) == []


def test_a_lone_route_files_unknown_model_is_an_unresolved_warning_for_check_and_an_error_for_serving(tmp_path: Path) -> None:
    route = write(tmp_path, "r.yaml", "route: r1\nprimary_model: ghost\nfallback: {max_attempts: 1}\n")
    _, issues = check_policy([route])
    (ref,) = [i for i in issues if i.kind == Kind.UNRESOLVED]
    assert (ref.level, ref.line, ref.key) == ("warning", 2, "routes[r1].primary_model")
    with pytest.raises(PolicyError) as info:
        load_policy([route])
    assert any(i.kind == Kind.UNRESOLVED and i.level == "error" and f"{route}:2:" in str(i) for i in info.value.issues)


def test_an_unknown_field_is_a_warning_of_kind_unknown_field(tmp_path: Path) -> None:
    route = write(tmp_path, "r.yaml", "route: r1\nprimary_model: low_cost_chat\nfallback: {max_attempts: 1}\nbillng: {}\n")
    _, issues = check_policy([CATALOG, route])
    assert [(i.level, i.kind, i.line) for i in issues if i.key == "routes[r1].billng"] == [("warning", Kind.UNKNOWN_FIELD, 4)]


# --- fields that have no effect --------------------------------------------------------------

SEED = EXAMPLES / "support_draft.yaml"


def no_effect(tmp_path: Path, old: str, new: str) -> list[tuple[str, str, int, str]]:
    route = write(tmp_path, "support_draft.yaml", SEED.read_text().replace(old, new))
    policy, issues = check_policy([CATALOG, route])
    assert policy is not None  # a warning: the policy still loads
    return [(i.level, i.file, i.line, i.key) for i in issues if i.kind == Kind.NO_EFFECT]


def test_a_billing_owner_other_than_the_key_is_reported_as_having_no_effect(tmp_path: Path) -> None:
    got = no_effect(tmp_path, "owner: customer_api_key", "owner: workspace")
    assert got == [("warning", str(tmp_path / "support_draft.yaml"), 9, "routes[support_draft].billing.owner")]


def test_record_primary_and_final_model_false_is_reported_as_having_no_effect(tmp_path: Path) -> None:
    got = no_effect(tmp_path, "record_primary_and_final_model: true", "record_primary_and_final_model: false")
    assert got == [("warning", str(tmp_path / "support_draft.yaml"), 10, "routes[support_draft].billing.record_primary_and_final_model")]


def test_on_budget_exceeded_other_than_fail_closed_is_reported_as_having_no_effect(tmp_path: Path) -> None:
    got = no_effect(tmp_path, "on_budget_exceeded: fail_closed", "on_budget_exceeded: downgrade")
    assert got == [("warning", str(tmp_path / "support_draft.yaml"), 6, "routes[support_draft].fallback.on_budget_exceeded")]


def test_the_seed_as_written_has_no_field_without_effect(tmp_path: Path) -> None:
    assert no_effect(tmp_path, "", "") == []


def test_policy_check_prints_each_no_effect_field_with_its_kind(tmp_path: Path) -> None:
    text = SEED.read_text().replace("owner: customer_api_key", "owner: customer").replace(
        "record_primary_and_final_model: true", "record_primary_and_final_model: false")
    route = write(tmp_path, "support_draft.yaml", text)
    out = subprocess.run([sys.executable, "-m", "extproc.cli", "policy", "check", str(CATALOG), str(route), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = [(i["line"], i["key"]) for i in json.loads(out.stdout)["issues"] if i["kind"] == "no_effect"]
    assert got == [(9, "routes[support_draft].billing.owner"), (10, "routes[support_draft].billing.record_primary_and_final_model")]


def test_an_empty_named_section_has_no_entries_and_no_issue(tmp_path: Path) -> None:
    d = doc(tmp_path, "a.yaml", "x: 1\nthings:\n")
    c = Checker()
    assert parse_named(c, Section(d["things"], d.at("things")), "things", lambda c, name, e, key: 1) == {}
    assert c.issues == []
