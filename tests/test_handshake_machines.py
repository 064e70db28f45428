"""Pure tests of the handshake machines: events in, actions out, no reactor, transport or session."""

from __future__ import annotations

from ipaddress import ip_network

from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.config import Address
from egressproxy.datapath.handshake import (
    ArmTimer, ClientBytes, Close, Connected, Context, Count, Dial, DialFailed, DisarmTimer, Flag, HoldClient,
    Refuse, SetUpstreamName, Splice, TimerFired, UpstreamBytes, WriteClient, WriteUpstream,
)
from egressproxy.modes.base import Handshake
from egressproxy.modes.forward.options import ForwardOptions
from egressproxy.modes.forward.rules import DestinationRule
from egressproxy.modes.http_connect.front import HEADER_TIMEOUT, HttpConnectMachine
from egressproxy.modes.postgres import pgwire, tlshello
from egressproxy.modes.postgres.front import PostgresMachine
from egressproxy.modes.postgres.options import PostgresOptions
from egressproxy.modes.postgres.state import PostgresListenerState
from egressproxy.modes.socks5.front import Socks5Machine
from tests.helpers import listener_config

PEER = IPv4Address("TCP", "192.0.2.1", 50000)


class _Cluster:
    name = "pg"
    config = None


def context(config, **values):  # type: ignore[no-untyped-def]
    return Context(listener=lambda: config, peer=PEER, cluster=_Cluster(), **values)


class TcpTests(SynchronousTestCase):
    def test_start_dial_splice(self) -> None:
        machine = Handshake(context(listener_config()))
        self.assertEqual(machine.start(), [HoldClient(), Dial(hold_client=True)])
        self.assertEqual(machine.receive(Connected()), [Splice()])
        self.assertEqual(machine.receive(DialFailed("UF", "refused")), [Close()])
        self.assertEqual(machine.refuse("RBAC", "source address not allowed"), [Close()])


def forward_config(mode: str):  # type: ignore[no-untyped-def]
    rules = (DestinationRule(host="api.egress.test", port=443),)
    return listener_config(mode=mode, cluster=None, options=ForwardOptions(allow_destinations=rules))


class HttpConnectTests(SynchronousTestCase):
    def test_connect(self) -> None:
        machine = HttpConnectMachine(context(forward_config("http_connect")))
        self.assertEqual(machine.start(), [ArmTimer(HEADER_TIMEOUT, "handshake")])
        actions = machine.receive(ClientBytes(b"CONNECT api.egress.test:443 HTTP/1.1\r\n\r\nhello"))
        self.assertEqual(actions, [
            SetUpstreamName("api.egress.test:443"), DisarmTimer("handshake"), HoldClient(b"hello"),
            Dial(endpoints=(Address("api.egress.test", 443),), checked=True, hold_client=True),
        ])
        [write, splice] = machine.receive(Connected(address=Address("api.egress.test", 443)))
        self.assertTrue(write.data.startswith(b"HTTP/1.1 200"))
        self.assertEqual(splice, Splice())

    def test_not_allowed(self) -> None:
        machine = HttpConnectMachine(context(forward_config("http_connect")))
        machine.start()
        actions = machine.receive(ClientBytes(b"CONNECT evil.egress.test:443 HTTP/1.1\r\n\r\n"))
        self.assertIn(Flag("NR"), actions)
        refuse = actions[-1]
        self.assertIsInstance(refuse, Refuse)
        self.assertEqual(refuse.how, "linger")
        self.assertTrue(refuse.answer.startswith(b"HTTP/1.1 403"))
        self.assertFalse([a for a in actions if isinstance(a, Dial)])

    def test_timeout(self) -> None:
        machine = HttpConnectMachine(context(forward_config("http_connect")))
        machine.start()
        actions = machine.receive(TimerFired("handshake"))
        self.assertIn(Flag("DPE"), actions)
        self.assertTrue(actions[-1].answer.startswith(b"HTTP/1.1 408"))  # type: ignore[union-attr]

    def test_dial_failure(self) -> None:
        machine = HttpConnectMachine(context(forward_config("http_connect")))
        machine.start()
        machine.receive(ClientBytes(b"CONNECT api.egress.test:443 HTTP/1.1\r\n\r\n"))
        [refuse] = machine.receive(DialFailed("UT", "timeout", upstream="api.egress.test:443"))
        self.assertTrue(refuse.answer.startswith(b"HTTP/1.1 504"))  # type: ignore[attr-defined]


