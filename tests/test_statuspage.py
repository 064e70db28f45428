"""Tests for the admin status page (``GET /``) and its data (``GET /status.json``), without sockets.

The service is ``tests.test_metrics.FakeService`` (real listener runtimes and
clusters on a memory clock) with real :class:`Session` objects added to its
listeners, as accepted connections are.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test._util import _render
from twisted.web.test.requesthelper import DummyRequest

from egressproxy.datapath.session import Session
from egressproxy.observe.admin import build_admin_site, build_metrics_site, cluster_status
from egressproxy.observe.egressip import EgressIpWatch
from egressproxy.observe.metrics import make_registry
from egressproxy.observe.statusdata import LIVE_LIMIT, status
from egressproxy.observe.statuspage import CSP, human_age, human_bytes, render_page
from tests.test_metrics import DB, DB2, FakeService

HOSTILE = "<script>alert(1)</script>"
HOSTILE_ATTR = '"><img src=x onerror=alert(2)>'


def add_session(service: FakeService, listener: str, peer: object, received: int = 0, sent: int = 0) -> Session:
    """A live session on ``listener``, as the listener's factory and admission would leave it."""
    runtime = service.listeners[listener]
    session = Session(runtime, peer)  # type: ignore[arg-type]
    session.bytes_received, session.bytes_sent = received, sent
    runtime.sessions.add(session)
    return session


def page(service: FakeService) -> str:
    return render_page(status(service, cluster_status))


def script_tags(html: str) -> list[str]:
    return re.findall(r"<script\b[^>]*>", html, flags=re.IGNORECASE)


