"""``expected_egress_ips``: /ready follows the egress address a STUN server (the test's own) reports."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from tests.integration.proxy import InProcessProxy, inline, wait_until
from tests.test_egressip import StunServer


class EgressReadyTests(TestCase):
    @inline
    async def test_ready_follows_the_egress_address(self) -> None:
        """503 naming the address seen while it is unexpected; 200 within one interval once it changes."""
        stun = StunServer("203.0.113.7")
        port = reactor.listenUDP(0, stun, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        proxy = InProcessProxy(self, f"""
expected_egress_ips: ["203.0.113.50"]
egress_ip_check: {{stun: ["127.0.0.1:{port.getHost().port}"], interval: 1s}}
listeners:
  - {{name: d, listen: "127.0.0.1:0", mode: tcp, cluster: c}}
clusters:
  - {{name: c, endpoints: ["127.0.0.1:1"]}}
""")
        url = f"http://127.0.0.1:{proxy.service.http_ports['metrics'].getHost().port}"
        agent = Agent(reactor)

        async def get(path: str) -> tuple[int, str]:
            response = await agent.request(b"GET", (url + path).encode())
            return response.code, (await readBody(response)).decode()

        await wait_until(lambda: proxy.service.egress is not None and proxy.service.egress.seen is not None)
        code, body = await get("/ready")
        self.assertEqual(code, 503)
        self.assertIn("egress address 203.0.113.7 is not in expected_egress_ips (203.0.113.50)", body)
        code, metrics = await get("/metrics")
        self.assertIn('egressproxy_egress_ip_expected{address="203.0.113.7"} 0.0', metrics)
        stun.address = "203.0.113.50"
        await wait_until(lambda: proxy.service.ready, timeout=3.0)
        code, body = await get("/ready")
        self.assertEqual((code, body), (200, "ready\n"))
        code, metrics = await get("/metrics")
        self.assertIn('egressproxy_egress_ip_expected{address="203.0.113.50"} 1.0', metrics)
