"""Prometheus exposition: a collector over the proxy's plain integers, and /metrics.

The data path never touches prometheus_client.  Sessions, listeners and
clusters keep ordinary integers (and :class:`~egressproxy.observe.histogram.Histogram`
buckets); :class:`EgressCollector` reads them when Prometheus scrapes and
builds fresh metric families each time.  A scrape therefore costs work
proportional to the number of listeners, clusters and endpoints, and nothing
at all between scrapes.

This module owns the metric names, help texts and labels (the contract in
DESIGN.md) and the :class:`MetricsResource` that renders a registry.  It does
not own the HTTP routing (which paths and methods are reachable): that is
:mod:`egressproxy.observe.admin` and :mod:`egressproxy.observe.httpsite`.  It never uses the
global ``REGISTRY``: the registry is made by :func:`make_registry` and passed
to whoever serves it.

Label values are listener, cluster and endpoint names and failure reasons,
all bounded by the config and the code; client addresses never appear.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.web.resource import Resource
from twisted.web.server import Request

from egressproxy import __version__
from egressproxy.observe import snapshot
from egressproxy.observe.histogram import Histogram
from egressproxy.observe.origin import NO_ORIGIN
from egressproxy.datapath.listener import ListenerRuntime
from egressproxy.observe.snapshot import Snapshot
from egressproxy.upstream.cluster import UpstreamCluster

#: The results ``egressproxy_config_reloads_total`` always reports, 0 included.
RELOAD_RESULTS = ("success", "error")


class MetricsSource(Protocol):
    """What the collector reads from the service (``EgressService`` provides it)."""

    listeners: Mapping[str, ListenerRuntime]
    def all_clusters(self) -> Mapping[str, UpstreamCluster]: ...
    reloads: Mapping[str, int]
    def worker_snapshots(self) -> list[Snapshot]:
        """The other workers' counters (``workers: N``); empty with one worker."""
        ...


