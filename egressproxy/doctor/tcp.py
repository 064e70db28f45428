"""The TCP step: connect to one address and say how it went (accepted, refused, timed out, unreachable).

Each address of a target is tried on its own, so an IPv6 address that
times out while the IPv4 one answers is visible.  For an upstream whose
protocol the doctor does not speak (``tcp``), the step also holds the
connection open for :data:`HOLD` seconds: a server that closes it at once
with 0 bytes is reported as the allowlist symptom it usually is (some
providers accept and then drop what their allowlist does not admit).
"""

from __future__ import annotations

from typing import Any

from egressproxy.doctor import hints
from egressproxy.doctor.conn import ConnectFailed, ProbeConnection, connect
from egressproxy.doctor.report import FAIL, OK, Check

#: Seconds an unknown-protocol connection is held, watching for a close-on-accept.
HOLD = 0.5

_HINTS = {
    "refused": "nothing accepts on that port: check the endpoint's port in the config, and that the server runs "
               "and listens on this address family",
    "timeout": ("packets are dropped on the way: a firewall or security group that does not admit this "
                "Machine, a wrong address, or (IPv6) no IPv6 route from here"),
    "unreachable": "no route to that address from here: check the address, and IPv6 egress if it is IPv6",
    "error": "the connect failed: check the address and port in the config",
}


def _where(_address: str, port: int) -> str:
    """The detail's prefix: the address itself is the check's ``address``."""
    return f"port {port}"


async def tcp_step(
    reactor: Any, subject: str, address: str, port: int, timeout: float, hold: bool, egress: str | None
) -> tuple[Check, ProbeConnection | None]:
    """The check for one connect, and the open connection when it was accepted (and not closed at once)."""
    started = reactor.seconds()
    try:
        conn = await connect(reactor, address, port, timeout)
    except ConnectFailed as e:
        hint = _HINTS[e.kind]
        if e.kind == "timeout":
            hint = hint + "; if the provider allowlists sources: " + hints.allowlist(egress)
        return Check(subject, "tcp", FAIL, f"{_where(address, port)}: {e.detail}",
                     reactor.seconds() - started, hint, address), None
    seconds = reactor.seconds() - started
    if hold and await conn.wait_closed(HOLD):
        if conn.received == 0:
            return Check(subject, "tcp", FAIL,
                         f"{_where(address, port)}: accepted, then closed at once with 0 bytes "
                         f"(the usual sign of a source allowlist)", seconds, hints.allowlist(egress), address), None
        return Check(subject, "tcp", OK, f"{_where(address, port)}: accepted; the server spoke and closed",
                     seconds, None, address), None
    return Check(subject, "tcp", OK, f"{_where(address, port)}: accepted", seconds, None, address), conn
