"""The text of an ``allow_destinations`` entry in, a :class:`DestinationRule` out."""

from __future__ import annotations

from ipaddress import ip_network

from egressproxy.config.parse import parse_name_pattern
from egressproxy.config.syntax import IPNetwork, ip_literal, port
from egressproxy.modes.forward.rules import DestinationRule

__all__ = ["DESTINATION_HINT", "parse_destination"]

DESTINATION_HINT = (
    "expected HOST:PORT, *.SUFFIX:PORT, IP:PORT, CIDR:PORT, [IPV6]:PORT or "
    "[IPV6 CIDR]:PORT, where PORT is a number or * for any port (e.g. "
    "api.vendor.com:443, *.bank.example:443, 10.1.2.0/24:443, "
    "[2001:db8::/32]:443, 203.0.113.7:*)"
)


def _destination_port(text: str) -> int | None:
    """A destination's port: a number, or ``*`` (None) for any port."""
    if text == "*":
        return None
    return port(text, 1, "or * for any port")


def _destination_network(text: str) -> IPNetwork:
    """A CIDR or a bare IP address (a /32 or /128) for a destination rule."""
    try:
        network = ip_network(text)
    except ValueError:
        try:
            network = ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{DESTINATION_HINT}, got {text!r}") from None
        raise ValueError(
            f"{text!r} has host bits set; did you mean '{network}'?"
        ) from None
    if network.prefixlen == 0:
        raise ValueError(
            f"'{network}' would allow every IPv{network.version} address and make "
            f"this an open proxy; list the networks clients may reach"
        )
    return network


def parse_destination(text: str) -> DestinationRule:
    """Parse one ``allow_destinations`` entry into a :class:`DestinationRule`.

    Accepted: ``host:port``, ``*.suffix:port``, ``ip:port``, ``cidr:port``,
    ``[v6]:port`` and ``[v6 cidr]:port``, each port a number or ``*``. Names
    are lower-cased; an IP literal becomes a one-address network.
    """
    if text.startswith("["):
        inner, sep, port_text = text[1:].partition("]:")
        if not sep or "[" in inner or "]" in inner:
            raise ValueError(f"{DESTINATION_HINT}, got {text!r}")
        if ":" not in inner:
            raise ValueError(
                f"only IPv6 addresses and networks go in brackets, got {inner!r} "
                f"in {text!r}"
            )
        any_or_one = _destination_port(port_text)
        return DestinationRule(network=_destination_network(inner), port=any_or_one)
    host, sep, port_text = text.rpartition(":")
    if ":" in host:
        for candidate, fix in ((host, f"[{host}]:{port_text}"), (text, f"[{text}]:PORT")):
            try:
                network = ip_network(candidate, strict=False)
            except ValueError:
                continue
            if network.version == 6:
                raise ValueError(
                    f"an IPv6 address needs brackets: write {fix}, got {text!r}"
                )
        raise ValueError(f"{DESTINATION_HINT}, got {text!r}")
    if not sep:
        if not text:
            raise ValueError(f"{DESTINATION_HINT}, got ''")
        if text == "*":
            parse_name_pattern(text, "every host name", DESTINATION_HINT)
        raise ValueError(
            f"{text!r} has no port; write {text}:PORT, or {text}:* for any port"
        )
    if not host:
        raise ValueError(f"{DESTINATION_HINT}, got {text!r}")
    any_or_one = _destination_port(port_text)
    if "/" in host or ip_literal(host) is not None:
        return DestinationRule(network=_destination_network(host), port=any_or_one)
    name = parse_name_pattern(host, "every host name", DESTINATION_HINT)
    return DestinationRule(host=name, port=any_or_one)
