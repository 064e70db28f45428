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

**Set once on the listening socket.**  Linux copies a listening socket's
options (``TCP_NODELAY``, ``SO_KEEPALIVE`` and the three keepalive timers)
to every socket it accepts, as HAProxy relies on.  So a listener's options
are set on its listening socket when it is bound (and again when a reload
changes its keepalive), and :func:`tune_tcp` skips accepted connections
whose listening socket already carries the same settings: five
``setsockopt`` calls fewer per connection.  The upstream leg is a new
socket of our own and is still tuned per connection.
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


#: What a listening socket carries before :func:`tune_listening_socket` ran (or when it could not).
NOT_TUNED = object()


def set_socket_options(sock: socket.socket, keepalive: Keepalive | None) -> None:
    """TCP_NODELAY, and keepalive with the cluster's timers unless ``keepalive`` is None, on a socket."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if keepalive is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, attr in _KEEPALIVE_OPTIONS:
        sock.setsockopt(socket.IPPROTO_TCP, option, max(1, int(getattr(keepalive, attr))))


def tune_tcp(transport: ITransport, keepalive: Keepalive | None) -> None:
    """Set TCP_NODELAY and keepalive on a TCP transport; other transports are left alone."""
    if not ITCPTransport.providedBy(transport):
        return
    try:
        set_socket_options(transport.getHandle(), keepalive)
    except OSError as e:
        # The peer may already have reset the connection; nothing to tune.
        log.debug("could not set socket options: {error}", error=e)


def tune_listening_socket(port: object, keepalive: Keepalive | None) -> object:
    """Give a listening TCP socket the options its accepted sockets should have.

    Returns what the socket now carries (``keepalive``), or
    :data:`NOT_TUNED` when it is not a TCP socket (a unix socket, an
    endpoint description) or the options could not be set; then every
    accepted connection is tuned on its own, as before.  Keepalive ``None``
    with a socket that had keepalive on would leave it on, so that case
    reports NOT_TUNED too (per-connection tuning never turns it off either).
    """
    sock = getattr(port, "socket", None)
    if not isinstance(sock, socket.socket) or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return NOT_TUNED
    try:
        if keepalive is None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE):
            return NOT_TUNED
        set_socket_options(sock, keepalive)
    except OSError as e:
        log.warn("could not set socket options on a listening socket: {error}", error=e)
        return NOT_TUNED
    return keepalive
