"""The tunnel's text forms: paths, destinations, ``${ENV}`` and its small config file.

What it owns: turning ``socks5://USER:PASSWORD@HOST:PORT``, ``tcp://HOST:PORT``
and ``HOST:PORT`` into :class:`Path` and :class:`Destination`, expanding
``${NAME}`` / ``${NAME:-default}`` (``$$`` for a literal ``$``, as in the
proxy's config) so a password can come from a Fly secret, and reading the
optional ``--config FILE``.  Every error is a :class:`TunnelUsageError`
whose message says what to write instead.  It does not decide precedence
between the command line, the file and the environment (``options.py``).

Why the URL is split by hand rather than with ``urllib.parse``: a password
may hold ``/``, ``?``, ``#`` or ``@``, which ``urlsplit`` would take for a
path or query, and its ``hostname`` lowercases a ``${VAR}`` host.  Here the
last ``@`` ends the credentials, each part is percent-decoded, and only then
is ``${...}`` expanded, so a secret's value is used exactly as it is set.
Passwords are never quoted in a message nor shown by ``str(path)``.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping
from urllib.parse import unquote

import attrs
import yaml

from egressproxy.addresses import format_host_port

#: ``socks5h`` is accepted as a synonym: the tunnel always sends names (ATYP 3).
SCHEMES = {"socks5": "socks5", "socks5h": "socks5", "tcp": "tcp"}

_REF = re.compile(r"\$\$|\$\{(?P<body>[^}]*)\}|(?P<open>\$\{)")
_VAR = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?$", re.DOTALL)
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")

#: Keys of the config file, and what each holds.
FILE_KEYS = {
    "via": "list of socks5:// or tcp:// URLs, in order of preference",
    "destinations": "list of HOST:PORT",
    "transparent": "true or false",
    "connect_timeout": "seconds (a number)",
}


class TunnelUsageError(Exception):
    """A setting the tunnel cannot use; the message names the fix."""


@attrs.frozen
class Path:
    """One way to the egress app: a ``socks5`` listener (with credentials) or a ``tcp`` listener."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{self.scheme}://{user}{format_host_port(self.host, self.port)}"


@attrs.frozen
class Destination:
    """Where the app means to connect: a host name (or IP literal) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_host_port(self.host, self.port)


def expand(text: str, environ: Mapping[str, str], where: str, secret: bool = False) -> str:
    """``text`` with ``${NAME}``, ``${NAME:-default}`` and ``$$`` expanded from ``environ``.

    A ``$`` followed by anything else stays as written.  With ``secret`` the
    error names the variable but never quotes the text around it.
    """
    problems: list[str] = []

    def one(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "$$":
            return "$"
        if match.group("open"):
            problems.append(f"{where}: unterminated '${{'; write $$ for a literal $")
            return token
        var = _VAR.match(match.group("body"))
        if var is None:
            shown = "a reference" if secret else repr(token)
            problems.append(f"{where}: {shown} is not ${{NAME}} or ${{NAME:-default}}; write $$ for a literal $")
            return token
        value = environ.get(var.group("name"))
        if value:
            return value
        if var.group("default") is not None:
            return var.group("default")
        if value is not None:
            return value
        name = var.group("name")
        problems.append(f"{where}: environment variable {name} is not set; set it (a Fly secret: fly secrets set {name}=...)")
        return token

    result = _REF.sub(one, text)
    if problems:
        raise TunnelUsageError(problems[0])
    return result


def valid_host(host: str) -> bool:
    """An IP literal, or a DNS name of at most 253 characters (labels of letters, digits, - and _)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))


