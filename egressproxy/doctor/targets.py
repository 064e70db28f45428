"""What the doctor dials: the upstreams the operator configured, and nothing else.

The doctor also runs behind ``GET /doctor``, so it must not become a way
to probe arbitrary hosts.  It dials only:

- every endpoint of every cluster a listener names (``cluster:``), with the
  endpoint's host as the TLS name (or the cluster's ``tls.server_name``);
- every exact route name of a postgres listener (``sni: db.example.com``),
  with that name as the TLS name, at the route's cluster's endpoints or at
  the address its ``upstream`` template gives;
- for a wildcard route (``*.pg.example.cloud``), only the ``--name`` the
  operator gives, and only when it matches that pattern: :func:`plan`
  refuses a name outside every route pattern (:class:`NameRefused`).  A
  wildcard route without a matching ``--name`` is reported as skipped.

A cluster named by no listener (only by routes, or by nothing) is checked
only through its routes, since its endpoints' own names need not be the TLS
names clients use.

**Protocol.**  An upstream is ``postgres`` when a postgres listener reaches
it (directly or through a route) or its ``health_check.kind`` is
``postgres``: the doctor then sends the SSLRequest, does TLS and may log in.
Otherwise it is ``tls`` when its port is one that speaks TLS from the first
byte (:data:`TLS_PORTS`: 443, 8443, ...), and ``tcp`` (unknown protocol:
the doctor stops after the TCP connect) for any other port.
"""

from __future__ import annotations

import attrs

from egressproxy.config import Address, ClusterConfig, Config, ListenerConfig
from egressproxy.modes.postgres.routing import match_route, route_address, valid_server_name

#: Ports whose protocol starts with a TLS ClientHello (HTTPS, ClickHouse's
#: secure native port, LDAPS, IMAPS, POP3S, SMTPS, DNS over TLS, Kubernetes).
TLS_PORTS = frozenset({443, 8443, 9440, 636, 993, 995, 465, 853, 6443})

POSTGRES = "postgres"
TLS = "tls"
TCP = "tcp"


class NameRefused(ValueError):
    """``--name`` names a host no route pattern admits: the doctor will not dial it."""


@attrs.frozen
class Target:
    """One upstream to walk through the steps: where it is, what it speaks, what TLS must prove."""

    subject: str
    host: str
    port: int
    protocol: str
    #: The TLS server name (SNI and the name the certificate must carry).
    server_name: str
    #: The cluster's ``tls.ca_file``; None: the system trust store.
    ca_file: str | None = None


@attrs.frozen
class Skipped:
    """A route the doctor did not check, and how to make it check it."""

    subject: str
    detail: str
    hint: str


@attrs.frozen
class Plan:
    targets: tuple[Target, ...]
    skipped: tuple[Skipped, ...]


def _postgres_listeners(config: Config) -> list[ListenerConfig]:
    return [listener for listener in config.listeners if listener.mode == POSTGRES]


def _routes(listener: ListenerConfig) -> tuple:  # tuple[PostgresRoute, ...]
    return tuple(getattr(listener.options, "routes", ()))


def _protocol(cluster: ClusterConfig, endpoint: Address, postgres_clusters: set[str]) -> str:
    if cluster.name in postgres_clusters or cluster.health_check.kind == POSTGRES:
        return POSTGRES
    return TLS if endpoint.port in TLS_PORTS else TCP


def _cluster_targets(cluster: ClusterConfig, protocol_of: set[str], server_name: str | None, subject: str) -> list[Target]:
    tls = cluster.tls
    targets = []
    for endpoint in cluster.endpoints:
        name = server_name or (tls.server_name if tls is not None and tls.server_name else endpoint.host)
        targets.append(Target(
            subject=f"{subject} endpoint {endpoint}",
            host=endpoint.host,
            port=endpoint.port,
            protocol=_protocol(cluster, endpoint, protocol_of),
            server_name=name,
            ca_file=tls.ca_file if tls is not None else None,
        ))
    return targets


def _route_targets(config: Config, listener: ListenerConfig, route, name: str, protocol_of: set[str]) -> list[Target]:  # type: ignore[no-untyped-def]
    subject = f"route {name} (listener {listener.name})"
    if route.cluster is not None:
        return _cluster_targets(config.cluster(route.cluster), protocol_of, name, subject)
    address = route_address(route.upstream, name)
    return [Target(subject=f"{subject} upstream {address}", host=address.host, port=address.port,
                   protocol=POSTGRES, server_name=name)]


def check_name(config: Config, name: str) -> str:
    """``--name`` in normal form, or :class:`NameRefused` when no route pattern admits it."""
    normal = name.strip().lower().rstrip(".")
    if not valid_server_name(normal):
        raise NameRefused(f"--name {name!r} is not a DNS host name")
    if not any(match_route(_routes(listener), normal) for listener in _postgres_listeners(config)):
        patterns = sorted({route.sni for listener in _postgres_listeners(config) for route in _routes(listener)})
        raise NameRefused(
            f"--name {name} matches no route of a postgres listener "
            f"({', '.join(patterns) if patterns else 'the config has no routes'}): the doctor dials only "
            f"what the config routes to"
        )
    return normal


def plan(config: Config, name: str | None = None) -> Plan:
    """The targets of one run, and the routes skipped; :class:`NameRefused` for a ``--name`` no route admits."""
    wanted = check_name(config, name) if name is not None else None
    postgres = _postgres_listeners(config)
    protocol_of = {listener.cluster for listener in postgres if listener.cluster is not None}
    protocol_of |= {route.cluster for listener in postgres for route in _routes(listener) if route.cluster}
    targets: list[Target] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for listener in config.listeners:
        if listener.cluster is not None and listener.cluster not in seen:
            seen.add(listener.cluster)
            targets += _cluster_targets(config.cluster(listener.cluster), protocol_of, None,
                                        f"cluster {listener.cluster}")
    routed: set[str] = set()
    for listener in postgres:
        for route in _routes(listener):
            pattern = route.sni.lower()
            if not pattern.startswith("*."):
                if pattern not in routed:
                    routed.add(pattern)
                    targets += _route_targets(config, listener, route, pattern, protocol_of)
                continue
            if wanted is not None and match_route((route,), wanted) is not None and wanted not in routed:
                if match_route(_routes(listener), wanted) is route:
                    routed.add(wanted)
                    targets += _route_targets(config, listener, route, wanted, protocol_of)
                    continue
            skipped.append(Skipped(
                subject=f"route {route.sni} (listener {listener.name})",
                detail="a wildcard route: which name to check is not known",
                hint=f"run egressproxy doctor --name HOST with a name under {route.sni}",
            ))
    return Plan(tuple(targets), tuple(skipped))
