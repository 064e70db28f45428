"""Per-connection socket options: TCP_NODELAY and TCP keepalive.

Nagle's algorithm delays a proxy's small writes (a Postgres query, a TLS
record) behind the peer's delayed ACK: tens of milliseconds per round trip.
Both legs turn it off.

Keepalive is what finds a dead peer on a connection that is idle on purpose
(a LISTEN/NOTIFY session, a pooled connection): there is no idle timeout by
default, so without keepalive a vanished client or a silently dropped NAT
entry would hold a slot and an upstream connection forever.  The kernel's
default (2 hours before the first probe) is too slow, so idle, interval and
count come from the cluster's ``keepalive`` setting.
"""

from __future__ import annotations

import socket

from twisted.internet.interfaces import ITCPTransport, ITransport
from twisted.logger import Logger

from egressproxy.config import Keepalive

log = Logger()

_KEEPALIVE_OPTIONS = tuple(
    (getattr(socket, name), attr)
    for name, attr in (("TCP_KEEPIDLE", "idle"), ("TCP_KEEPINTVL", "interval"), ("TCP_KEEPCNT", "count"))
    if hasattr(socket, name)
)


def tune_tcp(transport: ITransport, keepalive: Keepalive | None) -> None:
    """Set TCP_NODELAY and keepalive on a TCP transport; other transports are left alone."""
    if not ITCPTransport.providedBy(transport):
        return
    try:
        transport.setTcpNoDelay(True)
        if keepalive is None:
            return
        transport.setTcpKeepAlive(True)
        handle = transport.getHandle()
        for option, attr in _KEEPALIVE_OPTIONS:
            handle.setsockopt(socket.IPPROTO_TCP, option, max(1, int(getattr(keepalive, attr))))
    except OSError as e:
        # The peer may already have reset the connection; nothing to tune.
        log.debug("could not set socket options: {error}", error=e)