def split_host_port(text: str, where: str, example: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port), checked."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise TunnelUsageError(f"{where}: {text!r} is not [IPV6]:PORT; e.g. {example}")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or ":" in host:
            raise TunnelUsageError(f"{where}: {text!r} has no port; write HOST:PORT ([V6]:PORT for IPv6), e.g. {example}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise TunnelUsageError(f"{where}: port {port_text!r} in {text!r} is not 1-65535")
    if not valid_host(host):
        raise TunnelUsageError(f"{where}: {host!r} is not a host name or IP address")
    return host.lower(), int(port_text)


def parse_destination(text: str, where: str = "--dest") -> Destination:
    """``db.example.com:5432`` -> :class:`Destination`."""
    text = text.strip()
    if "://" in text or "@" in text:
        raise TunnelUsageError(f"{where}: {text!r}: a destination is HOST:PORT only (no scheme, no user), e.g. db.example.com:5432")
    host, port = split_host_port(text, where, "db.example.com:5432")
    return Destination(host, port)


def parse_via(text: str, environ: Mapping[str, str], where: str = "--via") -> Path:
    """``socks5://USER:PASSWORD@HOST:PORT`` or ``tcp://HOST:PORT`` -> :class:`Path`."""
    text = text.strip()
    scheme_text, sep, rest = text.partition("://")
    scheme = SCHEMES.get(scheme_text.lower()) if sep else None
    if scheme is None:
        shown = text.split("@")[-1] if "@" in text else text
        raise TunnelUsageError(
            f"{where}: {shown!r} is not socks5://[USER:PASSWORD@]HOST:PORT (a socks5 listener) "
            "or tcp://HOST:PORT (a tcp/postgres listener)"
        )
    userinfo, at, hostport = rest.rpartition("@")
    hostport = hostport[:-1] if hostport.endswith("/") else hostport
    if any(c in hostport for c in "/?#"):
        raise TunnelUsageError(f"{where}: {scheme}://...{hostport!r}: no path or query after HOST:PORT")
    hostport = expand(hostport, environ, where)
    host, port = split_host_port(hostport, where, "my-egress.flycast:1080")
    username = password = None
    if at:
        if scheme != "socks5":
            raise TunnelUsageError(f"{where}: tcp:// paths take no credentials (the tcp listener has none); remove USER:PASSWORD@")
        user_text, colon, password_text = userinfo.partition(":")
        username = expand(unquote(user_text), environ, f"{where} user")
        password = expand(unquote(password_text), environ, f"{where} password", secret=True) if colon else ""
        if not username or len(username.encode()) > 255 or len(password.encode()) > 255:
            raise TunnelUsageError(f"{where}: SOCKS5 user names and passwords are 1-255 bytes (RFC 1929); the password may be empty")
    return Path(scheme, host, port, username, password)


def split_list(text: str) -> list[str]:
    """A comma-separated environment value as its non-empty items."""
    return [item.strip() for item in text.split(",") if item.strip()]


@attrs.frozen
class FileSettings:
    """What a ``--config`` file said (None or empty: not said there)."""

    via: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()
    transparent: bool | None = None
    connect_timeout: float | None = None


def _strings(value: object, key: str, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(split_list(value))
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise TunnelUsageError(f"{path}: {key}: expected a {FILE_KEYS[key]}")


def read_file(path: str) -> FileSettings:
    """Read the optional YAML config file (``via``, ``destinations``, ``transparent``, ``connect_timeout``)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise TunnelUsageError(f"--config {path}: cannot read it: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise TunnelUsageError(f"--config {path}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TunnelUsageError(f"{path}: expected a mapping with keys {', '.join(FILE_KEYS)}")
    for key in raw:
        if key not in FILE_KEYS:
            close = difflib.get_close_matches(str(key), list(FILE_KEYS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the keys are {', '.join(FILE_KEYS)}"
            raise TunnelUsageError(f"{path}: unknown key {key!r}{hint}")
    transparent = raw.get("transparent")
    if transparent is not None and not isinstance(transparent, bool):
        raise TunnelUsageError(f"{path}: transparent: expected true or false")
    timeout = raw.get("connect_timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise TunnelUsageError(f"{path}: connect_timeout: expected a number of seconds above 0")
    return FileSettings(
        via=_strings(raw["via"], "via", path) if "via" in raw else (),
        destinations=_strings(raw["destinations"], "destinations", path) if "destinations" in raw else (),
        transparent=transparent,
        connect_timeout=float(timeout) if timeout is not None else None,
    )
