"""The forward proxies' allowlist rule and user: plain values, no I/O.

Kept free of the rest of the proxy (attrs and ``ipaddress`` only), so that
``allowlint``, which judges rules at config-load time, can name them.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

import attrs

__all__ = ["DestinationRule", "User"]


@attrs.frozen
class DestinationRule:
    """One ``allow_destinations`` entry of a forward-proxy listener.

    ``host`` is an exact name or ``*.suffix``; ``network`` a CIDR for IP
    literals (exactly one of the two); ``port`` None means any port (``:*``).
    """

    host: str | None = None
    network: IPv4Network | IPv6Network | None = None
    port: int | None = None


def _check_own_rules(_instance: object, attribute: attrs.Attribute, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, tuple):
        raise TypeError(f"{attribute.name} must be a tuple, got {value!r}")
    if not value:
        raise ValueError(f"{attribute.name} must not be empty")
    for item in value:
        if not isinstance(item, DestinationRule):
            raise TypeError(f"{attribute.name} holds {item!r}, not {DestinationRule}")


@attrs.frozen
class User:
    """A forward-proxy credential; the password never appears in a repr or a log.

    ``allow_destinations``, when set, replaces the listener's list for this
    user (it is not merged with it); None means the listener's list applies.
    """

    name: str
    password: str = attrs.field(repr=False)
    allow_destinations: tuple[DestinationRule, ...] | None = attrs.field(
        default=None, repr=False, validator=_check_own_rules
    )
