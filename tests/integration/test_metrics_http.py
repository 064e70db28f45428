"""/metrics over real HTTP after real traffic: counters equal what was sent."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from tests.integration.proxy import InProcessProxy, wait_until
from tests.integration.test_forwarding import Client, ReplyAfterEOF, inline


def sample(families: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    """The value of one sample, by its full name and labels."""
    for family in families.values():
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise KeyError((name, labels))


class MetricsOverHttpTests(TestCase):
    async def scrape(self, proxy: InProcessProxy, path: str = "/metrics") -> tuple[int, str]:
        port = proxy.service.http_ports["metrics"].getHost().port
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
        return response.code, (await readBody(response)).decode()

    @inline
    async def test_counters_equal_traffic(self) -> None:
        """After real connections, /metrics reports exactly the connections and bytes sent."""
        upstream = reactor.listenTCP(0, protocol.Factory.forProtocol(ReplyAfterEOF), interface="127.0.0.1")
        self.addCleanup(upstream.stopListening)
        closed = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        refused_port = closed.getHost().port
        await closed.stopListening()
        proxy = InProcessProxy(self, f"""
listeners:
  - {{name: direct, listen: "127.0.0.1:0", cluster: up}}
  - {{name: broken, listen: "127.0.0.1:0", cluster: nowhere}}
clusters:
  - {{name: up, endpoints: ["127.0.0.1:{upstream.getHost().port}"]}}
  - {{name: nowhere, endpoints: ["127.0.0.1:{refused_port}"], max_connect_attempts: 1}}
""")
        sizes = [1000, 20_000, 300_000]
        for size in sizes:
            client = await connectProtocol(
                TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port("direct")), Client())
            client.transport.write(b"x" * size)
            client.transport.loseWriteConnection()
            await client.closed
            self.assertEqual(client.received, f"got {size} bytes".encode())
        failed = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port("broken")), Client())
        await failed.closed
        await proxy.wait_for_lines(4)
        await wait_until(lambda: proxy.live_sessions() == 0)

        code, text = await self.scrape(proxy)
        self.assertEqual(code, 200)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        replies = sum(len(f"got {size} bytes") for size in sizes)
        self.assertEqual(sample(families, "egressproxy_downstream_connections_total", listener="direct"), 3)
        self.assertEqual(sample(families, "egressproxy_downstream_connections_active", listener="direct"), 0)
        self.assertEqual(sample(families, "egressproxy_bytes_received_total", listener="direct"), sum(sizes))
        self.assertEqual(sample(families, "egressproxy_bytes_sent_total", listener="direct"), replies)
        self.assertEqual(sample(families, "egressproxy_upstream_connect_seconds_count", cluster="up"), 3)
        self.assertEqual(
            sample(families, "egressproxy_upstream_connect_failures_total", cluster="nowhere", reason="refused"), 1)
        self.assertEqual(sample(families, "egressproxy_downstream_connections_total", listener="broken"), 1)
        self.assertEqual(sample(families, "egressproxy_config_reloads_total", result="error"), 0)
        self.assertIn("process_cpu_seconds_total", text)

    @inline
    async def test_ready_flips_on_drain(self) -> None:
        """/ready answers 200 while serving and 503 once a drain begins."""
        proxy = InProcessProxy(self, """
listeners:
  - {name: direct, listen: "127.0.0.1:0", cluster: up}
clusters:
  - {name: up, endpoints: ["127.0.0.1:9"]}
shutdown_delay: 1s
""")
        self.assertEqual((await self.scrape(proxy, "/ready"))[0], 200)
        self.assertEqual(await self.scrape(proxy, "/healthz"), (200, "ok\n"))
        drained = proxy.service.drain()
        self.assertEqual(await self.scrape(proxy, "/ready"), (503, "draining\n"))
        await drained


class Idle(protocol.Protocol):
    """A client that connects and sends nothing (or drips bytes); records what it gets and its end."""

    def __init__(self) -> None:
        self.received = b""
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.closed = True


class BoundedHttpTests(TestCase):
    """The metrics service's connection cap and request deadline, on real loopback sockets."""

    def proxy(self) -> InProcessProxy:
        return InProcessProxy(self, """
listeners:
  - {name: direct, listen: "127.0.0.1:0", cluster: up}
clusters:
  - {name: up, endpoints: ["127.0.0.1:9"]}
""")

    async def scrape(self, port: int) -> tuple[int, str]:
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/metrics".encode())
        return response.code, (await readBody(response)).decode()

    @inline
    async def test_idle_connections_capped_then_timed_out(self) -> None:
        """Of 200 idle connections, the cap (64) stay open; the deadline closes them; then /metrics answers."""
        proxy = self.proxy()
        port = proxy.service.http_ports["metrics"]
        site = port.factory  # type: ignore[attr-defined]
        # The parameters under test, shortened: the deadline must not fire while
        # the 200 connect, and the test should not wait 10 s.
        site.timeOut = 3.0
        cap = site.max_connections
        self.assertEqual(cap, 64)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        clients = [await connectProtocol(endpoint, Idle()) for _ in range(200)]
        self.addCleanup(lambda: [c.transport.abortConnection() for c in clients if not c.closed])
        await wait_until(lambda: sum(c.closed for c in clients) >= 200 - cap)
        open_now = [c for c in clients if not c.closed]
        self.assertEqual((len(open_now), site.open_connections, site.refused_connections), (cap, cap, 200 - cap))
        self.assertEqual([c.received for c in clients], [b""] * 200)  # nothing was read or answered
        # While the cap is reached, a new connection is closed unanswered too.
        extra = await connectProtocol(endpoint, Idle())
        await wait_until(lambda: extra.closed)
        self.assertEqual((extra.received, site.refused_connections), (b"", 200 - cap + 1))
        # The deadline closes the idle ones; then a fresh scrape works.
        await wait_until(lambda: all(c.closed for c in clients), timeout=20)
        await wait_until(lambda: site.open_connections == 0)
        code, text = await self.scrape(port.getHost().port)
        self.assertEqual(code, 200)
        self.assertIn("egressproxy_downstream_connections_total", text)

    @inline
    async def test_dripping_client_closed_at_deadline(self) -> None:
        """A client sending a header byte every 0.2 s never completes a request and is closed anyway."""
        proxy = self.proxy()
        port = proxy.service.http_ports["metrics"]
        port.factory.timeOut = 1.0  # type: ignore[attr-defined]
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = await connectProtocol(endpoint, Idle())
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
        sent = 0
        while not client.closed and sent < len(request):
            client.transport.write(request[sent : sent + 1])
            sent += 1
            await deferLater(reactor, 0.2, lambda: None)
        self.assertTrue(client.closed)
        self.assertEqual(client.received, b"")
        self.assertLess(sent, len(request))
