"""The configuration file: YAML text in, frozen attrs objects out.

This module owns the file format and everything that can be known about a
configuration without touching the network: which keys exist, their types and
ranges, ``${ENV}`` interpolation, cross references (a listener names a defined
cluster; listeners and the admin and metrics services, written or defaulted, do
not claim the same address) and the wording of every error. Its only door is
:func:`load_config` (or :func:`parse_config` for text already in hand); both
are pure apart from reading the file (and the certificate an ``ssl:`` listen
description names) and checking that the certificate, key and CA files the
TLS keys name exist, and both report every problem at once in a single
:class:`ConfigError`, each line shaped ``FILE:LINE: key.path: message``.

It does not own what the values mean at run time: it does not resolve names,
bind or connect sockets, install a resolver for ``hosts:`` or build Twisted
endpoints (the listener and cluster modules do that from these objects). It does
not read ``os.environ`` itself; callers pass the mapping in, so tests and
reloads decide which environment a file is read against.

Every key of the design's configuration is supported: the four listener
modes (``tcp``, ``postgres``, ``http_connect``, ``socks5``) with their keys
(``tls``, ``require_tls``, ``routes`` and ``client_tls`` for postgres;
``allow_destinations`` and ``users`` for the forward proxies), ``tls`` on
clusters, and the operations keys (``admin``, ``metrics``, ``drain_timeout``,
``shutdown_delay``, ``proxy_protocol``, ``health_check``). A key of one mode on
a listener of another is an error, not ignored, and the forward proxies need
``allow_destinations``: none is ever open to every destination. Passwords are
never quoted in a message. Relative file paths are taken from the working
directory. Not supported: YAML merge keys (``<<``). Interpolation applies to
string values only, never to keys.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import Any, NoReturn, TypeVar

import attrs
import yaml
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

__all__ = [
    "AccessLogConfig",
    "Address",
    "ClusterConfig",
    "Config",
    "ClientTLS",
    "ClusterTLS",
    "ConfigError",
    "DestinationRule",
    "MODES",
    "PostgresRoute",
    "User",
    "DEFAULT_ADMIN",
    "DEFAULT_METRICS",
    "HealthCheckConfig",
    "HttpServiceConfig",
    "Keepalive",
    "ListenAddress",
    "ListenerConfig",
    "load_config",
    "parse_config",
    "parse_duration",
]

IPNetwork = IPv4Network | IPv6Network
Path = tuple[str | int, ...]
T = TypeVar("T")


class ConfigError(Exception):
    """Every problem found in one configuration file.

    The loader collects all of them before raising, because an operator fixing a
    file one error per run is an operator who stops trusting the tool. Each entry
    reads ``FILE:LINE: key.path: message`` and ``str()`` joins them with newlines,
    so printing the exception is enough.
    """

    errors: tuple[str, ...]

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


# ---------------------------------------------------------------------------
# Pure value parsers, shared by the loader and the attrs validators.

_NAME_RE = re.compile(r"[a-z0-9_-]+\Z")
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")
_PLAIN_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_HINT = (
    "expected a duration such as 250ms, 5s, 2m, 1h or 1m30s "
    "(a plain number means seconds)"
)
_ENDPOINT_HINT = "expected HOST:PORT (e.g. db.example.com:5432 or [2001:db8::1]:5432)"
_SNI_HINT = (
    "expected a server name such as db.example.com, or *.SUFFIX such as "
    "*.pg.example.cloud ('*' only as the whole first label)"
)
_UPSTREAM_HINT = (
    "expected a HOST:PORT template in which {sni} stands for the server name the "
    "client sent (e.g. '{sni}:5432' or 'db.internal:5432')"
)
#: What ``{sni}`` is replaced with to check an upstream template.
_SAMPLE_SNI = "x.example.test"
_DESTINATION_HINT = (
    "expected HOST:PORT, *.SUFFIX:PORT, IP:PORT, CIDR:PORT, [IPV6]:PORT or "
    "[IPV6 CIDR]:PORT, where PORT is a number or * for any port (e.g. "
    "api.vendor.com:443, *.bank.example:443, 10.1.2.0/24:443, "
    "[2001:db8::/32]:443, 203.0.113.7:*)"
)
_LISTEN_HINT = (
    "expected IP:PORT, [IPV6]:PORT, :PORT for all interfaces "
    "(e.g. :5432, [::]:5432, 127.0.0.1:5432) or a Twisted endpoint description "
    "(e.g. tcp6:5432)"
)
# Endpoint types Twisted ships. A listen value starting with one of these and a
# colon is an endpoint description; other prefixes are asked of Twisted itself
# (plugins may add types) only when the value could also be NAME:PORT.
_BUILTIN_ENDPOINT_TYPES = frozenset({"tcp", "tcp6", "unix", "ssl", "systemd"})
# The kernel keeps keepalive times as whole seconds up to this bound
# (MAX_TCP_KEEPIDLE and MAX_TCP_KEEPINTVL on Linux) and at most 127 probes.
_MAX_KEEPALIVE_SECONDS = 32767
_MAX_KEEPALIVE_COUNT = 127


def _show(value: object) -> str:
    """Render a config value the way the user would recognise it in the file."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    return repr(value)


def parse_duration(value: object) -> float:
    """Turn ``250ms``, ``5s``, ``2m``, ``1h``, ``1m30s`` or a number into seconds.

    Plain numbers (and digit strings, which interpolation produces) are seconds.
    Negative, non-finite and unparseable values raise ``ValueError`` with a
    message fit to show the operator as it is.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{_DURATION_HINT}, got {_show(value)}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{_DURATION_HINT}, got {_show(value)}")
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {_show(value)}")
        return float(value)
    text = value
    if text.startswith("-") and text[1:] and _is_duration_text(text[1:]):
        raise ValueError(f"a duration cannot be negative, got {text!r}")
    if _PLAIN_NUMBER.match(text):
        return float(text)
    if not _is_duration_text(text):
        raise ValueError(f"{_DURATION_HINT}, got {text!r}")
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


def _hostname_problem(name: str) -> str | None:
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


def _port(text: str, low: int, what: str) -> int:
    """Parse a decimal port number in ``low``..65535, or raise ``ValueError``."""
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"expected a port number {low}-65535 {what}, got {text!r}")
    port = int(text)
    if not low <= port <= 65535:
        raise ValueError(f"port {port} is out of range ({low}-65535)")
    return port


def _ip_literal(text: str) -> IPv4Address | IPv6Address | None:
    """The IP address ``text`` spells, or ``None`` if it spells none."""
    try:
        return ip_address(text)
    except ValueError:
        return None


def _split_host_port(text: str, hint: str) -> tuple[str, str, bool]:
    """Split ``HOST:PORT`` or ``[V6]:PORT`` into host, port text and bracketed flag."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or "]" in host or "[" in host:
            raise ValueError(f"{hint}, got {text!r}")
        literal = _ip_literal(host)
        if not isinstance(literal, IPv6Address):
            raise ValueError(
                f"only IPv6 addresses go in brackets, got {host!r} in {text!r}"
            )
        return host, port, True
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"{hint}, got {text!r}")
    if ":" in host and isinstance(_ip_literal(host), IPv6Address):
        raise ValueError(
            f"an IPv6 address needs brackets: write [{host}]:{port}, got {text!r}"
        )
    return host, port, False


def _parse_endpoint(text: str) -> Address:
    """Parse one upstream ``host:port`` or ``[v6]:port`` into an :class:`Address`."""
    host, port_text, bracketed = _split_host_port(text, _ENDPOINT_HINT)
    if not bracketed and not host:
        raise ValueError(f"{_ENDPOINT_HINT}, got {text!r}")
    if not bracketed and _ip_literal(host) is None:
        problem = _hostname_problem(host)
        if problem:
            raise ValueError(problem)
    port = _port(port_text, 1, "after the host")
    literal = _ip_literal(host)
    return Address(host=str(literal) if literal is not None else host, port=port)


def _parse_name_pattern(text: str, what: str, hint: str) -> str:
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
        problem = _hostname_problem(suffix)
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
    problem = _hostname_problem(name)
    if problem:
        raise ValueError(problem)
    return name


def _parse_upstream_template(text: str) -> str:
    """Check a route's ``upstream``: a ``HOST:PORT`` in which ``{sni}`` may stand.

    ``{sni}`` is the only placeholder. The template is tried with a sample name
    in its place and must then be an endpoint :func:`_parse_endpoint` accepts;
    the template itself is returned unchanged.
    """
    for match in re.finditer(r"\{[^{}]*\}", text):
        if match.group(0) != "{sni}":
            raise ValueError(
                f"unknown placeholder {match.group(0)!r} in {text!r}; {{sni}} (the "
                f"server name the client sent) is the only one"
            )
    if "{" in text.replace("{sni}", "") or "}" in text.replace("{sni}", ""):
        raise ValueError(
            f"unmatched brace in {text!r}; {{sni}} (the server name the client "
            f"sent) is the only placeholder"
        )
    if ":" not in text:
        raise ValueError(f"{_UPSTREAM_HINT}, got {text!r}")
    sample = text.replace("{sni}", _SAMPLE_SNI)
    try:
        _parse_endpoint(sample)
    except ValueError as e:
        if sample != text and _SAMPLE_SNI in str(e):
            raise ValueError(
                f"{e} (from {text!r} with {{sni}} = {_SAMPLE_SNI})"
            ) from None
        raise
    return text


def _destination_port(text: str) -> int | None:
    """A destination's port: a number, or ``*`` (None) for any port."""
    if text == "*":
        return None
    return _port(text, 1, "or * for any port")


