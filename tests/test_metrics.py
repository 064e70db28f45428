"""Tests for egressproxy.observe.metrics: the collector's samples, the registry, /metrics."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import CollectorRegistry, Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test._util import _render
from twisted.web.test.requesthelper import DummyRequest

from egressproxy.config import Address, HealthCheckConfig
from egressproxy.datapath.listener import REJECT_REASONS, ListenerRuntime
from egressproxy.observe.metrics import EgressCollector, MetricsResource, make_registry
from egressproxy.upstream.cluster import UpstreamCluster
from tests.helpers import cluster_config, listener_config

DB = Address("db.example.com", 5432)
DB2 = Address("db2.example.com", 5432)
DB6 = Address("2001:db8::5", 5432)
API = Address("api.vendor.com", 443)


class LiveSession:
    """Stands in for a Session still open on a listener: only its byte counts."""

    def __init__(self, bytes_received: int, bytes_sent: int) -> None:
        self.bytes_received = bytes_received
        self.bytes_sent = bytes_sent


class FakeService:
    """The attributes and methods the collector and the HTTP services use, over real runtimes."""

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        pg = UpstreamCluster(
            cluster_config(
                name="pg",
                endpoints=(DB, DB2, DB6),
                max_connections=100,
                max_pending=10,
                health_check=HealthCheckConfig(kind="postgres", interval=5.0, timeout=1.5),
            ),
            self.reactor,
            {}.get,
        )
        api = UpstreamCluster(cluster_config(name="api", endpoints=(API,), max_connections=1), self.reactor, {}.get)
        quiet = Logger(observer=lambda event: None)
        self.clusters = {"pg": pg, "api": api}
        self.listeners = {
            "direct": ListenerRuntime(listener_config(name="direct", cluster="pg"), pg, self.reactor, quiet),
            "vendor": ListenerRuntime(
                listener_config(name="vendor", cluster="api", log_prefix="VENDOR"), api, self.reactor, quiet
            ),
        }
        self.bound = True
        self.draining = False
        self.reloads = {"success": 0, "error": 0}
        self.drain_requests = 0
        self.reload_result = (True, "reloaded: 2 listeners, 2 clusters")
        self.reload_calls = 0
        #: What other workers reported (``workers: N``).
        self.snapshots: list[dict] = []
        self.admin_token: str | None = None
        #: (ip, port) pairs standing for the local ends of the proxy's own upstream connections.
        self.own_upstreams: set[tuple[str, int]] = set()

    def worker_snapshots(self) -> list[dict]:
        return self.snapshots

    def is_own_upstream(self, address: Any) -> bool:
        return (getattr(address, "host", None), getattr(address, "port", None)) in self.own_upstreams

    @property
    def ready(self) -> bool:
        return self.bound and not self.draining

    def request_drain(self) -> None:
        self.drain_requests += 1

    def reload(self) -> tuple[bool, str]:
        self.reload_calls += 1
        return self.reload_result

    def all_clusters(self) -> dict[str, UpstreamCluster]:
        return self.clusters


def connect(cluster: UpstreamCluster, address: Address, seconds: float) -> None:
    """One upstream connect through the breaker, as a dial does it."""
    assert cluster.breaker.try_acquire_pending()
    cluster.connected(address, seconds)


def busy_service() -> FakeService:
    """A service with traffic on ``direct``/``pg`` and ``api``'s one-connection breaker full.

    ``vendor`` has had no connection at all.
    """
    service = FakeService()
    direct = service.listeners["direct"]
    direct.connections_total = 12
    direct.rejected.update({"source": 2, "max_connections": 1})
    direct.finished_bytes_received = 1000
    direct.finished_bytes_sent = 2000
    direct.sessions.add(LiveSession(284, 892))  # type: ignore[arg-type]

    pg = service.clusters["pg"]
    connect(pg, DB, 0.003)
    connect(pg, DB, 0.2)
    connect(pg, DB2, 0.003)
    connect(pg, DB, 20.0)
    pg.released(DB)
    assert pg.breaker.try_acquire_pending()  # a connect in progress
    pg.connect_failures.update({"refused": 2, "timeout": 1})
    pg.breaker.overflows = 5
    pg.endpoints[DB].healthy = True
    pg.endpoints[DB2].healthy = False
    pg.endpoints[DB2].last_error = "connection refused"
    pg.endpoints[DB2].connect_failures = 2

    connect(service.clusters["api"], API, 0.01)
    service.reloads = {"success": 3, "error": 1}
    return service


def scrape(registry: CollectorRegistry) -> dict[str, Metric]:
    """The registry's exposition, parsed back, by family name."""
    text = generate_latest(registry).decode("utf-8")
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family: Metric) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A family's samples as {(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}


