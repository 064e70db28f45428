"""attrs field validators: the model's local rules, a second line behind the reader.

The reader (``reader.py`` and the section readers) checks every value first
and words the operator's message; these make sure an object built in code
is valid too, so that an object that exists is valid.  Mode packages use
them for their options classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs

from egressproxy.config.syntax import NAME_RE, hostname_problem, ip_literal

__all__ = [
    "MAX_KEEPALIVE_COUNT",
    "MAX_KEEPALIVE_SECONDS",
    "check_host",
    "check_hosts",
    "check_keepalive_count",
    "check_keepalive_seconds",
    "check_log_prefix",
    "check_name",
    "check_non_negative_seconds",
    "check_optional_seconds",
    "check_port",
    "check_positive_int",
    "check_positive_seconds",
    "tuple_of",
]

# The kernel keeps keepalive times as whole seconds up to this bound
# (MAX_TCP_KEEPIDLE and MAX_TCP_KEEPINTVL on Linux) and at most 127 probes.
MAX_KEEPALIVE_SECONDS = 32767
MAX_KEEPALIVE_COUNT = 127

Validator = Callable[[object, "attrs.Attribute[object]", object], None]


def check_name(_instance: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(f"{attribute.name} must match [a-z0-9_-]+, got {value!r}")


def check_positive_int(
    _instance: object, attribute: attrs.Attribute, value: object
) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a whole number >= 1, got {value!r}")


def check_port(low: int) -> Validator:
    def check(_instance: object, attribute: attrs.Attribute, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{attribute.name} must be an int, got {value!r}")
        if not low <= value <= 65535:
            raise ValueError(f"{attribute.name} must be in {low}..65535, got {value}")

    return check


def check_host(_instance: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{attribute.name} must be a str, got {value!r}")
    if ip_literal(value) is None:
        problem = hostname_problem(value)
        if problem:
            raise ValueError(problem)


def check_keepalive_seconds(
    _instance: object, attribute: attrs.Attribute, value: object
) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 1 <= value <= MAX_KEEPALIVE_SECONDS
        or value != int(value)
    ):
        raise ValueError(
            f"{attribute.name} must be whole seconds in 1..{MAX_KEEPALIVE_SECONDS}, "
            f"got {value!r}"
        )


def check_keepalive_count(
    _instance: object, attribute: attrs.Attribute, value: object
) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 1 <= value <= MAX_KEEPALIVE_COUNT
    ):
        raise ValueError(
            f"{attribute.name} must be in 1..{MAX_KEEPALIVE_COUNT}, got {value!r}"
        )


def check_positive_seconds(
    _instance: object, attribute: attrs.Attribute, value: object
) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{attribute.name} must be seconds > 0, got {value!r}")


def check_non_negative_seconds(
    _instance: object, attribute: attrs.Attribute, value: object
) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{attribute.name} must be seconds >= 0, got {value!r}")


def check_optional_seconds(
    instance: object, attribute: attrs.Attribute, value: object
) -> None:
    if value is not None:
        check_positive_seconds(instance, attribute, value)


def check_log_prefix(
    _instance: object, attribute: attrs.Attribute, value: object
) -> None:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(
            f"{attribute.name} must be non-empty without whitespace, got {value!r}"
        )


def tuple_of(kind: type | tuple[type, ...], *, non_empty: bool) -> Validator:
    def check(_instance: object, attribute: attrs.Attribute, value: object) -> None:
        if not isinstance(value, tuple):
            raise TypeError(f"{attribute.name} must be a tuple, got {value!r}")
        if non_empty and not value:
            raise ValueError(f"{attribute.name} must not be empty")
        for item in value:
            if not isinstance(item, kind):
                raise TypeError(f"{attribute.name} holds {item!r}, not {kind}")

    return check


def check_hosts(_instance: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, tuple):
        raise TypeError(f"{attribute.name} must be a tuple, got {value!r}")
    for pair in value:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(f"{attribute.name} holds {pair!r}, not a (name, ip) pair")
        name, address = pair
        if not isinstance(name, str) or name != name.lower() or hostname_problem(name):
            raise ValueError(f"{attribute.name}: bad name {name!r}")
        if not isinstance(address, str) or ip_literal(address) is None:
            raise ValueError(f"{attribute.name}: {address!r} is not an IP literal")