def _destination_network(text: str) -> IPNetwork:
    """A CIDR or a bare IP address (a /32 or /128) for a destination rule."""
    try:
        network = ip_network(text)
    except ValueError:
        try:
            network = ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{_DESTINATION_HINT}, got {text!r}") from None
        raise ValueError(
            f"{text!r} has host bits set; did you mean '{network}'?"
        ) from None
    if network.prefixlen == 0:
        raise ValueError(
            f"'{network}' would allow every IPv{network.version} address and make "
            f"this an open proxy; list the networks clients may reach"
        )
    return network


def _parse_destination(text: str) -> DestinationRule:
    """Parse one ``allow_destinations`` entry into a :class:`DestinationRule`.

    Accepted: ``host:port``, ``*.suffix:port``, ``ip:port``, ``cidr:port``,
    ``[v6]:port`` and ``[v6 cidr]:port``, each port a number or ``*``. Names
    are lower-cased; an IP literal becomes a one-address network.
    """
    if text.startswith("["):
        inner, sep, port_text = text[1:].partition("]:")
        if not sep or "[" in inner or "]" in inner:
            raise ValueError(f"{_DESTINATION_HINT}, got {text!r}")
        if ":" not in inner:
            raise ValueError(
                f"only IPv6 addresses and networks go in brackets, got {inner!r} "
                f"in {text!r}"
            )
        port = _destination_port(port_text)
        return DestinationRule(network=_destination_network(inner), port=port)
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
        raise ValueError(f"{_DESTINATION_HINT}, got {text!r}")
    if not sep:
        if not text:
            raise ValueError(f"{_DESTINATION_HINT}, got ''")
        if text == "*":
            _parse_name_pattern(text, "every host name", _DESTINATION_HINT)
        raise ValueError(
            f"{text!r} has no port; write {text}:PORT, or {text}:* for any port"
        )
    if not host:
        raise ValueError(f"{_DESTINATION_HINT}, got {text!r}")
    port = _destination_port(port_text)
    if "/" in host or _ip_literal(host) is not None:
        return DestinationRule(network=_destination_network(host), port=port)
    name = _parse_name_pattern(host, "every host name", _DESTINATION_HINT)
    return DestinationRule(host=name, port=port)


def _parse_listen(text: str) -> ListenAddress:
    """Parse a listener's ``listen`` value into a :class:`ListenAddress`.

    ``:PORT`` and ``[::]:PORT`` mean every interface on one dual-stack socket
    (Fly's private network and ``fly proxy`` arrive over IPv6, health checks may
    use IPv4). Host names are refused: a listener binds an address, and a name
    that resolves differently tomorrow is a surprise nobody wants at bind time.
    """
    if not text:
        raise ValueError(f"{_LISTEN_HINT}, got ''")
    prefix = text.partition(":")[0]
    if prefix in _BUILTIN_ENDPOINT_TYPES and ":" in text:
        return _parse_description(text)
    if text.startswith(":") and not text.startswith("::"):
        port = _port(text[1:], 0, "after ':'")
        return ListenAddress(text=text, host="::", port=port, dual_stack=True)
    if text.startswith("[") or _ip_literal(text.rpartition(":")[0]) is not None:
        host, port_text, _ = _split_host_port(text, _LISTEN_HINT)
        literal = ip_address(host)
        port = _port(port_text, 0, "after the address")
        unspecified = isinstance(literal, IPv6Address) and literal.is_unspecified
        return ListenAddress(
            text=text, host=str(literal), port=port, dual_stack=unspecified
        )
    if ":" not in text:
        raise ValueError(f"{_LISTEN_HINT}, got {text!r}")
    host, _, port_text = text.rpartition(":")
    if ":" in host and isinstance(_ip_literal(host), IPv6Address):
        raise ValueError(
            f"an IPv6 address needs brackets: write [{host}]:{port_text}, got {text!r}"
        )
    problem = _hostname_problem(host)
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
        raise ValueError(f"{_LISTEN_HINT}, got {text!r} ({e})") from None


