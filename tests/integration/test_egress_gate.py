"""``when_unexpected: close_listeners``: no listening socket while the egress address is unexpected.

Fly's proxy routes by service checks, which pass whenever the port accepts;
so a Machine egressing from the wrong address must stop accepting.  These
tests use a STUN server of their own on loopback whose answer they change.
"""

from __future__ import annotations

import errno
import socket

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from egressproxy.app.egressgate import ClosedPort
from egressproxy.config import parse_config
from tests.integration.proxy import InProcessProxy, inline, wait_until
from tests.test_egressip import StunServer

EXPECTED, OTHER = "203.0.113.50", "198.51.100.7"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(port: int) -> bool:
    """Whether a TCP connect to 127.0.0.1:port succeeds (refused: False)."""
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
        except OSError as e:
            if e.errno == errno.ECONNREFUSED:
                return False
            raise
        return True


class EgressGateTests(TestCase):
    def start(self, answer: str, when: str = "", listen_port: int = 0) -> tuple[InProcessProxy, StunServer]:
        stun = StunServer(answer)
        udp = reactor.listenUDP(0, stun, interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        self.yaml = f"""
expected_egress_ips: ["{EXPECTED}"]
egress_ip_check: {{stun: ["127.0.0.1:{udp.getHost().port}"], interval: 1s{when}}}
listeners:
  - {{name: d, listen: "127.0.0.1:{listen_port}", mode: tcp, cluster: c, upstream_connect: on_first_byte}}
clusters:
  - {{name: c, endpoints: ["127.0.0.1:9"]}}
"""
        return InProcessProxy(self, self.yaml), stun

    @inline
    async def test_closed_while_unexpected_reopened_when_expected(self) -> None:
        """Refused while STUN reports another address; the same port accepts once it is the expected one."""
        proxy, stun = self.start(OTHER)
        port = proxy.port("d")
        self.assertTrue(accepts(port))  # bound at start, before the first answer
        await wait_until(lambda: isinstance(proxy.service.ports["d"], ClosedPort), timeout=5)
        self.assertFalse(accepts(port))
        self.assertEqual(proxy.port("d"), port)  # the placeholder remembers the address
        stun.address = EXPECTED
        await wait_until(lambda: not isinstance(proxy.service.ports["d"], ClosedPort), timeout=5)
        self.assertEqual(proxy.port("d"), port)  # port 0 in the config: the same port again
        self.assertTrue(accepts(port))
        self.assertTrue(proxy.service.ready)

    @inline
    async def test_not_ready_only(self) -> None:
        """``when_unexpected: not_ready`` keeps accepting: only /ready says no."""
        proxy, _ = self.start(OTHER, ", when_unexpected: not_ready")
        await wait_until(lambda: proxy.service.egress is not None and proxy.service.egress.seen == OTHER, timeout=5)
        self.assertFalse(proxy.service.ready)
        self.assertTrue(accepts(proxy.port("d")))

    @inline
    async def test_reload_while_closed_stays_closed(self) -> None:
        """A reload that adds a listener while the gate is closed leaves that one closed too."""
        fixed = free_port()
        proxy, stun = self.start(OTHER, listen_port=fixed)
        await wait_until(lambda: isinstance(proxy.service.ports["d"], ClosedPort), timeout=5)
        added = free_port()
        text = self.yaml.replace(
            "clusters:", f'  - {{name: e, listen: "127.0.0.1:{added}", mode: tcp, cluster: c}}\nclusters:'
        )
        changed = parse_config(text, "test.yaml", {})
        proxy.service._reload_config = lambda: changed
        ok, summary = proxy.service.reload()
        self.assertTrue(ok, summary)
        self.assertIsInstance(proxy.service.ports["e"], ClosedPort)
        await wait_until(lambda: not accepts(added), timeout=2)  # Twisted closes the socket on its next turn
        self.assertFalse(accepts(fixed))
        stun.address = EXPECTED
        await wait_until(lambda: not isinstance(proxy.service.ports["e"], ClosedPort), timeout=5)
        self.assertTrue(accepts(added))
        self.assertTrue(accepts(fixed))

    @inline
    async def test_unknown_address_keeps_listening(self) -> None:
        """No STUN answer at all (an outage): not ready, but the listeners stay open."""
        proxy, stun = self.start(OTHER)
        stun.drop = 10**6  # never answers
        await wait_until(lambda: proxy.service.egress is not None and proxy.service.egress.checked_at is not None,
                         timeout=8)
        self.assertIsNone(proxy.service.egress.seen)
        self.assertFalse(proxy.service.ready)
        self.assertTrue(accepts(proxy.port("d")))
