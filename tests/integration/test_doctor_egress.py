"""The doctor's egress-address check against a STUN server of the test's own on loopback."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from egressproxy.config import parse_config
from egressproxy.doctor.egress import egress_check
from tests.integration.proxy import inline
from tests.test_egressip import StunServer


def config(stun_port: int | None, expected: str = "203.0.113.50"):  # type: ignore[no-untyped-def]
    egress = (f'expected_egress_ips: ["{expected}"]\n'
              f'egress_ip_check: {{stun: ["127.0.0.1:{stun_port}"], interval: 60s}}\n') if stun_port else ""
    return parse_config(egress + """
listeners:
  - {name: d, listen: "[::]:0", mode: tcp, cluster: c}
clusters:
  - {name: c, endpoints: ["127.0.0.1:1"]}
admin: false
metrics: false
""", "egress.yaml", {})


class DoctorEgressTests(TestCase):
    timeout = 30

    def stun(self, address: str) -> int:
        port = reactor.listenUDP(0, StunServer(address), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    @inline
    async def test_unexpected_address(self) -> None:
        """An address STUN reports outside expected_egress_ips fails, naming it and fly ips allocate-egress."""
        check, seen = await egress_check(reactor, config(self.stun("203.0.113.7")))
        self.assertEqual(seen, "203.0.113.7")
        self.assertEqual((check.step, check.status), ("egress ip", "fail"))
        self.assertIn("203.0.113.7 is not in expected_egress_ips (203.0.113.50)", check.detail)
        self.assertIn("fly ips allocate-egress", check.hint)

    @inline
    async def test_expected_address(self) -> None:
        """The expected address passes."""
        check, seen = await egress_check(reactor, config(self.stun("203.0.113.50")))
        self.assertEqual((check.status, seen), ("ok", "203.0.113.50"))

    @inline
    async def test_not_configured(self) -> None:
        """Without expected_egress_ips the check is skipped with a note, and nothing is probed."""
        check, seen = await egress_check(reactor, config(None))
        self.assertEqual((check.status, seen), ("skip", None))
