"""The smallest pieces of config syntax: names, host names, ports, IP literals.

Pure functions over text, shared by the value parsers (``parse.py``), the
attrs field checks (``checks.py``) and the mode packages' readers.  Each
either answers or raises ``ValueError`` with a message fit to show the
operator as it is.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

__all__ = [
    "IPNetwork",
    "NAME_RE",
    "Path",
    "hostname_problem",
    "ip_literal",
    "port",
    "show",
    "split_host_port",
]

IPNetwork = IPv4Network | IPv6Network
#: Where a value sits in the file: ``("clusters", 1, "endpoints", 0)``.
Path = tuple[str | int, ...]

#: Listener and cluster names.
NAME_RE = re.compile(r"[a-z0-9_-]+\Z")
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


def show(value: object) -> str:
    """Render a config value the way the user would recognise it in the file."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    return repr(value)


def hostname_problem(name: str) -> str | None:
    """Say what is wrong with ``name`` as a DNS host name, or ``None`` if nothing.

    Only the syntax is checked (RFC 1123 labels); whether the name resolves is the
    business of ``egressproxy doctor``, not of loading a file.
    """
    shape = (
        "letters, digits and '-' in dot-separated labels of 1-63 characters, "
        "at most 253 in all"
    )
    if not name:
        return "the host name is empty"
    if len(name) > 253:
        return f"host name {name!r} is longer than 253 characters"
    labels = name.split(".")
    if not all(_LABEL_RE.match(label) for label in labels):
        return f"{name!r} is not a valid host name ({shape})"
    if all(label.isdigit() for label in labels):
        return f"{name!r} is not a valid IPv4 address"
    return None


def port(text: str, low: int, what: str) -> int:
    """Parse a decimal port number in ``low``..65535, or raise ``ValueError``."""
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"expected a port number {low}-65535 {what}, got {text!r}")
    number = int(text)
    if not low <= number <= 65535:
        raise ValueError(f"port {number} is out of range ({low}-65535)")
    return number


def ip_literal(text: str) -> IPv4Address | IPv6Address | None:
    """The IP address ``text`` spells, or ``None`` if it spells none."""
    try:
        return ip_address(text)
    except ValueError:
        return None


def split_host_port(text: str, hint: str) -> tuple[str, str, bool]:
    """Split ``HOST:PORT`` or ``[V6]:PORT`` into host, port text and bracketed flag."""
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep or "]" in host or "[" in host:
            raise ValueError(f"{hint}, got {text!r}")
        literal = ip_literal(host)
        if not isinstance(literal, IPv6Address):
            raise ValueError(
                f"only IPv6 addresses go in brackets, got {host!r} in {text!r}"
            )
        return host, port_text, True
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f"{hint}, got {text!r}")
    if ":" in host and isinstance(ip_literal(host), IPv6Address):
        raise ValueError(
            f"an IPv6 address needs brackets: write [{host}]:{port_text}, got {text!r}"
        )
    return host, port_text, False