def labelled(name: str, value: float, **labels: str) -> tuple[tuple[str, tuple[tuple[str, str], ...]], float]:
    return (name, tuple(sorted(labels.items()))), value


def expect(*pairs: tuple[Any, float]) -> dict[Any, float]:
    return dict(pairs)


BOUNDS = (
    "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "+Inf"
)


def buckets(cluster: str, counts: tuple[int, ...]) -> list[tuple[Any, float]]:
    name = "egressproxy_upstream_connect_seconds_bucket"
    return [labelled(name, count, cluster=cluster, le=le) for le, count in zip(BOUNDS, counts)]


class CollectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.service = busy_service()
        self.families = scrape(make_registry(self.service))

    def test_family_names(self) -> None:
        """The eleven DESIGN.md names plus Postgres login refusals, policy reports and the info series."""
        self.assertEqual(
            sorted(name for name in self.families if name.startswith("egressproxy_")),
            [
                "egressproxy_bytes_received",
                "egressproxy_bytes_sent",
                "egressproxy_config_reloads",
                "egressproxy_downstream_connections",
                "egressproxy_downstream_connections_active",
                "egressproxy_downstream_rejected",
                "egressproxy_info",
                "egressproxy_policy_reported",
                "egressproxy_postgres_login_refused",
                "egressproxy_upstream_connect_failures",
                "egressproxy_upstream_connect_seconds",
                "egressproxy_upstream_connections_active",
                "egressproxy_upstream_healthy",
                "egressproxy_upstream_overflow",
            ],
        )

    def test_family_types(self) -> None:
        """Totals are counters, current values gauges and connect time a histogram."""
        types = {name: family.type for name, family in self.families.items() if name.startswith("egressproxy_")}
        self.assertEqual(
            types,
            {
                "egressproxy_bytes_received": "counter",
                "egressproxy_bytes_sent": "counter",
                "egressproxy_config_reloads": "counter",
                "egressproxy_downstream_connections": "counter",
                "egressproxy_downstream_connections_active": "gauge",
                "egressproxy_downstream_rejected": "counter",
                "egressproxy_info": "gauge",
                "egressproxy_policy_reported": "counter",
                "egressproxy_postgres_login_refused": "counter",
                "egressproxy_upstream_connect_failures": "counter",
                "egressproxy_upstream_connect_seconds": "histogram",
                "egressproxy_upstream_connections_active": "gauge",
                "egressproxy_upstream_healthy": "gauge",
                "egressproxy_upstream_overflow": "counter",
            },
        )

    def test_label_names(self) -> None:
        """Labels are only listener, cluster, endpoint, reason, result and the bucket bound.

        ``egressproxy_info`` alone carries version, region and machine_id (see origin.py).
        """
        names = {
            label
            for name, family in self.families.items()
            if name.startswith("egressproxy_") and name != "egressproxy_info"
            for sample in family.samples
            for label in sample.labels
        }
        self.assertEqual(names, {"listener", "cluster", "endpoint", "reason", "result", "le"})

    def test_downstream_connections_total(self) -> None:
        """Each listener's connection count is a ``_total`` sample labelled with its name."""
        self.assertEqual(
            samples(self.families["egressproxy_downstream_connections"]),
            expect(
                labelled("egressproxy_downstream_connections_total", 12, listener="direct"),
                labelled("egressproxy_downstream_connections_total", 0, listener="vendor"),
            ),
        )

    def test_downstream_connections_active(self) -> None:
        """Each listener's open sessions are counted."""
        self.assertEqual(
            samples(self.families["egressproxy_downstream_connections_active"]),
            expect(
                labelled("egressproxy_downstream_connections_active", 1, listener="direct"),
                labelled("egressproxy_downstream_connections_active", 0, listener="vendor"),
            ),
        )

    def test_downstream_rejected(self) -> None:
        """Rejections are reported per listener and reason, for the reasons recorded."""
        self.assertEqual(
            samples(self.families["egressproxy_downstream_rejected"]),
            expect(
                labelled("egressproxy_downstream_rejected_total", 1, listener="direct", reason="max_connections"),
                labelled("egressproxy_downstream_rejected_total", 2, listener="direct", reason="source"),
                # Known reasons are exported from the start, at zero.
                *(
                    labelled("egressproxy_downstream_rejected_total", 0, listener=listener, reason=reason)
                    for listener in ("direct", "vendor")
                    for reason in REJECT_REASONS
                    if (listener, reason) not in (("direct", "max_connections"), ("direct", "source"))
                ),
            ),
        )
        self.assertLessEqual(
            {"source", "max_connections", "max_connections_per_source", "proxy_protocol", "proxy_protocol_untrusted"},
            set(REJECT_REASONS),
        )

    def test_recorded_zero_reason(self) -> None:
        """A reason recorded with a count of zero is reported as a zero sample."""
        self.service.listeners["vendor"].rejected["source"] = 0
        families = scrape(make_registry(self.service))
        self.assertEqual(
            samples(families["egressproxy_downstream_rejected"])[
                ("egressproxy_downstream_rejected_total", (("listener", "vendor"), ("reason", "source")))
            ],
            0,
        )

    def test_policy_reported(self) -> None:
        """Connections policy: report let through are counted per listener and reason, once recorded."""
        self.assertEqual(samples(self.families["egressproxy_policy_reported"]), {})
        self.service.listeners["direct"].count_reported("destination")
        self.service.listeners["direct"].count_reported("destination")
        families = scrape(make_registry(self.service))
        self.assertEqual(
            samples(families["egressproxy_policy_reported"]),
            expect(labelled("egressproxy_policy_reported_total", 2, listener="direct", reason="destination")),
        )

    def test_bytes_received(self) -> None:
        """Bytes received count finished and live sessions."""
        self.assertEqual(
            samples(self.families["egressproxy_bytes_received"]),
            expect(
                labelled("egressproxy_bytes_received_total", 1284, listener="direct"),
                labelled("egressproxy_bytes_received_total", 0, listener="vendor"),
            ),
        )

    def test_bytes_sent(self) -> None:
        """Bytes sent count finished and live sessions."""
        self.assertEqual(
            samples(self.families["egressproxy_bytes_sent"]),
            expect(
                labelled("egressproxy_bytes_sent_total", 2892, listener="direct"),
                labelled("egressproxy_bytes_sent_total", 0, listener="vendor"),
            ),
        )

    def test_upstream_connections_active(self) -> None:
        """Each cluster's established connections come from its breaker."""
        self.assertEqual(
            samples(self.families["egressproxy_upstream_connections_active"]),
            expect(
                labelled("egressproxy_upstream_connections_active", 3, cluster="pg"),
                labelled("egressproxy_upstream_connections_active", 1, cluster="api"),
            ),
        )

    def test_upstream_connect_failures(self) -> None:
        """Connect failures are reported per cluster and reason."""
        self.assertEqual(
            samples(self.families["egressproxy_upstream_connect_failures"]),
            expect(
                labelled("egressproxy_upstream_connect_failures_total", 2, cluster="pg", reason="refused"),
                labelled("egressproxy_upstream_connect_failures_total", 1, cluster="pg", reason="timeout"),
                # Known reasons are exported from the start, at zero.
                *(
                    labelled("egressproxy_upstream_connect_failures_total", 0, cluster=cluster, reason=reason)
                    for cluster, reason in [
                        ("pg", "dns"), ("pg", "unreachable"), ("pg", "error"),
                        ("api", "timeout"), ("api", "refused"), ("api", "dns"), ("api", "unreachable"), ("api", "error"),
                    ]
                ),
            ),
        )

    def test_upstream_overflow(self) -> None:
        """Circuit breaker overflows are reported per cluster."""
        self.assertEqual(
            samples(self.families["egressproxy_upstream_overflow"]),
            expect(
                labelled("egressproxy_upstream_overflow_total", 5, cluster="pg"),
                labelled("egressproxy_upstream_overflow_total", 0, cluster="api"),
            ),
        )

    def test_upstream_connect_seconds(self) -> None:
        """Connect times are cumulative buckets with a count and a sum per cluster."""
        self.assertEqual(
            samples(self.families["egressproxy_upstream_connect_seconds"]),
            expect(
                *buckets("pg", (0, 0, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 4)),
                labelled("egressproxy_upstream_connect_seconds_count", 4, cluster="pg"),
                labelled("egressproxy_upstream_connect_seconds_sum", 0.003 + 0.2 + 0.003 + 20.0, cluster="pg"),
                *buckets("api", (0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)),
                labelled("egressproxy_upstream_connect_seconds_count", 1, cluster="api"),
                labelled("egressproxy_upstream_connect_seconds_sum", 0.01, cluster="api"),
            ),
        )

    def test_upstream_healthy(self) -> None:
        """Healthy and unchecked endpoints report 1, unhealthy ones 0, labelled ``host:port``."""
        self.assertEqual(
            samples(self.families["egressproxy_upstream_healthy"]),
            expect(
                labelled("egressproxy_upstream_healthy", 1, cluster="pg", endpoint="db.example.com:5432"),
                labelled("egressproxy_upstream_healthy", 0, cluster="pg", endpoint="db2.example.com:5432"),
                labelled("egressproxy_upstream_healthy", 1, cluster="pg", endpoint="[2001:db8::5]:5432"),
                labelled("egressproxy_upstream_healthy", 1, cluster="api", endpoint="api.vendor.com:443"),
            ),
        )

    def test_config_reloads(self) -> None:
        """Reloads are reported per result."""
        self.assertEqual(
            samples(self.families["egressproxy_config_reloads"]),
            expect(
                labelled("egressproxy_config_reloads_total", 3, result="success"),
                labelled("egressproxy_config_reloads_total", 1, result="error"),
            ),
        )


