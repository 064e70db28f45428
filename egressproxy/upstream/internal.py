"""The address ranges an egress proxy must not dial on a client's behalf.

This module owns one list, :data:`INTERNAL_RANGES` (and its networks alone,
:data:`INTERNAL_NETWORKS`): every IPv4 and IPv6 range that is not an
ordinary, globally routed destination.  The run-time address check refuses
them unless a listener's ``allow_addresses`` makes an exception, and
``allowlint`` (what ``check-config`` says about allowlists) names them.  It is
pure: ``ipaddress`` only, no I/O, no Twisted.

Each range has a ``scope``, which says why it is on the list:

``local``
    This host or its link: loopback, unspecified (connecting to 0.0.0.0 or
    ``::`` reaches the local host on Linux), link-local (cloud metadata
    services answer at 169.254.169.254), multicast and broadcast.  Never a
    legitimate egress destination.
``private``
    A site's own network: RFC 1918, CGNAT shared space (100.64.0.0/10),
    unique-local IPv6 (fc00::/7, which holds Fly's private network
    fdaa::/16), deprecated site-local fec0::/10 and the benchmarking range
    198.18.0.0/15 (often used as private space).
``special``
    Ranges that translate, tunnel or embed another address, or are reserved:
    IPv4-mapped (``::ffff:127.0.0.1`` is loopback in disguise) and
    IPv4-compatible IPv6, NAT64 (well-known and local-use prefixes), 6to4
    (2002::/16 and its relay anycast 192.88.99.0/24), Teredo (2001::/32),
    the discard-only prefix 100::/64, IETF protocol assignments
    192.0.0.0/24 and the reserved 240.0.0.0/4.  Teredo and 6to4 are
    included (the issue asked whether to): both embed an IPv4 address, so a
    host with a tunnel interface could be steered to an internal IPv4 address
    through them, both are deprecated (RFC 7526 for 6to4) and no service an
    egress proxy fronts lives there.
``documentation``
    192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32 and
    3fff::/20 (RFC 9637): nothing answers there, so they are refused at run
    time (a destination there is a mistake) but an allowlist naming them
    exposes nothing.

Left out, because they are globally routed: AS112 (192.31.196.0/24,
192.175.48.0/24), AMT (192.52.193.0/24, 2001:3::/32) and the rest of the
IETF's 2001::/23 besides Teredo.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

import attrs

__all__ = [
    "INTERNAL_NETWORKS",
    "INTERNAL_RANGES",
    "IPAddress",
    "IPNetwork",
    "InternalRange",
    "internal_class",
    "internal_range",
    "is_internal",
]

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


@attrs.frozen
class InternalRange:
    """One refused range: its network, what it is, and why it is refused."""

    network: IPNetwork
    #: A short class for "a LABEL address": ``loopback``, ``private``.
    label: str
    #: What the range is, for longer messages: ``private, RFC 1918``.
    name: str
    #: ``local``, ``private``, ``special`` or ``documentation`` (module docstring).
    scope: str


def _range(cidr: str, label: str, name: str, scope: str) -> InternalRange:
    return InternalRange(ip_network(cidr), label, name, scope)


#: Every internal range, IPv4 then IPv6. Ranges may nest (255.255.255.255/32
#: in 240.0.0.0/4, ::1 in ::/96); :func:`internal_range` picks the narrowest.
INTERNAL_RANGES: tuple[InternalRange, ...] = (
    # IPv4
    _range("0.0.0.0/8", "unspecified", "unspecified, 'this network'", "local"),
    _range("127.0.0.0/8", "loopback", "loopback", "local"),
    _range("169.254.0.0/16", "link-local", "link-local, where cloud metadata services answer", "local"),
    _range("224.0.0.0/4", "multicast", "multicast", "local"),
    _range("255.255.255.255/32", "broadcast", "broadcast", "local"),
    _range("10.0.0.0/8", "private", "private, RFC 1918", "private"),
    _range("172.16.0.0/12", "private", "private, RFC 1918", "private"),
    _range("192.168.0.0/16", "private", "private, RFC 1918", "private"),
    _range("100.64.0.0/10", "shared (CGNAT)", "CGNAT shared address space", "private"),
    _range("198.18.0.0/15", "benchmarking", "benchmarking", "private"),
    _range("192.0.0.0/24", "reserved", "IETF protocol assignments", "special"),
    _range("192.88.99.0/24", "6to4 relay", "6to4 relay anycast", "special"),
    _range("240.0.0.0/4", "reserved", "reserved", "special"),
    _range("192.0.2.0/24", "documentation", "documentation", "documentation"),
    _range("198.51.100.0/24", "documentation", "documentation", "documentation"),
    _range("203.0.113.0/24", "documentation", "documentation", "documentation"),
    # IPv6
    _range("::/128", "unspecified", "unspecified", "local"),
    _range("::1/128", "loopback", "loopback", "local"),
    _range("fe80::/10", "link-local", "link-local", "local"),
    _range("ff00::/8", "multicast", "multicast", "local"),
    _range("fc00::/7", "unique-local", "unique-local, which holds Fly's private network fdaa::/16", "private"),
    _range("fec0::/10", "site-local", "site-local (deprecated)", "private"),
    _range("::ffff:0:0/96", "IPv4-mapped", "IPv4-mapped", "special"),
    _range("::/96", "IPv4-compatible", "IPv4-compatible (deprecated)", "special"),
    _range("64:ff9b::/96", "NAT64", "NAT64", "special"),
    _range("64:ff9b:1::/48", "NAT64", "local-use NAT64", "special"),
    _range("100::/64", "discard-only", "discard-only", "special"),
    _range("2001::/32", "Teredo", "Teredo", "special"),
    _range("2002::/16", "6to4", "6to4", "special"),
    _range("2001:db8::/32", "documentation", "documentation", "documentation"),
    _range("3fff::/20", "documentation", "documentation", "documentation"),
)

#: The networks of :data:`INTERNAL_RANGES`, for checks that need no names.
INTERNAL_NETWORKS: tuple[IPNetwork, ...] = tuple(r.network for r in INTERNAL_RANGES)


def internal_range(address: IPAddress) -> InternalRange | None:
    """The narrowest internal range holding ``address``, or None for a public one.

    An IPv4-mapped IPv6 address is in ``::ffff:0:0/96`` and is reported as
    that; callers that want the IPv4 range it stands for map it first.
    """
    found: InternalRange | None = None
    for candidate in INTERNAL_RANGES:
        if candidate.network.version != address.version or address not in candidate.network:
            continue
        if found is None or candidate.network.prefixlen > found.network.prefixlen:
            found = candidate
    return found


def internal_class(address: IPAddress) -> str | None:
    """The short class of ``address`` (``loopback``, ``private``, ...), or None for a public one.

    For "resolves to a LABEL address"; IPv4-mapped addresses are reported
    as such (callers that want the IPv4 class unmap them first).
    """
    found = internal_range(address)
    return None if found is None else found.label


def is_internal(address: IPAddress) -> bool:
    """Whether ``address`` is in any internal range (IPv4-mapped ones always are)."""
    return any(
        network.version == address.version and address in network
        for network in INTERNAL_NETWORKS
    )
