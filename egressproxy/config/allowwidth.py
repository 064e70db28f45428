"""allowlint's width check: network entries that alone or together reach too far.

An allowlist of ``0.0.0.0/1`` and ``128.0.0.0/1`` is every IPv4 address, and
so is an ``allow_addresses`` list that exempts them from the internal-range
check.  The union of a list's networks is measured per family against a /8
of IPv4 or a /32 of IPv6, and the widest entries that make it too big are
named, so the message points at what to narrow.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from ipaddress import IPv4Network, IPv6Network, collapse_addresses

from egressproxy.config.allowtext import join, mark, or_mark

IPNetwork = IPv4Network | IPv6Network

#: The widest an allowlist (or allow_addresses) may reach per family: a /8, a /32.
LIMITS = {4: 2**24, 6: 2**96}
_LIMIT_TEXT = {4: "a /8 (16,777,216)", 6: "a /32 (2^96)"}
_FAMILY_SIZE = {4: 2**32, 6: 2**128}


def _size(networks: Iterable[IPNetwork]) -> int:
    return sum(net.num_addresses for net in collapse_addresses(networks))


def _wide_entries(
    networks: Sequence[tuple[int, IPNetwork]], version: int
) -> tuple[list[int], int]:
    """The indexes of the widest networks that make the union too big, and their union's size.

    Empty when the union of all ``networks`` (one family) is within the limit.
    Otherwise: every network too big alone, plus the widest ones taken in
    turn until together they are too big; smaller ones are left alone.
    """
    limit = LIMITS[version]
    if _size(net for _, net in networks) <= limit:
        return [], 0
    chosen: list[tuple[int, IPNetwork]] = [
        (index, net) for index, net in networks if net.num_addresses > limit
    ]
    if not chosen:
        by_size = sorted(networks, key=lambda item: (-item[1].num_addresses, item[0]))
        for index, net in by_size:
            chosen.append((index, net))
            if _size(n for _, n in chosen) > limit:
                break
    wide = {net for _, net in chosen}
    indexes = sorted(index for index, net in networks if net in wide)
    return indexes, _size(wide)


def _count(total: int, version: int) -> str:
    """An address count as people read it: 16,777,216 for IPv4, 2^96 for IPv6."""
    if version == 4:
        return f"{total:,}"
    if total & (total - 1) == 0:
        return f"2^{total.bit_length() - 1}"
    return f"more than 2^{total.bit_length() - 1}"


def _too_wide_message(
    text: str, others: Sequence[str], total: int, version: int, verb: str, after: str = ""
) -> str:
    """The start of a message: this entry (with ``others``) ``verb`` ``total`` addresses."""
    every = " (all of them)" if total == _FAMILY_SIZE[version] else ""
    if not others:
        subject = f'"{text}" {verb}'
    elif len(others) <= 3:
        listed = join([f'"{other}"' for other in others])
        subject = f'"{text}" with {listed} {verb}'
    else:
        subject = f'"{text}" with {len(others)} other entries {verb}'
    return (
        f"{subject} {_count(total, version)} IPv{version} addresses{every}{after}, "
        f"more than {_LIMIT_TEXT[version]}"
    )


def _marks_for(text: str, others: Sequence[str], texts_in_order: Sequence[str]) -> str:
    if not others:
        return or_mark(text)
    if len(others) <= 3:
        return f"or mark them intended with {mark(texts_in_order)}"
    return "or mark each of them intended with accept_risk"


def too_wide(
    entries: Sequence[tuple[str, IPNetwork | None]], verb: str, why: str, after: str = ""
) -> list[tuple[int, str]]:
    """``(index, message)`` for each entry among the widest that make the list too big.

    ``entries`` are ``(text as written, network)``, the network None for an
    entry that is not one (a name); IPv4 is judged first, then IPv6.  Each
    message reads: the entry (and its partners) ``verb`` N addresses
    ``after``, more than the limit: ``why``, then how to mark them intended.
    """
    findings: list[tuple[int, str]] = []
    for version in (4, 6):
        networks = [
            (index, network) for index, (_, network) in enumerate(entries)
            if network is not None and network.version == version
        ]
        wide, total = _wide_entries(networks, version)
        for index in wide:
            text = entries[index][0]
            others = [entries[i][0] for i in wide if i != index]
            start = _too_wide_message(text, others, total, version, verb, after)
            findings.append((
                index,
                f"{start}: {why}, {_marks_for(text, others, [entries[i][0] for i in wide])}",
            ))
    return findings
