"""``egressproxy urls``: the connection strings consumer apps paste, per listener.

Operators get the proxy running; then every app team asks "what do I put in
DATABASE_URL?".  The answer depends on the listener's shape, and libpq has a
trap: ``hostaddr`` takes only a numeric address, so the flycast *name* cannot
go there.  This module turns a loaded config and the proxy's address into
those strings, in the shapes the README's connection-strings table (and the
driver matrix behind it) uses:

- TLS end to end (a ``tcp`` listener, or a ``postgres`` listener without
  ``tls: originate``): the database's name as ``host`` (what TLS verifies),
  the proxy's numeric address as ``hostaddr``;
- ``tls: originate``: plaintext to the proxy by its name or address;
- forward proxies: ``HTTPS_PROXY`` and ``ALL_PROXY=socks5h://``.

Passwords are always placeholders: the proxy's config may hold forward-proxy
passwords, and this output is meant to be pasted into tickets and chats.  It
is pure: no I/O, except :func:`resolve_app`, which looks the flycast name up.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

import attrs

from egressproxy.config import Config, ListenerConfig

USER = "<user>"
PASSWORD = "<password>"
DBNAME = "<dbname>"
#: Where the CA goes on Debian-based images; libpq 16+ may say sslrootcert=system instead.
CA_FILE = "/etc/ssl/certs/ca-certificates.crt"


@attrs.frozen
class ProxyAddress:
    """How consumers reach the proxy: a name (for drivers that resolve) and a numeric address (for libpq's hostaddr)."""

    name: str
    numeric: str

    @property
    def uri_host(self) -> str:
        """The proxy as a URI host: its name, or its number (IPv6 in brackets)."""
        if self.name != self.numeric:
            return self.name
        return f"[{self.numeric}]" if ":" in self.numeric else self.numeric


@attrs.frozen
class ListenerUrls:
    listener: str
    mode: str
    port: int | None
    lines: tuple[tuple[str, str], ...]
    note: str | None = None


def proxy_address(address: str | None = None, app: str | None = None, resolved: str | None = None) -> ProxyAddress:
    """The consumer's view of the proxy from ``--address`` or ``--app`` (``resolved`` is the app's flycast address)."""
    if address is not None:
        ipaddress.ip_address(address)  # numeric only: libpq's hostaddr accepts nothing else
        return ProxyAddress(address, address)
    if app is not None:
        return ProxyAddress(f"{app}.flycast", resolved or "<flycast address of " + app + ">")
    return ProxyAddress("<proxy address>", "<proxy address>")


def resolve_app(app: str) -> str:
    """The numeric address of ``APP.flycast`` (IPv6 on Fly), via the system resolver."""
    infos = socket.getaddrinfo(f"{app}.flycast", None, type=socket.SOCK_STREAM)
    for family in (socket.AF_INET6, socket.AF_INET):
        for info in infos:
            if info[0] == family:
                return str(info[4][0]).split("%", 1)[0]
    raise OSError(f"{app}.flycast has no address")


def libpq_passthrough(name: str, proxy: ProxyAddress, port: int) -> list[tuple[str, str]]:
    """Strings for TLS end to end: the database's name for TLS, the proxy's number for the socket."""
    keywords = (f"host={name} hostaddr={proxy.numeric} port={port} dbname={DBNAME} user={USER} "
                f"sslmode=verify-full sslrootcert={CA_FILE}")
    uri = (f"postgresql://{USER}:{PASSWORD}@{name}:{port}/{DBNAME}?hostaddr={proxy.numeric}"
           f"&sslmode=verify-full&sslrootcert={CA_FILE}")
    return [
        ("libpq keywords (psql, pgbench, psycopg)", keywords),
        ("libpq URI / DATABASE_URL (Django, Rails, SQLAlchemy with psycopg)", uri),
        ("asyncpg", f'asyncpg.connect(host="{proxy.numeric}", port={port}, database="{DBNAME}", user="{USER}", '
                    f'ssl=ServerNameContext.verifying("{name}", "{CA_FILE}"))'),
        ("node-postgres", f'new pg.Client({{host: "{proxy.numeric}", port: {port}, database: "{DBNAME}", user: "{USER}", '
                          f'ssl: {{ca, servername: "{name}", checkServerIdentity: (_, cert) => '
                          f'tls.checkServerIdentity("{name}", cert)}}}})'),
        ("JDBC (map the name to the proxy in /etc/hosts)",
         f"jdbc:postgresql://{name}:{port}/{DBNAME}?sslmode=verify-full&sslrootcert={CA_FILE}"),
        ("laptop (fly proxy 15432:{port} -a <app>)".format(port=port),
         f"host={name} hostaddr=127.0.0.1 port=15432 dbname={DBNAME} user={USER} sslmode=verify-full "
         f"sslrootcert={CA_FILE}"),
    ]


def libpq_originate(proxy: ProxyAddress, port: int) -> list[tuple[str, str]]:
    """Strings for ``tls: originate``: plaintext to the proxy (over Fly's encrypted private network)."""
    return [
        ("libpq keywords (psql, pgbench, psycopg)",
         f"host={proxy.name} port={port} dbname={DBNAME} user={USER} sslmode=disable"),
        ("libpq URI / DATABASE_URL (Django, Rails, SQLAlchemy with psycopg)",
         f"postgresql://{USER}:{PASSWORD}@{proxy.uri_host}:{port}/{DBNAME}?sslmode=disable"),
        ("asyncpg", f'asyncpg.connect(host="{proxy.name}", port={port}, database="{DBNAME}", user="{USER}", ssl=False)'),
        ("node-postgres", f'new pg.Client({{host: "{proxy.name}", port: {port}, database: "{DBNAME}", '
                          f'user: "{USER}", ssl: false}})'),
        ("JDBC", f"jdbc:postgresql://{proxy.uri_host}:{port}/{DBNAME}?sslmode=disable"),
        ("laptop (fly proxy 15432:{port} -a <app>)".format(port=port),
         f"host=127.0.0.1 port=15432 dbname={DBNAME} user={USER} sslmode=disable"),
    ]


def forward(mode: str, proxy: ProxyAddress, port: int, with_user: bool) -> list[tuple[str, str]]:
    credentials = f"{USER}:{PASSWORD}@" if with_user else ""
    if mode == "http_connect":
        return [("HTTPS_PROXY (curl, requests, Go, Node with a proxy agent)",
                 f"HTTPS_PROXY=http://{credentials}{proxy.uri_host}:{port}")]
    return [("ALL_PROXY (names resolved by the proxy)",
             f"ALL_PROXY=socks5h://{credentials}{proxy.uri_host}:{port}")]


def database_names(config: Config, listener: ListenerConfig) -> list[str]:
    """The names a TLS-end-to-end listener's clients must verify: its cluster's server names, or its routes' names."""
    routes = getattr(listener.options, "routes", ())
    if routes:
        return [route.sni if not route.sni.startswith("*.") else "<name>" + route.sni[1:] for route in routes]
    cluster = next((c for c in config.clusters if c.name == listener.cluster), None)
    if cluster is None:
        return ["<database name>"]
    tls = getattr(cluster, "tls", None)
    if tls is not None and getattr(tls, "server_name", None):
        return [tls.server_name]
    return sorted({endpoint.host for endpoint in cluster.endpoints})


def listener_urls(config: Config, proxy: ProxyAddress) -> Iterable[ListenerUrls]:
    """Per listener, its strings (see the module notes)."""
    for listener in config.listeners:
        port = listener.listen.port
        if port is None:
            yield ListenerUrls(listener.name, listener.mode, None, (), "listens on an endpoint description: no URL")
            continue
        options = listener.options
        if listener.mode in ("http_connect", "socks5"):
            lines = forward(listener.mode, proxy, port, bool(getattr(options, "users", ())))
            yield ListenerUrls(listener.name, listener.mode, port, tuple(lines))
            continue
        if listener.mode == "postgres" and getattr(options, "tls", "passthrough") == "originate":
            yield ListenerUrls(listener.name, listener.mode, port, tuple(libpq_originate(proxy, port)))
            continue
        lines: list[tuple[str, str]] = []
        for name in database_names(config, listener):
            lines += [(f"{label} [{name}]", text) for label, text in libpq_passthrough(name, proxy, port)]
        note = None if listener.mode == "postgres" else "a tcp listener: TLS stays end to end, verified by the client"
        yield ListenerUrls(listener.name, listener.mode, port, tuple(lines), note)


def render(config: Config, proxy: ProxyAddress) -> str:
    """The command's output: one block per listener."""
    blocks = []
    for entry in listener_urls(config, proxy):
        head = f"== {entry.listener} ({entry.mode}{', port ' + str(entry.port) if entry.port else ''})"
        body = [f"  # {entry.note}"] if entry.note else []
        body += [f"  {label}:\n    {text}" for label, text in entry.lines]
        blocks.append("\n".join([head, *body]))
    footer = (f"# proxy: {proxy.name} = {proxy.numeric}; passwords are placeholders (set them from your secrets)"
              if proxy.name != proxy.numeric else f"# proxy: {proxy.numeric}; passwords are placeholders")
    return "\n\n".join(blocks + [footer]) + "\n"
