"""A TCP proxy in front of one Redis that loses one reply on purpose: when armed, the first
client write carrying a given byte string (a script's SHA) goes through to Redis, and once
Redis has run it (the caller's check says so) the client's connection is closed without the
reply. That is the network failure after which a Redis client library may send the same
command again."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class DropProxy:
    target_port: int
    port: int = 0
    dropped: int = 0  # replies lost on purpose so far
    forwarded: dict[bytes, int] = field(default_factory=dict)  # writes carrying a watched string
    _needle: bytes | None = None
    _ran: Callable[[], bool] | None = None
    _hold: tuple[bytes, Callable[[], bool]] | None = None  # the next write carrying it waits for the check
    held: int = 0  # writes held back and then forwarded
    refused: set[bytes] = field(default_factory=set)  # writes carrying one of these never reach Redis
    _slow: tuple[bytes, float] | None = None  # the reply to the next write carrying it comes this late
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _listener: socket.socket | None = None
    _socks: list[socket.socket] = field(default_factory=list)

    def start(self) -> DropProxy:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        for s in [self._listener, *self._socks]:
            if s is not None:
                _close(s)

    def watch(self, needle: bytes) -> None:
        """Count client writes carrying `needle` (how often a command was sent)."""
        self.forwarded.setdefault(needle, 0)

    def arm(self, needle: bytes, ran: Callable[[], bool], then_hold_until: Callable[[], bool] | None = None) -> None:
        """Lose the reply to the next write carrying `needle`, once `ran()` says Redis ran it;
        with `then_hold_until`, the write after it carrying `needle` (a client's resend) reaches
        Redis only once that check passes (a resend delayed in the network)."""
        with self._lock:
            self._needle, self._ran = needle, ran
            self._hold = (needle, then_hold_until) if then_hold_until else None
            self.watch(needle)

    def hold(self, needle: bytes, until: Callable[[], bool]) -> None:
        """The next write carrying `needle` reaches Redis only once `until()` passes (or 10 s)."""
        with self._lock:
            self._hold = (needle, until)
            self.watch(needle)

    def slow_reply(self, needle: bytes, seconds: float) -> None:
        """The reply to the next write carrying `needle` (Redis runs it at once) reaches the
        client `seconds` late, if the client still listens then."""
        with self._lock:
            self._slow = (needle, seconds)
            self.watch(needle)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self._socks += [client, server]
            doomed = threading.Event()
            late: list[float] = []  # a delay for the next reply, set by `_up`
            threading.Thread(target=self._up, args=(client, server, doomed, late), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, doomed, late), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, doomed: threading.Event, late: list[float]) -> None:
        tail = b""
        while True:
            data = _recv(client)
            if not data:
                _close(server)
                return
            seen, before = tail + data, tail  # a string split over two reads is still seen once
            tail = seen[-64:]
            with self._lock:
                for needle in self.forwarded:
                    self.forwarded[needle] += seen.count(needle) - before.count(needle)
                drop = self._needle is not None and self._needle in seen and self._needle not in before
                ran = self._ran
                hold = None
                if drop:
                    self._needle = self._ran = None
                    doomed.set()  # before Redis can answer: its reply never reaches the client
                elif self._hold is not None and self._hold[0] in seen and self._hold[0] not in before and self._needle is None:
                    hold, self._hold = self._hold[1], None
                refuse = any(n in seen for n in self.refused)
                if self._slow is not None and self._slow[0] in seen and self._slow[0] not in before:
                    late.append(self._slow[1])
                    self._slow = None
            if refuse:  # the connection breaks before the command is delivered
                _close(client)
                _close(server)
                return
            if hold is not None:
                _wait(hold, 10)
                self.held += 1
            try:
                server.sendall(data)
            except OSError:
                _close(client)
                return
            if drop and ran is not None:
                _wait(ran, 5)
                self.dropped += 1
                _close(client)
                _close(server)
                return

    def _down(self, server: socket.socket, client: socket.socket, doomed: threading.Event, late: list[float]) -> None:
        while True:
            data = _recv(server)
            if not data:
                _close(client)
                return
            if doomed.is_set():
                continue
            if late:
                time.sleep(late.pop())
            try:
                client.sendall(data)
            except OSError:
                _close(server)
                return


def _wait(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.01)


def _recv(s: socket.socket) -> bytes:
    """The next bytes from `s`; b"" when it closed or broke."""
    try:
        return s.recv(65536)
    except OSError:
        return b""


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()
