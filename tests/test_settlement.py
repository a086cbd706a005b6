"""Settlement that cannot be lost (issue: money cap, item 6): a Redis that refuses writes at
settle time, through the real stack. The reservation and its hint stay until the settlement
lands; then exactly one record exists and no money is left in flight."""

from __future__ import annotations

import threading
import time

from extproc.fakeprovider import Reply
from tests.conftest import Stack
from tests.test_quota import MESSAGES, money, records_of, reservations_of


def test_a_settlement_refused_by_a_full_redis_is_retried_and_lands_once(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, plan="starter")
    stack.fakes["p1"].script(Reply(delay_s=1.0, prompt_tokens=100, completion_tokens=10))
    r = stack.redis_sync()
    answered: list[int] = []

    def call() -> None:
        raw = stack.client(secret).chat.completions.with_raw_response.create(model="support_draft", messages=MESSAGES)
        answered.append(int(raw.headers["x-tollgate-cost-usd"].replace(".", "")))

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 5
    while not reservations_of(stack, customer):  # reserved: the provider is thinking
        assert time.monotonic() < deadline
        time.sleep(0.01)
    r.config_set("maxmemory", 1)  # from now on every write that may grow memory is refused
    try:
        t.join(10)
        assert answered, "the client got no answer"
        time.sleep(0.3)
        # Not settled while Redis refuses: the money is still reserved and the hint still there.
        assert money(stack, customer, settle=False)["reserved"] > 0
        assert len(reservations_of(stack, customer)) == 1
        assert records_of(stack, customer, settle=False) == []
    finally:
        r.config_set("maxmemory", 0)
    deadline = time.monotonic() + 10
    while not records_of(stack, customer, settle=False) or reservations_of(stack, customer):
        assert time.monotonic() < deadline, "the settlement never landed"
        time.sleep(0.1)
    (rec,) = records_of(stack, customer)
    # low_cost_chat: (100 x 150,000 + 10 x 600,000) / 1e6 = 21 micro-USD
    assert (rec["status"], rec["cost_micro_usd"], answered) == ("200", "21", [21])
    m = money(stack, customer)
    assert (m["reserved"], m["spend"]) == (0, 21)
