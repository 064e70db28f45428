"""What check-config says about forward-proxy allowlists that are open in all but name.

An ``allow_destinations`` list is the whole of a forward proxy's policy, and a
list can be valid entry by entry and still open: two ``/1`` networks are the
whole IPv4 internet, ``*.co.uk`` is every British company, ``localhost:*`` is
the proxy's own admin port.  This module owns those judgements, as pure
functions over the parsed rules and the text they were written as (no I/O,
no Twisted; the config loader turns the results into ``FILE:LINE`` errors):

- network entries that alone or together cover more than a /8 of IPv4 or a
  /32 of IPv6 (the union of the list's networks is measured, per family, and
  the widest entries that make it too big are named);
- a wildcard directly under a public suffix of the Public Suffix List, ICANN
  and private sections both (``*.co.uk``, ``*.fly.dev``, ``*.github.io``),
  or one that spans public suffixes beneath it (``*.amazonaws.com`` holds
  ``s3.amazonaws.com``): other people register names there;
- wildcards under DNS services that answer any name with the IP address
  written in it (``*.nip.io``, ``*.sslip.io``; nip.io is *not* on the Public
  Suffix List, so these are listed here), and exact names there that spell
  an internal address;
- internal names: ``localhost`` and names under it, names that public DNS
  resolves to loopback (``*.localtest.me``, ``lvh.me``), and private-use
  names (``.internal``, Fly's private DNS; ``.flycast``; ``.local``;
  ``home.arpa``; ``.lan``, ``.home``, ``.corp``, ``.intranet``);
- IP literals and networks in the internal ranges of ``internal.py``,
  except where the listener's ``allow_addresses`` makes an exception;
- entries that would admit one of the proxy's own listening sockets (its
  listeners, admin and metrics services), a wildcard bind (``:5432``,
  ``[::]:5432``) counting as reachable on loopback and the unspecified
  address;
- ``allow_addresses`` entries that alone or together exempt more than a /8
  or a /32 from the internal-address check.

How strict: ranges and names of this host and its link (loopback,
link-local with the cloud metadata address, multicast, ``localhost``) and the
translation ranges (IPv4-mapped, NAT64, ...) are always flagged.  A *private*
network (RFC 1918, CGNAT, unique-local) or private-use name is flagged when
the entry admits every port (``:*``) or is a wildcard name; one service of a
private network (``10.1.2.0/24:443``, ``db.internal:5432``) is a deliberate
choice and is not.  Documentation ranges are not flagged (nothing answers
there).  Names are judged by their shape, not resolved, so
``allow_addresses`` exempts IP entries only; a ``hosts:`` pin is followed for
the own-socket check.

Every finding is an error unless the listener's ``accept_risk`` lists the
entry as written; an ``accept_risk`` entry that marks nothing risky is an
error too (:func:`check_listener`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    collapse_addresses,
    ip_address,
    ip_network,
)

import attrs

from egressproxy.internal import INTERNAL_RANGES, InternalRange
from egressproxy.modes.forward.rules import DestinationRule

__all__ = [
    "Entry",
    "Finding",
    "OwnSocket",
    "Report",
    "check_listener",
    "lint_allow_addresses",
    "lint_allowlist",
    "own_socket_hits",
]

IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address

#: The widest an allowlist (or allow_addresses) may reach per family: a /8, a /32.
LIMITS = {4: 2**24, 6: 2**96}
_LIMIT_TEXT = {4: "a /8 (16,777,216)", 6: "a /32 (2^96)"}
_FAMILY_SIZE = {4: 2**32, 6: 2**128}

#: DNS services that answer ``A.B.C.D.service`` (and dashed forms) with A.B.C.D.
IP_ECHO_DOMAINS = ("nip.io", "sslip.io", "xip.io", "traefik.me")
#: Public names that resolve to 127.0.0.1, subdomains included.
LOOPBACK_DOMAINS = ("localtest.me", "lvh.me", "vcap.me")
#: Private-use names: each suffix and what it is.
PRIVATE_NAME_SUFFIXES = (
    ("internal", ".internal is private DNS; on Fly it names the organisation's apps and Machines"),
    ("flycast", ".flycast is Fly's private load-balanced address of an app"),
    ("local", ".local is multicast DNS on the local link (RFC 6762)"),
    ("home.arpa", "home.arpa is for home networks (RFC 8375)"),
    ("lan", ".lan is a private-use name, not a public domain"),
    ("home", ".home is a private-use name, not a public domain"),
    ("corp", ".corp is a private-use name, not a public domain"),
    ("intranet", ".intranet is a private-use name, not a public domain"),
)

_LOOPBACK_ADDRESSES = (ip_address("127.0.0.1"), ip_address("::1"))
_EMBEDDED_V4 = re.compile(r"(?:^|[.-])(\d{1,3})[.-](\d{1,3})[.-](\d{1,3})[.-](\d{1,3})(?:$|[.-])")


@attrs.frozen
class Entry:
    """One allowlist entry: the text written in the file and the rule it became."""

    text: str
    rule: DestinationRule


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


@attrs.frozen
class Finding:
    """One problem: where (the caller's key for the list, then the index) and what."""

    key: Hashable
    index: int
    entry: str
    message: str


@attrs.frozen
class Report:
    """The result of :func:`check_listener`: errors, and the findings ``accept_risk`` marked."""

    errors: tuple[Finding, ...]
    accepted: tuple[Finding, ...]


# -- helpers -------------------------------------------------------------------


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _mark(texts: Sequence[str]) -> str:
    quoted = ", ".join(f'"{text}"' for text in texts)
    return f"accept_risk: [{quoted}]"


def _or_mark(text: str) -> str:
    return f"or mark it intended with {_mark([text])}"


def _under(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


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
        listed = _join([f'"{other}"' for other in others])
        subject = f'"{text}" with {listed} {verb}'
    else:
        subject = f'"{text}" with {len(others)} other entries {verb}'
    return (
        f"{subject} {_count(total, version)} IPv{version} addresses{every}{after}, "
        f"more than {_LIMIT_TEXT[version]}"
    )


def _marks_for(text: str, others: Sequence[str], texts_in_order: Sequence[str]) -> str:
    if not others:
        return _or_mark(text)
    if len(others) <= 3:
        return f"or mark them intended with {_mark(texts_in_order)}"
    return "or mark each of them intended with accept_risk"


# -- the Public Suffix List ------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _psl():  # type: ignore[no-untyped-def]
    """The Public Suffix List bundled with ``publicsuffixlist`` (read once, never fetched)."""
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList(accept_unknown=False)


@functools.lru_cache(maxsize=1)
def _suffix_parents() -> Mapping[str, str]:
    """Every name that has a public suffix beneath it, with one such suffix.

    ``amazonaws.com`` -> ``s3.amazonaws.com``: a wildcard over the parent
    spans names that strangers register.  Read from the same bundled file.
    """
    from publicsuffixlist import PSLFILE, encode_idn

    parents: dict[str, str] = {}
    with open(PSLFILE, encoding="utf-8") as f:
        for line in f:
            rule = line.strip().split(" ")[0].lower()
            if not rule or rule.startswith("//") or rule.startswith("!"):
                continue
            rule = rule.removeprefix("*.")
            try:
                rule = encode_idn(rule)
            except UnicodeError:
                continue
            labels = rule.split(".")
            for start in range(1, len(labels)):
                parent = ".".join(labels[start:])
                best = parents.get(parent)
                if best is None or (len(rule), rule) < (len(best), best):
                    parents[parent] = rule
    return parents


def public_suffix_problem(suffix: str) -> str | None:
    """Why ``*.suffix`` is too wide by the Public Suffix List, or None."""
    if _psl().publicsuffix(suffix) == suffix:
        return (
            f"a wildcard directly under the public suffix {suffix}: it admits every "
            f"site registered there"
        )
    beneath = _suffix_parents().get(suffix)
    if beneath is not None:
        return (
            f"a wildcard over public suffixes such as {beneath}: it admits sites "
            f"that anyone can register there"
        )
    return None


# -- one entry -------------------------------------------------------------------


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


def _flagged(hit: InternalRange, any_port: bool) -> bool:
    if hit.scope == "documentation":
        return False
    if hit.scope == "private":
        return any_port
    return True


def _describe(hit: InternalRange) -> str:
    return f"{hit.network} ({hit.name})"


def _network_problem(entry: Entry, allow: Sequence[IPNetwork]) -> str | None:
    rule = entry.rule
    network = rule.network
    assert network is not None
    any_port = rule.port is None
    hits = [h for h in _internal_hits(network, allow) if _flagged(h, any_port)]
    if not hits:
        return None
    mapped_range = ip_network("::ffff:0:0/96")
    if network.version == 6 and network.subnet_of(mapped_range):  # type: ignore[arg-type]
        v4 = IPv4Network((int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96))
        v4_text = str(v4.network_address) if v4.prefixlen == 32 else str(v4)
        inner = [h for h in _internal_hits(v4, allow) if h.scope != "documentation"]
        where = f", in {_join([_describe(h) for h in inner])}" if inner else ""
        return (
            f'"{entry.text}" is an IPv4-mapped IPv6 address, standing for {v4_text}'
            f"{where}: the proxy reads such destinations as IPv4, so the entry "
            f"never matches as written and hides what it admits; write {v4_text} "
            f"instead, or mark it intended with {_mark([entry.text])}"
        )
    inside = network.subnet_of(hits[0].network)  # type: ignore[arg-type]
    ranges = _join([_describe(h) for h in hits[:3]])
    if len(hits) > 3:
        ranges += f" and {len(hits) - 3} more internal ranges"
    verb = "is in" if inside else "includes"
    if all(h.scope == "private" for h in hits):
        return (
            f'"{entry.text}" {verb} {ranges} and admits every port: the proxy would '
            f"let clients reach any internal service there; name the ports clients "
            f"need, list the range in allow_addresses if they should reach all of it, "
            f"{_or_mark(entry.text)}"
        )
    return (
        f'"{entry.text}" {verb} {ranges}: the proxy would let clients reach '
        f"internal addresses; remove it, list the range in allow_addresses if they "
        f"should, {_or_mark(entry.text)}"
    )


def _private_name(name: str) -> str | None:
    for suffix, why in PRIVATE_NAME_SUFFIXES:
        if _under(name, suffix):
            return why
    return None


def _embedded_internal(name: str, service: str) -> InternalRange | None:
    """The internal range of the IPv4 address spelled in ``name`` before ``service``, if any."""
    prefix = name[: -len(service)].rstrip(".")
    for match in _EMBEDDED_V4.finditer(prefix):
        octets = [int(part) for part in match.groups()]
        if all(o <= 255 for o in octets):
            address = IPv4Address(".".join(map(str, octets)))
            for candidate in sorted(
                INTERNAL_RANGES, key=lambda r: -r.network.prefixlen
            ):
                if candidate.network.version == 4 and address in candidate.network:
                    return candidate
    return None


def _name_problems(entry: Entry) -> list[str]:
    rule = entry.rule
    host = rule.host
    assert host is not None
    wildcard = host.startswith("*.")
    name = host[2:] if wildcard else host
    any_port = rule.port is None
    text = entry.text
    problems: list[str] = []
    if _under(name, "localhost"):
        problems.append(
            f'"{text}" names this machine: localhost and the names under it resolve '
            f"to loopback (RFC 6761), where the proxy's own ports and other local "
            f"services listen; list the hosts clients need, {_or_mark(text)}"
        )
    for service in LOOPBACK_DOMAINS:
        if _under(name, service):
            problems.append(
                f'"{text}" names this machine: public DNS answers {service} and every '
                f"name under it with 127.0.0.1; list the hosts clients need, "
                f"{_or_mark(text)}"
            )
    why = _private_name(name)
    if why is not None and (wildcard or any_port):
        problems.append(
            f'"{text}" is an internal name ({why}): the proxy would let clients '
            f"reach internal services{' on every port' if any_port else ''}; list "
            f"the hosts and ports clients need, {_or_mark(text)}"
        )
    for service in IP_ECHO_DOMAINS:
        if not _under(name, service):
            continue
        if wildcard:
            problems.append(
                f'"{text}" is a wildcard under {service}, a DNS service that answers '
                f"every name with the IP address written in it "
                f"(10.0.0.1.{service} is 10.0.0.1): it admits every address, internal "
                f"ones included; list the hosts clients need, {_or_mark(text)}"
            )
        else:
            hit = _embedded_internal(name, service)
            if hit is not None and _flagged(hit, any_port):
                problems.append(
                    f'"{text}" resolves to an address in {_describe(hit)} ({service} '
                    f"answers with the IP address written in the name): the proxy "
                    f"would let clients reach internal addresses; {_or_mark(text)}"
                )
        break
    if wildcard and not problems:
        psl = public_suffix_problem(name)
        if psl is not None:
            problems.append(
                f'"{text}" is {psl}; list the hosts you need, {_or_mark(text)}'
            )
    return problems


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
        if _under(suffix, "localhost") or any(_under(suffix, d) for d in LOOPBACK_DOMAINS):
            return _LOOPBACK_ADDRESSES + pinned
        return pinned or None
    if host in hosts:
        return (ip_address(hosts[host]),)
    if _under(host, "localhost") or any(_under(host, d) for d in LOOPBACK_DOMAINS):
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


def _own_socket_problem(
    entry: Entry, own_sockets: Sequence[OwnSocket], hosts: Mapping[str, str]
) -> str | None:
    hits = own_socket_hits(entry.rule, own_sockets, hosts)
    if not hits:
        return None
    named = _join([str(socket) for socket in hits])
    if any(socket.is_admin for socket in hits):
        harm = (
            "use the admin API (drain, reload) from outside, or make the proxy "
            "connect to itself in a loop"
        )
    else:
        harm = "make the proxy connect to itself in a loop"
    return (
        f"\"{entry.text}\" admits this proxy's own {named}: a client could {harm}; "
        f"narrow it so it cannot reach the proxy, {_or_mark(entry.text)}"
    )


# -- whole lists -------------------------------------------------------------------


def lint_allowlist(
    entries: Sequence[Entry],
    *,
    allow_addresses: Sequence[IPNetwork] = (),
    own_sockets: Sequence[OwnSocket] = (),
    hosts: Mapping[str, str] | None = None,
) -> list[tuple[int, str]]:
    """Every finding for one allowlist, as ``(index, message)`` in list order.

    ``allow_addresses`` are the listener's exceptions to the internal ranges;
    ``own_sockets`` the proxy's listening sockets; ``hosts`` the top-level
    ``hosts:`` pins (lower-case name -> IP literal).
    """
    pins = dict(hosts or {})
    findings: list[tuple[int, str]] = []
    # A network too wide is reported as that; its internal ranges go without saying.
    too_wide: set[int] = set()
    for version in (4, 6):
        networks = [
            (index, entry.rule.network)
            for index, entry in enumerate(entries)
            if entry.rule.network is not None and entry.rule.network.version == version
        ]
        wide, total = _wide_entries(networks, version)
        too_wide.update(wide)
        for index in wide:
            text = entries[index].text
            others = [entries[i].text for i in wide if i != index]
            start = _too_wide_message(text, others, total, version, "covers")
            findings.append((
                index,
                f"{start}: an allowlist that wide is an open proxy in all but name; list "
                f"the networks clients need, "
                f"{_marks_for(text, others, [entries[i].text for i in wide])}",
            ))
    for index, entry in enumerate(entries):
        if entry.rule.network is not None:
            if index in too_wide:
                problem = None
            else:
                problem = _network_problem(entry, allow_addresses)
            if problem is not None:
                findings.append((index, problem))
        else:
            findings.extend((index, problem) for problem in _name_problems(entry))
        own = _own_socket_problem(entry, own_sockets, pins)
        if own is not None:
            findings.append((index, own))
    findings.sort(key=lambda finding: finding[0])
    return findings


def lint_allow_addresses(entries: Sequence[tuple[str, IPNetwork]]) -> list[tuple[int, str]]:
    """Findings for ``allow_addresses`` (text as written, network): exceptions that are too wide."""
    findings: list[tuple[int, str]] = []
    for version in (4, 6):
        networks = [
            (index, network) for index, (_, network) in enumerate(entries)
            if network.version == version
        ]
        wide, total = _wide_entries(networks, version)
        for index in wide:
            text = entries[index][0]
            others = [entries[i][0] for i in wide if i != index]
            start = _too_wide_message(
                text, others, total, version, "exempts", " from the internal-address check"
            )
            findings.append((
                index,
                f"{start}: an exception that wide all but turns the check off; list "
                f"the ranges clients need, "
                f"{_marks_for(text, others, [entries[i][0] for i in wide])}",
            ))
    findings.sort(key=lambda finding: finding[0])
    return findings


def check_listener(
    lists: Sequence[tuple[Hashable, Sequence[Entry]]],
    *,
    allow_addresses: Sequence[tuple[str, IPNetwork]] = (),
    accept_risk: Sequence[str] = (),
    own_sockets: Sequence[OwnSocket] = (),
    hosts: Mapping[str, str] | None = None,
    allow_addresses_key: Hashable = "allow_addresses",
    accept_risk_key: Hashable = "accept_risk",
) -> Report:
    """Judge one listener: its allowlists, its ``allow_addresses`` and its ``accept_risk``.

    ``lists`` holds each allowlist with the caller's key for it (the
    listener's own, and each user's that replaces it); findings carry the key
    and the entry's index.  A finding whose entry text is in ``accept_risk``
    is accepted, not an error; an ``accept_risk`` entry that accepts nothing
    is an error, so stale markings do not linger.
    """
    networks = [network for _, network in allow_addresses]
    findings: list[Finding] = []
    for key, entries in lists:
        for index, message in lint_allowlist(
            entries, allow_addresses=networks, own_sockets=own_sockets, hosts=hosts
        ):
            findings.append(Finding(key, index, entries[index].text, message))
    for index, message in lint_allow_addresses(allow_addresses):
        findings.append(
            Finding(allow_addresses_key, index, allow_addresses[index][0], message)
        )
    marked = set(accept_risk)
    errors = [finding for finding in findings if finding.entry not in marked]
    accepted = [finding for finding in findings if finding.entry in marked]
    used = {finding.entry for finding in accepted}
    for index, text in enumerate(accept_risk):
        if text not in used:
            errors.append(Finding(
                accept_risk_key, index, text,
                f'accept_risk entry "{text}" matches no risky allowlist entry; remove it',
            ))
    return Report(errors=tuple(errors), accepted=tuple(accepted))
