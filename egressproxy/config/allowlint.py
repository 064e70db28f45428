"""What check-config says about forward-proxy allowlists that are open in all but name.

An ``allow_destinations`` list is the whole of a forward proxy's policy, and a
list can be valid entry by entry and still open: two ``/1`` networks are the
whole IPv4 internet, ``*.co.uk`` is every British company, ``localhost:*`` is
the proxy's own admin port.  This module judges one listener's lists and its
``accept_risk``; the judgements are pure functions over the parsed rules and
the text they were written as (no I/O, no Twisted; the config loader turns
the results into ``FILE:LINE`` errors), one module each:

- ``allowwidth.py``: network entries that alone or together cover more than
  a /8 of IPv4 or a /32 of IPv6, and ``allow_addresses`` entries that exempt
  that much from the internal-address check;
- ``allownets.py``: IP literals and networks in the internal ranges of
  ``internal.py``, except where the listener's ``allow_addresses`` makes an
  exception;
- ``allownames.py``: names by their shape (never resolved): ``localhost``,
  names that public DNS resolves to loopback, private-use names, IP-echo DNS
  services, wildcards at or over a public suffix of the Public Suffix List;
- ``ownsocket.py``: entries that would admit one of the proxy's own
  listening sockets (its listeners, admin and metrics services);
- ``allowtext.py``: the wording the messages share.

How strict: ranges and names of this host and its link (loopback,
link-local with the cloud metadata address, multicast, ``localhost``) and the
translation ranges (IPv4-mapped, NAT64, ...) are always flagged.  A *private*
network (RFC 1918, CGNAT, unique-local) or private-use name is flagged when
the entry admits every port (``:*``) or is a wildcard name; one service of a
private network (``10.1.2.0/24:443``, ``db.internal:5432``) is a deliberate
choice and is not.  Documentation ranges are not flagged (nothing answers
there).  ``allow_addresses`` exempts IP entries only; a ``hosts:`` pin is
followed for the own-socket check.

Every finding is an error unless the listener's ``accept_risk`` lists the
entry as written; an ``accept_risk`` entry that marks nothing risky is an
error too (:func:`check_listener`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from ipaddress import IPv4Network, IPv6Network

import attrs

from egressproxy.config.allownames import name_problems
from egressproxy.config.allownets import network_problem
from egressproxy.config.allowwidth import too_wide
from egressproxy.modes.forward.rules import DestinationRule
from egressproxy.config.ownsocket import OwnSocket, own_socket_problem

__all__ = [
    "Entry",
    "Finding",
    "Report",
    "check_listener",
    "lint_allow_addresses",
    "lint_allowlist",
]

IPNetwork = IPv4Network | IPv6Network


@attrs.frozen
class Entry:
    """One allowlist entry: the text written in the file and the rule it became."""

    text: str
    rule: DestinationRule


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
    findings = too_wide(
        [(entry.text, entry.rule.network) for entry in entries],
        "covers",
        "an allowlist that wide is an open proxy in all but name; list the networks clients need",
    )
    # A network too wide is reported as that; its internal ranges go without saying.
    wide = {index for index, _ in findings}
    for index, entry in enumerate(entries):
        if entry.rule.network is not None:
            if index in wide:
                problem = None
            else:
                problem = network_problem(entry.text, entry.rule, allow_addresses)
            if problem is not None:
                findings.append((index, problem))
        else:
            findings.extend((index, problem) for problem in name_problems(entry.text, entry.rule))
        own = own_socket_problem(entry.text, entry.rule, own_sockets, pins)
        if own is not None:
            findings.append((index, own))
    findings.sort(key=lambda finding: finding[0])
    return findings


def lint_allow_addresses(entries: Sequence[tuple[str, IPNetwork]]) -> list[tuple[int, str]]:
    """Findings for ``allow_addresses`` (text as written, network): exceptions that are too wide."""
    findings = too_wide(
        entries,
        "exempts",
        "an exception that wide all but turns the check off; list the ranges clients need",
        " from the internal-address check",
    )
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
