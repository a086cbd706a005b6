"""The usage record and spend kinds, as pure data (ledger.py)."""

from __future__ import annotations

import json

from extproc.ledger import UsageRecord, spend_kind
from extproc.records import Attempt


def test_the_primary_on_the_first_attempt_is_normal_spend() -> None:
    assert spend_kind("a", "a", 1) == "normal"


def test_the_primary_on_a_later_attempt_is_retry_spend() -> None:
    assert spend_kind("a", "a", 2) == "retry"


def test_another_model_is_fallback_spend_even_on_the_first_attempt() -> None:
    """The primary's circuit was open: the first real attempt already went elsewhere."""
    assert spend_kind("a", "b", 1) == "fallback"


def _record() -> UsageRecord:
    return UsageRecord("req-1", "1700", "support_draft", "acme", "ws", "key1", "starter", "low_cost_chat", "low_cost_chat",
                       "p1", False, "/v1/chat/completions", "rec-1", True,
                       attempt_list=[Attempt("low_cost_chat", "p1", 0, "unknown")])


def test_an_unfinished_record_has_only_what_was_known_before_the_call() -> None:
    fields = _record().fields(finished=False)
    assert "status" not in fields and "cost_micro_usd" not in fields
    assert fields["prepaid"] == "true" and fields["stream"] == "false" and fields["attempts"] == "1"
    assert json.loads(fields["attempt_list"]) == [{"model": "low_cost_chat", "provider": "p1", "status": 0, "reason": "unknown"}]


def test_retry_spend_is_kept_apart_in_the_record() -> None:
    rec = _record()
    rec.status, rec.kind, rec.cost_micro_usd, rec.attempts = 200, "retry", 1234, 2
    fields = rec.fields()
    assert (fields["cost_micro_usd"], fields["retry_cost_micro_usd"], fields["fallback_cost_micro_usd"]) == ("1234", "1234", "0")
    assert fields["status"] == "200" and fields["kind"] == "retry"