class EscapingTests(SynchronousTestCase):
    """Client-controlled strings reach the page as text, never as markup."""

    def setUp(self) -> None:
        self.service = FakeService()
        # A unix-socket peer's path and a TLS server name are whatever the client made them.
        hostile = add_session(self.service, "direct", UNIXAddress(f"/run/{HOSTILE}".encode()))
        hostile.upstream_name = f"{HOSTILE}.example:5432"
        hostile.user = HOSTILE_ATTR
        hostile.flag("RP")
        self.service.clusters["pg"].endpoints[DB2].last_error = HOSTILE
        self.service.listeners["vendor"].count_rejected(HOSTILE)

    def test_no_markup_from_client_input(self) -> None:
        """Hostile peer, server name, user, last error and refusal reason appear escaped only."""
        html = page(self.service)
        self.assertEqual(len(script_tags(html)), 1, script_tags(html))  # the page's own refresh script
        self.assertNotIn("<img", html)
        self.assertNotIn("alert(1)</script>", html)
        self.assertIn("/run/&lt;script&gt;alert(1)&lt;/script&gt;", html)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;.example:5432", html)
        self.assertIn("&quot;&gt;&lt;img src=x onerror=alert(2)&gt;", html)

    def test_not_ready_reason_escaped(self) -> None:
        """The egress check's error text (from the network) is escaped in the readiness line too."""
        watch = EgressIpWatch(self.service.reactor, [("192.0.2.1", 3478)], frozenset({"203.0.113.9"}), 30.0)
        watch.error = HOSTILE
        self.service.egress = watch  # type: ignore[attr-defined]
        self.service.not_ready_reason = watch.reason  # type: ignore[attr-defined]
        self.service.bound = False
        html = page(self.service)
        self.assertEqual(len(script_tags(html)), 1)
        self.assertIn("not ready: egress address not known yet (&lt;script&gt;", html)

    def test_json_keeps_raw_strings(self) -> None:
        """/status.json carries the strings unchanged (JSON, served as application/json)."""
        data = json.loads(json.dumps(status(self.service, cluster_status)))
        [live] = data["connections"]["shown"]
        self.assertEqual((live["peer"], live["upstream"], live["user"], live["flags"]),
                         (f"/run/{HOSTILE}", f"{HOSTILE}.example:5432", HOSTILE_ATTR, ["RP"]))

    def test_csp_allows_only_the_page_script(self) -> None:
        """The Content-Security-Policy names the hash of exactly the inline script the page carries."""
        html = page(self.service)
        [script] = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        self.assertIn(f"script-src 'sha256-{digest}';".encode(), CSP)
        self.assertNotIn(b"unsafe-inline", CSP)
        [style] = re.findall(r"<style>(.*?)</style>", html, flags=re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
        self.assertIn(f"style-src 'sha256-{digest}';".encode(), CSP)


class EmptyStateTests(SynchronousTestCase):
    def test_nothing_configured(self) -> None:
        """No listeners, clusters or connections: every section says so."""
        service = FakeService()
        service.listeners, service.clusters = {}, {}
        data = status(service, cluster_status)
        self.assertEqual((data["listeners"], data["clusters"], data["connections"]["total"]), ([], [], 0))
        html = render_page(data)
        for text in ("No listeners configured.", "No clusters.", "No live connections.",
                     "No connection refused since start.", "Not checked: expected_egress_ips is not set.",
                     '<span class="ok">ready</span>'):
            self.assertIn(text, html)

    def test_idle_listeners(self) -> None:
        """Configured but idle: listeners and endpoints listed (health unknown), no connections."""
        html = page(FakeService())
        self.assertIn("<td>direct</td><td>tcp</td><td>pg</td>", html)
        self.assertIn("<td>db.example.com:5432</td><td class=\"unknown\">unknown</td>", html)
        self.assertIn("No live connections.", html)


class ContentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.service = FakeService()
        self.clock = self.service.reactor

    def test_live_connection_row(self) -> None:
        """A live session: peer, listener, upstream, bytes both ways, stage and age from the clock."""
        session = add_session(self.service, "direct", IPv4Address("TCP", "10.0.0.7", 50122), 2048, 300)
        session.upstream_name = "db.example.com:5432"
        self.clock.advance(75)
        [row] = status(self.service, cluster_status)["connections"]["shown"]
        self.assertEqual(
            {k: row[k] for k in ("peer", "listener", "upstream", "bytes_received", "bytes_sent", "age_seconds")},
            {"peer": "10.0.0.7:50122", "listener": "direct", "upstream": "db.example.com:5432",
             "bytes_received": 2048, "bytes_sent": 300, "age_seconds": 75.0},
        )
        self.assertIn("<td>10.0.0.7:50122</td><td>direct</td><td>db.example.com:5432</td>", page(self.service))
        self.assertIn("<td>2.0 KiB</td><td>300 B</td><td>1m 15s</td>", page(self.service))

    def test_cap_newest_first(self) -> None:
        """Past the cap, the newest sessions are listed and the rest counted as "and N more"."""
        for port in range(LIVE_LIMIT + 5):
            add_session(self.service, "direct" if port % 2 else "vendor", IPv4Address("TCP", "10.0.0.1", 10000 + port))
            self.clock.advance(1)
        data = status(self.service, cluster_status)
        live = data["connections"]
        self.assertEqual((live["total"], len(live["shown"]), live["more"]), (LIVE_LIMIT + 5, LIVE_LIMIT, 5))
        self.assertEqual(live["shown"][0]["peer"], f"10.0.0.1:{10000 + LIVE_LIMIT + 4}")
        self.assertEqual(live["shown"][-1]["peer"], "10.0.0.1:10005")
        html = render_page(data)
        self.assertEqual(html.count("<td>10.0.0.1:"), LIVE_LIMIT)
        self.assertIn("and 5 more (only the newest 200 are listed)", html)
        self.assertNotIn("10.0.0.1:10004<", html)

    def test_small_cap(self) -> None:
        """The cap is a parameter; under it, no "more" line."""
        for port in range(3):
            add_session(self.service, "direct", IPv4Address("TCP", "10.0.0.1", 20000 + port))
        self.assertEqual(status(self.service, cluster_status, limit=2)["connections"]["more"], 1)
        self.assertNotIn("more (only", page(self.service))

    def test_retired_and_awaiting(self) -> None:
        """A listener a reload removed still lists its live sessions; one awaiting its PROXY header says so."""
        vendor = self.service.listeners.pop("vendor")
        self.service.retired = [vendor]  # type: ignore[attr-defined]
        add_session(self.service, "direct", IPv4Address("TCP", "10.0.0.2", 40000))
        waiting = Session(self.service.listeners["direct"], IPv4Address("TCP", "10.0.0.3", 40001))
        self.service.listeners["direct"].awaiting.add(waiting)
        old = Session(vendor, IPv4Address("TCP", "10.0.0.4", 40002))
        vendor.sessions.add(old)
        data = status(self.service, cluster_status)
        self.assertEqual([(l["name"], l["retired"]) for l in data["listeners"]], [("direct", False), ("vendor", True)])
        stages = {c["peer"]: (c["listener"], c["stage"]) for c in data["connections"]["shown"]}
        self.assertEqual(stages, {
            "10.0.0.2:40000": ("direct", "handshake"),
            "10.0.0.3:40001": ("direct", "awaiting PROXY header"),
            "10.0.0.4:40002": ("vendor", "handshake"),
        })
        self.assertIn("<td>vendor (removed by reload, draining)</td>", render_page(data))

    def test_refusals_with_flags(self) -> None:
        """Each listener's refusal counts, its newest reason and the access-log flag it carries."""
        direct = self.service.listeners["direct"]
        direct.rejected["source"] = 2
        direct.count_rejected("no_route")
        [entry, _vendor] = status(self.service, cluster_status)["listeners"]
        self.assertEqual((entry["rejected"], entry["last_refusal"], entry["last_refusal_flag"]),
                         ({"no_route": 1, "source": 2}, "no_route", "NR"))
        html = page(self.service)
        self.assertIn("<td>direct</td><td>no_route</td><td>NR</td><td>no route: destination or server name not "
                      "allowed</td><td>no_route: 1, source: 2</td>", html)

    def test_clusters_health_and_breaker(self) -> None:
        """Endpoint health (healthy, unhealthy, unknown), last error and an open breaker, as /clusters has them."""
        pg = self.service.clusters["pg"]
        pg.endpoints[DB].healthy = True
        pg.endpoints[DB2].healthy = False
        pg.endpoints[DB2].last_error = "connection refused"
        api = self.service.clusters["api"]
        assert api.breaker.try_acquire_pending()  # api allows one connection: with it pending, the breaker is open
        html = page(self.service)
        self.assertIn('<td>db.example.com:5432</td><td class="ok">healthy</td>', html)
        self.assertIn('<td>db2.example.com:5432</td><td class="bad">unhealthy</td><td>connection refused</td>', html)
        self.assertIn('<td>[2001:db8::5]:5432</td><td class="unknown">unknown</td>', html)
        self.assertIn('<td>api</td><td class="bad">open</td><td>0 / 1</td><td>1 / 128</td>', html)
        self.assertIn('<td>pg</td><td class="ok">closed</td>', html)
        self.assertEqual(status(self.service, cluster_status)["clusters"][1], cluster_status(api))

    def test_workers_caveat_and_totals(self) -> None:
        """With workers: N the page says its connections are this process's; listener totals add the others'."""
        self.service.worker_count = 3  # type: ignore[attr-defined]
        self.service.snapshots = [{"listeners": {"direct": {"connections": 40, "active": 4, "received": 10,
                                                            "sent": 20, "rejected": {"source": 1}}}, "clusters": {}}]
        data = status(self.service, cluster_status)
        direct = data["listeners"][0]
        self.assertEqual((direct["connections_total"], direct["active"], direct["rejected"]),
                         (40, 4, {"source": 1}))
        self.assertIn("Connections of this process only (worker 0 of 3)", render_page(data))

    def test_egress_state(self) -> None:
        """The egress-address check: address seen, expected ones, verdict; /ready's reason when not ready."""
        watch = EgressIpWatch(self.clock, [("192.0.2.1", 3478)], frozenset({"203.0.113.9"}), 30.0)
        watch.seen, watch.checked_at = "198.51.100.4", 0.0
        self.clock.advance(12)
        self.service.egress = watch  # type: ignore[attr-defined]
        self.service.bound = False
        data = status(self.service, cluster_status)
        self.assertEqual((data["egress"]["seen"], data["egress"]["ready"], data["egress"]["checked_seconds_ago"]),
                         ("198.51.100.4", False, 12.0))
        self.assertEqual(data["server"]["ready"], False)
        html = render_page(data)
        self.assertIn("<td>198.51.100.4</td><td>203.0.113.9</td>", html)
        self.assertIn("egress address 198.51.100.4 is not in expected_egress_ips", html)
        self.assertIn("<td>12.0s ago</td>", html)

    def test_human_units(self) -> None:
        self.assertEqual([human_bytes(n) for n in (0, 1023, 1024, 5 * 1024**3)], ["0 B", "1023 B", "1.0 KiB", "5.0 GiB"])
        self.assertEqual([human_age(s) for s in (4.25, 187, 7500, 3 * 86400 + 4 * 3600)],
                         ["4.2s", "3m 07s", "2h 05m", "3d 04h"])


class RouteTests(SynchronousTestCase):
    """``/`` and ``/status.json`` on the admin site: open without the token, read-only, admin only."""

    def setUp(self) -> None:
        self.service = FakeService()
        self.service.admin_token = "secret"
        self.registry = make_registry(self.service)
        add_session(self.service, "direct", IPv4Address("TCP", "10.0.0.7", 50122))

    def call(self, site: object, method: bytes, path: bytes) -> DummyRequest:
        request = DummyRequest(path[1:].split(b"/"))
        request.method = method
        request.client = IPv4Address("TCP", "127.0.0.1", 51000)
        self.successResultOf(_render(site.getResourceFor(request), request))  # type: ignore[attr-defined]
        return request

    def test_page(self) -> None:
        """GET /: 200 HTML with the CSP and no-store, no token needed."""
        request = self.call(build_admin_site(self.service, self.registry), b"GET", b"/")
        self.assertEqual(request.responseCode, 200)
        headers = request.responseHeaders
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
        self.assertEqual(headers.getRawHeaders(b"content-security-policy"), [CSP])
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-store"])
        self.assertIn(b"<td>10.0.0.7:50122</td>", b"".join(request.written))

    def test_json(self) -> None:
        """GET /status.json: the same data as JSON."""
        request = self.call(build_admin_site(self.service, self.registry), b"GET", b"/status.json")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"])
        data = json.loads(b"".join(request.written))
        self.assertEqual(data["connections"]["shown"][0]["peer"], "10.0.0.7:50122")

    def test_read_only(self) -> None:
        """POST / is 405; HEAD / has no body."""
        site = build_admin_site(self.service, self.registry)
        self.assertEqual(self.call(site, b"POST", b"/").responseCode, 405)
        head = self.call(site, b"HEAD", b"/")
        self.assertEqual((head.responseCode, b"".join(head.written)), (200, b""))

    def test_not_on_metrics_site(self) -> None:
        """The metrics port (exposed to the scraper) does not serve the page."""
        site = build_metrics_site(self.service, self.registry)
        for path in (b"/", b"/status.json"):
            self.assertEqual(self.call(site, b"GET", path).responseCode, 404)


class RecentProblemTests(SynchronousTestCase):
    """The last refused or failed connections, as the listeners remember them when they end."""

    def finish(self, service: FakeService, listener: str, start: float, flags: tuple[str, ...], peer: str) -> None:
        from egressproxy.observe.accesslog import AccessRecord

        runtime = service.listeners[listener]
        record = AccessRecord(start, listener, listener.upper(), peer, "db.example.com:5432", 10, 0, 3, flags)
        session = add_session(service, listener, IPv4Address("TCP", "127.0.0.1", 1))
        runtime.session_finished(session, record)

    def test_newest_first_across_listeners_quiet_flags_left_out(self) -> None:
        service = FakeService()
        self.finish(service, "direct", 100.0, ("RBAC",), "10.0.0.1:1")
        self.finish(service, "vendor", 300.0, ("NR",), f"{HOSTILE}:2")
        self.finish(service, "direct", 200.0, ("UF", "LR:28P01"), "10.0.0.3:3")
        self.finish(service, "direct", 400.0, ("NB",), "10.0.0.4:4")  # closed before a byte: not a problem
        self.finish(service, "direct", 500.0, (), "10.0.0.5:5")
        problems = status(service, cluster_status)["recent_problems"]
        self.assertEqual([p["flags"] for p in problems], [["NR"], ["UF", "LR:28P01"], ["RBAC"]])
        self.assertTrue(problems[1]["meanings"][1].startswith("Postgres login refused"))
        html = page(service)
        self.assertIn("Last refused or failed connections", html)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;:2", html)
        self.assertNotIn(HOSTILE, html)

    def test_bounded(self) -> None:
        """Each listener keeps only its newest RECENT_PROBLEMS."""
        from egressproxy.datapath.listener import RECENT_PROBLEMS

        service = FakeService()
        for i in range(RECENT_PROBLEMS + 5):
            self.finish(service, "direct", float(i), ("OM",), f"10.0.0.1:{i}")
        problems = status(service, cluster_status)["recent_problems"]
        self.assertEqual(len(problems), RECENT_PROBLEMS)
        self.assertEqual(problems[0]["downstream"], f"10.0.0.1:{RECENT_PROBLEMS + 4}")