class _UnknownEndpointType(ValueError):
    """Twisted knows no endpoint type by the prefix of a listen value."""


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

    ``serverFromString`` against a ``MemoryReactor`` runs Twisted's own parser
    (and any endpoint plugins) but opens no socket; an ``ssl:`` description does
    read its certificate file, which is worth failing on early. Twisted does not
    range-check TCP ports, so that is done here for ``tcp``, ``tcp6`` and ``ssl``.
    """
    try:
        serverFromString(MemoryReactor(), text)
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
            _port(port_text, 0, "in the description")
    return ListenAddress(
        text=text, host=None, port=None, dual_stack=False, description=text
    )


# ---------------------------------------------------------------------------
# attrs validators: local rules only, a second line behind the loader.


def _check_name(_instance: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"{attribute.name} must match [a-z0-9_-]+, got {value!r}")


def _check_positive_int(
    _instance: object, attribute: attrs.Attribute, value: object
) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a whole number >= 1, got {value!r}")


def _check_port(low: int) -> Callable[[object, attrs.Attribute, object], None]:
    def check(_instance: object, attribute: attrs.Attribute, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{attribute.name} must be an int, got {value!r}")
        if not low <= value <= 65535:
            raise ValueError(f"{attribute.name} must be in {low}..65535, got {value}")

    return check


def _check_host(_instance: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{attribute.name} must be a str, got {value!r}")
    if _ip_literal(value) is None:
        problem = _hostname_problem(value)
        if problem:
            raise ValueError(problem)


def _check_keepalive_seconds(
    _instance: object, attribute: attrs.Attribute, value: object
) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 1 <= value <= _MAX_KEEPALIVE_SECONDS
        or value != int(value)
    ):
        raise ValueError(
            f"{attribute.name} must be whole seconds in 1..{_MAX_KEEPALIVE_SECONDS}, "
            f"got {value!r}"
        )


def _check_keepalive_count(
    _instance: object, attribute: attrs.Attribute, value: object
) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 1 <= value <= _MAX_KEEPALIVE_COUNT
    ):
        raise ValueError(
            f"{attribute.name} must be in 1..{_MAX_KEEPALIVE_COUNT}, got {value!r}"
        )


def _check_positive_seconds(
    _instance: object, attribute: attrs.Attribute, value: object
) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{attribute.name} must be seconds > 0, got {value!r}")


def _check_non_negative_seconds(
    _instance: object, attribute: attrs.Attribute, value: object
) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{attribute.name} must be seconds >= 0, got {value!r}")


def _check_optional_seconds(
    instance: object, attribute: attrs.Attribute, value: object
) -> None:
    if value is not None:
        _check_positive_seconds(instance, attribute, value)


def _check_log_prefix(
    _instance: object, attribute: attrs.Attribute, value: object
) -> None:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(
            f"{attribute.name} must be non-empty without whitespace, got {value!r}"
        )


def _tuple_of(kind: type | tuple[type, ...], *, non_empty: bool) -> Callable[..., None]:
    def check(_instance: object, attribute: attrs.Attribute, value: object) -> None:
        if not isinstance(value, tuple):
            raise TypeError(f"{attribute.name} must be a tuple, got {value!r}")
        if non_empty and not value:
            raise ValueError(f"{attribute.name} must not be empty")
        for item in value:
            if not isinstance(item, kind):
                raise TypeError(f"{attribute.name} holds {item!r}, not {kind}")

    return check


# ---------------------------------------------------------------------------
# The configuration objects.


@attrs.frozen
class Address:
    """One upstream endpoint: a DNS name or IP literal and a port.

    IPv6 literals are kept without brackets so they can be handed to
    ``HostnameEndpoint`` as they are; ``str()`` adds the brackets back for logs.
    """

    host: str = attrs.field(validator=_check_host)
    port: int = attrs.field(validator=_check_port(1))

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@attrs.frozen
class ListenAddress:
    """Where one listener accepts connections.

    Either an IP literal and port (``host``/``port`` set, ``description`` None),
    or a raw Twisted server endpoint description for anything else (``unix:``,
    ``systemd:``, plugin types), in which case ``host`` and ``port`` are None and
    the description is handed to Twisted unchanged. ``dual_stack`` marks the one
    IPv6 socket that also accepts IPv4 (``:5432``, ``[::]:5432``).
    """

    text: str = attrs.field(validator=attrs.validators.instance_of(str))
    host: str | None
    port: int | None
    dual_stack: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    description: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.description is not None:
            if self.host is not None or self.port is not None or self.dual_stack:
                raise ValueError("a description leaves host, port and dual_stack unset")
            return
        literal = _ip_literal(self.host) if isinstance(self.host, str) else None
        if literal is None:
            raise ValueError(f"host must be an IP literal, got {self.host!r}")
        _check_port(0)(self, attrs.fields(ListenAddress).port, self.port)
        if self.dual_stack and not (
            isinstance(literal, IPv6Address) and literal.is_unspecified
        ):
            raise ValueError("only the IPv6 any-address '::' can be dual-stack")

    def __str__(self) -> str:
        return self.text


@attrs.frozen
class Keepalive:
    """TCP keepalive on upstream sockets: how dead peers are found.

    Long-idle Postgres sessions (LISTEN/NOTIFY) have no idle timeout by default,
    so keepalive is what notices a peer that vanished. The kernel takes whole
    seconds, hence the integer-valued floats.
    """

    idle: float = attrs.field(default=60.0, validator=_check_keepalive_seconds)
    interval: float = attrs.field(default=15.0, validator=_check_keepalive_seconds)
    count: int = attrs.field(default=4, validator=_check_keepalive_count)


@attrs.frozen
class HealthCheckConfig:
    """Active health checks of a cluster's endpoints.

    ``tcp`` connects and closes; ``postgres`` also sends an SSLRequest and
    expects ``S`` or ``N``, which proves a Postgres answers and that it
    accepts this proxy's egress address (providers that drop non-allowlisted
    peers right after accept fail it); ``none`` runs no checks.
    """

    kind: str = attrs.field(default="tcp", validator=attrs.validators.in_(("tcp", "postgres", "none")))
    interval: float = attrs.field(default=10.0, validator=_check_positive_seconds)
    timeout: float = attrs.field(default=2.0, validator=_check_positive_seconds)
    unhealthy_threshold: int = attrs.field(default=2, validator=_check_positive_int)
    healthy_threshold: int = attrs.field(default=1, validator=_check_positive_int)


@attrs.frozen
class ClusterTLS:
    """TLS the proxy originates to a cluster (Postgres ``tls: originate`` listeners).

    Verification is never optional: the chain against ``ca_file`` (default:
    the system trust store) and the name against ``server_name`` (default:
    each endpoint's host).
    """

    server_name: str | None = attrs.field(default=None)
    ca_file: str | None = attrs.field(default=None)


@attrs.frozen
class ClusterConfig:
    """One named group of upstream endpoints and the limits for reaching them."""

    name: str = attrs.field(validator=_check_name)
    endpoints: tuple[Address, ...] = attrs.field(
        # Empty only for the dynamic clusters the service makes (the loader
        # requires at least one endpoint in a file).
        validator=_tuple_of(Address, non_empty=False)
    )
    connect_timeout: float = attrs.field(
        default=5.0, validator=_check_positive_seconds
    )
    max_connect_attempts: int = attrs.field(default=3, validator=_check_positive_int)
    idle_timeout: float | None = attrs.field(
        default=None, validator=_check_optional_seconds
    )
    max_connections: int = attrs.field(default=1024, validator=_check_positive_int)
    max_pending: int = attrs.field(default=128, validator=_check_positive_int)
    keepalive: Keepalive | None = attrs.field(
        default=Keepalive(),
        validator=attrs.validators.optional(attrs.validators.instance_of(Keepalive)),
    )
    health_check: HealthCheckConfig = attrs.field(
        default=HealthCheckConfig(),
        validator=attrs.validators.instance_of(HealthCheckConfig),
    )
    tls: ClusterTLS | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(ClusterTLS))
    )


@attrs.frozen
class PostgresRoute:
    """Route Postgres connections by the TLS server name (SNI) the client sends.

    ``sni`` is an exact name or ``*.suffix`` (one or more labels before the
    suffix).  Exactly one target: ``cluster`` (a configured cluster) or
    ``upstream``, a ``HOST:PORT`` template in which ``{sni}`` stands for the
    name the client sent (``"{sni}:5432"``).  Names that match no route are
    never dialled.
    """

    sni: str
    cluster: str | None = None
    upstream: str | None = None


@attrs.frozen
class ClientTLS:
    """The certificate a ``tls: originate`` listener shows clients that ask for TLS."""

    cert: str
    key: str


@attrs.frozen
class DestinationRule:
    """One ``allow_destinations`` entry of a forward-proxy listener.

    ``host`` is an exact name or ``*.suffix``; ``network`` a CIDR for IP
    literals (exactly one of the two); ``port`` None means any port (``:*``).
    """

    host: str | None = None
    network: IPNetwork | None = None
    port: int | None = None


@attrs.frozen
class User:
    """A forward-proxy credential; the password never appears in a repr or a log."""

    name: str
    password: str = attrs.field(repr=False)


#: Listener modes.
MODES = ("tcp", "postgres", "http_connect", "socks5")


def _default_log_prefix(listener: ListenerConfig) -> str:
    return listener.name.upper()


@attrs.frozen
class ListenerConfig:
    """One listening address, the cluster it forwards to, and who may use it."""

    name: str = attrs.field(validator=_check_name)
    listen: ListenAddress = attrs.field(
        validator=attrs.validators.instance_of(ListenAddress)
    )
    mode: str = attrs.field(validator=attrs.validators.in_(MODES))
    #: None for modes that choose destinations themselves (forward proxies,
    #: routed Postgres): their limits come from a per-listener dynamic cluster.
    cluster: str | None = attrs.field(default=None, validator=attrs.validators.optional(_check_name))
    log_prefix: str = attrs.field(
        default=attrs.Factory(_default_log_prefix, takes_self=True),
        validator=_check_log_prefix,
    )
    allow_sources: tuple[IPNetwork, ...] | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(
            _tuple_of((IPv4Network, IPv6Network), non_empty=True)
        ),
    )
    max_connections: int = attrs.field(default=10000, validator=_check_positive_int)
    proxy_protocol: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    # -- mode: postgres ---------------------------------------------------
    #: ``passthrough`` (TLS end to end, routing by SNI) or ``originate``.
    tls: str = attrs.field(default="passthrough", validator=attrs.validators.in_(("passthrough", "originate")))
    #: Refuse plaintext startups (with a Postgres ErrorResponse).
    require_tls: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    routes: tuple[PostgresRoute, ...] = attrs.field(default=(), validator=_tuple_of(PostgresRoute, non_empty=False))
    client_tls: ClientTLS | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(ClientTLS))
    )
    # -- modes: http_connect, socks5 ----------------------------------------
    allow_destinations: tuple[DestinationRule, ...] = attrs.field(
        default=(), validator=_tuple_of(DestinationRule, non_empty=False)
    )
    users: tuple[User, ...] = attrs.field(default=(), validator=_tuple_of(User, non_empty=False))


@attrs.frozen
class HttpServiceConfig:
    """Where one of the HTTP services (admin, metrics) listens."""

    listen: ListenAddress = attrs.field(validator=attrs.validators.instance_of(ListenAddress))


#: Admin has full control (drain, reload): loopback only unless told otherwise.
DEFAULT_ADMIN = HttpServiceConfig(ListenAddress("127.0.0.1:9901", "127.0.0.1", 9901, False, None))
#: Metrics are read-only: all interfaces, so Fly's scraper reaches them.
DEFAULT_METRICS = HttpServiceConfig(ListenAddress("[::]:9091", "::", 9091, True, None))


@attrs.frozen
class AccessLogConfig:
    """How finished connections are written to stdout: Envoy-like text or JSON."""

    format: str = attrs.field(
        default="text", validator=attrs.validators.in_(("text", "json"))
    )


def _check_hosts(_instance: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, tuple):
        raise TypeError(f"{attribute.name} must be a tuple, got {value!r}")
    for pair in value:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(f"{attribute.name} holds {pair!r}, not a (name, ip) pair")
        name, address = pair
        if not isinstance(name, str) or name != name.lower() or _hostname_problem(name):
            raise ValueError(f"{attribute.name}: bad name {name!r}")
        if not isinstance(address, str) or _ip_literal(address) is None:
            raise ValueError(f"{attribute.name}: {address!r} is not an IP literal")


@attrs.frozen
class Config:
    """A whole, valid configuration; an instance that exists is consistent.

    Besides the field checks, construction verifies the cross-object rules that
    other modules rely on without re-checking: names are unique and every
    cluster a listener or one of its routes names exists.
    """

    source: str = attrs.field(validator=attrs.validators.instance_of(str))
    listeners: tuple[ListenerConfig, ...] = attrs.field(
        validator=_tuple_of(ListenerConfig, non_empty=True)
    )
    clusters: tuple[ClusterConfig, ...] = attrs.field(
        validator=_tuple_of(ClusterConfig, non_empty=False)
    )
    hosts: tuple[tuple[str, str], ...] = attrs.field(default=(), validator=_check_hosts)
    access_log: AccessLogConfig = attrs.field(
        default=AccessLogConfig(),
        validator=attrs.validators.instance_of(AccessLogConfig),
    )
    #: None when disabled (``admin: false``).
    admin: HttpServiceConfig | None = attrs.field(
        default=DEFAULT_ADMIN,
        validator=attrs.validators.optional(attrs.validators.instance_of(HttpServiceConfig)),
    )
    #: None when disabled (``metrics: false``).
    metrics: HttpServiceConfig | None = attrs.field(
        default=DEFAULT_METRICS,
        validator=attrs.validators.optional(attrs.validators.instance_of(HttpServiceConfig)),
    )
    drain_timeout: float = attrs.field(default=25.0, validator=_check_non_negative_seconds)
    shutdown_delay: float = attrs.field(default=0.0, validator=_check_non_negative_seconds)

    def __attrs_post_init__(self) -> None:
        for kind, items in (("listener", self.listeners), ("cluster", self.clusters)):
            names = [item.name for item in items]
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} names are not unique: {names}")
        clusters = {cluster.name for cluster in self.clusters}
        for listener in self.listeners:
            if listener.cluster is not None and listener.cluster not in clusters:
                raise ValueError(
                    f"listener {listener.name!r} names unknown cluster "
                    f"{listener.cluster!r}"
                )
            for route in listener.routes:
                if route.cluster is not None and route.cluster not in clusters:
                    raise ValueError(
                        f"listener {listener.name!r} routes {route.sni!r} to unknown "
                        f"cluster {route.cluster!r}"
                    )

    def cluster(self, name: str) -> ClusterConfig:
        """The cluster called ``name``; ``KeyError`` if there is none."""
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        raise KeyError(name)

    def pinned_address(self, host: str) -> str | None:
        """The address ``hosts:`` pins ``host`` to (case-insensitive), else None."""
        wanted = host.lower()
        for name, address in self.hosts:
            if name == wanted:
                return address
        return None


# ---------------------------------------------------------------------------
# The loader: YAML nodes in, errors with lines and paths out.


class _Loader(yaml.SafeLoader):
    """A ``SafeLoader`` that refuses duplicate mapping keys.

    PyYAML keeps the last of two equal keys without a word, which turns a
    copy-paste slip into a silently different proxy. :func:`parse_config` walks
    the composed node tree itself (so it can report every duplicate with its line
    and path); this override makes the class safe for plain ``yaml.load`` too.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # unhashable: the base class reports it
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r} (first at line {first_line[key]})",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _Invalid(Exception):
    """A value was rejected; the problem has already been recorded."""


