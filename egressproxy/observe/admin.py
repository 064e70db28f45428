"""The metrics and admin HTTP services: what each serves, and the admin token.

Two sites share the same small resources:

- the metrics site (``metrics.listen``, exposed to Fly's scraper): GET and HEAD
  of ``/metrics``, ``/ready`` and ``/healthz``, and nothing else;
- the admin site (``admin.listen``, loopback by default): the same three plus
  ``/stats``, ``/clusters``, the status page (``/`` and ``/status.json``),
  ``POST /drain`` and ``POST /reload``.

The resources are thin adapters over the service: they read its state and
call ``request_drain()`` and ``reload()``; they own no state and make no
decisions of their own.  This module does not bind ports; whoever owns the
service tree listens with the sites built here.  The routing (404, 405,
HEAD), the per-request deadline, the connection cap and the refusal of
requests that came through the proxy itself are ``httpsite.py``'s.

**Admin token.**  With ``EGRESSPROXY_ADMIN_TOKEN`` set, ``POST /drain`` and
``POST /reload`` need ``Authorization: Bearer <token>`` (401 without one,
403 with a wrong one); the GET routes stay open.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any, Protocol

from prometheus_client.core import CollectorRegistry
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from egressproxy.observe import snapshot
from egressproxy.observe.httpsite import GET_HEAD, JSON, POST, QuietSite, RouteTable, Routes, refused, respond
from egressproxy.datapath.listener import ListenerRuntime
from egressproxy.doctor.resource import METHODS as DOCTOR_METHODS, DoctorResource
from egressproxy.observe.metrics import RELOAD_RESULTS, MetricsResource
from egressproxy.observe.snapshot import Snapshot
from egressproxy.observe.statuspage import StatusJsonResource, StatusPageResource
from egressproxy.upstream.cluster import UpstreamCluster

#: The environment variable holding the bearer token ``POST /drain`` and ``/reload`` need.
ADMIN_TOKEN_ENV = "EGRESSPROXY_ADMIN_TOKEN"


def admin_token(environ: Mapping[str, str]) -> str | None:
    """The admin token from ``environ`` (surrounding whitespace dropped); None when unset or empty."""
    return environ.get(ADMIN_TOKEN_ENV, "").strip() or None


class AdminTarget(Protocol):
    """What the HTTP services read from and call on the service (``EgressService``)."""

    reactor: IReactorTime
    listeners: Mapping[str, ListenerRuntime]
    def all_clusters(self) -> Mapping[str, UpstreamCluster]: ...
    #: Listeners bound and not draining.
    ready: bool
    draining: bool
    reloads: Mapping[str, int]
    #: The bearer token ``POST /drain`` and ``/reload`` require; None: none required.
    admin_token: str | None

    def is_own_upstream(self, address: IAddress) -> bool:
        """Whether ``address`` is the local end of one of the proxy's live upstream connections."""

    def worker_snapshots(self) -> list[Snapshot]:
        """The other workers' counters (``workers: N``); empty with one worker."""

    def request_drain(self) -> None:
        """Start the drain and exit sequence; a second call does nothing."""

    def reload(self) -> tuple[bool, str]:
        """Re-read the config file: (True, summary) or (False, the error text)."""


