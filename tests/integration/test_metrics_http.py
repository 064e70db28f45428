"""/metrics over real HTTP after real traffic: counters equal what was sent."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
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