class Socks5Tests(SynchronousTestCase):
    def test_connect(self) -> None:
        machine = Socks5Machine(context(forward_config("socks5")))
        machine.start()
        self.assertEqual(machine.receive(ClientBytes(b"\x05\x01\x00")), [WriteClient(b"\x05\x00")])
        request = b"\x05\x01\x00\x03" + bytes([15]) + b"api.egress.test" + (443).to_bytes(2, "big")
        actions = machine.receive(ClientBytes(request))
        self.assertEqual(actions[-2:], [
            HoldClient(b""), Dial(endpoints=(Address("api.egress.test", 443),), checked=True, hold_client=True),
        ])
        [write, splice] = machine.receive(Connected(local=("10.0.0.2", 40000)))
        self.assertEqual(write.data, b"\x05\x00\x00\x01\x0a\x00\x00\x02" + (40000).to_bytes(2, "big"))
        self.assertEqual(splice, Splice())


class PostgresTests(SynchronousTestCase):
    def machine(self, **options):  # type: ignore[no-untyped-def]
        config = listener_config(mode="postgres", options=PostgresOptions(**options))
        machine = PostgresMachine(context(config, state=PostgresListenerState()))
        self.assertEqual(machine.start(), [ArmTimer(10.0, "postgres")])
        return machine

    def test_ssl_request_single_cluster(self) -> None:
        """The SSLRequest is forwarded once connected, and the server's S relayed through the splice."""
        machine = self.machine()
        actions = machine.receive(ClientBytes(pgwire.SSL_REQUEST))
        self.assertEqual(actions, [DisarmTimer("postgres"), Dial(machine.context.cluster, None, False)])
        actions = machine.receive(Connected(address=Address("db.egress.test", 5432), cluster=_Cluster()))
        self.assertEqual(actions, [WriteUpstream(pgwire.SSL_REQUEST), ArmTimer(10.0, "postgres")])
        self.assertEqual(machine.receive(UpstreamBytes(b"S")), [
            DisarmTimer("postgres"), Splice(client=b"", upstream=b"S"),
        ])

    def test_unreachable_startup(self) -> None:
        """A plaintext startup to an unreachable cluster gets a FATAL ErrorResponse, flag UF."""
        machine = self.machine()
        from tests.test_pgwire import STARTUP as startup

        machine.receive(ClientBytes(startup))
        actions = machine.receive(DialFailed("UF", "refused", upstream="db.egress.test:5432"))
        self.assertEqual(actions[0], Flag("UF"))
        writes = [a for a in actions if isinstance(a, WriteClient)]
        self.assertIn(b"connection refused", writes[0].data)
        self.assertEqual(actions[-1], Close())

    def test_routed_no_sni(self) -> None:
        """A routed listener answers S, reads the hello; no SNI: NR, counted, an alert."""
        from egressproxy.modes.postgres.options import PostgresRoute
        from tests.tlsclient import client_hello

        machine = self.machine(routes=(PostgresRoute(sni="a.db.egress.test", cluster="a"),))
        self.assertIn(WriteClient(pgwire.ACCEPT), machine.receive(ClientBytes(pgwire.SSL_REQUEST)))
        actions = machine.receive(ClientBytes(client_hello(None)))
        self.assertIn(Flag("NR"), actions)
        self.assertIn(Count("rejected", "no_route"), actions)
        self.assertIn(WriteClient(tlshello.alert_record(tlshello.UNRECOGNIZED_NAME)), actions)
        self.assertEqual(actions[-1], Close())
        self.assertFalse([a for a in actions if isinstance(a, Dial)])