_REF_RE = re.compile(r"\$(?:\$|\{(?P<body>[^}]*)\}|(?P<open>\{))?")
_VAR_RE = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?\Z", re.S)


def _render_path(path: Path) -> str:
    """``("clusters", 1, "endpoints", 0)`` -> ``clusters[1].endpoints[0]``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif text:
            text += f".{part}"
        else:
            text = part
    return text


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return "a single value"


_TOP_KEYS = (
    "listeners",
    "clusters",
    "hosts",
    "access_log",
    "admin",
    "metrics",
    "drain_timeout",
    "shutdown_delay",
)
_LISTENER_KEYS = (
    "name",
    "listen",
    "mode",
    "cluster",
    "log_prefix",
    "allow_sources",
    "max_connections",
    "proxy_protocol",
    "tls",
    "require_tls",
    "routes",
    "client_tls",
    "allow_destinations",
    "users",
)
#: Listener keys that belong to some modes only, with the modes and how the
#: error names them.
_MODE_KEYS = (
    (("tls", "require_tls", "routes", "client_tls"), ("postgres",), "postgres"),
    (
        ("allow_destinations", "users"),
        ("http_connect", "socks5"),
        "http_connect or socks5",
    ),
)
_LISTENER_TLS = ("passthrough", "originate")
_ROUTE_KEYS = ("sni", "cluster", "upstream")
_CLIENT_TLS_KEYS = ("cert", "key")
_USER_KEYS = ("name", "password")
#: SOCKS5 username/password authentication (RFC 1929) carries each in at most
#: 255 bytes.
_SOCKS5_MAX_CREDENTIAL = 255
_CLUSTER_KEYS = (
    "name",
    "endpoints",
    "connect_timeout",
    "max_connect_attempts",
    "idle_timeout",
    "max_connections",
    "max_pending",
    "keepalive",
    "health_check",
    "tls",
)
_CLUSTER_TLS_KEYS = ("server_name", "ca_file")
_KEEPALIVE_KEYS = ("idle", "interval", "count")
_HEALTH_CHECK_KEYS = (
    "kind",
    "interval",
    "timeout",
    "unhealthy_threshold",
    "healthy_threshold",
)
_HEALTH_CHECK_KINDS = ("tcp", "postgres", "none")
_ACCESS_LOG_KEYS = ("format",)
_HTTP_SERVICE_KEYS = ("listen",)
#: The HTTP services by top-level key, with the address each has when not told.
_HTTP_SERVICE_DEFAULTS = {"admin": DEFAULT_ADMIN, "metrics": DEFAULT_METRICS}


class _Fields(dict[str, yaml.Node]):
    """The known keys of one mapping, each with its value node.

    ``key_nodes`` holds each key's own node, for errors about a key being there
    at all; ``suggested`` holds the known keys that an unknown key was taken
    for a misspelling of, so a rule that requires one of them stays quiet (the
    suggestion already says what to fix).
    """

    def __init__(self) -> None:
        super().__init__()
        self.key_nodes: dict[str, yaml.Node] = {}
        self.suggested: set[str] = set()

    def has(self, key: str) -> bool:
        """Whether ``key`` is written, or an unknown key was taken for it."""
        return key in self or key in self.suggested


@attrs.define
class _Named:
    """A name read from the file, remembered for the cross checks."""

    value: str
    node: yaml.Node
    path: Path


class _Builder:
    """Walks a composed YAML tree, converting values and collecting errors.

    Converters take ``(node, path)`` and either return a value or record the
    problem and raise :class:`_Invalid`; the ``_build_*`` methods catch that per
    field so one bad value never hides the next.
    """

    def __init__(self, source: str, environ: Mapping[str, str], loader: _Loader):
        self.source = source
        self.environ = environ
        self.loader = loader
        self.errors: list[tuple[int, str]] = []
        self.listener_names: list[_Named] = []
        self.cluster_names: list[_Named] = []
        self.cluster_refs: list[_Named] = []
        # Every address something will listen on; the node is None for an
        # admin or metrics default the file does not spell out.
        self.listens: list[tuple[ListenAddress, yaml.Node | None, Path]] = []

    # -- reporting ----------------------------------------------------------

    def report(self, node: yaml.Node, path: Path, message: str) -> None:
        where = _render_path(path)
        prefix = f"{self.source}:{_line(node)}: "
        self.errors.append((_line(node), prefix + (f"{where}: " if where else "") + message))

    def fail(self, node: yaml.Node, path: Path, message: str) -> NoReturn:
        self.report(node, path, message)
        raise _Invalid()

    # -- structure ----------------------------------------------------------

    def mapping(
        self,
        node: yaml.Node,
        path: Path,
        allowed: Sequence[str],
        required: Sequence[str] = (),
    ) -> _Fields:
        """Read a mapping with a fixed set of keys; report unknown and missing ones."""
        if not isinstance(node, yaml.MappingNode):
            got = self._got(node)
            self.fail(
                node, path, f"expected a mapping with keys {', '.join(allowed)}, got {got}"
            )
        fields = self.entries(node, path)
        result = _Fields()
        for key, (key_node, value_node) in fields.items():
            if key in allowed:
                result[key] = value_node
                result.key_nodes[key] = key_node
                continue
            close = difflib.get_close_matches(key, allowed, n=1)
            if close:
                result.suggested.add(close[0])
                hint = f"; did you mean {close[0]!r}?"
            else:
                hint = f" (expected one of: {', '.join(allowed)})"
            self.report(key_node, path, f"unknown key {key!r}{hint}")
        for key in required:
            if not result.has(key):
                self.report(node, path, f"missing required key {key!r}")
        return result

    def entries(
        self, node: yaml.MappingNode, path: Path
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """The string-keyed entries of a mapping, first occurrence winning.

        Duplicates and non-string keys are reported here, once, with their line.
        """
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.construct(key_node, path)
            if not isinstance(key, str):
                got = _show(key) if isinstance(key_node, yaml.ScalarNode) else _kind(key_node)
                self.report(key_node, path, f"keys must be text, got {got}")
                continue
            if key in entries:
                first = _line(entries[key][0])
                self.report(
                    key_node, path + (key,), f"duplicate key {key!r} (first at line {first})"
                )
                continue
            entries[key] = (key_node, value_node)
        return entries

    def each(self, items: list[yaml.Node], path: Path, build: Callable[[yaml.Node, Path], T]) -> tuple[T, ...]:
        """Build every item of a list, reporting each bad one; then one ``_Invalid`` if any was."""
        built: list[T] = []
        failed = False
        for index, item in enumerate(items):
            try:
                built.append(build(item, path + (index,)))
            except _Invalid:
                failed = True
        if failed:
            raise _Invalid()
        return tuple(built)

    def sequence(self, node: yaml.Node, path: Path, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, path, f"expected a list of {what}, got {self._got(node)}")
        return list(node.value)

    # -- scalars ------------------------------------------------------------

    def construct(self, node: yaml.Node, path: Path) -> object:
        """The Python value of a scalar node, before interpolation."""
        if not isinstance(node, yaml.ScalarNode):
            return node  # the caller's type check reports it
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e)
            self.fail(node, path, f"cannot read this value: {problem}")

    def scalar(
        self, node: yaml.Node, path: Path, expected: str, *, secret: bool = False
    ) -> object:
        """A scalar's value with ``${...}`` expanded in strings.

        With ``secret``, interpolation errors do not quote the text.
        """
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, path, f"expected {expected}, got {_kind(node)}")
        value = self.construct(node, path)
        if isinstance(value, str):
            value = self.interpolate(value, node, path, secret=secret)
        return value

    def interpolate(
        self, text: str, node: yaml.Node, path: Path, *, secret: bool = False
    ) -> str:
        """Expand ``${VAR}``, ``${VAR:-default}`` and ``$$``; report unset variables.

        A ``$`` followed by anything else is kept as written, so passwords with
        a dollar sign survive; ``${`` without its ``}`` is an error. With
        ``secret`` (passwords) the errors name variables but never quote the
        text around them.
        """
        problems: list[str] = []

        def expand(match: re.Match[str]) -> str:
            token = match.group(0)
            if token == "$$":
                return "$"
            if match.group("open"):
                where = "the value" if secret else repr(text)
                problems.append(
                    f"unterminated '${{' in {where}; write $$ for a literal $"
                )
                return token
            body = match.group("body")
            if body is None:
                return token
            var = _VAR_RE.match(body)
            if not var:
                reference = "in the value" if secret else repr(token)
                problems.append(
                    f"invalid reference {reference}: expected ${{NAME}} or "
                    f"${{NAME:-default}} (NAME is letters, digits and _); "
                    f"write $$ for a literal $"
                )
                return token
            name, default = var.group("name"), var.group("default")
            value = self.environ.get(name)
            if value:
                return value
            if default is not None:
                return default
            if value is not None:
                return value  # set but empty, and no default to prefer
            problems.append(
                f"environment variable {name} is not set; "
                f"set {name} or write ${{{name}:-default}}"
            )
            return token

        result = _REF_RE.sub(expand, text)
        for problem in problems:
            self.report(node, path, problem)
        if problems:
            raise _Invalid()
        return result

    def _got(self, node: yaml.Node) -> str:
        if isinstance(node, yaml.ScalarNode):
            try:
                return _show(self.loader.construct_object(node, deep=True))
            except yaml.YAMLError:
                return repr(node.value)
        return _kind(node)

    # -- typed converters ---------------------------------------------------

    def text(self, node: yaml.Node, path: Path, expected: str = "text") -> str:
        value = self.scalar(node, path, expected)
        if not isinstance(value, str):
            self.fail(node, path, f"expected {expected}, got {_show(value)}")
        return value

    def name(self, node: yaml.Node, path: Path) -> str:
        expected = "a name of lower-case letters, digits, '_' and '-'"
        value = self.text(node, path, expected)
        if not _NAME_RE.match(value):
            self.fail(node, path, f"expected {expected}, got {value!r}")
        return value

    def integer(self, node: yaml.Node, path: Path, low: int, high: int | None) -> int:
        """An int within bounds; digit strings count, since ``${VAR}`` yields text."""
        expected = (
            f"a whole number >= {low}" if high is None else f"a whole number {low}-{high}"
        )
        value = self.scalar(node, path, expected)
        if isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(node, path, f"expected {expected}, got {_show(value)}")
        if value < low or (high is not None and value > high):
            self.fail(node, path, f"expected {expected}, got {value}")
        return value

    def positive(self, node: yaml.Node, path: Path) -> int:
        return self.integer(node, path, 1, None)

    def boolean(self, node: yaml.Node, path: Path) -> bool:
        """true or false; the text ``true``/``false`` counts, as ``${VAR}`` yields text."""
        value = _flag(self.scalar(node, path, "true or false"))
        if not isinstance(value, bool):
            self.fail(node, path, f"expected true or false, got {_show(value)}")
        return value

    def duration(self, node: yaml.Node, path: Path) -> float:
        value = self.scalar(node, path, "a duration")
        try:
            return parse_duration(value)
        except ValueError as e:
            self.fail(node, path, str(e))

    # -- the document -------------------------------------------------------

    def build(self, root: yaml.Node | None) -> Config | None:
        if root is None:
            self.errors.append(
                (1, f"{self.source}:1: the file is empty; expected a mapping with "
                    f"'listeners' and 'clusters'")
            )
            return None
        try:
            fields = self.mapping(root, (), _TOP_KEYS, ("listeners",))
        except _Invalid:
            return None
        # Only forward-proxy listeners may go without: an unknown cluster
        # reference below reports the rest ("defined clusters: none").
        clusters = (
            self._build_list(fields, "clusters", "clusters", self._build_cluster)
            if "clusters" in fields else ()
        )
        listeners = self._build_list(
            fields, "listeners", "listeners", self._build_listener
        )
        hosts = self._optional(fields, "hosts", (), self._build_hosts)
        access_log = self._optional(
            fields, "access_log", AccessLogConfig(), self._build_access_log
        )
        for key, default in _HTTP_SERVICE_DEFAULTS.items():
            if key not in fields:
                self.listens.append((default.listen, None, (key, "listen")))
        settings = _FieldReader(self, fields, (), ())
        admin = settings("admin", self._http_service, DEFAULT_ADMIN)
        metrics = settings("metrics", self._http_service, DEFAULT_METRICS)
        drain_timeout = settings("drain_timeout", self.duration, 25.0)
        shutdown_delay = settings("shutdown_delay", self.duration, 0.0)
        self._check_names("listener", self.listener_names)
        self._check_names("cluster", self.cluster_names)
        self._check_cluster_refs()
        self._check_listens()
        if self.errors or listeners is None or clusters is None:
            return None
        if hosts is None or access_log is None or not settings.ok:
            return None
        return self._construct(
            root, (), Config, source=self.source, listeners=listeners,
            clusters=clusters, hosts=hosts, access_log=access_log, admin=admin,
            metrics=metrics, drain_timeout=drain_timeout,
            shutdown_delay=shutdown_delay,
        )

    def _optional(
        self,
        fields: dict[str, yaml.Node],
        key: str,
        default: T,
        build: Callable[[yaml.Node, Path], T],
    ) -> T | None:
        node = fields.get(key)
        if node is None or _is_null(node):
            return default
        try:
            return build(node, (key,))
        except _Invalid:
            return None

    def _build_list(
        self,
        fields: dict[str, yaml.Node],
        key: str,
        what: str,
        build: Callable[[yaml.Node, Path], T | None],
    ) -> tuple[T, ...] | None:
        node = fields.get(key)
        if node is None:
            return None  # reported as missing
        try:
            items = self.sequence(node, (key,), what)
        except _Invalid:
            return None
        if not items:
            self.report(node, (key,), f"expected at least one entry in {what}, got []")
            return None
        built = [build(item, (key, index)) for index, item in enumerate(items)]
        if any(item is None for item in built):
            return None
        return tuple(built)  # type: ignore[arg-type]

    def _construct(self, node: yaml.Node, path: Path, cls: Callable[..., T], **kw: Any) -> T | None:
        """Build an attrs object; a validator failure becomes an ordinary error.

        The loader checks everything first, so this only fires if the two lines
        of defence disagree; reporting beats a traceback.
        """
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            self.report(node, path, str(e))
            return None

    def _build_listener(self, node: yaml.Node, path: Path) -> ListenerConfig | None:
        try:
            fields = self.mapping(node, path, _LISTENER_KEYS, ("name", "listen"))
        except _Invalid:
            return None
        read = _FieldReader(self, fields, path, ("name", "listen"))
        name = read("name", self.name)
        if name is not None:
            self.listener_names.append(_Named(name, fields["name"], path + ("name",)))
        listen = read("listen", self._listen)
        if listen is not None:
            self.listens.append((listen, fields["listen"], path + ("listen",)))
        # None when the mode written is wrong: the rules tied to a mode are
        # then skipped, and every key's value is still checked.
        mode = read("mode", self._mode) if "mode" in fields else "tcp"
        if not self._check_mode_keys(fields, path, mode):
            read.ok = False
        cluster = read("cluster", self.name)
        if cluster is not None:
            self.cluster_refs.append(
                _Named(cluster, fields["cluster"], path + ("cluster",))
            )
        log_prefix = read(
            "log_prefix", self._log_prefix, name.upper() if name else None
        )
        allow_sources = read("allow_sources", self._allow_sources)
        max_connections = read("max_connections", self.positive, 10000)
        proxy_protocol = read("proxy_protocol", self.boolean, False)
        tls = read("tls", self._listener_tls) if "tls" in fields else "passthrough"
        require_tls = read("require_tls", self.boolean, False)
        routes = read("routes", self._routes, ())
        client_tls = read("client_tls", self._client_tls)
        allow_destinations = read("allow_destinations", self._allow_destinations, ())
        users = read("users", lambda n, p: self._users(n, p, mode), ())
        if mode == "tcp":
            if not fields.has("cluster"):
                self.report(node, path, "missing required key 'cluster'")
                read.ok = False
        elif mode == "postgres":
            if not self._check_postgres(node, path, fields, tls, require_tls):
                read.ok = False
        elif mode is not None and not fields.has("allow_destinations"):
            self.report(
                node, path,
                f"missing required key 'allow_destinations' ({mode} listeners dial "
                f"only the destinations listed there and are never open proxies; "
                f"e.g. allow_destinations: [\"api.vendor.com:443\"])",
            )
            read.ok = False
        if not read.ok:
            return None
        return self._construct(
            node, path, ListenerConfig, name=name, listen=listen, mode=mode,
            cluster=cluster, log_prefix=log_prefix, allow_sources=allow_sources,
            max_connections=max_connections, proxy_protocol=proxy_protocol,
            tls=tls, require_tls=require_tls, routes=routes, client_tls=client_tls,
            allow_destinations=allow_destinations, users=users,
        )

    def _check_mode_keys(self, fields: _Fields, path: Path, mode: str | None) -> bool:
        """Report keys that belong to other modes and drop them from ``fields``.

        Their values are not read: the key is wrong wherever its value is.
        Returns False if any was reported.
        """
        if mode is None:
            return True
        ok = True
        default = "" if "mode" in fields else ", the default"
        for keys, modes, wanted in _MODE_KEYS:
            if mode in modes:
                continue
            for key in keys:
                if key not in fields:
                    continue
                self.report(
                    fields.key_nodes[key], path + (key,),
                    f"only for mode: {wanted}; this listener has mode: {mode}{default}",
                )
                del fields[key]
                ok = False
        return ok

    def _check_postgres(
        self,
        node: yaml.Node,
        path: Path,
        fields: _Fields,
        tls: str | None,
        require_tls: bool | None,
    ) -> bool:
        """The rules tying a postgres listener's cluster, routes and TLS keys.

        Checked on which keys are written, so a bad value elsewhere does not
        hide them; ``tls`` is None when its value was wrong, and the rules
        that depend on it are then skipped. Returns False if any was broken.
        """
        before = len(self.errors)
        if tls == "originate":
            if "routes" in fields:
                self.report(
                    fields.key_nodes["routes"], path + ("routes",),
                    "not allowed with tls: originate: routes choose by the TLS "
                    "server name (SNI), and clients of a tls: originate listener "
                    "speak plaintext to the proxy, so it sees none; name one "
                    "cluster instead, or use tls: passthrough to route by SNI",
                )
            elif not fields.has("cluster"):
                self.report(
                    node, path,
                    "missing required key 'cluster' (a tls: originate listener "
                    "opens TLS to one cluster)",
                )
            if require_tls is True and not fields.has("client_tls"):
                self.report(
                    fields.key_nodes["require_tls"], path + ("require_tls",),
                    "with tls: originate, require_tls needs client_tls (the "
                    "certificate the proxy shows clients that ask for TLS); "
                    "without it every client would be refused",
                )
        else:
            if "cluster" in fields and "routes" in fields:
                self.report(
                    fields.key_nodes["routes"], path + ("routes",),
                    "give cluster or routes, not both (cluster sends every "
                    "connection to one cluster; routes choose by the TLS server "
                    "name, SNI)",
                )
            elif not fields.has("cluster") and not fields.has("routes"):
                self.report(
                    node, path,
                    "missing required key 'cluster' or 'routes' (a postgres "
                    "listener sends every connection to one cluster, or chooses "
                    "by the TLS server name, SNI, with routes)",
                )
        if tls == "passthrough" and "client_tls" in fields:
            default = "" if "tls" in fields else ", the default"
            self.report(
                fields.key_nodes["client_tls"], path + ("client_tls",),
                f"only with tls: originate (with passthrough the client's TLS goes "
                f"through to the server and the proxy shows no certificate); this "
                f"listener has tls: passthrough{default}",
            )
        return len(self.errors) == before

    def _build_cluster(self, node: yaml.Node, path: Path) -> ClusterConfig | None:
        try:
            fields = self.mapping(node, path, _CLUSTER_KEYS, ("name", "endpoints"))
        except _Invalid:
            return None
        read = _FieldReader(self, fields, path, ("name", "endpoints"))
        name = read("name", self.name)
        if name is not None:
            self.cluster_names.append(_Named(name, fields["name"], path + ("name",)))
        endpoints = read("endpoints", self._endpoints)
        connect_timeout = read("connect_timeout", self._connect_timeout, 5.0)
        max_connect_attempts = read("max_connect_attempts", self.positive, 3)
        idle_timeout = read("idle_timeout", self._idle_timeout, None)
        max_connections = read("max_connections", self.positive, 1024)
        max_pending = read("max_pending", self.positive, 128)
        keepalive = read("keepalive", self._keepalive, Keepalive())
        health_check = read("health_check", self._health_check, HealthCheckConfig())
        tls = read("tls", self._cluster_tls)
        if not read.ok:
            return None
        return self._construct(
            node, path, ClusterConfig, name=name, endpoints=endpoints,
            connect_timeout=connect_timeout,
            max_connect_attempts=max_connect_attempts, idle_timeout=idle_timeout,
            max_connections=max_connections, max_pending=max_pending,
            keepalive=keepalive, health_check=health_check, tls=tls,
        )

    def _listen(self, node: yaml.Node, path: Path) -> ListenAddress:
        value = self.scalar(node, path, "an address to listen on")
        if isinstance(value, int) and not isinstance(value, bool):
            self.fail(
                node, path,
                f"{_LISTEN_HINT}, got {value}; write \":{value}\" for all interfaces",
            )
        if not isinstance(value, str):
            self.fail(node, path, f"{_LISTEN_HINT}, got {_show(value)}")
        try:
            return _parse_listen(value)
        except ValueError as e:
            self.fail(node, path, str(e))

    def _mode(self, node: yaml.Node, path: Path) -> str:
        expected = "tcp, postgres, http_connect or socks5"
        value = self.scalar(node, path, expected)
        if value not in MODES:
            self.fail(node, path, f"expected {expected}, got {_show(value)}")
        return value

    def _log_prefix(self, node: yaml.Node, path: Path) -> str:
        value = self.text(node, path, "a prefix without spaces")
        if not value or any(c.isspace() for c in value):
            self.fail(
                node, path,
                f"expected a non-empty prefix without whitespace, got {value!r}",
            )
        return value

    def _allow_sources(self, node: yaml.Node, path: Path) -> tuple[IPNetwork, ...] | None:
        if _is_null(node):
            return None
        items = self.sequence(node, path, "CIDRs or IP addresses")
        if not items:
            self.fail(
                node, path,
                "an empty list would refuse every client; remove the key to "
                "allow any source",
            )
        return self.each(items, path, self._network)

    def _network(self, node: yaml.Node, path: Path) -> IPNetwork:
        expected = (
            "expected a CIDR such as 10.0.0.0/8 or fdaa::/16, or a single IP address"
        )
        value = self.scalar(node, path, "a CIDR")
        if not isinstance(value, str):
            self.fail(node, path, f"{expected}, got {_show(value)}")
        try:
            return ip_network(value)
        except ValueError:
            pass
        try:
            network = ip_network(value, strict=False)
        except ValueError:
            self.fail(node, path, f"{expected}, got {value!r}")
        self.fail(
            node, path,
            f"{value!r} has host bits set; did you mean '{network}'?",
        )

    # -- postgres listeners -------------------------------------------------

    def _listener_tls(self, node: yaml.Node, path: Path) -> str:
        value = self.scalar(node, path, "passthrough or originate")
        if value not in _LISTENER_TLS:
            self.fail(
                node, path,
                f"expected passthrough (the client's TLS goes through to the server) "
                f"or originate (the proxy opens TLS to the cluster), got {_show(value)}",
            )
        return value

    def _routes(self, node: yaml.Node, path: Path) -> tuple[PostgresRoute, ...]:
        items = self.sequence(
            node, path, "routes ({sni: NAME, cluster: NAME} or {sni: NAME, upstream: HOST:PORT})"
        )
        if not items:
            self.fail(
                node, path,
                "an empty list would refuse every connection; give at least one "
                "route, or use cluster instead",
            )
        routes: list[PostgresRoute] = []
        first: dict[str, _Named] = {}
        failed = False
        for index, item in enumerate(items):
            try:
                route, sni_node = self._route(item, path + (index,))
            except _Invalid:
                failed = True
                continue
            sni_path = path + (index, "sni")
            if route.sni in first:
                earlier = first[route.sni]
                self.report(
                    sni_node, sni_path,
                    f"duplicate route for {route.sni!r} (first at "
                    f"{_render_path(earlier.path)}, line {_line(earlier.node)})",
                )
                failed = True
                continue
            first[route.sni] = _Named(route.sni, sni_node, sni_path)
            routes.append(route)
        if failed:
            raise _Invalid()
        return tuple(routes)

    def _route(self, node: yaml.Node, path: Path) -> tuple[PostgresRoute, yaml.Node]:
        """One route and the node of its ``sni``, for the duplicate check."""
        fields = self.mapping(node, path, _ROUTE_KEYS, ("sni",))
        read = _FieldReader(self, fields, path, ("sni",))
        sni = read("sni", self._sni)
        cluster = read("cluster", self.name)
        if cluster is not None:
            self.cluster_refs.append(
                _Named(cluster, fields["cluster"], path + ("cluster",))
            )
        upstream = read("upstream", self._upstream)
        if "cluster" in fields and "upstream" in fields:
            self.report(
                fields.key_nodes["upstream"], path + ("upstream",),
                "give cluster or upstream, not both (cluster sends to a configured "
                "cluster; upstream dials a HOST:PORT made from the server name)",
            )
            read.ok = False
        elif not fields.has("cluster") and not fields.has("upstream"):
            self.report(
                node, path,
                "missing required key 'cluster' or 'upstream' (a route sends to a "
                "configured cluster, or to a HOST:PORT template such as "
                "'{sni}:5432')",
            )
            read.ok = False
        if not read.ok:
            raise _Invalid()
        route = self._construct(
            node, path, PostgresRoute, sni=sni, cluster=cluster, upstream=upstream
        )
        if route is None:
            raise _Invalid()
        return route, fields["sni"]

    def _sni(self, node: yaml.Node, path: Path) -> str:
        value = self.text(node, path, "a server name")
        if _ip_literal(value) is not None:
            self.fail(
                node, path,
                f"clients send a TLS server name (SNI) only for host names, never "
                f"for an IP address; {_SNI_HINT}, got {value!r}",
            )
        try:
            return _parse_name_pattern(value, "every server name", _SNI_HINT)
        except ValueError as e:
            self.fail(node, path, str(e))

    def _upstream(self, node: yaml.Node, path: Path) -> str:
        value = self.scalar(node, path, "HOST:PORT")
        if not isinstance(value, str):
            self.fail(node, path, f"{_UPSTREAM_HINT}, got {_show(value)}")
        try:
            return _parse_upstream_template(value)
        except ValueError as e:
            self.fail(node, path, str(e))

    def _client_tls(self, node: yaml.Node, path: Path) -> ClientTLS:
        fields = self.mapping(node, path, _CLIENT_TLS_KEYS, _CLIENT_TLS_KEYS)
        read = _FieldReader(self, fields, path, _CLIENT_TLS_KEYS)
        cert = read("cert", self._file)
        key = read("key", self._file)
        if not read.ok:
            raise _Invalid()
        result = self._construct(node, path, ClientTLS, cert=cert, key=key)
        if result is None:
            raise _Invalid()
        return result

    def _file(self, node: yaml.Node, path: Path) -> str:
        """The path of an existing file (relative paths: to the working directory)."""
        value = self.text(node, path, "a file path")
        if not value:
            self.fail(node, path, "expected a file path, got ''")
        if os.path.isdir(value):
            self.fail(node, path, f"{value!r} is a directory, not a file")
        if not os.path.isfile(value):
            self.fail(node, path, f"no such file: {value!r}")
        return value

    def _optional_file(self, node: yaml.Node, path: Path) -> str | None:
        if _is_null(node):
            return None
        return self._file(node, path)

    # -- cluster tls --------------------------------------------------------

    def _cluster_tls(self, node: yaml.Node, path: Path) -> ClusterTLS | None:
        """A cluster's ``tls``: true, null-valued keys or ``{}`` verify with defaults."""
        if isinstance(node, yaml.ScalarNode):
            value = _flag(self.scalar(node, path, "a mapping or true/false"))
            if value is None or value is False:
                return None
            if value is True:
                return ClusterTLS()
            self.fail(
                node, path,
                f"expected a mapping with server_name and ca_file, or true to verify "
                f"with the defaults (each endpoint's host name, the system trust "
                f"store), got {_show(value)}",
            )
        fields = self.mapping(node, path, _CLUSTER_TLS_KEYS)
        read = _FieldReader(self, fields, path, ())
        server_name = read("server_name", self._server_name)
        ca_file = read("ca_file", self._optional_file)
        if not read.ok:
            raise _Invalid()
        result = self._construct(
            node, path, ClusterTLS, server_name=server_name, ca_file=ca_file
        )
        if result is None:
            raise _Invalid()
        return result

    def _server_name(self, node: yaml.Node, path: Path) -> str | None:
        if _is_null(node):
            return None
        value = self.text(node, path, "a host name")
        if _ip_literal(value) is None:
            problem = _hostname_problem(value)
            if problem:
                self.fail(node, path, problem)
        return value

    # -- forward-proxy listeners --------------------------------------------

    def _allow_destinations(
        self, node: yaml.Node, path: Path
    ) -> tuple[DestinationRule, ...]:
        items = self.sequence(node, path, "HOST:PORT destinations")
        if not items:
            self.fail(
                node, path,
                "an empty list would refuse every destination; list the HOST:PORT "
                "destinations clients may reach (the proxy is never open to all)",
            )
        return self.each(items, path, self._destination)

    def _destination(self, node: yaml.Node, path: Path) -> DestinationRule:
        value = self.scalar(node, path, "HOST:PORT")
        if not isinstance(value, str):
            self.fail(node, path, f"{_DESTINATION_HINT}, got {_show(value)}")
        try:
            return _parse_destination(value)
        except ValueError as e:
            self.fail(node, path, str(e))

    def _users(self, node: yaml.Node, path: Path, mode: str | None) -> tuple[User, ...]:
        """``users``: name and password pairs. No message ever shows a password.

        Shapes are checked here rather than by :meth:`sequence` and
        :meth:`mapping`, whose messages quote the value they got, which could be
        a password written in the wrong place.
        """
        if not isinstance(node, yaml.SequenceNode):
            got = "null" if _is_null(node) else _kind(node)
            self.fail(
                node, path, f"expected a list of {{name, password}} mappings, got {got}"
            )
        if not node.value:
            self.fail(
                node, path,
                "an empty list is ambiguous; list {name, password} mappings, or "
                "remove the key to let clients in without a password",
            )
        users: list[User] = []
        first: dict[str, _Named] = {}
        failed = False
        for index, item in enumerate(node.value):
            entry = path + (index,)
            if not isinstance(item, yaml.MappingNode):
                got = "null" if _is_null(item) else _kind(item)
                self.report(
                    item, entry, f"expected a mapping with keys name, password, got {got}"
                )
                failed = True
                continue
            try:
                fields = self.mapping(item, entry, _USER_KEYS, _USER_KEYS)
            except _Invalid:
                failed = True
                continue
            read = _FieldReader(self, fields, entry, _USER_KEYS)
            name = read("name", lambda n, p: self._user_name(n, p, mode))
            password = read("password", lambda n, p: self._password(n, p, mode))
            if name is not None:
                name_path = entry + ("name",)
                if name in first:
                    earlier = first[name]
                    self.report(
                        fields["name"], name_path,
                        f"duplicate user name {name!r} (first at "
                        f"{_render_path(earlier.path)}, line {_line(earlier.node)})",
                    )
                    read.ok = False
                else:
                    first[name] = _Named(name, fields["name"], name_path)
            if not read.ok:
                failed = True
                continue
            users.append(User(name=name, password=password))
        if failed:
            raise _Invalid()
        return tuple(users)

    def _user_name(self, node: yaml.Node, path: Path, mode: str | None) -> str:
        value = self.text(node, path, "a user name")
        if not value:
            self.fail(node, path, "must not be empty")
        if any(c.isspace() or not c.isprintable() for c in value):
            self.fail(
                node, path,
                f"expected a user name without whitespace or control characters, "
                f"got {value!r}",
            )
        if mode == "http_connect" and ":" in value:
            self.fail(
                node, path,
                f"HTTP Basic authentication cannot carry ':' in a user name, got "
                f"{value!r}",
            )
        if mode == "socks5" and len(value.encode()) > _SOCKS5_MAX_CREDENTIAL:
            self.fail(
                node, path,
                f"longer than {_SOCKS5_MAX_CREDENTIAL} bytes, the most SOCKS5 "
                f"(RFC 1929) can carry",
            )
        return value

    def _password(self, node: yaml.Node, path: Path, mode: str | None) -> str:
        """A password: text, never quoted back in a message."""
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, path, f"expected text, got {_kind(node)}")
        value = self.scalar(node, path, "text", secret=True)
        if value is None or value == "":
            # An empty result can only come of references that expanded to
            # nothing, so the text written is safe to show.
            written = node.value if "${" in node.value else ""
            hint = f" ({written} expanded to nothing)" if written else ""
            self.fail(node, path, f"must not be empty{hint}")
        if not isinstance(value, str):
            self.fail(
                node, path,
                "expected text; put the password in quotes (YAML reads it "
                "unquoted as another type)",
            )
        if mode == "socks5" and len(value.encode()) > _SOCKS5_MAX_CREDENTIAL:
            self.fail(
                node, path,
                f"longer than {_SOCKS5_MAX_CREDENTIAL} bytes, the most SOCKS5 "
                f"(RFC 1929) can carry",
            )
        return value

    def _endpoints(self, node: yaml.Node, path: Path) -> tuple[Address, ...]:
        items = self.sequence(node, path, "HOST:PORT endpoints")
        if not items:
            self.fail(node, path, f"{_ENDPOINT_HINT}: the list is empty")
        return self.each(items, path, self._endpoint)

    def _endpoint(self, node: yaml.Node, path: Path) -> Address:
        value = self.scalar(node, path, "HOST:PORT")
        if not isinstance(value, str):
            self.fail(node, path, f"{_ENDPOINT_HINT}, got {_show(value)}")
        try:
            return _parse_endpoint(value)
        except ValueError as e:
            self.fail(node, path, str(e))

    def _connect_timeout(self, node: yaml.Node, path: Path) -> float:
        return self._positive_duration(node, path, "5s")

    def _positive_duration(self, node: yaml.Node, path: Path, example: str) -> float:
        seconds = self.duration(node, path)
        if seconds <= 0:
            self.fail(node, path, f"must be greater than 0 (e.g. {example})")
        return seconds

    def _idle_timeout(self, node: yaml.Node, path: Path) -> float | None:
        if _is_null(node):
            return None
        return self.duration(node, path) or None

    def _keepalive(self, node: yaml.Node, path: Path) -> Keepalive | None:
        if isinstance(node, yaml.ScalarNode):
            value = _flag(self.scalar(node, path, "a mapping or true/false"))
            if value is None or value is False:
                return None
            if value is True:
                return Keepalive()
            self.fail(
                node, path,
                f"expected a mapping with idle, interval and count, or false to "
                f"turn keepalive off, got {_show(value)}",
            )
        fields = self.mapping(node, path, _KEEPALIVE_KEYS)
        read = _FieldReader(self, fields, path, ())
        defaults = Keepalive()
        idle = read("idle", self._keepalive_seconds, defaults.idle)
        interval = read("interval", self._keepalive_seconds, defaults.interval)
        count = read(
            "count",
            lambda n, p: self.integer(n, p, 1, _MAX_KEEPALIVE_COUNT),
            defaults.count,
        )
        if not read.ok:
            raise _Invalid()
        result = self._construct(node, path, Keepalive, idle=idle, interval=interval, count=count)
        if result is None:
            raise _Invalid()
        return result

    def _keepalive_seconds(self, node: yaml.Node, path: Path) -> float:
        value = self.scalar(node, path, "a duration")
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            self.fail(node, path, str(e))
        if seconds < 1 or seconds != int(seconds) or seconds > _MAX_KEEPALIVE_SECONDS:
            self.fail(
                node, path,
                f"expected whole seconds from 1s to {_MAX_KEEPALIVE_SECONDS}s "
                f"(the kernel counts keepalive time in whole seconds), "
                f"got {_show(value)}",
            )
        return seconds

    def _health_check(self, node: yaml.Node, path: Path) -> HealthCheckConfig:
        if isinstance(node, yaml.ScalarNode):
            value = _flag(self.scalar(node, path, "a mapping or true/false"))
            if value is None or value is True:
                return HealthCheckConfig()
            if value is False:
                return HealthCheckConfig(kind="none")
            self.fail(
                node, path,
                f"expected a mapping with kind, interval, timeout, unhealthy_threshold "
                f"and healthy_threshold, or false to turn health checks off, got "
                f"{_show(value)}",
            )
        fields = self.mapping(node, path, _HEALTH_CHECK_KEYS)
        read = _FieldReader(self, fields, path, ())
        defaults = HealthCheckConfig()
        kind = read("kind", self._health_check_kind, defaults.kind)
        interval = read(
            "interval",
            lambda n, p: self._positive_duration(n, p, "10s"),
            defaults.interval,
        )
        timeout = read(
            "timeout",
            lambda n, p: self._positive_duration(n, p, "2s"),
            defaults.timeout,
        )
        unhealthy_threshold = read(
            "unhealthy_threshold", self.positive, defaults.unhealthy_threshold
        )
        healthy_threshold = read(
            "healthy_threshold", self.positive, defaults.healthy_threshold
        )
        if not read.ok:
            raise _Invalid()
        if timeout >= interval:
            # A check still running when the next is due would overlap it.
            written = fields.get("timeout") or fields.get("interval") or node
            timeout_text = _format_seconds(timeout)
            if "timeout" not in fields:
                timeout_text += ", the default"
            interval_text = _format_seconds(interval)
            if "interval" not in fields:
                interval_text += ", the default"
            self.fail(
                written, path,
                f"timeout ({timeout_text}) must be less than interval ({interval_text})",
            )
        result = self._construct(
            node, path, HealthCheckConfig, kind=kind, interval=interval,
            timeout=timeout, unhealthy_threshold=unhealthy_threshold,
            healthy_threshold=healthy_threshold,
        )
        if result is None:
            raise _Invalid()
        return result

    def _health_check_kind(self, node: yaml.Node, path: Path) -> str:
        value = self.scalar(node, path, "tcp, postgres or none")
        if value not in _HEALTH_CHECK_KINDS:
            self.fail(node, path, f"expected tcp, postgres or none, got {_show(value)}")
        return value

    def _build_hosts(self, node: yaml.Node, path: Path) -> tuple[tuple[str, str], ...]:
        if not isinstance(node, yaml.MappingNode):
            self.fail(
                node, path,
                f"expected a mapping of host name to IP address, got {self._got(node)}",
            )
        pairs: list[tuple[str, str]] = []
        seen: dict[str, int] = {}
        failed = False
        for key, (key_node, value_node) in self.entries(node, path).items():
            name = key.lower()
            entry = path + (key,)
            problem = _hostname_problem(name)
            if problem:
                self.report(key_node, entry, problem)
                failed = True
                continue
            if name in seen:
                self.report(
                    key_node, entry,
                    f"duplicate host {key!r} (names ignore case; first at line "
                    f"{seen[name]})",
                )
                failed = True
                continue
            seen[name] = _line(key_node)
            try:
                address = self.text(value_node, entry, "an IP address")
            except _Invalid:
                failed = True
                continue
            literal = _ip_literal(address)
            if literal is None:
                self.report(
                    value_node, entry,
                    f"expected an IP address (e.g. 127.0.0.1 or fdaa::3), got {address!r}",
                )
                failed = True
                continue
            pairs.append((name, str(literal)))
        if failed:
            raise _Invalid()
        return tuple(pairs)

    def _build_access_log(self, node: yaml.Node, path: Path) -> AccessLogConfig:
        fields = self.mapping(node, path, _ACCESS_LOG_KEYS)
        read = _FieldReader(self, fields, path, ())
        log_format = read("format", self._log_format, "text")
        if not read.ok:
            raise _Invalid()
        return AccessLogConfig(format=log_format)

    def _log_format(self, node: yaml.Node, path: Path) -> str:
        value = self.scalar(node, path, "text or json")
        if value not in ("text", "json"):
            self.fail(node, path, f"expected text or json, got {_show(value)}")
        return value

    def _http_service(self, node: yaml.Node, path: Path) -> HttpServiceConfig | None:
        """``admin`` or ``metrics``: null, true or ``{}`` is the default, false is off.

        The address the service will use, written or default, is claimed for
        the listen clash check; a key absent from the file is claimed by
        :meth:`build`.
        """
        key = path[-1]
        default = _HTTP_SERVICE_DEFAULTS[key]
        listen_path = path + ("listen",)
        if isinstance(node, yaml.ScalarNode):
            value = _flag(self.scalar(node, path, "a mapping or true/false"))
            if value is False:
                return None
            if value is None or value is True:
                self.listens.append((default.listen, None, listen_path))
                return default
            self.fail(
                node, path,
                f"expected a mapping with listen, or false to turn {key} off, "
                f"got {_show(value)}",
            )
        fields = self.mapping(node, path, _HTTP_SERVICE_KEYS)
        if "listen" not in fields:
            self.listens.append((default.listen, None, listen_path))
            return default
        listen = self._listen(fields["listen"], listen_path)
        self.listens.append((listen, fields["listen"], listen_path))
        result = self._construct(node, path, HttpServiceConfig, listen=listen)
        if result is None:
            raise _Invalid()
        return result

    # -- cross checks -------------------------------------------------------

    def _check_names(self, kind: str, names: list[_Named]) -> None:
        first: dict[str, _Named] = {}
        for named in names:
            if named.value in first:
                earlier = first[named.value]
                self.report(
                    named.node, named.path,
                    f"duplicate {kind} name {named.value!r} (first at "
                    f"{_render_path(earlier.path)}, line {_line(earlier.node)})",
                )
            else:
                first[named.value] = named

    def _check_cluster_refs(self) -> None:
        defined = list(dict.fromkeys(named.value for named in self.cluster_names))
        for ref in self.cluster_refs:
            if ref.value in defined:
                continue
            listing = ", ".join(defined) if defined else "none"
            close = difflib.get_close_matches(ref.value, defined, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            self.report(
                ref.node, ref.path,
                f"unknown cluster {ref.value!r} (defined clusters: {listing}){hint}",
            )

    def _check_listens(self) -> None:
        # Defaults first, then file order: of two clashing addresses the later
        # one written carries the error and names the other.
        claims = sorted(
            self.listens, key=lambda claim: 0 if claim[1] is None else _line(claim[1])
        )
        for index, (listen, node, path) in enumerate(claims):
            if node is None:
                continue  # the defaults do not clash with each other
            for other, other_node, other_path in claims[:index]:
                if not _overlaps(listen, other):
                    continue
                where = _render_path(other_path)
                if other_node is None:
                    service = other_path[0]
                    message = (
                        f"{listen.text!r} overlaps the default {where} "
                        f"{other.text!r}; give {service} another address "
                        f"({service}: {{listen: ...}}) or turn it off "
                        f"({service}: false)"
                    )
                else:
                    if path[0] == other_path[0] == "listeners":
                        needs = "each listener needs its own address"
                    else:
                        needs = (
                            "listeners, admin and metrics each need their own address"
                        )
                    message = (
                        f"{listen.text!r} overlaps {where} {other.text!r} "
                        f"(line {_line(other_node)}); {needs}"
                    )
                self.report(node, path, message)
                break


class _FieldReader:
    """Reads optional and required fields of one mapping, remembering failures."""

    def __init__(
        self,
        builder: _Builder,
        fields: dict[str, yaml.Node],
        path: Path,
        required: Sequence[str],
    ) -> None:
        self.builder = builder
        self.fields = fields
        self.path = path
        self.ok = all(key in fields for key in required)

    def __call__(
        self,
        key: str,
        convert: Callable[[yaml.Node, Path], T],
        default: T | None = None,
    ) -> T | None:
        node = self.fields.get(key)
        if node is None:
            return default
        try:
            return convert(node, self.path + (key,))
        except _Invalid:
            self.ok = False
            return default


def _flag(value: object) -> object:
    """The text ``true``/``false`` (what ``${VAR}`` yields) as a bool; others unchanged."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _format_seconds(seconds: float) -> str:
    """``2.0`` -> ``2s``, ``0.25`` -> ``250ms``: seconds as the file would spell them."""
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _overlaps(a: ListenAddress, b: ListenAddress) -> bool:
    """Whether two listen addresses would fight over the same port.

    Port 0 (ephemeral) never clashes. On Linux a listening wildcard socket
    blocks specific addresses of its family on the same port, and a dual-stack
    ``::`` socket blocks both families.
    """
    if a.description is not None or b.description is not None:
        return a.description == b.description
    if a.port != b.port or a.port == 0:
        return False
    assert a.host is not None and b.host is not None
    if a.host == b.host:
        return True
    first, second = ip_address(a.host), ip_address(b.host)
    if a.dual_stack or b.dual_stack:
        return True
    if first.version != second.version:
        return False
    return first.is_unspecified or second.is_unspecified


def _syntax_error(source: str, text: str, error: yaml.MarkedYAMLError) -> str:
    """One line for a YAML syntax error: where it broke, and where the broken part began.

    PyYAML puts errors found at the end of the stream on the line after the
    last; that is clamped to the last line so the number exists in the file.
    """
    mark = error.problem_mark or error.context_mark
    last_line = max(1, len(text.splitlines()))
    line = min(mark.line + 1, last_line) if mark else 1
    problem, context = error.problem or "", error.context or ""
    if problem.startswith("but ") and context:
        # The composer's "expected a single document ... but found another".
        problem, context = f"{context}, {problem}", ""
    message = f"{source}:{line}: invalid YAML: {problem or context}"
    if mark and error.problem_mark:
        if mark.line + 1 > last_line:
            message += " (at the end of the file)"
        else:
            message += f" (column {mark.column + 1})"
    if problem and context:
        message += f", {context}"
        if error.context_mark:
            message += f" that starts at line {error.context_mark.line + 1}"
    return message


def parse_config(text: str, source: str, environ: Mapping[str, str]) -> Config:
    """Validate configuration ``text`` and return it as a :class:`Config`.

    ``source`` labels the messages (normally the file name). Every problem is
    collected and raised together as one :class:`ConfigError`, sorted by line.
    """
    loader = _Loader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            raise ConfigError([_syntax_error(source, text, e)]) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"{source}:1: invalid YAML: {e}"]) from None
        builder = _Builder(source, environ, loader)
        config = builder.build(root)
    finally:
        loader.dispose()
    if config is None or builder.errors:
        ordered = sorted(builder.errors, key=lambda error: error[0])
        raise ConfigError(message for _, message in ordered)
    return config


def load_config(path: str, environ: Mapping[str, str]) -> Config:
    """Read the file at ``path`` and validate it; see :func:`parse_config`.

    A file that cannot be read (missing, a directory, not UTF-8) is reported as
    a :class:`ConfigError` too, so callers have one exception to handle.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the config file: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: the config file is not UTF-8 text: {e.reason}"]) from None
    return parse_config(text, path, environ)
