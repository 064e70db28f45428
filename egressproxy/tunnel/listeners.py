"""Which local address and port serve each destination, and binding them.

Two plans (:func:`plan`):

- **plain** (default): every destination on ``127.0.0.1``, on the
  destination's own port when that is free, else on a port the kernel
  picks (a second destination with the same port, or a port something else
  holds).  The map is printed at start, and the app connects there
  (``host=db.example.com hostaddr=127.0.0.1 port=5432``).
- **transparent**: each destination *host* gets its own loopback address,
  ``127.77.0.1``, ``127.77.0.2``, ... in the order given, listening on each
  of its destinations' own ports, so two databases on 5432 never clash and
  the app's connection string (host name and port) stays as it is.  The
  whole of 127.0.0.0/8 is local on Linux, so no address has to be added.
  The names are pointed there by ``hostsfile.py``.  A port that cannot be
  bound is an error here: the app will connect to exactly that port.

This module does not decide what a connection does (``connection.py``)
and does not touch ``/etc/hosts``.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable

import attrs
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory

from egressproxy.addresses import format_host_port
from egressproxy.tunnel.parse import Destination

LOCAL = "127.0.0.1"
#: Transparent mode's addresses: TRANSPARENT_NET.1 for the first host, .2 for the next...
TRANSPARENT_NET = "127.77.0"
MAX_TRANSPARENT_HOSTS = 254


class TunnelStartError(Exception):
    """The tunnel cannot start as asked; the message names the fix."""


@attrs.frozen
class Binding:
    """One destination's listener: the address, and the port asked for (0: the kernel's choice)."""

    destination: Destination
    address: str
    port: int


def host_addresses(destinations: tuple[Destination, ...]) -> dict[str, str]:
    """Transparent mode: each distinct destination host -> its loopback address, in order."""
    addresses: dict[str, str] = {}
    for destination in destinations:
        if destination.host not in addresses:
            if len(addresses) == MAX_TRANSPARENT_HOSTS:
                raise TunnelStartError(f"--transparent serves at most {MAX_TRANSPARENT_HOSTS} destination hosts")
            addresses[destination.host] = f"{TRANSPARENT_NET}.{len(addresses) + 1}"
    return addresses


def plan(destinations: tuple[Destination, ...], transparent: bool) -> list[Binding]:
    """The listener of each destination; see the module notes."""
    if transparent:
        for destination in destinations:
            try:
                ipaddress.ip_address(destination.host)
            except ValueError:
                continue
            raise TunnelStartError(
                f"--transparent points host names at the tunnel, and {destination} is an IP address, "
                "which no /etc/hosts entry redirects: give its name, or run without --transparent"
            )
        addresses = host_addresses(destinations)
        return [Binding(d, addresses[d.host], d.port) for d in destinations]
    used: set[int] = set()
    bindings = []
    for destination in destinations:
        port = destination.port if destination.port not in used else 0
        used.add(destination.port)
        bindings.append(Binding(destination, LOCAL, port))
    return bindings


def _why(error: CannotListenError, port: int) -> str:
    text = str(error.socketError)
    if port < 1024 and "ermission" in text:
        return f"{text}: ports below 1024 need root (or CAP_NET_BIND_SERVICE)"
    return text


def listen_all(reactor: Any, bindings: list[Binding], factory_for: Callable[[Destination], Factory],
               transparent: bool) -> list[tuple[Binding, IListeningPort]]:
    """Bind every listener; on failure, close the ones already bound and raise TunnelStartError.

    Plain mode falls back to a port the kernel picks when the destination's
    own is taken; transparent mode cannot (the app dials that port).
    """
    bound: list[tuple[Binding, IListeningPort]] = []
    try:
        for binding in bindings:
            factory = factory_for(binding.destination)
            try:
                port = reactor.listenTCP(binding.port, factory, interface=binding.address)
            except CannotListenError as e:
                if transparent or binding.port == 0:
                    raise TunnelStartError(
                        f"cannot listen on {format_host_port(binding.address, binding.port)} for "
                        f"{binding.destination}: {_why(e, binding.port)}"
                    ) from None
                port = reactor.listenTCP(0, factory, interface=binding.address)
            bound.append((binding, port))
    except BaseException:
        for _, port in bound:
            port.stopListening()
        raise
    return bound
