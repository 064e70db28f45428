"""Value parsers: text as written in the file in, model values out.

Each raises ``ValueError`` with a message fit to show the operator as it is;
the reader puts ``FILE:LINE: key.path:`` in front of it.  Durations, upstream
endpoints, host name patterns and listen addresses (with Twisted endpoint
descriptions) live here; values only one mode reads are parsed in that
mode's package.
"""

from __future__ import annotations

import math
import re
from ipaddress import IPv6Address, ip_address, ip_network

from twisted.internet.endpoints import serverFromString

from egressproxy.config.model import Address, ListenAddress
from egressproxy.config.syntax import (
    IPNetwork,
    hostname_problem,
    ip_literal,
    port,
    show,
    split_host_port,
)

__all__ = [
    "DURATION_HINT",
    "ENDPOINT_HINT",
    "LISTEN_HINT",
    "parse_duration",
    "parse_endpoint",
    "parse_listen",
    "parse_name_pattern",
    "parse_network",
]

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")
_PLAIN_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_HINT = (
    "expected a duration such as 250ms, 5s, 2m, 1h or 1m30s "
    "(a plain number means seconds)"
)
ENDPOINT_HINT = "expected HOST:PORT (e.g. db.example.com:5432 or [2001:db8::1]:5432)"
LISTEN_HINT = (
    "expected IP:PORT, [IPV6]:PORT, :PORT for all interfaces "
    "(e.g. :5432, [::]:5432, 127.0.0.1:5432) or a Twisted endpoint description "
    "(e.g. tcp6:5432)"
)
# Endpoint types Twisted ships. A listen value starting with one of these and a
# colon is an endpoint description; other prefixes are asked of Twisted itself
# (plugins may add types) only when the value could also be NAME:PORT.
_BUILTIN_ENDPOINT_TYPES = frozenset({"tcp", "tcp6", "unix", "ssl", "systemd"})