def _line(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def bearer_token(value: bytes | None) -> bytes | None:
    """The credentials of an ``Authorization: Bearer <token>`` header value; None for any other."""
    if value is None:
        return None
    scheme, _, credentials = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return credentials.strip() or None


def token_matches(presented: bytes, token: str) -> bool:
    """Constant-time comparison; both sides hashed first, so not even the length leaks."""
    return hmac.compare_digest(hashlib.sha256(presented).digest(), hashlib.sha256(token.encode("utf-8")).digest())


class RequireToken(Resource):
    """Wraps an admin action: while the service has an ``admin_token``, the request must carry it.

    No ``Authorization: Bearer`` header: 401 with ``WWW-Authenticate: Bearer``;
    a wrong token: 403.  Either is logged, without the token presented.
    """

    isLeaf = True

    def __init__(self, resource: IResource, service: AdminTarget) -> None:
        super().__init__()
        self.resource = resource
        self.service = service

    def render(self, request: Request) -> bytes:
        token = self.service.admin_token
        if token is not None:
            presented = bearer_token(request.getHeader(b"authorization"))
            if presented is None:
                refused("admin", request, "no bearer token")
                request.setHeader(b"WWW-Authenticate", b'Bearer realm="egressproxy admin"')
                return respond(request, 401, "this action needs Authorization: Bearer <token>\n")
            if not token_matches(presented, token):
                refused("admin", request, "wrong bearer token")
                return respond(request, 403, "wrong token\n")
        body: bytes = self.resource.render(request)
        return body


class HealthzResource(Resource):
    """``/healthz``: 200 ``ok``, which only proves the reactor answers."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return respond(request, 200, "ok\n")


class ReadyResource(Resource):
    """``/ready``: 200 while the service is ready, else 503 ``draining`` or ``starting``."""

    isLeaf = True

    def __init__(self, service: AdminTarget) -> None:
        super().__init__()
        self.service = service

    def render_GET(self, request: Request) -> bytes:
        if self.service.ready:
            return respond(request, 200, "ready\n")
        reason = getattr(self.service, "not_ready_reason", None)
        text = reason() if reason is not None else ("draining" if self.service.draining else "starting")
        return respond(request, 503, text + "\n")


def stats_lines(service: AdminTarget) -> list[str]:
    """Envoy-like ``name: value`` lines for every counter and gauge, sorted by name.

    With several workers, listener and cluster figures are the sum over all
    of them (as in /metrics); the per-endpoint lines, pending dials, breaker
    state and server lines are this (the main) worker's own.
    """
    stats: dict[str, int] = {}
    totals = snapshot.take(service)
    for other in service.worker_snapshots():
        snapshot.add(totals, other, only_known=True)
    for name, entry in totals["listeners"].items():
        prefix = f"listener.{name}."
        stats[prefix + "downstream_cx_total"] = entry["connections"]
        stats[prefix + "downstream_cx_active"] = entry["active"]
        for reason, count in entry["rejected"].items():
            stats[prefix + f"downstream_cx_rejected.{reason}"] = count
        stats[prefix + "downstream_bytes_received"] = entry["received"]
        stats[prefix + "downstream_bytes_sent"] = entry["sent"]
    for name, cluster in service.all_clusters().items():
        prefix = f"cluster.{name}."
        entry = totals["clusters"][name]
        breaker = cluster.breaker
        stats[prefix + "upstream_cx_active"] = entry["active"]
        stats[prefix + "upstream_cx_total"] = entry["connections"]
        for reason, count in entry["failures"].items():
            stats[prefix + f"upstream_cx_connect_fail.{reason}"] = count
        stats[prefix + "upstream_cx_overflow"] = entry["overflows"]
        stats[prefix + "upstream_rq_pending_active"] = breaker.pending
        stats[prefix + "circuit_breaker_open"] = int(breaker.open)
        for address, state in cluster.endpoints.items():
            endpoint = f"{prefix}endpoint.{address}."
            stats[endpoint + "healthy"] = 0 if state.healthy is False else 1
            stats[endpoint + "cx_active"] = state.active
            stats[endpoint + "cx_total"] = state.connections_total
            stats[endpoint + "cx_connect_fail"] = state.connect_failures
    stats["server.ready"] = int(service.ready)
    stats["server.draining"] = int(service.draining)
    for result in RELOAD_RESULTS:
        stats[f"server.config_reloads.{result}"] = service.reloads.get(result, 0)
    return [f"{name}: {value}" for name, value in sorted(stats.items())]


class StatsResource(Resource):
    """``/stats``: :func:`stats_lines` as text."""

    isLeaf = True

    def __init__(self, service: AdminTarget) -> None:
        super().__init__()
        self.service = service

    def render_GET(self, request: Request) -> bytes:
        return respond(request, 200, "".join(line + "\n" for line in stats_lines(self.service)))


def cluster_status(cluster: UpstreamCluster) -> dict[str, Any]:
    """One cluster's limits, breaker state, health checking and endpoints, for JSON."""
    breaker = cluster.breaker
    health_check = cluster.config.health_check
    return {
        "name": cluster.name,
        "circuit_breaker": {
            "max_connections": breaker.max_connections,
            "max_pending": breaker.max_pending,
            "active": breaker.active,
            "pending": breaker.pending,
            "open": breaker.open,
            "overflows": breaker.overflows,
        },
        "connections_total": cluster.connections_total,
        "connect_failures": dict(sorted(cluster.connect_failures.items())),
        "health_check": {
            "kind": health_check.kind,
            "interval": health_check.interval,
            "timeout": health_check.timeout,
        },
        "endpoints": [
            {
                "address": str(address),
                "healthy": state.healthy,
                "active": state.active,
                "connections_total": state.connections_total,
                "connect_failures": state.connect_failures,
                "last_error": state.last_error,
            }
            for address, state in cluster.endpoints.items()
        ],
    }


class ClustersResource(Resource):
    """``/clusters``: every cluster's :func:`cluster_status`, in config order, as JSON."""

    isLeaf = True

    def __init__(self, service: AdminTarget) -> None:
        super().__init__()
        self.service = service

    def render_GET(self, request: Request) -> bytes:
        clusters = [cluster_status(cluster) for cluster in self.service.all_clusters().values()]
        return respond(request, 200, json.dumps({"clusters": clusters}, indent=2) + "\n", JSON)


class DrainResource(Resource):
    """``POST /drain``: start draining (as SIGTERM does) and answer 202 at once."""

    isLeaf = True

    def __init__(self, service: AdminTarget) -> None:
        super().__init__()
        self.service = service

    def render_POST(self, request: Request) -> bytes:
        self.service.request_drain()
        return respond(request, 202, "draining\n")


class ReloadResource(Resource):
    """``POST /reload``: re-read the config (as SIGHUP does); 200 with a summary or 400 with the errors."""

    isLeaf = True

    def __init__(self, service: AdminTarget) -> None:
        super().__init__()
        self.service = service

    def render_POST(self, request: Request) -> bytes:
        ok, text = self.service.reload()
        return respond(request, 200 if ok else 400, _line(text))


def _read_only_routes(service: AdminTarget, registry: CollectorRegistry) -> RouteTable:
    return {
        b"/metrics": (GET_HEAD, MetricsResource(registry)),
        b"/ready": (GET_HEAD, ReadyResource(service)),
        b"/healthz": (GET_HEAD, HealthzResource()),
    }


def build_metrics_site(service: AdminTarget, registry: CollectorRegistry) -> Site:
    """The metrics service: GET and HEAD of /metrics, /ready and /healthz only."""
    return QuietSite(Routes(_read_only_routes(service, registry), service, "metrics"), "metrics", service.reactor)


def build_admin_site(service: AdminTarget, registry: CollectorRegistry) -> Site:
    """The admin service: the metrics routes plus /stats, /clusters, POST /drain and POST /reload.

    Also the status page, ``/`` and ``/status.json`` (``statuspage.py``), read-only like /stats.
    """
    routes = {
        **_read_only_routes(service, registry),
        b"/stats": (GET_HEAD, StatsResource(service)),
        b"/clusters": (GET_HEAD, ClustersResource(service)),
        b"/doctor": (DOCTOR_METHODS, DoctorResource(service)),  # type: ignore[arg-type]
        b"/": (GET_HEAD, StatusPageResource(service, cluster_status)),
        b"/status.json": (GET_HEAD, StatusJsonResource(service, cluster_status)),
        b"/drain": (POST, RequireToken(DrainResource(service), service)),
        b"/reload": (POST, RequireToken(ReloadResource(service), service)),
    }
    return QuietSite(Routes(routes, service, "admin"), "admin", service.reactor)
