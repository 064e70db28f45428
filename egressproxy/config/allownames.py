"""allowlint's judgement of one name entry, by its shape (names are never resolved here).

Flagged: ``localhost`` and names under it; public names that resolve to
loopback (``*.localtest.me``, ``lvh.me``); private-use names (``.internal``,
Fly's private DNS; ``.flycast``; ``.local``; ``home.arpa``; ``.lan``,
``.home``, ``.corp``, ``.intranet``) as a wildcard or on every port;
wildcards under DNS services that answer any name with the IP address
written in it (``*.nip.io``; nip.io is *not* on the Public Suffix List, so
these are listed here), and exact names there that spell an internal
address; a wildcard directly under a public suffix of the Public Suffix
List, ICANN and private sections both (``*.co.uk``, ``*.fly.dev``), or one
that spans public suffixes beneath it (``*.amazonaws.com`` holds
``s3.amazonaws.com``): other people register names there.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from ipaddress import IPv4Address

from egressproxy.config.allownets import describe, flagged
from egressproxy.config.allowtext import or_mark
from egressproxy.upstream.internal import INTERNAL_RANGES, InternalRange
from egressproxy.modes.forward.rules import DestinationRule

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

_EMBEDDED_V4 = re.compile(r"(?:^|[.-])(\d{1,3})[.-](\d{1,3})[.-](\d{1,3})[.-](\d{1,3})(?:$|[.-])")


def under(name: str, suffix: str) -> bool:
    """Whether ``name`` is ``suffix`` or a name beneath it."""
    return name == suffix or name.endswith("." + suffix)


def is_loopback_name(name: str) -> bool:
    """Whether ``name`` resolves to loopback without asking DNS: ``localhost``, ``lvh.me`` and names under them."""
    return under(name, "localhost") or any(under(name, d) for d in LOOPBACK_DOMAINS)


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


# -- one name ----------------------------------------------------------------------


def _private_name(name: str) -> str | None:
    for suffix, why in PRIVATE_NAME_SUFFIXES:
        if under(name, suffix):
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


def name_problems(text: str, rule: DestinationRule) -> list[str]:
    """Every reason the name entry ``text`` (parsed as ``rule``) is risky, in a fixed order."""
    host = rule.host
    assert host is not None
    wildcard = host.startswith("*.")
    name = host[2:] if wildcard else host
    any_port = rule.port is None
    problems: list[str] = []
    if under(name, "localhost"):
        problems.append(
            f'"{text}" names this machine: localhost and the names under it resolve '
            f"to loopback (RFC 6761), where the proxy's own ports and other local "
            f"services listen; list the hosts clients need, {or_mark(text)}"
        )
    for service in LOOPBACK_DOMAINS:
        if under(name, service):
            problems.append(
                f'"{text}" names this machine: public DNS answers {service} and every '
                f"name under it with 127.0.0.1; list the hosts clients need, "
                f"{or_mark(text)}"
            )
    why = _private_name(name)
    if why is not None and (wildcard or any_port):
        problems.append(
            f'"{text}" is an internal name ({why}): the proxy would let clients '
            f"reach internal services{' on every port' if any_port else ''}; list "
            f"the hosts and ports clients need, {or_mark(text)}"
        )
    for service in IP_ECHO_DOMAINS:
        if not under(name, service):
            continue
        if wildcard:
            problems.append(
                f'"{text}" is a wildcard under {service}, a DNS service that answers '
                f"every name with the IP address written in it "
                f"(10.0.0.1.{service} is 10.0.0.1): it admits every address, internal "
                f"ones included; list the hosts clients need, {or_mark(text)}"
            )
        else:
            hit = _embedded_internal(name, service)
            if hit is not None and flagged(hit, any_port):
                problems.append(
                    f'"{text}" resolves to an address in {describe(hit)} ({service} '
                    f"answers with the IP address written in the name): the proxy "
                    f"would let clients reach internal addresses; {or_mark(text)}"
                )
        break
    if wildcard and not problems:
        psl = public_suffix_problem(name)
        if psl is not None:
            problems.append(
                f'"{text}" is {psl}; list the hosts you need, {or_mark(text)}'
            )
    return problems
