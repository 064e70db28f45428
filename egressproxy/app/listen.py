"""Binding a listener's socket.

``:5432`` and ``[::]:5432`` mean *every interface, IPv6 and IPv4*: Fly's
private network and ``fly proxy`` arrive over IPv6, while health checks and
local tools may use IPv4.  Twisted's ``tcp6`` port leaves IPV6_V6ONLY to the
kernel default (``net.ipv6.bindv6only``), so instead the socket is made here
with IPV6_V6ONLY explicitly off and handed to the reactor with
``adoptStreamPort``: dual-stack whatever the host's sysctl says.  On a host
without IPv6 at all, the all-interfaces form falls back to IPv4 with a
warning rather than not starting.

Other forms bind exactly what they say; a Twisted endpoint description
(``tcp6:...``, ``unix:...``) goes through ``serverFromString``.

Binding is synchronous and raises :class:`ListenError`, so a port that is
taken stops ``twistd`` before it runs with a listener missing.
"""

from __future__ import annotations

import errno
import socket

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorCore
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from egressproxy.config import ListenAddress

log = Logger()

BACKLOG = 1024


class ListenError(Exception):
    """A listener could not be bound; the message says which and why."""


def _bound_socket(
    family: int, host: str, port: int, dual_stack: bool, backlog: int, reuse_port: bool = False
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            # Workers (egressproxy.app.workers) each bind the same address; the
            # kernel spreads new connections over their accept queues.  Only
            # sockets of the same user may join the group.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
        sock.set_inheritable(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _ipv6_unavailable(e: OSError) -> bool:
    return e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


def listen(
    reactor: IReactorCore,
    address: ListenAddress,
    factory: Factory,
    backlog: int = BACKLOG,
    reuse_port: bool = False,
) -> IListeningPort:
    """Bind ``address`` and start accepting connections for ``factory``.

    With ``reuse_port`` the socket joins the other workers' sockets on the
    same address (host:port addresses only; the config loader enforces it).
    """
    if address.description is not None:
        return _listen_description(reactor, address.description, factory)
    assert address.host is not None and address.port is not None
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        sock = _bound_socket(family, address.host, address.port, address.dual_stack, backlog, reuse_port)
    except OSError as e:
        if not (address.dual_stack and _ipv6_unavailable(e)):
            raise ListenError(f"cannot listen on {address.text}: {e.strerror or e}") from e
        log.warn("IPv6 is not available here; {listen} listens on IPv4 only", listen=address.text)
        try:
            family = socket.AF_INET
            sock = _bound_socket(family, "0.0.0.0", address.port, False, backlog, reuse_port)
        except OSError as e4:
            raise ListenError(f"cannot listen on {address.text}: {e4.strerror or e4}") from e4
    try:
        # The reactor duplicates the descriptor; ours is closed either way.
        return reactor.adoptStreamPort(sock.fileno(), family, factory)  # type: ignore[attr-defined]
    finally:
        sock.close()


def _listen_description(reactor: IReactorCore, description: str, factory: Factory) -> IListeningPort:
    outcome: list[IListeningPort | Failure] = []
    serverFromString(reactor, description).listen(factory).addBoth(outcome.append)
    if not outcome:
        raise ListenError(f"cannot listen on {description}: the endpoint did not bind at once")
    result = outcome[0]
    if isinstance(result, Failure):
        raise ListenError(f"cannot listen on {description}: {result.getErrorMessage()}")
    return result
