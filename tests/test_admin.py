"""Tests for egressproxy.admin: the metrics and admin sites, route by route."""

from __future__ import annotations

import json

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site
from twisted.web.test._util import _render
from twisted.web.test.requesthelper import DummyRequest

from egressproxy.admin import build_admin_site, build_metrics_site
from egressproxy.metrics import make_registry
from tests.test_metrics import FakeService, busy_service

TEXT = [b"text/plain; charset=utf-8"]

STATS = """\
cluster.api.circuit_breaker_open: 1
cluster.api.endpoint.api.vendor.com:443.cx_active: 1
cluster.api.endpoint.api.vendor.com:443.cx_connect_fail: 0
cluster.api.endpoint.api.vendor.com:443.cx_total: 1
cluster.api.endpoint.api.vendor.com:443.healthy: 1
cluster.api.upstream_cx_active: 1
cluster.api.upstream_cx_connect_fail.dns: 0
cluster.api.upstream_cx_connect_fail.error: 0
cluster.api.upstream_cx_connect_fail.refused: 0
cluster.api.upstream_cx_connect_fail.timeout: 0
cluster.api.upstream_cx_connect_fail.unreachable: 0
cluster.api.upstream_cx_overflow: 0
cluster.api.upstream_cx_total: 1
cluster.api.upstream_rq_pending_active: 0
cluster.pg.circuit_breaker_open: 0
cluster.pg.endpoint.[2001:db8::5]:5432.cx_active: 0
cluster.pg.endpoint.[2001:db8::5]:5432.cx_connect_fail: 0
cluster.pg.endpoint.[2001:db8::5]:5432.cx_total: 0
cluster.pg.endpoint.[2001:db8::5]:5432.healthy: 1
cluster.pg.endpoint.db.example.com:5432.cx_active: 2
cluster.pg.endpoint.db.example.com:5432.cx_connect_fail: 0
cluster.pg.endpoint.db.example.com:5432.cx_total: 3
cluster.pg.endpoint.db.example.com:5432.healthy: 1
cluster.pg.endpoint.db2.example.com:5432.cx_active: 1
cluster.pg.endpoint.db2.example.com:5432.cx_connect_fail: 2
cluster.pg.endpoint.db2.example.com:5432.cx_total: 1
cluster.pg.endpoint.db2.example.com:5432.healthy: 0
cluster.pg.upstream_cx_active: 3
cluster.pg.upstream_cx_connect_fail.dns: 0
cluster.pg.upstream_cx_connect_fail.error: 0
cluster.pg.upstream_cx_connect_fail.refused: 2
cluster.pg.upstream_cx_connect_fail.timeout: 1
cluster.pg.upstream_cx_connect_fail.unreachable: 0
cluster.pg.upstream_cx_overflow: 5
cluster.pg.upstream_cx_total: 4
cluster.pg.upstream_rq_pending_active: 1
listener.direct.downstream_bytes_received: 1284
listener.direct.downstream_bytes_sent: 2892
listener.direct.downstream_cx_active: 1
listener.direct.downstream_cx_rejected.max_connections: 1
listener.direct.downstream_cx_rejected.proxy_protocol: 0
listener.direct.downstream_cx_rejected.source: 2
listener.direct.downstream_cx_total: 12
listener.vendor.downstream_bytes_received: 0
listener.vendor.downstream_bytes_sent: 0
listener.vendor.downstream_cx_active: 0
listener.vendor.downstream_cx_rejected.max_connections: 0
listener.vendor.downstream_cx_rejected.proxy_protocol: 0
listener.vendor.downstream_cx_rejected.source: 0
listener.vendor.downstream_cx_total: 0
server.config_reloads.error: 1
server.config_reloads.success: 3
server.draining: 0
server.ready: 1
"""

CLUSTERS = {
    "clusters": [
        {
            "name": "pg",
            "circuit_breaker": {
                "max_connections": 100,
                "max_pending": 10,
                "active": 3,
                "pending": 1,
                "open": False,
                "overflows": 5,
            },
            "connections_total": 4,
            "connect_failures": {"timeout": 1, "refused": 2, "dns": 0, "unreachable": 0, "error": 0},
            "health_check": {"kind": "postgres", "interval": 5.0, "timeout": 1.5},
            "endpoints": [
                {
                    "address": "db.example.com:5432",
                    "healthy": True,
                    "active": 2,
                    "connections_total": 3,
                    "connect_failures": 0,
                    "last_error": None,
                },
                {
                    "address": "db2.example.com:5432",
                    "healthy": False,
                    "active": 1,
                    "connections_total": 1,
                    "connect_failures": 2,
                    "last_error": "connection refused",
                },
                {
                    "address": "[2001:db8::5]:5432",
                    "healthy": None,
                    "active": 0,
                    "connections_total": 0,
                    "connect_failures": 0,
                    "last_error": None,
                },
            ],
        },
        {
            "name": "api",
            "circuit_breaker": {
                "max_connections": 1,
                "max_pending": 128,
                "active": 1,
                "pending": 0,
                "open": True,
                "overflows": 0,
            },
            "connections_total": 1,
            "connect_failures": {"timeout": 0, "refused": 0, "dns": 0, "unreachable": 0, "error": 0},
            "health_check": {"kind": "tcp", "interval": 10.0, "timeout": 2.0},
            "endpoints": [
                {
                    "address": "api.vendor.com:443",
                    "healthy": None,
                    "active": 1,
                    "connections_total": 1,
                    "connect_failures": 0,
                    "last_error": None,
                },
            ],
        },
    ]
}


