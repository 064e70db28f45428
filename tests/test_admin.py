"""Tests for egressproxy.observe.admin: the metrics and admin sites, route by route."""

from __future__ import annotations

import json

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site
from twisted.web.test._util import _render
from twisted.web.test.requesthelper import DummyRequest

from egressproxy.observe.admin import ADMIN_TOKEN_ENV, admin_token, build_admin_site, build_metrics_site
from egressproxy.observe.httpsite import HTTP_MAX_CONNECTIONS, HTTP_TIMEOUT, QuietSite, Routes
from egressproxy.datapath.listener import REJECT_REASONS
from egressproxy.observe.metrics import make_registry
from tests.test_metrics import FakeService, busy_service

TEXT = [b"text/plain; charset=utf-8"]

def rejected_lines(listener: str, counts: dict[str, int]) -> str:
    """A listener's ``downstream_cx_rejected`` lines: every known reason, sorted."""
    return "".join(
        f"listener.{listener}.downstream_cx_rejected.{reason}: {counts.get(reason, 0)}\n"
        for reason in sorted(REJECT_REASONS)
    )


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
{direct_rejected}listener.direct.downstream_cx_total: 12
listener.vendor.downstream_bytes_received: 0
listener.vendor.downstream_bytes_sent: 0
listener.vendor.downstream_cx_active: 0
{vendor_rejected}listener.vendor.downstream_cx_total: 0
server.config_reloads.error: 1
server.config_reloads.success: 3
server.draining: 0
server.ready: 1
""".format(
    # Every known reason has a line, at zero until counted (busy_service counts two).
    direct_rejected=rejected_lines("direct", {"max_connections": 1, "source": 2}),
    vendor_rejected=rejected_lines("vendor", {}),
)

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


class LogCapture:
    """Collects global log events for the length of a test."""

    def __init__(self, testcase: SynchronousTestCase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(event) for event in self.events]


class AdminTokenTests(SiteTestCase):
    """EGRESSPROXY_ADMIN_TOKEN: POST /drain and /reload need ``Authorization: Bearer``; GETs stay open."""

    TOKEN = "s3cret-Token_1"

    def setUp(self) -> None:
        super().setUp()
        self.service.admin_token = self.TOKEN
        self.site = build_admin_site(self.service, self.registry)
        self.log = LogCapture(self)

    def call(self, method: bytes, path: bytes, authorization: bytes | None = None) -> DummyRequest:
        request = DummyRequest(path[1:].split(b"/"))
        request.method = method
        request.client = IPv4Address("TCP", "127.0.0.1", 51000)
        if authorization is not None:
            request.requestHeaders.addRawHeader(b"authorization", authorization)
        self.successResultOf(_render(self.site.getResourceFor(request), request))
        return request

    def test_read_from_environment(self) -> None:
        """The token is the variable's value without surrounding whitespace; unset or empty means none."""
        self.assertEqual(admin_token({}), None)
        self.assertEqual(admin_token({ADMIN_TOKEN_ENV: ""}), None)
        self.assertEqual(admin_token({ADMIN_TOKEN_ENV: "  \n"}), None)
        self.assertEqual(admin_token({ADMIN_TOKEN_ENV: " abc\n"}), "abc")

    def test_missing_token_401(self) -> None:
        """Without an Authorization header: 401 with WWW-Authenticate: Bearer, and nothing happens."""
        for path in (b"/drain", b"/reload"):
            request = self.call(b"POST", path)
            self.assertEqual(request.responseCode, 401)
            [challenge] = request.responseHeaders.getRawHeaders(b"www-authenticate")
            self.assertTrue(challenge.startswith(b"Bearer"))
        self.assertEqual((self.service.drain_requests, self.service.reload_calls), (0, 0))

    def test_other_scheme_401(self) -> None:
        """A Basic header (or a bare ``Bearer``) is no bearer token: 401."""
        for header in (b"Basic YWRtaW46czNjcmV0", b"Bearer", b"Bearer   ", self.TOKEN.encode()):
            self.assertEqual(self.call(b"POST", b"/drain", header).responseCode, 401, header)
        self.assertEqual(self.service.drain_requests, 0)

    def test_wrong_token_403(self) -> None:
        """A wrong token: 403, and nothing happens."""
        for token in (b"wrong", self.TOKEN.encode()[:-1], self.TOKEN.encode() + b"x", self.TOKEN.upper().encode()):
            for path in (b"/drain", b"/reload"):
                self.assertResponse(self.call(b"POST", path, b"Bearer " + token), 403, b"wrong token\n")
        self.assertEqual((self.service.drain_requests, self.service.reload_calls), (0, 0))

    def test_right_token_acts(self) -> None:
        """The right token (the scheme in any case) drains and reloads as before."""
        self.assertResponse(self.call(b"POST", b"/drain", b"Bearer " + self.TOKEN.encode()), 202, b"draining\n")
        request = self.call(b"POST", b"/reload", b"bearer  " + self.TOKEN.encode())
        self.assertEqual(request.responseCode, 200)
        self.assertEqual((self.service.drain_requests, self.service.reload_calls), (1, 1))

    def test_gets_stay_open(self) -> None:
        """The read-only routes need no token."""
        for path in (b"/stats", b"/clusters", b"/metrics", b"/ready", b"/healthz"):
            self.assertEqual(self.call(b"GET", path).responseCode, 200, path)

    def test_method_checked_before_token(self) -> None:
        """GET /drain is still 405, token or not."""
        self.assertEqual(self.call(b"GET", b"/drain").responseCode, 405)

    def test_refusals_logged_without_the_token(self) -> None:
        """Each refusal is logged with the path, the peer and why; the presented token never appears."""
        self.call(b"POST", b"/drain")
        self.call(b"POST", b"/reload", b"Bearer not-the-token")
        texts = self.log.texts()
        self.assertEqual(len(texts), 2)
        self.assertIn("admin: refused POST /drain from 127.0.0.1:51000: no bearer token", texts[0])
        self.assertIn("admin: refused POST /reload from 127.0.0.1:51000: wrong bearer token", texts[1])
        self.assertFalse(any("not-the-token" in text or self.TOKEN in text for text in texts))

    def test_no_token_unchanged(self) -> None:
        """Without a token, POST /drain needs no header (the behaviour before)."""
        self.service.admin_token = None
        self.assertEqual(self.call(b"POST", b"/drain").responseCode, 202)


