"""Turning Twisted peer addresses into what logs and policies need.

A dual-stack listener (one IPv6 socket that also accepts IPv4) reports IPv4
clients as IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``).  Operators write
``127.0.0.0/8`` in ``allow_sources`` and expect ``127.0.0.1:5000`` in the
access log, so both go through :func:`peer_ip`, which unmaps them.
"""

from __future__ import annotations

import functools
import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def peer_ip(address: IAddress) -> IPAddress | None:
    """The peer's IP address, IPv4-mapped IPv6 unmapped; None for non-IP peers."""
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return None
    return _ip_of(address.host)


#: How many peer addresses :func:`_ip_of` remembers.
PARSED_HOSTS = 4096


@functools.lru_cache(maxsize=PARSED_HOSTS)
def _ip_of(host: str) -> IPAddress | None:
    """A peer host string as an IP address (unmapped), or None; remembered.

    Every new connection asks for its peer's address three times (source
    check, per-source count, access line), and ``ipaddress`` parsing is a
    noticeable part of a short connection's cost; clients mostly come back
    from the same few addresses, and the answers are immutable.  Bounded, so
    a client rotating its source address only churns it.
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop a zone index such as %eth0
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def format_host_port(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 literal."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def format_peer(address: IAddress) -> str:
    """The peer as the access log shows it: ``1.2.3.4:5``, ``[fdaa::3]:5``, or a path."""
    ip = peer_ip(address)
    if ip is not None:
        return format_host_port(_text_of(ip), address.port)  # type: ignore[attr-defined]
    if isinstance(address, UNIXAddress):
        name = address.name
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return name or "unix"
    return "-"


@functools.lru_cache(maxsize=PARSED_HOSTS)
def _text_of(ip: IPAddress) -> str:
    """An address as the access log writes it (remembered, as :func:`_ip_of`)."""
    return str(ip)


def source_allowed(ip: IPAddress | None, networks: tuple[IPNetwork, ...] | None) -> bool:
    """Whether a peer may use a listener: any peer when no list is configured.

    A peer with no IP (a unix socket) is allowed only when no list is set:
    a list of CIDRs says nothing about it, and refusing is the safe reading.
    """
    if networks is None:
        return True
    if ip is None:
        return False
    return any(ip in network for network in networks)