class SiteTestCase(SynchronousTestCase):
    """Drives a site's resources with DummyRequest, as twisted.web's Request would."""

    def setUp(self) -> None:
        self.service = busy_service()
        self.registry = make_registry(self.service)

    def request(self, site: Site, method: bytes, path: bytes) -> DummyRequest:
        request = DummyRequest(path[1:].split(b"/"))
        request.method = method
        self.successResultOf(_render(site.getResourceFor(request), request))
        return request

    def assertResponse(
        self, request: DummyRequest, code: int, body: bytes, content_type: list[bytes] | None = TEXT
    ) -> None:
        self.assertEqual(
            (request.responseCode, b"".join(request.written), request.responseHeaders.getRawHeaders(b"content-type")),
            (code, body, content_type),
        )


class MetricsSiteTests(SiteTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.site = build_metrics_site(self.service, self.registry)

    def get(self, path: bytes, method: bytes = b"GET") -> DummyRequest:
        return self.request(self.site, method, path)

    def test_metrics(self) -> None:
        """GET /metrics answers 200 with the registry in the Prometheus text format."""
        request = self.get(b"/metrics")
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [CONTENT_TYPE_LATEST.encode()])
        names = {family.name for family in text_string_to_metric_families(b"".join(request.written).decode())}
        self.assertIn("egressproxy_downstream_connections", names)

    def test_metrics_head(self) -> None:
        """HEAD /metrics answers 200 with the content type and no body."""
        request = self.get(b"/metrics", b"HEAD")
        self.assertResponse(request, 200, b"", [CONTENT_TYPE_LATEST.encode()])

    def test_healthz(self) -> None:
        """GET /healthz answers 200 ``ok``."""
        self.assertResponse(self.get(b"/healthz"), 200, b"ok\n")

    def test_healthz_head(self) -> None:
        """HEAD /healthz gives GET's Content-Length and no body."""
        request = self.get(b"/healthz", b"HEAD")
        self.assertResponse(request, 200, b"")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-length"), [b"3"])

    def test_ready(self) -> None:
        """GET /ready answers 200 ``ready`` while the service is ready."""
        self.assertResponse(self.get(b"/ready"), 200, b"ready\n")

    def test_ready_turns_503_when_draining(self) -> None:
        """/ready answers 503 ``draining`` once the service drains."""
        self.assertEqual(self.get(b"/ready").responseCode, 200)
        self.service.draining = True
        self.assertResponse(self.get(b"/ready"), 503, b"draining\n")

    def test_ready_starting(self) -> None:
        """/ready answers 503 ``starting`` before the listeners are bound."""
        self.service.bound = False
        self.assertResponse(self.get(b"/ready"), 503, b"starting\n")

    def test_other_method(self) -> None:
        """POST to a known path answers 405 with ``Allow: GET, HEAD``."""
        request = self.get(b"/metrics", b"POST")
        self.assertResponse(request, 405, b"method not allowed\n")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"allow"), [b"GET, HEAD"])

    def test_admin_routes_unreachable(self) -> None:
        """The admin routes are 404 on the metrics site."""
        for path in (b"/stats", b"/clusters", b"/reload"):
            self.assertResponse(self.get(path), 404, b"not found\n")

    def test_drain_unreachable(self) -> None:
        """POST /drain is 404 on the metrics site and does not drain."""
        self.assertResponse(self.get(b"/drain", b"POST"), 404, b"not found\n")
        self.assertEqual(self.service.drain_requests, 0)

    def test_unknown_path(self) -> None:
        """An unknown path answers 404."""
        self.assertResponse(self.get(b"/nope"), 404, b"not found\n")

    def test_root(self) -> None:
        """The root path answers 404."""
        self.assertResponse(self.get(b"/"), 404, b"not found\n")

    def test_trailing_slash(self) -> None:
        """A known path with a trailing slash answers 404."""
        self.assertResponse(self.get(b"/metrics/"), 404, b"not found\n")

    def test_extra_segment(self) -> None:
        """A known path with a further segment answers 404."""
        self.assertResponse(self.get(b"/healthz/x"), 404, b"not found\n")

    def test_head_unknown_path(self) -> None:
        """HEAD of an unknown path answers 404 without a body."""
        self.assertResponse(self.get(b"/nope", b"HEAD"), 404, b"")

    def test_service_reactor(self) -> None:
        """The site runs its timeouts on the service's reactor."""
        self.assertIs(self.site.reactor, self.service.reactor)


