"""allowlint's judgement of one network entry: does it reach the proxy's internal ranges?

An allowlist entry that is an IP literal or network is checked against the
internal ranges of ``internal.py``, less the listener's ``allow_addresses``
exceptions.  Ranges of this host and its link (loopback, link-local with the
cloud metadata address, multicast) and the translation ranges are always
flagged; a private network only when the entry admits every port;
documentation ranges never.  An IPv4-mapped IPv6 entry is flagged for what
it hides.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network, collapse_addresses, ip_network

from egressproxy.config.allowtext import join, mark, or_mark
from egressproxy.upstream.internal import INTERNAL_RANGES, InternalRange
from egressproxy.modes.forward.rules import DestinationRule

IPNetwork = IPv4Network | IPv6Network


def _internal_hits(
    network: IPNetwork, allow: Sequence[IPNetwork]
) -> list[InternalRange]:
    """The internal ranges ``network`` reaches outside ``allow``, narrowest description first.

    If the network lies inside a range, that (narrowest) range alone; else
    the widest ranges inside it.
    """
    allowed = list(collapse_addresses(n for n in allow if n.version == network.version))
    hits: list[InternalRange] = []
    for candidate in INTERNAL_RANGES:
        other = candidate.network
        if other.version != network.version or not network.overlaps(other):
            continue
        part = network if network.subnet_of(other) else other  # type: ignore[arg-type]
        if any(part.subnet_of(a) for a in allowed):  # type: ignore[arg-type]
            continue
        hits.append(candidate)
    containing = [h for h in hits if network.subnet_of(h.network)]  # type: ignore[arg-type]
    if containing:
        return [max(containing, key=lambda h: h.network.prefixlen)]
    return [
        h for h in hits
        if not any(
            o is not h and h.network.subnet_of(o.network) for o in hits  # type: ignore[arg-type]
        )
    ]


def flagged(hit: InternalRange, any_port: bool) -> bool:
    """Whether reaching ``hit`` is a finding: private ranges only on every port, documentation never."""
    if hit.scope == "documentation":
        return False
    if hit.scope == "private":
        return any_port
    return True


def describe(hit: InternalRange) -> str:
    """``10.0.0.0/8 (private, RFC 1918)``: how messages name a range."""
    return f"{hit.network} ({hit.name})"


def network_problem(text: str, rule: DestinationRule, allow: Sequence[IPNetwork]) -> str | None:
    """Why the network entry ``text`` (parsed as ``rule``) reaches internal addresses, or None."""
    network = rule.network
    assert network is not None
    any_port = rule.port is None
    hits = [h for h in _internal_hits(network, allow) if flagged(h, any_port)]
    if not hits:
        return None
    mapped_range = ip_network("::ffff:0:0/96")
    if network.version == 6 and network.subnet_of(mapped_range):  # type: ignore[arg-type]
        v4 = IPv4Network((int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96))
        v4_text = str(v4.network_address) if v4.prefixlen == 32 else str(v4)
        inner = [h for h in _internal_hits(v4, allow) if h.scope != "documentation"]
        where = f", in {join([describe(h) for h in inner])}" if inner else ""
        return (
            f'"{text}" is an IPv4-mapped IPv6 address, standing for {v4_text}'
            f"{where}: the proxy reads such destinations as IPv4, so the entry "
            f"never matches as written and hides what it admits; write {v4_text} "
            f"instead, or mark it intended with {mark([text])}"
        )
    inside = network.subnet_of(hits[0].network)  # type: ignore[arg-type]
    ranges = join([describe(h) for h in hits[:3]])
    if len(hits) > 3:
        ranges += f" and {len(hits) - 3} more internal ranges"
    verb = "is in" if inside else "includes"
    if all(h.scope == "private" for h in hits):
        return (
            f'"{text}" {verb} {ranges} and admits every port: the proxy would '
            f"let clients reach any internal service there; name the ports clients "
            f"need, list the range in allow_addresses if they should reach all of it, "
            f"{or_mark(text)}"
        )
    return (
        f'"{text}" {verb} {ranges}: the proxy would let clients reach '
        f"internal addresses; remove it, list the range in allow_addresses if they "
        f"should, {or_mark(text)}"
    )
