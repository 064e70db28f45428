"""The listener checks: is each address bound (or bindable), dual-stack, and how it admits clients.

**Bound.**  The doctor usually runs beside a running proxy.  It first tries
to bind the address itself (and lets go at once): that succeeds when
nothing holds it ("free: the proxy can bind it"), and fails with "address
in use" when something does, in which case it connects to check that
something accepts there.  Inside the running proxy (``GET /doctor``) the
service says which listeners it has bound, and no connection is made.
"Not an address of this machine" and "permission denied" fail.

**Dual-stack.**  Fly's private network (6PN) and ``fly proxy`` arrive over
IPv6; an IPv4-only bind (``0.0.0.0:5432``, ``127.0.0.1:5432``) takes none
of it, and clients see the connection refused or "server closed the
connection unexpectedly".  ``[::]:5432`` (or ``:5432``) takes both.

PROXY protocol and ``allow_sources`` are shown as they are configured.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from egressproxy.config import ListenerConfig
from egressproxy.doctor.conn import ConnectFailed, connect
from egressproxy.doctor.report import FAIL, OK, SKIP, WARN, Check

#: Seconds to wait for a bound listener to accept.
ACCEPT_TIMEOUT = 2.0


def _probe_host(host: str) -> str:
    """Where to connect to reach a listener bound to ``host`` (the any-address: loopback)."""
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return host


def try_bind(host: str, port: int, dual_stack: bool) -> OSError | None:
    """Bind ``host:port`` and let go; the error, or None when it could be bound."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e
    return None


async def bound_check(reactor: Any, listener: ListenerConfig, bound: Callable[[str], int | None] | None) -> Check:
    subject = f"listener {listener.name}"
    listen = listener.listen
    if listen.host is None or listen.port is None:
        return Check(subject, "listen", SKIP, f"an endpoint description ({listen.description}): not checked")
    port = bound(listener.name) if bound is not None else None
    if port is not None:
        return Check(subject, "listen", OK, f"{listen}: bound by this proxy (port {port})")
    if listen.port == 0:
        return Check(subject, "listen", SKIP, f"{listen}: port 0 (any free port): nothing to check")
    started = reactor.seconds()
    problem = try_bind(listen.host, listen.port, listen.dual_stack)
    if problem is None:
        return Check(subject, "listen", OK, f"{listen}: nothing holds it now; the proxy can bind it",
                     reactor.seconds() - started)
    if problem.errno == errno.EADDRINUSE:
        try:
            conn = await connect(reactor, _probe_host(listen.host), listen.port, ACCEPT_TIMEOUT)
        except ConnectFailed as e:
            return Check(subject, "listen", FAIL, f"{listen}: in use, but nothing accepts there ({e.detail})",
                         reactor.seconds() - started,
                         "another process holds the port without accepting: stop it, or choose another port")
        conn.close(graceful=True)
        return Check(subject, "listen", OK, f"{listen}: bound, and accepting (the proxy, if it runs here)",
                     reactor.seconds() - started)
    if problem.errno == errno.EADDRNOTAVAIL:
        hint = f"{listen.host} is not an address of this machine: listen on \"[::]:{listen.port}\" instead"
    elif problem.errno == errno.EACCES:
        hint = f"port {listen.port} needs privileges: run as root or with CAP_NET_BIND_SERVICE, or use a port above 1023"
    else:
        hint = "the proxy could not bind this address either: fix listen in the config"
    return Check(subject, "listen", FAIL, f"{listen}: cannot bind: {problem.strerror or problem}",
                 reactor.seconds() - started, hint)


def stack_check(listener: ListenerConfig) -> Check:
    subject = f"listener {listener.name}"
    listen = listener.listen
    if listen.host is None:
        return Check(subject, "dual-stack", SKIP, "an endpoint description: not checked")
    if listen.dual_stack:
        return Check(subject, "dual-stack", OK, f"{listen}: takes IPv6 and IPv4")
    ip = ipaddress.ip_address(listen.host)
    port = listen.port if listen.port else 5432
    if ip.is_loopback:
        # Bound to loopback on purpose (a sidecar, a demo): nothing off this
        # machine was meant to reach it, so there is nothing to fix, only to know.
        return Check(subject, "dual-stack", WARN,
                     f"{listen}: loopback only: only this machine reaches it (not fly proxy, not other apps)", 0.0,
                     f'listen: "[::]:{port}" if apps or fly proxy should reach it')
    if ip.version == 4:
        return Check(subject, "dual-stack", FAIL,
                     f"{listen}: IPv4 only: fly proxy and Fly's private network (6PN, flycast) arrive over IPv6 "
                     f"and cannot reach it", 0.0,
                     f'listen: "[::]:{port}" (dual-stack: IPv6 and IPv4)')
    return Check(subject, "dual-stack", OK, f"{listen}: IPv6 only (Fly's private network reaches it; IPv4 clients do not)")


def admission_checks(listener: ListenerConfig) -> list[Check]:
    subject = f"listener {listener.name}"
    if listener.proxy_protocol:
        trusted = listener.proxy_protocol_trusted
        who = ", ".join(str(n) for n in trusted) if trusted else "any peer"
        proxy = f"on: expects a PROXY header (v1/v2) from {who}"
    else:
        proxy = "off"
    sources = listener.allow_sources
    if sources is None:
        allowed = "any source"
    else:
        shown = [str(n) for n in sources[:4]]
        allowed = ", ".join(shown) + (f" (+{len(sources) - 4} more)" if len(sources) > 4 else "")
    return [
        Check(subject, "proxy protocol", OK, proxy),
        Check(subject, "allow_sources", OK, allowed),
    ]


async def listener_checks(reactor: Any, listener: ListenerConfig, bound: Callable[[str], int | None] | None) -> list[Check]:
    """Every check of one listener, in order."""
    return [await bound_check(reactor, listener, bound), stack_check(listener), *admission_checks(listener)]