class AdminSiteTests(SiteTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.site = build_admin_site(self.service, self.registry)

    def call(self, method: bytes, path: bytes) -> DummyRequest:
        return self.request(self.site, method, path)

    def test_stats(self) -> None:
        """GET /stats answers every counter as sorted ``name: value`` lines."""
        self.assertResponse(self.call(b"GET", b"/stats"), 200, STATS.encode())

    def test_stats_draining(self) -> None:
        """/stats reports a draining service as not ready and draining."""
        self.service.draining = True
        body = b"".join(self.call(b"GET", b"/stats").written).decode()
        self.assertEqual(body.splitlines()[-2:], ["server.draining: 1", "server.ready: 0"])

    def test_clusters(self) -> None:
        """GET /clusters answers every cluster's breaker, health check and endpoints as JSON."""
        request = self.call(b"GET", b"/clusters")
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(json.loads(b"".join(request.written)), CLUSTERS)

    def test_metrics(self) -> None:
        """GET /metrics on the admin site serves the same registry."""
        request = self.call(b"GET", b"/metrics")
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [CONTENT_TYPE_LATEST.encode()])

    def test_ready(self) -> None:
        """GET /ready on the admin site follows the service state."""
        self.service.draining = True
        self.assertResponse(self.call(b"GET", b"/ready"), 503, b"draining\n")

    def test_healthz(self) -> None:
        """GET /healthz on the admin site answers 200 ``ok``."""
        self.assertResponse(self.call(b"GET", b"/healthz"), 200, b"ok\n")

    def test_drain(self) -> None:
        """POST /drain asks the service to drain once and answers 202."""
        self.assertResponse(self.call(b"POST", b"/drain"), 202, b"draining\n")
        self.assertEqual(self.service.drain_requests, 1)

    def test_drain_get(self) -> None:
        """GET /drain answers 405 with ``Allow: POST`` and does not drain."""
        request = self.call(b"GET", b"/drain")
        self.assertResponse(request, 405, b"method not allowed\n")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"allow"), [b"POST"])
        self.assertEqual(self.service.drain_requests, 0)

    def test_reload(self) -> None:
        """POST /reload answers 200 with the service's summary."""
        self.assertResponse(self.call(b"POST", b"/reload"), 200, b"reloaded: 2 listeners, 2 clusters\n")
        self.assertEqual(self.service.reload_calls, 1)

    def test_reload_error(self) -> None:
        """POST /reload answers 400 with the error text when the new config is refused."""
        self.service.reload_result = (False, "egressproxy.yaml:3: clusters[0].endpoints[0]: expected HOST:PORT\n")
        self.assertResponse(
            self.call(b"POST", b"/reload"), 400, b"egressproxy.yaml:3: clusters[0].endpoints[0]: expected HOST:PORT\n"
        )

    def test_reload_get(self) -> None:
        """GET /reload answers 405 with ``Allow: POST`` and does not reload."""
        request = self.call(b"GET", b"/reload")
        self.assertEqual((request.responseCode, request.responseHeaders.getRawHeaders(b"allow")), (405, [b"POST"]))
        self.assertEqual(self.service.reload_calls, 0)

    def test_stats_post(self) -> None:
        """POST /stats answers 405 with ``Allow: GET, HEAD``."""
        request = self.call(b"POST", b"/stats")
        self.assertEqual((request.responseCode, request.responseHeaders.getRawHeaders(b"allow")), (405, [b"GET, HEAD"]))

    def test_stats_head(self) -> None:
        """HEAD /stats answers 200 with GET's Content-Length and no body."""
        request = self.call(b"HEAD", b"/stats")
        self.assertResponse(request, 200, b"")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-length"), [b"%d" % len(STATS)])

    def test_unknown_path(self) -> None:
        """An unknown path answers 404."""
        self.assertResponse(self.call(b"GET", b"/config_dump"), 404, b"not found\n")


class QuietSiteTests(SynchronousTestCase):
    def test_no_request_log(self) -> None:
        """The sites write nothing to the log for a finished request."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service = FakeService()
        registry = make_registry(service)
        for site in (build_metrics_site(service, registry), build_admin_site(service, registry)):
            site.log(DummyRequest([b"metrics"]))
        self.assertEqual(events, [])

    def test_not_noisy(self) -> None:
        """The sites log no factory start and stop lines."""
        service = FakeService()
        self.assertFalse(build_metrics_site(service, make_registry(service)).noisy)

    def test_log_prefix(self) -> None:
        """Each site's port lines are prefixed with the service it belongs to."""
        service = FakeService()
        registry = make_registry(service)
        self.assertEqual(
            (build_metrics_site(service, registry).logPrefix(), build_admin_site(service, registry).logPrefix()),
            ("metrics http", "admin http"),
        )
