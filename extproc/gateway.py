"""What every request of one processor process shares (`Gateway`): the policy in force, the
stores (keys, quota, health), provider secrets, and the background tasks it keeps alive."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from extproc import config
from extproc.health import Health
from extproc.keys import KeyStore
from extproc.policy.model import Policy
from extproc.quota import Quota


@dataclass
class Gateway:
    """What every exchange of one process shares: the policy, stores, provider secrets."""

    policy: Policy
    keys: KeyStore
    quota: Quota
    health: Health
    provider_secrets: dict[str, str] = field(default_factory=dict)
    background: set[asyncio.Task[None]] = field(default_factory=set)
    reservation_grace_s: float = config.RESERVATION_GRACE_S
    max_body_bytes: int = config.MAX_BODY_BYTES  # Envoy buffers bodies up to this (envoy_config)
    # Policies a reload replaced, newest first (at most config.RETIRED_POLICIES_KEPT): requests
    # admitted under them are settled under them (downstream.Exchange.resume).
    retired: list[Policy] = field(default_factory=list)

    def replace_policy(self, policy: Policy) -> None:
        """A reload: `policy` is in force; the one it replaces is kept for requests in flight."""
        self.retired = [self.policy, *self.retired][:config.RETIRED_POLICIES_KEPT]
        self.policy = policy

    # Requests this process reserved for and handed to Envoy's response side (their marker key
    # -> when their reservation expires, monotonic): a stopping worker waits for their
    # settlements (`server.Processor.settle_handed`). Removed when settled here; entries another
    # process settled stay until they expire (swept every HANDED_SWEEP_EVERY insertions).
    handed: dict[str, float] = field(default_factory=dict)
    _handed_added: int = 0

    def hand_over(self, marker_key: str, ttl_s: float) -> None:
        self.handed[marker_key] = time.monotonic() + ttl_s
        self._handed_added += 1
        if self._handed_added % config.HANDED_SWEEP_EVERY == 0:
            now = time.monotonic()
            for k in [k for k, until in self.handed.items() if until < now]:
                del self.handed[k]

    def credential(self, provider: str) -> str:
        """The `authorization` value a provider is sent (its key from the environment or a
        file), or "" when it has none: the client's own credential is removed either way."""
        secret = self.provider_secrets.get(provider)
        return f"Bearer {secret}" if secret else ""

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        """Run work the reply need not wait for, keeping a reference until it is done."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task