class ThroughProxyTests(SiteTestCase):
    """Requests whose peer is one of the proxy's own upstream connections are refused on both sites."""

    OWN = ("127.0.0.1", 40123)

    def setUp(self) -> None:
        super().setUp()
        self.service.own_upstreams = {self.OWN}
        self.log = LogCapture(self)

    def call(self, site: Site, method: bytes, path: bytes, client: IPv4Address | IPv6Address) -> DummyRequest:
        request = DummyRequest(path[1:].split(b"/"))
        request.method = method
        request.client = client
        self.successResultOf(_render(site.getResourceFor(request), request))
        return request

    def test_refused_403(self) -> None:
        """GET /metrics, /stats and POST /drain through the proxy: 403, and no drain."""
        own = IPv4Address("TCP", *self.OWN)
        admin = build_admin_site(self.service, self.registry)
        metrics = build_metrics_site(self.service, self.registry)
        for site, method, path in ((metrics, b"GET", b"/metrics"), (admin, b"GET", b"/stats"),
                                   (admin, b"POST", b"/drain"), (admin, b"HEAD", b"/nope")):
            request = self.call(site, method, path, own)
            body = b"" if method == b"HEAD" else b"request came through this proxy\n"
            self.assertResponse(request, 403, body)
        self.assertEqual(self.service.drain_requests, 0)
        self.assertIn("admin: refused POST /drain from 127.0.0.1:40123: it came through this proxy",
                      "\n".join(self.log.texts()))

    def test_refused_even_with_the_token(self) -> None:
        """The token does not let a request through the proxy in."""
        self.service.admin_token = "t"
        request = DummyRequest([b"drain"])
        request.method = b"POST"
        request.client = IPv4Address("TCP", *self.OWN)
        request.requestHeaders.addRawHeader(b"authorization", b"Bearer t")
        admin = build_admin_site(self.service, self.registry)
        self.successResultOf(_render(admin.getResourceFor(request), request))
        self.assertEqual((request.responseCode, self.service.drain_requests), (403, 0))

    def test_other_peers_served(self) -> None:
        """Another port on the same address is an ordinary client."""
        request = self.call(build_admin_site(self.service, self.registry), b"POST", b"/drain",
                            IPv4Address("TCP", "127.0.0.1", 40124))
        self.assertEqual((request.responseCode, self.service.drain_requests), (202, 1))

    def test_routes_without_service(self) -> None:
        """A Routes table built without a service checks nothing (as before)."""
        request = DummyRequest([b"x"])
        request.client = IPv4Address("TCP", *self.OWN)
        self.successResultOf(_render(Routes({}), request))
        self.assertEqual(request.responseCode, 404)


