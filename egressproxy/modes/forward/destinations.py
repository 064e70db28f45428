"""Forward-proxy policy: where a client may go, and whether it is who it says.

This module owns three pure decisions for the ``http_connect`` and
``socks5`` modes, shared so that both modes say yes and no alike:

- the normal form of a requested destination (:func:`destination`,
  :func:`parse_authority`): a lower-case DNS name without its trailing dot,
  or an IP address (an IPv4-mapped IPv6 address becomes the IPv4 address it
  maps), and a port 1-65535;
- whether a listener's ``allow_destinations`` admits it (:func:`allowed`):
  names match ``host`` rules (exact, or ``*.suffix`` with at least one label
  before the suffix), IP addresses match ``network`` rules only, and a rule's
  port None matches every port.  The allowlist applies to the name the client
  asked for; what the name resolves to is not checked (a ``hosts:`` pin is
  how an operator fixes that);
- which configured user, if any, credentials belong to
  (:func:`authenticate`), in time that does not depend on where the first
  differing byte is, and which allowlist then applies (:func:`rules_for`: a
  user's own ``allow_destinations`` replaces the listener's).

It does not dial, resolve names or speak any protocol, and it never logs:
passwords pass through here and nowhere else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from ipaddress import IPv4Address, IPv6Address, ip_address

import attrs

from egressproxy.config.model import Address
from egressproxy.modes.forward.rules import DestinationRule, User


class InvalidDestination(ValueError):
    """The requested destination is not a host name or IP address with a port."""


#: One DNS label as the config accepts it (RFC 1123: letters, digits, '-').
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
#: A last label that a resolver would read as a number (``127.1``, ``0x7f.1``):
#: such "names" are IPv4 addresses in disguise, so they are refused.
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)\Z")


@attrs.frozen
class Destination:
    """A destination in normal form; ``ip`` is set for IP literals, else None."""

    host: str
    port: int
    ip: IPv4Address | IPv6Address | None = None

    def __str__(self) -> str:
        """``host:port``, IPv6 in brackets: the access log's upstream field."""
        return str(self.address)

    @property
    def address(self) -> Address:
        """The endpoint to dial (``hosts:`` pins apply to its name)."""
        return Address(self.host, self.port)


def _check_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise InvalidDestination(f"port {port} is out of range (1-65535)")
    return port


def destination(host: str, port: int) -> Destination:
    """The normal form of ``host`` (a name or an IP literal without brackets) and ``port``.

    Raises :class:`InvalidDestination` for anything else: empty names,
    characters outside RFC 1123 labels, names longer than 253 characters,
    numeric last labels, IPv6 zone ids, port 0.
    """
    _check_port(port)
    try:
        ip = ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if isinstance(ip, IPv6Address):
            if ip.scope_id is not None:
                raise InvalidDestination("IPv6 zone ids are not accepted")
            if ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
        return Destination(str(ip), port, ip)
    name = host.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253 or not name.isascii():
        raise InvalidDestination("not a valid host name")
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise InvalidDestination("not a valid host name")
    if _NUMERIC_LABEL.match(labels[-1]):
        raise InvalidDestination("a host name cannot end in a numeric label")
    return Destination(name, port, None)


def parse_port(text: str) -> int:
    """A decimal port 1-65535 (at most five digits, nothing else)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise InvalidDestination("the port must be a number 1-65535")
    return _check_port(int(text))


def parse_authority(text: str, default_port: int | None = None) -> Destination:
    """Parse ``host:port`` or ``[v6]:port`` (an HTTP authority without userinfo).

    Without ``default_port`` the port is required (CONNECT's authority-form);
    with it, a missing or empty port means ``default_port`` (``http://`` URLs).
    """
    if "@" in text:
        raise InvalidDestination("credentials in the authority are not accepted")
    if text.startswith("["):
        host, sep, after = text[1:].partition("]")
        if not sep or not isinstance(_ip_or_none(host), IPv6Address):
            raise InvalidDestination("only an IPv6 address goes in brackets")
        if after.startswith(":"):
            port_text: str | None = after[1:]
        elif not after:
            port_text = None
        else:
            raise InvalidDestination("junk after the bracketed address")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, None
        if ":" in host:
            raise InvalidDestination("an IPv6 address needs brackets")
    if port_text is None or (port_text == "" and default_port is not None):
        if default_port is None:
            raise InvalidDestination("the port is missing (write host:port)")
        port = default_port
    else:
        port = parse_port(port_text)
    return destination(host, port)


def _ip_or_none(text: str) -> IPv4Address | IPv6Address | None:
    try:
        return ip_address(text)
    except ValueError:
        return None


def allowed(rules: tuple[DestinationRule, ...], dest: Destination) -> bool:
    """True when some rule admits ``dest`` (see the module docstring); no rules admit nothing."""
    for rule in rules:
        if rule.port is not None and rule.port != dest.port:
            continue
        if dest.ip is not None:
            if rule.network is not None and dest.ip.version == rule.network.version and dest.ip in rule.network:
                return True
        elif rule.host is not None:
            if rule.host.startswith("*."):
                if dest.host.endswith(rule.host[1:]):
                    return True
            elif dest.host == rule.host:
                return True
    return False


# -- credentials -----------------------------------------------------------


def parse_basic(value: bytes) -> tuple[bytes, bytes] | None:
    """``(user, password)`` from a ``Basic`` credential (RFC 7617), else None.

    The scheme is case-insensitive; the token must be strict base64 and
    decode to ``user:password`` (the password may contain ``:``).
    """
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    name, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return name, password


def _digest(value: bytes) -> bytes:
    # Equal-length digests, so compare_digest's time depends on neither the
    # position of a difference nor the lengths of the secrets.
    return hashlib.sha256(value).digest()


def authenticate(users: tuple[User, ...], name: bytes, password: bytes) -> User | None:
    """The user of ``users`` whom ``name`` and ``password`` (UTF-8 bytes) belong to, else None.

    Every user is compared, name and password both, with
    ``hmac.compare_digest`` over SHA-256 digests, and the loop never stops
    early (not at a matching name, not at the match): the time taken does
    not reveal which part differed, how much of it matched, or which user it
    was.  Names are unique (the config refuses duplicates), so at most one
    user matches.
    """
    given_name, given_password = _digest(name), _digest(password)
    found: User | None = None
    for user in users:
        name_ok = hmac.compare_digest(given_name, _digest(user.name.encode("utf-8")))
        password_ok = hmac.compare_digest(given_password, _digest(user.password.encode("utf-8")))
        if name_ok & password_ok:
            found = user
    return found


def credentials_match(users: tuple[User, ...], name: bytes, password: bytes) -> bool:
    """True when ``name`` and ``password`` belong to one of ``users`` (see :func:`authenticate`)."""
    return authenticate(users, name, password) is not None


def rules_for(listener_rules: tuple[DestinationRule, ...], user: User | None) -> tuple[DestinationRule, ...]:
    """The allowlist that applies to ``user``: its own list if it has one, else the listener's.

    A user's list replaces the listener's; it is neither merged nor intersected.
    """
    if user is not None and user.allow_destinations is not None:
        return user.allow_destinations
    return listener_rules