class EgressCollector:
    """A prometheus_client custom collector reading the service at scrape time.

    Counter families are named without ``_total``: prometheus_client appends
    it.  Failure and rejection reasons are exported as the owning objects
    record them; a reason they have not recorded yet has no series.  With
    several workers the connection, byte and failure figures are the sum
    over all of them (:mod:`egressproxy.observe.snapshot`); health and reloads are
    this process's own.
    """

    def __init__(self, service: MetricsSource) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        """Yield every egressproxy metric family with its current values."""
        yield self._info()
        totals = snapshot.take(self.service)
        for other in self.service.worker_snapshots():
            snapshot.add(totals, other, only_known=True)
        yield from self._listener_metrics(totals["listeners"])
        yield from self._cluster_metrics(totals["clusters"])
        reloads = CounterMetricFamily(
            "egressproxy_config_reloads", "Configuration reloads, by result.", labels=["result"]
        )
        for result in RELOAD_RESULTS:
            reloads.add_metric([result], self.service.reloads.get(result, 0))
        yield reloads
        egress = getattr(self.service, "egress", None)
        if egress is not None:
            expected = GaugeMetricFamily(
                "egressproxy_egress_ip_expected",
                "1 while the egress address STUN reports is in expected_egress_ips, else 0.",
                labels=["address"],
            )
            expected.add_metric([egress.seen or "unknown"], int(egress.ready))
            yield expected

    def _info(self) -> Metric:
        """``egressproxy_info{version,region,machine_id} 1``: which build and which Machine (see origin.py)."""
        origin = getattr(self.service, "origin", NO_ORIGIN)
        info = GaugeMetricFamily(
            "egressproxy_info",
            "Always 1; the labels say which version runs and on which Fly region and Machine (empty off Fly).",
            labels=["version", "region", "machine_id"],
        )
        info.add_metric([__version__, origin.region, origin.machine_id], 1)
        return info

    def _listener_metrics(self, listeners: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
        total = CounterMetricFamily(
            "egressproxy_downstream_connections",
            "Downstream connections accepted, including those rejected.",
            labels=["listener"],
        )
        active = GaugeMetricFamily(
            "egressproxy_downstream_connections_active",
            "Downstream connections open now.",
            labels=["listener"],
        )
        rejected = CounterMetricFamily(
            "egressproxy_downstream_rejected",
            "Downstream connections refused before any upstream was dialled, by reason.",
            labels=["listener", "reason"],
        )
        received = CounterMetricFamily(
            "egressproxy_bytes_received",
            "Bytes received from downstream clients, live connections included.",
            labels=["listener"],
        )
        sent = CounterMetricFamily(
            "egressproxy_bytes_sent",
            "Bytes sent to downstream clients, live connections included.",
            labels=["listener"],
        )
        login_refused = CounterMetricFamily(
            "egressproxy_postgres_login_refused",
            "Postgres logins the server refused (relayed through originate or plaintext listeners), by SQLSTATE.",
            labels=["listener", "sqlstate"],
        )
        reported = CounterMetricFamily(
            "egressproxy_policy_reported",
            "Connections a policy: report listener allowed although policy: enforce would refuse them, by reason.",
            labels=["listener", "reason"],
        )
        for name, entry in listeners.items():
            for sqlstate, count in sorted(entry.get("login_refused", {}).items()):
                login_refused.add_metric([name, sqlstate], count)
            for reason, count in sorted(entry.get("reported", {}).items()):
                reported.add_metric([name, reason], count)
            total.add_metric([name], entry["connections"])
            active.add_metric([name], entry["active"])
            for reason, count in sorted(entry["rejected"].items()):
                rejected.add_metric([name, reason], count)
            received.add_metric([name], entry["received"])
            sent.add_metric([name], entry["sent"])
        yield from (total, active, rejected, received, sent, login_refused, reported)

    def _cluster_metrics(self, clusters: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "egressproxy_upstream_connections_active",
            "Established upstream connections open now.",
            labels=["cluster"],
        )
        failures = CounterMetricFamily(
            "egressproxy_upstream_connect_failures",
            "Failed upstream connect attempts, by reason (each failover attempt counts).",
            labels=["cluster", "reason"],
        )
        overflows = CounterMetricFamily(
            "egressproxy_upstream_overflow",
            "Connections refused by the cluster's circuit breaker.",
            labels=["cluster"],
        )
        connect_seconds = HistogramMetricFamily(
            "egressproxy_upstream_connect_seconds",
            "Time to establish an upstream connection, name resolution included.",
            labels=["cluster"],
        )
        healthy = GaugeMetricFamily(
            "egressproxy_upstream_healthy",
            "1 if the endpoint passes health checks or has not been checked yet, else 0.",
            labels=["cluster", "endpoint"],
        )
        for name, cluster in self.service.all_clusters().items():
            entry = clusters[name]
            active.add_metric([name], entry["active"])
            for reason, count in sorted(entry["failures"].items()):
                failures.add_metric([name, reason], count)
            overflows.add_metric([name], entry["overflows"])
            buckets = cumulative_buckets(cluster.connect_seconds.bounds, entry["buckets"])
            connect_seconds.add_metric([name], buckets, entry["sum"])
            for address, state in cluster.endpoints.items():
                healthy.add_metric([name, str(address)], 0 if state.healthy is False else 1)
        yield from (active, failures, overflows, connect_seconds, healthy)


def cumulative_buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, int]]:
    """Per-bucket counts as Prometheus ``(le, cumulative count)`` pairs ending with ``+Inf``."""
    histogram = Histogram(bounds)
    histogram.counts = list(counts)
    return histogram.cumulative()


def make_registry(service: MetricsSource) -> CollectorRegistry:
    """A new registry holding the egressproxy collector and the process and platform ones."""
    registry = CollectorRegistry()
    registry.register(EgressCollector(service))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class MetricsResource(Resource):
    """Renders a registry in the Prometheus text format, in the reactor thread.

    GET only (HEAD falls back to it); which methods reach it is the site's
    business.  prometheus_client's own ``MetricsResource`` is a WSGI resource
    on the global reactor's thread pool, which this avoids.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        body = generate_latest(self.registry)
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return body
