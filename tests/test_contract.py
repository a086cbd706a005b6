"""The notes the processors leave each other in Envoy's dynamic metadata, on the wire (the
short keys are what Envoy carries with every message) and back."""

from __future__ import annotations

from extproc.contract import NS_APPLY, NS_LAST, NS_REWRITE, AttemptNote, AttemptsNote, RequestNote, StopNote
from extproc.envoy_config import MODEL_REWRITE_LUA, STATUS_RECORDER_LUA, apply_lua


def test_a_request_note_travels_with_short_keys() -> None:
    note = RequestNote("support_draft", "starter", "low_cost_chat", "p1", 1700, "acme", 512, True,
                       frozenset({"p3", "p2"}), "flaky_chat", "p4", "provider_5xx")
    assert note.to_struct() == {
        "route": "support_draft", "plan": "starter", "m1": "low_cost_chat", "p1": "p1", "t1": 1700, "cust": "acme",
        "cap": 512, "stream": True, "unhealthy": "p2,p3", "skip": "flaky_chat", "skip_p": "p4", "skip_o": "provider_5xx"}


def test_a_request_note_read_back_from_envoy_numbers_is_the_same_note() -> None:
    """Envoy hands numbers back as floats."""
    wire = {"route": "r", "plan": "p", "m1": "m", "p1": "p1", "t1": 1700.0, "cust": "c", "cap": 512.0, "stream": False,
            "unhealthy": ""}
    assert RequestNote.from_struct(wire) == RequestNote("r", "p", "m", "p1", 1700, "c", 512, False)


def test_an_attempt_without_an_outcome_has_no_outcome_on_the_wire() -> None:
    assert AttemptNote("m", "p", 5).to_struct() == {"m": "m", "p": "p", "t": 5}
    assert AttemptNote("m", "p", 5, "provider_5xx", 500, "retry_same", "provider_5xx").to_struct() == {
        "m": "m", "p": "p", "t": 5, "o": "provider_5xx", "s": 500, "rule": "retry_same", "reason": "provider_5xx"}


def test_attempts_are_read_in_order_with_the_stop() -> None:
    wire = {"2": {"m": "b", "p": "p2", "t": 7.0}, "1": {"m": "a", "p": "p1", "t": 3.0, "o": "timeout", "s": 0.0},
            "stop": {"reason": "policy", "rule": "fail_closed"}}
    notes = AttemptsNote.from_struct(wire)
    assert list(notes.attempts) == [1, 2]
    assert notes.attempts[1] == AttemptNote("a", "p1", 3, "timeout", 0)
    assert notes.stop == StopNote("policy", "fail_closed")
    assert AttemptsNote.from_struct(notes.to_struct()) == notes


def test_the_lua_filters_use_the_contracts_namespaces() -> None:
    assert f'"{NS_LAST}"' in STATUS_RECORDER_LUA and f'"{NS_REWRITE}"' in MODEL_REWRITE_LUA
    assert f'"{NS_APPLY}"' in apply_lua()
