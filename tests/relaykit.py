"""Helpers for testing the compiled relay (``egressproxy._relay``) on real sockets.

The relay runs its own thread, so these tests drive plain sockets from the
test's thread and wait with bounded ``select`` loops; no reactor is needed.
:func:`relay_module` answers the extension or raises SkipTest saying why,
except when ``EGRESSPROXY_TEST_DATA_PATH=relay`` asks for the relay: then a
relay that cannot load fails the test instead of skipping it.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import struct
import time
from typing import Any

from twisted.trial.unittest import SkipTest

from egressproxy.datapath import relay as relay_path

#: Chooses the data path of the service-level data-path tests (see :func:`wanted_data_path`).
VARIABLE = "EGRESSPROXY_TEST_DATA_PATH"

BLOCK = 64 * 1024


def wanted_data_path() -> str:
    """``relay``, ``python``, or ``auto`` (unset: what ``fast_path: auto`` picks here)."""
    value = os.environ.get(VARIABLE, "auto") or "auto"
    if value not in ("auto", "relay", "python"):
        raise ValueError(f"{VARIABLE} must be relay, python or auto, got {value!r}")
    return value


def relay_module() -> Any:
    """The extension; SkipTest (or, with ``EGRESSPROXY_TEST_DATA_PATH=relay``, a failure) when it cannot load."""
    module, why = relay_path.load()
    if module is None:
        if wanted_data_path() == "relay":
            raise AssertionError(f"{VARIABLE}=relay, but {why}")
        raise SkipTest(f"the compiled relay cannot be used here: {why} (build it with pip install .)")
    return module


def relay_expected() -> bool:
    """Whether a service started with the tests' default config hands splices to the relay."""
    wanted = wanted_data_path()
    if wanted == "python":
        return False
    return wanted == "relay" or relay_path.load()[0] is not None


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets: (outside, inside)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        outside = socket.create_connection(listener.getsockname(), timeout=5)
        inside, _ = listener.accept()
    inside.setblocking(False)
    return outside, inside


class Relayed:
    """A client and a server whose connections' inner ends are relayed by ``relay``.

    client <-> a (relayed) ... b (relayed) <-> server.  ``a`` is the relay's
    side a (the downstream), ``b`` its side b.
    """

    def __init__(self, relay: Any, cookie: object = None, unix: bool = False, **add: Any) -> None:
        if unix:
            self.client, a = socket.socketpair()
            b, self.server = socket.socketpair()
            a.setblocking(False)
            b.setblocking(False)
        else:
            self.client, a = tcp_pair()
            self.server, b = tcp_pair()
        for s in (self.client, self.server):
            s.settimeout(10)
        self.before_add(a, b)
        self.handle = relay.add(a.fileno(), b.fileno(), self if cookie is None else cookie, **add)
        a.detach()
        b.detach()

    def before_add(self, a: socket.socket, b: socket.socket) -> None:
        """Hook: what happens on the inner sockets before the relay takes them."""

    def close(self) -> None:
        for s in (self.client, self.server):
            s.close()


def reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), not FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def recv_all(sock: socket.socket, size: int, timeout: float = 20.0) -> bytes:
    """Exactly ``size`` bytes (less only at EOF), within ``timeout`` seconds."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    while len(got) < size and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(size - len(got))
        if not chunk:
            break
        got += chunk
    return bytes(got)


def recv_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything until EOF; AssertionError if no EOF comes within ``timeout``."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(1 << 20)
        if not chunk:
            return bytes(got)
        got += chunk
    raise AssertionError(f"no EOF within {timeout}s ({len(got)} bytes came)")


def wait_ended(relay: Any, count: int = 1, timeout: float = 10.0) -> list[tuple[Any, int, int, str]]:
    """The next ``count`` ended pairs, waiting on the relay's descriptor at most ``timeout`` seconds."""
    ended: list[tuple[Any, int, int, str]] = []
    deadline = time.monotonic() + timeout
    while len(ended) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{len(ended)} of {count} pairs ended within {timeout}s")
        select.select([relay.fileno()], [], [], left)
        ended += relay.ended()
    return ended


def until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 10 ms for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.01)


def flood(sender: socket.socket, limit: int = 256 * 1024 * 1024, payload: bytes | None = None) -> int:
    """Send until the kernel takes nothing more for 0.5 s (the whole chain is full); bytes sent.

    ``payload``: what to send (its length is the limit); else ``limit`` bytes of filler.
    """
    sender.setblocking(False)
    view = memoryview(payload if payload is not None else b"\x5a" * limit)
    sent, idle_since = 0, time.monotonic()
    deadline = time.monotonic() + 60
    while sent < len(view) and time.monotonic() < deadline:
        _, writable, _ = select.select([], [sender], [], 0.05)
        n = 0
        if writable:
            try:
                n = sender.send(view[sent:sent + (1 << 20)])
            except BlockingIOError:
                pass
        if n:
            sent += n
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > 0.5:
            return sent
    raise AssertionError(f"the flood was never pushed back ({sent} bytes sent)")


def pattern(size: int, salt: int = 0) -> bytes:
    """Numbered 64 KiB blocks: loss, duplication and reordering all change the digest."""
    return b"".join(struct.pack(">II", salt, i) * (BLOCK // 8) for i in range(size // BLOCK))


def exchange(left: socket.socket, right: socket.socket, to_right: bytes, to_left: bytes, timeout: float = 60.0) -> tuple[str, str]:
    """Send both payloads at once, each side reading as it goes; the SHA-256 each side received."""
    for s in (left, right):
        s.setblocking(False)
    outgoing = {left: memoryview(to_right), right: memoryview(to_left)}
    expected = {left: len(to_left), right: len(to_right)}
    digests = {left: hashlib.sha256(), right: hashlib.sha256()}
    received = {left: 0, right: 0}
    deadline = time.monotonic() + timeout
    while any(received[s] < expected[s] for s in (left, right)):
        left_time = deadline - time.monotonic()
        if left_time <= 0:
            raise AssertionError(f"exchange incomplete after {timeout}s: {received[left]}, {received[right]}")
        writers = [s for s in (left, right) if len(outgoing[s])]
        readable, writable, _ = select.select([left, right], writers, [], min(1.0, left_time))
        for s in writable:
            sent = s.send(outgoing[s][:1 << 20])
            outgoing[s] = outgoing[s][sent:]
        for s in readable:
            chunk = s.recv(1 << 20)
            if chunk:
                digests[s].update(chunk)
                received[s] += len(chunk)
    for s in (left, right):
        s.setblocking(True)
    return digests[left].hexdigest(), digests[right].hexdigest()
