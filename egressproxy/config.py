"""The configuration model: frozen attrs objects for everything a config file says.

An object that exists is valid: field validators check local rules (port
ranges, name patterns) and :class:`Config` checks the cross references other
modules rely on without re-checking (unique names, known clusters).  Reading
YAML into these objects, ``${ENV}`` interpolation, the checks that need the
whole file and the wording of every error live in ``configload.py``; its two
doors, :func:`load_config` and :func:`parse_config`, are re-exported here.
Both report every problem at once in a single :class:`ConfigError`, each line
shaped ``FILE:LINE: key.path: message``.

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

import math
import re
from collections.abc import Callable, Iterable, Mapping
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import TypeVar

import attrs
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
    """A forward-proxy credential; the password never appears in a repr or a log.

    ``allow_destinations``, when set, replaces the listener's list for this
    user (it is not merged with it); None means the listener's list applies.
    """

    name: str
    password: str = attrs.field(repr=False)
    allow_destinations: tuple[DestinationRule, ...] | None = attrs.field(
        default=None, repr=False, validator=attrs.validators.optional(_tuple_of(DestinationRule, non_empty=True))
    )


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
    #: At most this many connections from one source address (after any PROXY
    #: header); default half of max_connections, so no one source fills a listener.
    max_connections_per_source: int = attrs.field(
        default=attrs.Factory(lambda self: max(1, self.max_connections // 2), takes_self=True),
        validator=_check_positive_int,
    )
    proxy_protocol: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    #: The peers allowed to send a PROXY header (None: any peer, as before).
    proxy_protocol_trusted: tuple[IPNetwork, ...] | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(_tuple_of((IPv4Network, IPv6Network), non_empty=True)),
    )
    # -- address checks (forward modes, postgres {sni} routes) ------------------
    #: Exceptions to the built-in list of refused (internal) address ranges.
    allow_addresses: tuple[IPNetwork, ...] = attrs.field(
        default=(), validator=_tuple_of((IPv4Network, IPv6Network), non_empty=False)
    )
    #: More ranges to refuse.
    deny_addresses: tuple[IPNetwork, ...] = attrs.field(
        default=(), validator=_tuple_of((IPv4Network, IPv6Network), non_empty=False)
    )
    #: ``enforce`` refuses what the policy forbids; ``report`` allows it, logs and counts it.
    policy: str = attrs.field(default="enforce", validator=attrs.validators.in_(("enforce", "report")))
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
    #: Allowlist entries (as written) that check-config would call too broad,
    #: marked by the operator as intended.
    accept_risk: tuple[str, ...] = attrs.field(default=(), validator=_tuple_of(str, non_empty=False))


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
    #: Worker processes sharing the listeners (``auto`` is resolved to the
    #: CPUs this process may run on when the file is read).
    workers: int = attrs.field(default=1, validator=_check_positive_int)
    #: Use the data path's shortcuts around Twisted's per-event code (when
    #: the installed Twisted has the parts they rely on); false: Twisted's own path.
    fast_path: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))

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


# The loader builds the objects above and imports this module, so these two
# doors import it when called: either module may then be imported first.


def parse_config(text: str, source: str, environ: Mapping[str, str]) -> Config:
    """Validate configuration ``text`` (``source`` labels messages); see ``configload``."""
    from egressproxy import configload

    return configload.parse_config(text, source, environ)


def load_config(path: str, environ: Mapping[str, str]) -> Config:
    """Read and validate the file at ``path``; see ``configload``."""
    from egressproxy import configload

    return configload.load_config(path, environ)