class BoundedSiteTests(SynchronousTestCase):
    """The deadline and the connection cap of the HTTP services, on a memory reactor."""

    def setUp(self) -> None:
        self.service = FakeService()
        self.clock = MemoryReactorClock()
        self.service.reactor = self.clock
        self.log = LogCapture(self)

    def site(self, timeout: float = 10.0, max_connections: int = 3) -> QuietSite:
        site = build_metrics_site(self.service, make_registry(self.service))
        assert isinstance(site, QuietSite)
        site.timeOut, site.max_connections = timeout, max_connections
        return site

    def connect(self, site: QuietSite, port: int = 50000):  # type: ignore[no-untyped-def]
        address = IPv4Address("TCP", "127.0.0.1", port)
        channel = site.buildProtocol(address)
        if channel is None:
            return None, None
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        return channel, transport

    def test_defaults(self) -> None:
        """Both sites get the default deadline (10 s) and cap (64)."""
        registry = make_registry(self.service)
        for site in (build_metrics_site(self.service, registry), build_admin_site(self.service, registry)):
            self.assertEqual((site.timeOut, site.max_connections), (HTTP_TIMEOUT, HTTP_MAX_CONNECTIONS))
        self.assertEqual((HTTP_TIMEOUT, HTTP_MAX_CONNECTIONS), (10.0, 64))

    def test_slow_headers_closed_at_deadline(self) -> None:
        """A client dripping a header byte every second is closed at the deadline, traffic notwithstanding."""
        site = self.site(timeout=10.0)
        channel, transport = self.connect(site)
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 100
        for i in range(10):
            self.assertFalse(transport.disconnecting, i)
            channel.dataReceived(request[i : i + 1])
            self.clock.advance(1.0)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_idle_between_requests_closed(self) -> None:
        """After a response, the next request must come within the deadline too."""
        site = self.site(timeout=10.0)
        channel, transport = self.connect(site)
        self.clock.advance(9.0)
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"))
        self.clock.advance(9.0)  # a new window began with the response
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1.0)
        self.assertTrue(transport.disconnecting)

    def test_deadline_aborts_a_peer_that_does_not_read(self) -> None:
        """A connection the deadline closed is aborted if it has not gone after another deadline."""
        site = self.site(timeout=10.0)
        _channel, transport = self.connect(site)
        self.clock.advance(10.0)
        self.assertTrue(transport.disconnecting)
        self.clock.advance(10.0)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cap(self) -> None:
        """Past max_connections, buildProtocol answers None (the port closes the socket unread)."""
        site = self.site(max_connections=3)
        channels = [self.connect(site, 50000 + i)[0] for i in range(3)]
        self.assertEqual(self.connect(site, 50010), (None, None))
        self.assertEqual(self.connect(site, 50011), (None, None))
        self.assertEqual((site.open_connections, site.refused_connections), (3, 2))
        channels[0].connectionLost(Failure(ConnectionDone()))
        self.assertEqual(site.open_connections, 2)
        self.assertIsNotNone(self.connect(site, 50012)[0])

    def test_cap_logged_once_per_episode(self) -> None:
        """Reaching the cap is logged once, and again only after the count fell to half."""
        site = self.site(max_connections=4)
        channels = [self.connect(site, 50000 + i)[0] for i in range(4)]
        for i in range(5):
            self.connect(site, 50100 + i)
        self.assertEqual(len(self.log.texts()), 1)
        self.assertIn("metrics http: 4 connections open", self.log.texts()[0])
        channels.pop().connectionLost(Failure(ConnectionDone()))
        channels.append(self.connect(site, 50200)[0])
        self.connect(site, 50201)
        self.assertEqual(len(self.log.texts()), 1)
        for channel in channels[:2]:
            channel.connectionLost(Failure(ConnectionDone()))
        for i in range(3):
            self.connect(site, 50300 + i)
        self.assertEqual(len(self.log.texts()), 2)

    def test_timeouts_log_nothing(self) -> None:
        """A connection closed by the deadline writes no log line (Fly scrapes every few seconds)."""
        site = self.site(timeout=1.0)
        for i in range(3):
            self.connect(site, 50000 + i)
        self.clock.advance(5.0)
        self.assertEqual(self.log.events, [])
