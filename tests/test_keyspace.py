"""The money scripts read their keys by name (K.<field>), bound from the same dataclass that
builds the key list, so a script and its caller cannot disagree on positions."""

from __future__ import annotations

import re
from dataclasses import fields
from importlib import resources

import pytest

from extproc.keyspace import SCRIPT_KEYS, Account
from extproc.store import load_script


@pytest.mark.parametrize("script", sorted(SCRIPT_KEYS))
def test_a_named_key_script_never_reads_keys_by_position(script: str) -> None:
    text = resources.files("extproc").joinpath("lua", f"{script}.lua").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    assert "KEYS[" not in code


@pytest.mark.parametrize("script", sorted(SCRIPT_KEYS))
def test_every_key_a_script_names_is_a_field_of_its_keys(script: str) -> None:
    text = resources.files("extproc").joinpath("lua", f"{script}.lua").read_text()
    used = set(re.findall(r"\bK\.([a-z_]+)", text))
    assert used and used <= {f.name for f in fields(SCRIPT_KEYS[script])}


def test_the_loaded_script_binds_each_name_to_its_position() -> None:
    first = load_script("finish").splitlines()[0]
    assert first.startswith("local K = {marker = KEYS[1], reservation = KEYS[2], index = KEYS[3], balance = KEYS[4],")
    assert first.endswith("outbox = KEYS[11], tpm = KEYS[12]}")


def test_reserve_keys_are_in_the_customers_hash_slot_in_field_order() -> None:
    keys = Account("acme", "ws1", "key9").reserve_keys("req-1", "202611").as_list()
    assert keys[:4] == ["tollgate:{c:acme}:req:req-1", "tollgate:{c:acme}:resv:req-1", "tollgate:{c:acme}:resv-index",
                        "tollgate:{c:acme}:balance"]
    assert keys[7] == "tollgate:{c:acme}:ws:ws1:reserved" and keys[10] == "tollgate:{c:acme}:key:key9:rpm"
    assert all(k.startswith("tollgate:{c:acme}:") for k in keys) and len(keys) == 16
