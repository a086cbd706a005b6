"""Top-ups as ledger entries: a credit is applied once per reference and recorded.

`credit.lua` changes the balance, remembers the reference (for good: a payment id must never
credit twice, however late a webhook is re-delivered) and writes a `kind=credit` record to the
customer's outbox, in one atomic step; the record is then published to the usage stream
exactly once, like a usage record, so the exporter puts every balance change in the ledger.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from extproc.quota import OUTBOX_HINTS, Account, now_ms, publish_args, valid_id
from extproc.store import RedisLike, Scripts
from extproc.store import text as _text


@dataclass(frozen=True)
class Credit:
    customer: str
    reference: str
    amount_micro: int
    credited: bool  # False: this reference had already been credited; nothing changed
    record_id: str  # the record of the credit that counts (the first one)
    balance_micro: int


def reference_key(customer: str, reference: str) -> str:
    return Account(customer, "", "").k(f"credit-ref:{reference}")


async def add_credit(redis: RedisLike, customer: str, amount_micro: int, reference: str | None, source: str) -> Credit:
    """Credit `amount_micro` (negative: deduct) once per `reference`; without one, a fresh
    reference is made (every call then credits). Raises ValueError on invalid ids."""
    if not valid_id(customer):
        raise ValueError(f"invalid customer id {customer!r}")
    uid = uuid.uuid4().hex
    reference = reference or f"manual-{uid}"
    if not valid_id(reference):
        raise ValueError("reference must be 1-128 letters, digits or _ . : @ -")
    a = Account(customer, "", "")
    record = {
        "record_id": uid, "kind": "credit", "ts": str(now_ms()), "customer_id": customer, "workspace_id": "",
        "request_id": f"credit:{customer}:{reference}", "amount_micro_usd": str(amount_micro), "reference": reference,
        "source": source,
    }
    scripts = Scripts(redis, "credit", "publish")
    keys = [reference_key(customer, reference), a.k("balance"), a.k("outbox")]
    _, reply = await scripts.batch(
        # The hint first, as for usage records: a drainer publishes the record if we die next.
        lambda c: c.zadd(OUTBOX_HINTS, {customer: now_ms()}, nx=True),
        lambda c: scripts.call(c, "credit", keys, [amount_micro, uid, json.dumps(record)]),
    )
    first_uid, balance = _text(reply[1]), int(reply[2])
    # The first credit under this reference may be this very call: a cluster client resends a
    # call whose reply it lost, and the resend finds the reference taken by itself.
    credited = int(reply[0]) == 1 or first_uid == uid
    if credited:
        body = await redis.hget(a.k("outbox"), uid)
        if body is not None:
            await scripts.eval("publish", *publish_args(uid, record["request_id"], customer, _text(body)))
            await redis.hdel(a.k("outbox"), uid)  # only once published: else the drainer publishes it
    return Credit(customer, reference, amount_micro, credited, first_uid, balance)