class RegistryTests(SynchronousTestCase):
    def test_reloads_always_both_results(self) -> None:
        """Both reload results are reported even when the service has counted neither."""
        service = FakeService()
        service.reloads = {}
        families = scrape(make_registry(service))
        self.assertEqual(
            samples(families["egressproxy_config_reloads"]),
            expect(
                labelled("egressproxy_config_reloads_total", 0, result="success"),
                labelled("egressproxy_config_reloads_total", 0, result="error"),
            ),
        )

    def test_read_at_scrape_time(self) -> None:
        """Each scrape reads the counters as they are then."""
        service = FakeService()
        registry = make_registry(service)
        scrape(registry)
        service.listeners["direct"].connections_total = 7
        self.assertEqual(
            samples(scrape(registry)["egressproxy_downstream_connections"])[
                ("egressproxy_downstream_connections_total", (("listener", "direct"),))
            ],
            7,
        )

    def test_new_registry(self) -> None:
        """The registry is a new one and the global registry gains nothing."""
        registry = make_registry(FakeService())
        self.assertIsNot(registry, REGISTRY)
        self.assertNotIn(b"egressproxy_", generate_latest(REGISTRY))

    def test_process_metrics(self) -> None:
        """The registry includes the process collector's metrics."""
        if not os.path.exists("/proc/self/stat"):
            raise self.skipTest("the process collector reads /proc (Linux only)")
        families = scrape(make_registry(FakeService()))
        self.assertIn("process_cpu_seconds", families)
        self.assertIn("process_resident_memory_bytes", families)

    def test_platform_metrics(self) -> None:
        """The registry includes the platform collector's python_info."""
        self.assertIn("python_info", scrape(make_registry(FakeService())))

    def test_collector_alone(self) -> None:
        """The collector works in any registry it is registered with."""
        registry = CollectorRegistry()
        registry.register(EgressCollector(FakeService()))
        self.assertEqual(
            sorted(scrape(registry)),
            sorted(name for name in scrape(make_registry(FakeService())) if name.startswith("egressproxy_")),
        )


class MetricsResourceTests(SynchronousTestCase):
    def render(self, registry: CollectorRegistry) -> DummyRequest:
        request = DummyRequest([])
        self.successResultOf(_render(MetricsResource(registry), request))
        return request

    def test_status(self) -> None:
        """The response is 200."""
        self.assertEqual(self.render(make_registry(FakeService())).responseCode, 200)

    def test_content_type(self) -> None:
        """The response has the Prometheus text format's content type."""
        request = self.render(make_registry(FakeService()))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [CONTENT_TYPE_LATEST.encode()])

    def test_body(self) -> None:
        """The body is the registry's exposition."""
        registry = CollectorRegistry()
        registry.register(EgressCollector(busy_service()))
        request = self.render(registry)
        self.assertEqual(b"".join(request.written), generate_latest(registry))
