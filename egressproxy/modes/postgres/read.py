"""Reading a postgres listener's keys: ``tls``, ``require_tls``, ``routes``, ``client_tls``.

The rules tying them to each other and to the common ``cluster`` are
checked on which keys are written, so a bad value elsewhere does not hide
them.  A route's ``cluster`` is checked against the file's clusters with the
others, and an exact route's ``upstream`` against the proxy's own sockets.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from egressproxy.config.context import ListenerKeys
from egressproxy.config.parse import parse_endpoint, parse_name_pattern
from egressproxy.config.reader import FieldReader, Invalid, Named
from egressproxy.config.syntax import Path, ip_literal
from egressproxy.config.yamlnodes import line, render_path
from egressproxy.modes.postgres.options import ClientTLS, PostgresRoute
from egressproxy.modes.registry import ModeKey

__all__ = ["KEYS", "check_postgres", "parse_upstream_template"]

SNI_HINT = (
    "expected a server name such as db.example.com, or *.SUFFIX such as "
    "*.pg.example.cloud ('*' only as the whole first label)"
)
UPSTREAM_HINT = (
    "expected a HOST:PORT template in which {sni} stands for the server name the "
    "client sent (e.g. '{sni}:5432' or 'db.internal:5432')"
)
#: What ``{sni}`` is replaced with to check an upstream template.
SAMPLE_SNI = "x.example.test"
_ROUTE_KEYS = ("sni", "cluster", "upstream")
_CLIENT_TLS_KEYS = ("cert", "key")


def parse_upstream_template(text: str) -> str:
    """Check a route's ``upstream``: a ``HOST:PORT`` in which ``{sni}`` may stand.

    ``{sni}`` is the only placeholder. The template is tried with a sample name
    in its place and must then be an endpoint :func:`parse_endpoint` accepts;
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
        raise ValueError(f"{UPSTREAM_HINT}, got {text!r}")
    sample = text.replace("{sni}", SAMPLE_SNI)
    try:
        parse_endpoint(sample)
    except ValueError as e:
        if sample != text and SAMPLE_SNI in str(e):
            raise ValueError(
                f"{e} (from {text!r} with {{sni}} = {SAMPLE_SNI})"
            ) from None
        raise
    return text


def _tls(keys: ListenerKeys, node: yaml.Node, path: Path) -> str:
    return keys.r.choice(
        node, path, "passthrough or originate", ("passthrough", "originate"),
        "expected passthrough (the client's TLS goes through to the server) "
        "or originate (the proxy opens TLS to the cluster)",
    )


def _require_tls(keys: ListenerKeys, node: yaml.Node, path: Path) -> bool:
    return keys.r.boolean(node, path)


def _routes(keys: ListenerKeys, node: yaml.Node, path: Path) -> tuple[PostgresRoute, ...]:
    r = keys.r
    items = r.non_empty_sequence(
        node, path, "routes ({sni: NAME, cluster: NAME} or {sni: NAME, upstream: HOST:PORT})",
        "an empty list would refuse every connection; give at least one route, or use cluster instead",
    )
    routes: list[PostgresRoute] = []
    first: dict[str, Named] = {}
    failed = False
    for index, item in enumerate(items):
        try:
            route, sni_node = _route(keys, item, path + (index,))
        except Invalid:
            failed = True
            continue
        sni_path = path + (index, "sni")
        if route.sni in first:
            earlier = first[route.sni]
            r.report(
                sni_node, sni_path,
                f"duplicate route for {route.sni!r} (first at "
                f"{render_path(earlier.path)}, line {line(earlier.node)})",
            )
            failed = True
            continue
        first[route.sni] = Named(route.sni, sni_node, sni_path)
        routes.append(route)
    if failed:
        raise Invalid()
    return tuple(routes)


