"""The Redis key layout of the money scripts, named.

A Lua script receives its keys as a positional list. Here each script's keys are a frozen
dataclass whose field order *is* that list, and `store.Scripts` prefixes the script with
`local K = {<field> = KEYS[i], ...}` generated from the same dataclass, so the script reads
`K.balance`, never `KEYS[4]`: the two sides cannot drift apart.

Everything about one customer shares the hash tag `{c:<customer>}` (one Redis Cluster slot);
the layout itself is documented in `quota`'s module docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


class ScriptKeys:
    """Base of the dataclasses below: their fields, in order, are the script's KEYS."""

    def as_list(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self)]  # type: ignore[arg-type]


def lua_prelude(keys_type: type) -> str:
    """`local K = {marker = KEYS[1], ...}` for a script whose keys are `keys_type`."""
    names = [f.name for f in fields(keys_type)]
    return "local K = {" + ", ".join(f"{n} = KEYS[{i}]" for i, n in enumerate(names, 1)) + "}\n"


@dataclass(frozen=True)
class Account:
    """One API key's place in the layout: its customer's keys (`k`), its workspace's (`w`),
    its own. Everything shares the customer's hash tag `{c:<customer>}`."""

    customer: str
    workspace: str
    key_id: str

    def k(self, suffix: str) -> str:
        return f"tollgate:{{c:{self.customer}}}:{suffix}"

    def w(self, suffix: str) -> str:
        return self.k(f"ws:{self.workspace}:{suffix}")

    def marker(self, request_id: str) -> str:
        """A request id's marker (`inflight:<call>` while reserved, then `settled`, ...)."""
        return self.k(f"req:{request_id}")

    def reserve_keys(self, request_id: str, month: str) -> ReserveKeys:
        return ReserveKeys(
            marker=self.marker(request_id), reservation=self.k(f"resv:{request_id}"), index=self.k("resv-index"),
            balance=self.k("balance"), reserved=self.k("reserved"), spend=self.k(f"spend:{month}"), limits=self.k("limits"),
            ws_reserved=self.w("reserved"), ws_spend=self.w(f"spend:{month}"), ws_limits=self.w("limits"),
            key_rpm=self.k(f"key:{self.key_id}:rpm"), key_tpm=self.k(f"key:{self.key_id}:tpm"),
            ws_rpm=self.w("rpm"), ws_tpm=self.w("tpm"), rpm=self.k("rpm"), tpm=self.k("tpm"))

    def finish_keys(self, request_id: str, month: str) -> FinishKeys:
        return FinishKeys(
            marker=self.marker(request_id), reservation=self.k(f"resv:{request_id}"), index=self.k("resv-index"),
            balance=self.k("balance"), reserved=self.k("reserved"), spend=self.k(f"spend:{month}"),
            ws_reserved=self.w("reserved"), ws_spend=self.w(f"spend:{month}"), key_tpm=self.k(f"key:{self.key_id}:tpm"),
            ws_tpm=self.w("tpm"), outbox=self.k("outbox"), tpm=self.k("tpm"))

    def cancel_keys(self, request_id: str) -> CancelKeys:
        return CancelKeys(
            marker=self.marker(request_id), reservation=self.k(f"resv:{request_id}"), index=self.k("resv-index"),
            reserved=self.k("reserved"), ws_reserved=self.w("reserved"), key_tpm=self.k(f"key:{self.key_id}:tpm"),
            ws_tpm=self.w("tpm"), tpm=self.k("tpm"))

    def expire_keys(self, request_id: str) -> ExpireKeys:
        return ExpireKeys(
            marker=self.marker(request_id), reservation=self.k(f"resv:{request_id}"), index=self.k("resv-index"),
            reserved=self.k("reserved"), ws_reserved=self.w("reserved"), outbox=self.k("outbox"))


@dataclass(frozen=True)
class ReserveKeys(ScriptKeys):
    """reserve.lua: the request-id marker, the reservation and the customer's index of them,
    the money (balance, in flight, month spend, limits) of customer and workspace, and the
    rate buckets of key, workspace and customer."""

    marker: str
    reservation: str
    index: str
    balance: str
    reserved: str
    spend: str
    limits: str
    ws_reserved: str
    ws_spend: str
    ws_limits: str
    key_rpm: str
    key_tpm: str
    ws_rpm: str
    ws_tpm: str
    rpm: str
    tpm: str


@dataclass(frozen=True)
class FinishKeys(ScriptKeys):
    """finish.lua: what reserve took, where the spend goes, the tokens-per-minute buckets it
    refunds, and the customer's outbox for the record."""

    marker: str
    reservation: str
    index: str
    balance: str
    reserved: str
    spend: str
    ws_reserved: str
    ws_spend: str
    key_tpm: str
    ws_tpm: str
    outbox: str
    tpm: str


@dataclass(frozen=True)
class ExpireKeys(ScriptKeys):
    """expire.lua: an overdue reservation, the money it holds, and the outbox for its record."""

    marker: str
    reservation: str
    index: str
    reserved: str
    ws_reserved: str
    outbox: str


@dataclass(frozen=True)
class CancelKeys(ScriptKeys):
    """cancel.lua: one call's reservation, the money it holds and the tokens-per-minute it took."""

    marker: str
    reservation: str
    index: str
    reserved: str
    ws_reserved: str
    key_tpm: str
    ws_tpm: str
    tpm: str


SCRIPT_KEYS: dict[str, type] = {"reserve": ReserveKeys, "finish": FinishKeys, "expire": ExpireKeys, "cancel": CancelKeys}
