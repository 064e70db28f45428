"""On a Fly Machine (FLY_REGION, FLY_MACHINE_ID set) real access lines and /metrics say which Machine."""

from __future__ import annotations

from twisted.internet import protocol, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from tests.integration.proxy import InProcessProxy, inline
from tests.integration.test_forwarding import Client, ReplyAfterEOF
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol


class RegionTests(TestCase):
    @inline
    async def test_lines_and_info_name_the_machine(self) -> None:
        upstream = reactor.listenTCP(0, protocol.Factory.forProtocol(ReplyAfterEOF), interface="127.0.0.1")
        self.addCleanup(upstream.stopListening)
        proxy = InProcessProxy(self, f"""
expected_egress_ips: {{ams: ["203.0.113.7"], iad: ["198.51.100.9"]}}
egress_ip_check: {{stun: ["127.0.0.1:9"], interval: 1h}}
listeners:
  - {{name: direct, listen: "127.0.0.1:0", cluster: up}}
clusters:
  - {{name: up, endpoints: ["127.0.0.1:{upstream.getHost().port}"]}}
""", environ={"FLY_REGION": "iad", "FLY_MACHINE_ID": "e784079b449483"})
        self.assertEqual(proxy.config.expected_egress_ips, ("198.51.100.9",))
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port("direct")), Client())
        client.transport.write(b"hello")
        client.transport.loseWriteConnection()
        await client.closed
        [line] = await proxy.wait_for_lines(1)
        self.assertTrue(line.endswith(" region=iad machine=e784079b449483"), line)
        port = proxy.service.http_ports["metrics"].getHost().port
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/metrics".encode())
        body = (await readBody(response)).decode()
        self.assertRegex(body, r'egressproxy_info\{machine_id="e784079b449483",region="iad",version="[^"]+"\} 1\.0')