def _route(keys: ListenerKeys, node: yaml.Node, path: Path) -> tuple[PostgresRoute, yaml.Node]:
    """One route and the node of its ``sni``, for the duplicate check."""
    r = keys.r
    fields = r.mapping(node, path, _ROUTE_KEYS, ("sni",))
    read = FieldReader(fields, path, ("sni",))
    sni = read("sni", lambda n, p: r.parsed(n, p, "a server name", _parse_sni))
    cluster = read("cluster", r.name)
    if cluster is not None:
        keys.facts.refer_cluster(cluster, fields["cluster"], path + ("cluster",))
    upstream = read("upstream", lambda n, p: r.parsed(n, p, "HOST:PORT", parse_upstream_template, UPSTREAM_HINT))
    if "cluster" in fields and "upstream" in fields:
        r.report(
            fields.key_nodes["upstream"], path + ("upstream",),
            "give cluster or upstream, not both (cluster sends to a configured "
            "cluster; upstream dials a HOST:PORT made from the server name)",
        )
        read.ok = False
    elif not fields.has("cluster") and not fields.has("upstream"):
        r.report(
            node, path,
            "missing required key 'cluster' or 'upstream' (a route sends to a "
            "configured cluster, or to a HOST:PORT template such as "
            "'{sni}:5432')",
        )
        read.ok = False
    if not read.ok:
        raise Invalid()
    route = r.built(node, path, PostgresRoute, sni=sni, cluster=cluster, upstream=upstream)
    if upstream is not None:
        _record_upstream(keys, route, fields["upstream"], path + ("upstream",))
    return route, fields["sni"]


def _parse_sni(value: str) -> str:
    if ip_literal(value) is not None:
        raise ValueError(
            f"clients send a TLS server name (SNI) only for host names, never "
            f"for an IP address; {SNI_HINT}, got {value!r}"
        )
    return parse_name_pattern(value, "every server name", SNI_HINT)


def _record_upstream(keys: ListenerKeys, route: PostgresRoute, node: yaml.Node, path: Path) -> None:
    """Remember a route's upstream for the never-dial-yourself check.

    A template with ``{sni}`` is known only for an exact ``sni`` (the
    name then is the one the client sends); a wildcard route's dials are
    checked at run time instead.
    """
    assert route.upstream is not None
    if "{sni}" in route.upstream and "*" in route.sni:
        return
    try:
        address = parse_endpoint(route.upstream.replace("{sni}", route.sni))
    except ValueError:
        return
    keys.facts.dial(address, node, path)


def _client_tls(keys: ListenerKeys, node: yaml.Node, path: Path) -> ClientTLS:
    r = keys.r
    fields = r.mapping(node, path, _CLIENT_TLS_KEYS, _CLIENT_TLS_KEYS)
    read = FieldReader(fields, path, _CLIENT_TLS_KEYS)
    cert = read("cert", r.file)
    key = read("key", r.file)
    if not read.ok:
        raise Invalid()
    return r.built(node, path, ClientTLS, cert=cert, key=key)


#: The keys, in reading order, with their values when absent.
KEYS = (
    ModeKey("tls", _tls, "passthrough"),
    ModeKey("require_tls", _require_tls, False),
    ModeKey("routes", _routes, ()),
    ModeKey("client_tls", _client_tls, None),
)


def check_postgres(keys: ListenerKeys, values: dict[str, Any]) -> None:
    """The rules tying a postgres listener's cluster, routes and TLS keys.

    ``tls`` is None when its value was wrong, and the rules that depend on
    it are then skipped.
    """
    tls, require_tls = values["tls"], values["require_tls"]
    if tls == "originate":
        if "routes" in keys.fields:
            keys.key_broken(
                "routes",
                "not allowed with tls: originate: routes choose by the TLS "
                "server name (SNI), and clients of a tls: originate listener "
                "speak plaintext to the proxy, so it sees none; name one "
                "cluster instead, or use tls: passthrough to route by SNI",
            )
        elif not keys.has("cluster"):
            keys.broken(
                keys.node, keys.path,
                "missing required key 'cluster' (a tls: originate listener "
                "opens TLS to one cluster)",
            )
        if require_tls is True and not keys.has("client_tls"):
            keys.key_broken(
                "require_tls",
                "with tls: originate, require_tls needs client_tls (the "
                "certificate the proxy shows clients that ask for TLS); "
                "without it every client would be refused",
            )
    else:
        if "cluster" in keys.fields and "routes" in keys.fields:
            keys.key_broken(
                "routes",
                "give cluster or routes, not both (cluster sends every "
                "connection to one cluster; routes choose by the TLS server "
                "name, SNI)",
            )
        elif not keys.has("cluster") and not keys.has("routes"):
            keys.broken(
                keys.node, keys.path,
                "missing required key 'cluster' or 'routes' (a postgres "
                "listener sends every connection to one cluster, or chooses "
                "by the TLS server name, SNI, with routes)",
            )
    if tls == "passthrough" and "client_tls" in keys.fields:
        default = "" if "tls" in keys.fields else ", the default"
        keys.key_broken(
            "client_tls",
            f"only with tls: originate (with passthrough the client's TLS goes "
            f"through to the server and the proxy shows no certificate); this "
            f"listener has tls: passthrough{default}",
        )