def parse_duration(value: object) -> float:
    """Turn ``250ms``, ``5s``, ``2m``, ``1h``, ``1m30s`` or a number into seconds.

    Plain numbers (and digit strings, which interpolation produces) are seconds.
    Negative, non-finite and unparseable values raise ``ValueError`` with a
    message fit to show the operator as it is.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{DURATION_HINT}, got {show(value)}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{DURATION_HINT}, got {show(value)}")
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {show(value)}")
        return float(value)
    text = value
    if text.startswith("-") and text[1:] and _is_duration_text(text[1:]):
        raise ValueError(f"a duration cannot be negative, got {text!r}")
    if _PLAIN_NUMBER.match(text):
        return float(text)
    if not _is_duration_text(text):
        raise ValueError(f"{DURATION_HINT}, got {text!r}")
    return sum(
        float(number) * _DURATION_UNITS[unit]
        for number, unit in _DURATION_PART.findall(text)
    )


def _is_duration_text(text: str) -> bool:
    """Whether ``text`` is a plain number or an unbroken run of NUMBER+UNIT parts."""
    if _PLAIN_NUMBER.match(text):
        return True
    position = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            return False
        position = match.end()
    return position > 0 and position == len(text)


def parse_endpoint(text: str) -> Address:
    """Parse one upstream ``host:port`` or ``[v6]:port`` into an :class:`Address`."""
    host, port_text, bracketed = split_host_port(text, ENDPOINT_HINT)
    if not bracketed and not host:
        raise ValueError(f"{ENDPOINT_HINT}, got {text!r}")
    if not bracketed and ip_literal(host) is None:
        problem = hostname_problem(host)
        if problem:
            raise ValueError(problem)
    number = port(port_text, 1, "after the host")
    literal = ip_literal(host)
    return Address(host=str(literal) if literal is not None else host, port=number)


def parse_name_pattern(text: str, what: str, hint: str) -> str:
    """Parse an exact DNS name or ``*.suffix`` into its lower-case form.

    ``what`` says what a lone ``*`` would match (``every server name``); the
    suffix of a wildcard needs two labels or more, so ``*.com`` is refused as
    too broad. IP literals are the caller's business.
    """
    name = text.lower()
    if name == "*":
        raise ValueError(
            f"'*' would match {what} and make this an open proxy; name the "
            f"hosts, or a *.SUFFIX such as *.example.com"
        )
    if name.startswith("*."):
        suffix = name[2:]
        if "*" in suffix:
            raise ValueError(f"{hint}, got {text!r}")
        problem = hostname_problem(suffix)
        if problem:
            raise ValueError(problem)
        if "." not in suffix:
            raise ValueError(
                f"{text!r} is too broad: the suffix after '*.' needs at least two "
                f"labels (e.g. *.example.com)"
            )
        return name
    if "*" in name:
        raise ValueError(f"{hint}, got {text!r}")
    problem = hostname_problem(name)
    if problem:
        raise ValueError(problem)
    return name


def parse_network(text: str) -> IPNetwork:
    """A CIDR such as ``10.0.0.0/8``, or a single IP address (a /32 or /128)."""
    try:
        return ip_network(text)
    except ValueError:
        pass
    try:
        network = ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"expected a CIDR such as 10.0.0.0/8 or fdaa::/16, or a single IP address, got {text!r}"
        ) from None
    raise ValueError(f"{text!r} has host bits set; did you mean '{network}'?")


def parse_listen(text: str) -> ListenAddress:
    """Parse a listener's ``listen`` value into a :class:`ListenAddress`.

    ``:PORT`` and ``[::]:PORT`` mean every interface on one dual-stack socket
    (Fly's private network and ``fly proxy`` arrive over IPv6, health checks may
    use IPv4). Host names are refused: a listener binds an address, and a name
    that resolves differently tomorrow is a surprise nobody wants at bind time.
    """
    if not text:
        raise ValueError(f"{LISTEN_HINT}, got ''")
    prefix = text.partition(":")[0]
    if prefix in _BUILTIN_ENDPOINT_TYPES and ":" in text:
        return _parse_description(text)
    if text.startswith(":") and not text.startswith("::"):
        number = port(text[1:], 0, "after ':'")
        return ListenAddress(text=text, host="::", port=number, dual_stack=True)
    if text.startswith("[") or ip_literal(text.rpartition(":")[0]) is not None:
        host, port_text, _ = split_host_port(text, LISTEN_HINT)
        literal = ip_address(host)
        number = port(port_text, 0, "after the address")
        unspecified = isinstance(literal, IPv6Address) and literal.is_unspecified
        return ListenAddress(
            text=text, host=str(literal), port=number, dual_stack=unspecified
        )
    if ":" not in text:
        raise ValueError(f"{LISTEN_HINT}, got {text!r}")
    host, _, port_text = text.rpartition(":")
    if ":" in host and isinstance(ip_literal(host), IPv6Address):
        raise ValueError(
            f"an IPv6 address needs brackets: write [{host}]:{port_text}, got {text!r}"
        )
    problem = hostname_problem(host)
    if port_text.isdigit() and problem and all(
        label.isdigit() for label in host.split(".")
    ):
        raise ValueError(problem)
    if port_text.isdigit() and problem is None:
        # NAME:PORT could be a host name or an endpoint type from a plugin.
        try:
            return _parse_description(text)
        except _UnknownEndpointType:
            raise ValueError(
                f"expected an IP address to listen on, got host name {host!r} "
                f"(use 127.0.0.1:{port_text}, [::1]:{port_text}, or :{port_text} "
                f"for all interfaces)"
            ) from None
    try:
        return _parse_description(text)
    except _UnknownEndpointType as e:
        raise ValueError(f"{LISTEN_HINT}, got {text!r} ({e})") from None


class _UnknownEndpointType(ValueError):
    """Twisted knows no endpoint type by the prefix of a listen value."""


class _NoReactor:
    """What ``serverFromString`` is given in place of a reactor when only parsing.

    Twisted's endpoint parsers (and plugins' ``parseStreamServer``) only keep
    the reactor in the endpoint they build; nothing is bound or started
    until ``listen``, which is never called on these endpoints.
    """


def _split_description(text: str) -> list[str]:
    """Split a Twisted endpoint description on unescaped colons."""
    fields = [""]
    escaped = False
    for char in text:
        if escaped:
            fields[-1] += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append("")
        else:
            fields[-1] += char
    return fields


def _parse_description(text: str) -> ListenAddress:
    """Check a raw Twisted server endpoint description without binding anything.

    ``serverFromString`` runs Twisted's own parser (and any endpoint plugins)
    and builds an endpoint that is never asked to listen; an ``ssl:``
    description does read its certificate file, which is worth failing on
    early. Twisted does not range-check TCP ports, so that is done here for
    ``tcp``, ``tcp6`` and ``ssl``.
    """
    try:
        serverFromString(_NoReactor(), text)
    except ValueError as e:
        message = str(e)
        if message.startswith("Unknown endpoint type"):
            raise _UnknownEndpointType(message) from None
        raise ValueError(
            f"invalid endpoint description {text!r}: {message}"
        ) from None
    except Exception as e:  # noqa: BLE001 - endpoint parsers raise what they like
        if text.startswith("systemd:") and isinstance(e, (IndexError, KeyError)):
            raise ValueError(
                f"endpoint description {text!r} names a socket this process did not "
                f"inherit (systemd socket activation passes them in; check the index "
                f"or name)"
            ) from None
        raise ValueError(
            f"endpoint description {text!r} cannot be used here: "
            f"{type(e).__name__}: {e}"
        ) from None
    fields = _split_description(text)
    if fields[0] in ("tcp", "tcp6", "ssl"):
        positional = [field for field in fields[1:] if "=" not in field]
        keywords = dict(
            field.split("=", 1) for field in fields[1:] if "=" in field
        )
        port_text = keywords.get("port", positional[0] if positional else None)
        if port_text is not None:
            port(port_text, 0, "in the description")
    return ListenAddress(
        text=text, host=None, port=None, dual_stack=False, description=text
    )
