"""The proxy's own listening sockets as the config says they will bind, and the allowlist rules that reach them.

``check-config`` refuses an allowlist entry that would let a client make the
proxy dial itself: its listeners (a loop), its admin service (drain and
reload from outside).  This is the config-time view, from listen addresses
as written; at run time ``addrguard.OwnSockets`` refuses such dials from the
ports really bound.  A wildcard bind (``:5432``, ``[::]:5432``) counts as
reachable on loopback and the unspecified address; a ``hosts:`` pin is
followed; other names are not resolved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import attrs

from egressproxy.config.allownames import is_loopback_name
from egressproxy.config.allowtext import join, or_mark
from egressproxy.modes.forward.rules import DestinationRule

IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address

_LOOPBACK_ADDRESSES = (ip_address("127.0.0.1"), ip_address("::1"))


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@attrs.frozen
class OwnSocket:
    """One of the proxy's listening sockets, as the config says it will bind."""

    #: How messages name it: ``listener 'direct'``, ``admin service``.
    what: str
    #: The listen address as written (``:5432``).
    text: str
    #: The IP literal it binds (``::`` for ``:5432``).
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.what} ({self.text})"

    @property
    def is_admin(self) -> bool:
        return self.what.startswith("admin")

    def reached_from(self) -> tuple[IPNetwork, ...]:
        """The destination networks that connect to this socket.

        A socket bound to a specific address is reached at that address (and
        at the unspecified address, for a loopback one: Linux sends a connect
        to 0.0.0.0 or ``::`` to loopback).  A wildcard bind is reached on
        every loopback address and the unspecified one, of both families
        for ``::`` (dual-stack), of IPv4 only for 0.0.0.0.  The machine's
        other addresses cannot be known here.
        """
        ip = ip_address(self.host)
        if ip.is_unspecified:
            nets = [ip_network("127.0.0.0/8"), ip_network("0.0.0.0/32")]
            if ip.version == 6:
                nets += [ip_network("::1/128"), ip_network("::/128")]
            return tuple(nets)
        nets = [ip_network(ip)]
        if ip.is_loopback:
            nets.append(ip_network("0.0.0.0/32" if ip.version == 4 else "::/128"))
        return tuple(nets)

    def reached_by(self, address: IPAddress, port: int | None) -> bool:
        """Whether dialling ``address`` on ``port`` (None: any port) lands here."""
        if port is not None and port != self.port:
            return False
        address = _unmapped(address)
        return any(
            net.version == address.version and address in net for net in self.reached_from()
        )


def _rule_addresses(
    rule: DestinationRule, hosts: Mapping[str, str]
) -> tuple[IPAddress, ...] | None:
    """The addresses a name rule stands for, when they are known without DNS."""
    host = rule.host
    if host is None:
        return None
    if host.startswith("*."):
        suffix = host[2:]
        pinned = tuple(
            ip_address(address) for name, address in hosts.items() if name.endswith("." + suffix)
        )
        if is_loopback_name(suffix):
            return _LOOPBACK_ADDRESSES + pinned
        return pinned or None
    if host in hosts:
        return (ip_address(hosts[host]),)
    if is_loopback_name(host):
        return _LOOPBACK_ADDRESSES
    return None


def own_socket_hits(
    rule: DestinationRule,
    own_sockets: Sequence[OwnSocket],
    hosts: Mapping[str, str] | None = None,
) -> list[OwnSocket]:
    """The proxy's own sockets an allowlist rule admits."""
    hits: list[OwnSocket] = []
    for socket in own_sockets:
        if rule.port is not None and rule.port != socket.port:
            continue
        if rule.network is not None:
            reached = any(
                net.version == rule.network.version and rule.network.overlaps(net)
                for net in socket.reached_from()
            )
        else:
            addresses = _rule_addresses(rule, hosts or {}) or ()
            reached = any(socket.reached_by(address, None) for address in addresses)
        if reached:
            hits.append(socket)
    return hits


def own_socket_problem(
    text: str, rule: DestinationRule, own_sockets: Sequence[OwnSocket], hosts: Mapping[str, str]
) -> str | None:
    """Why the entry ``text`` (parsed as ``rule``) would let a client reach the proxy itself, or None."""
    hits = own_socket_hits(rule, own_sockets, hosts)
    if not hits:
        return None
    named = join([str(socket) for socket in hits])
    if any(socket.is_admin for socket in hits):
        harm = (
            "use the admin API (drain, reload) from outside, or make the proxy "
            "connect to itself in a loop"
        )
    else:
        harm = "make the proxy connect to itself in a loop"
    return (
        f"\"{text}\" admits this proxy's own {named}: a client could {harm}; "
        f"narrow it so it cannot reach the proxy, {or_mark(text)}"
    )
