"""Routing by TLS server name: which route a name takes, and the address it names."""

from __future__ import annotations

import re

from egressproxy.config.model import Address
from egressproxy.modes.postgres.options import PostgresRoute

__all__ = ["match_route", "route_address", "valid_server_name"]

_HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


def valid_server_name(name: str) -> bool:
    """True for a DNS host name fit to route on (and dial): no IP literals, no trailing dot."""
    if not 0 < len(name) <= 253:
        return False
    labels = name.split(".")
    if all(label.isdigit() for label in labels):
        return False
    return all(_HOST_LABEL.match(label) for label in labels)


def match_route(routes: tuple[PostgresRoute, ...], name: str) -> PostgresRoute | None:
    """The first route whose ``sni`` matches ``name``: exact, or ``*.suffix`` for one or more labels."""
    for route in routes:
        pattern = route.sni.lower()
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
                return route
        elif name == pattern:
            return route
    return None


def route_address(template: str, name: str) -> Address:
    """The ``HOST:PORT`` a route's ``upstream`` template names for server name ``name``."""
    text = template.replace("{sni}", name)
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit():
        raise ValueError(f"upstream {template!r} gives {text!r}, not HOST:PORT")
    return Address(host, int(port))

