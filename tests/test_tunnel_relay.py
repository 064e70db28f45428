"""One tunnelled connection: hold, dial, fail over, splice with backpressure and half-close, one TUNNEL line."""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.modes.socks5.socks import reply
from egressproxy.tunnel.check import check_one
from egressproxy.tunnel.connection import TunnelFactory, TunnelSite
from egressproxy.tunnel.failover import HOLDOFF, PathOrder
from egressproxy.tunnel.logline import TunnelLog, TunnelRecord, format_line
from egressproxy.tunnel.parse import Destination, Path
from tests.helpers import HalfCloseTransport

FIRST = Path("socks5", "10.0.0.21", 1080, "app", "pw")
SECOND = Path("socks5", "10.0.0.22", 1080, "app", "pw")
DEST = Destination("db.egress.test", 5432)
AUTH_OK = b"\x05\x02\x01\x00"


class Rig:
    """A destination's listener factory on a memory reactor, and what it logged."""

    def __init__(self, paths: tuple[Path, ...] = (FIRST, SECOND), destination: Destination = DEST) -> None:
        self.reactor = MemoryReactorClock()
        self.stream = io.StringIO()
        self.order = PathOrder(paths, self.reactor)
        self.site = TunnelSite(self.reactor, destination, self.order, TunnelLog(self.stream), timeout=2.0)
        self.factory = TunnelFactory(self.site)

    def client(self) -> tuple[Any, HalfCloseTransport]:
        """A new local connection from the app."""
        leg = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        transport = HalfCloseTransport()
        leg.makeConnection(transport)
        return leg, transport

    def dialled(self) -> list[tuple[str, int]]:
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    def accept(self) -> tuple[Any, HalfCloseTransport]:
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = HalfCloseTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def refuse(self) -> None:
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(ConnectionRefusedError()))

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()


class SpliceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rig = Rig()
        self.down, self.down_transport = self.rig.client()

    def connect(self) -> tuple[Any, HalfCloseTransport]:
        up, up_transport = self.rig.accept()
        up.dataReceived(AUTH_OK + reply(0))
        return up, up_transport

    def test_client_held_until_the_path_is_ready(self) -> None:
        """The app's connection is paused while the path is dialled, and its bytes go up first once joined."""
        self.assertEqual(self.down_transport.producerState, "paused")
        self.down.dataReceived(b"early")
        up, up_transport = self.connect()
        self.assertEqual(self.down_transport.producerState, "producing")
        self.assertTrue(up_transport.value().endswith(b"early"))

    def test_bytes_both_ways_and_backpressure(self) -> None:
        """Bytes cross both ways and each transport is the other's producer."""
        up, up_transport = self.connect()
        up_transport.clear()
        self.down.dataReceived(b"query")
        up.dataReceived(b"answer!")
        self.assertEqual(up_transport.value(), b"query")
        self.assertEqual(self.down_transport.value(), b"answer!")
        self.assertIs(self.down_transport.producer, up_transport)
        self.assertIs(up_transport.producer, self.down_transport)
        up_transport.producer.pauseProducing()
        self.assertEqual(self.down_transport.producerState, "paused")

    def test_half_close_and_one_line(self) -> None:
        """The app's EOF half-closes the path; its reply still arrives; one TUNNEL line when both end."""
        up, up_transport = self.connect()
        self.down.dataReceived(b"q")
        self.down.readConnectionLost()
        self.assertTrue(up_transport.write_closed)
        up.dataReceived(b"late reply")
        self.assertEqual(self.down_transport.value(), b"late reply")
        up.readConnectionLost()
        self.assertTrue(self.down_transport.disconnecting and up_transport.disconnecting)
        self.down.connectionLost(Failure(ConnectionDone()))
        up.connectionLost(Failure(ConnectionDone()))
        [line] = [line for line in self.rig.lines() if " TUNNEL " in line]
        self.assertIn(' TUNNEL 127.0.0.1:50000 db.egress.test:5432 1 10 0 "-" via=socks5://app@10.0.0.21:1080', line)
        self.assertNotIn("failed=", line)
        self.assertEqual(self.rig.reactor.getDelayedCalls(), [])
        self.assertEqual(self.rig.site.live, set())

    def test_app_leaves_while_dialling(self) -> None:
        """An app that leaves before the path is ready stops the dial and still gets its line."""
        self.down.connectionLost(Failure(ConnectionDone()))
        [line] = self.rig.lines()
        self.assertIn('0 0 0 "-" via=-', line)
        self.assertEqual(self.rig.reactor.getDelayedCalls(), [])


class FailoverTests(SynchronousTestCase):
    def test_next_path_after_a_refused_connect(self) -> None:
        """A path that refuses the connection is followed by the next, and both the note and the line say so."""
        rig = Rig()
        down, _ = rig.client()
        rig.refuse()
        self.assertEqual(rig.dialled(), [("10.0.0.21", 1080), ("10.0.0.22", 1080)])
        up, _ = rig.accept()
        up.dataReceived(AUTH_OK + reply(0))
        up.connectionLost(Failure(ConnectionDone()))
        down.connectionLost(Failure(ConnectionDone()))
        note, line = rig.lines()
        self.assertIn("socks5://app@10.0.0.21:1080 failed (connection refused", note)
        self.assertIn("failing over to socks5://app@10.0.0.22:1080", note)
        self.assertIn(" via=socks5://app@10.0.0.22:1080 failed=socks5://app@10.0.0.21:1080(UF)", line)

    def test_next_path_after_a_socks_failure(self) -> None:
        """A SOCKS failure other than a refusal by rule (host unreachable) also tries the next path."""
        rig = Rig()
        rig.client()
        up, _ = rig.accept()
        up.dataReceived(AUTH_OK + reply(4))
        self.assertEqual(len(rig.dialled()), 2)

    def test_refusal_by_rule_is_final(self) -> None:
        """An allowlist refusal is not retried elsewhere; the note names the destination; the line is NR."""
        rig = Rig(destination=Destination("api.evil.example", 443))
        down, down_transport = rig.client()
        up, _ = rig.accept()
        up.dataReceived(AUTH_OK + reply(2))
        self.assertEqual(len(rig.dialled()), 1)
        self.assertTrue(down_transport.disconnecting)
        down.connectionLost(Failure(ConnectionDone()))
        note, line = rig.lines()
        self.assertEqual(
            note,
            "egressproxy tunnel: refused by the egress proxy's allowlist: api.evil.example:443 "
            "(via socks5://app@10.0.0.21:1080); add it to the socks5 listener's allow_destinations to allow it",
        )
        self.assertIn(' api.evil.example:443 0 0 0 "NR" via=- failed=socks5://app@10.0.0.21:1080(NR)', line)

    def test_every_path_failed(self) -> None:
        """When the last path fails too, the app's connection is closed with that path's flag."""
        rig = Rig()
        down, down_transport = rig.client()
        rig.refuse()
        rig.refuse()
        self.assertTrue(down_transport.disconnecting)
        down.connectionLost(Failure(ConnectionDone()))
        self.assertIn("no path worked; the last, socks5://app@10.0.0.22:1080: connection refused", rig.lines()[-2])
        self.assertIn('"UF" via=- failed=socks5://app@10.0.0.21:1080(UF),socks5://app@10.0.0.22:1080(UF)', rig.lines()[-1])

    def test_unreachable_path_is_tried_last_for_a_while(self) -> None:
        """After a path could not be reached, new connections try it last until HOLDOFF has passed."""
        rig = Rig()
        rig.client()
        rig.refuse()
        rig.accept()[0].dataReceived(AUTH_OK + reply(0))
        rig.client()
        self.assertEqual(rig.dialled()[-1], ("10.0.0.22", 1080))
        rig.reactor.advance(HOLDOFF)
        self.assertEqual(rig.order.order(), [FIRST, SECOND])

    def test_no_retry_after_bytes(self) -> None:
        """Once spliced, a lost path ends the connection: no other path is dialled."""
        rig = Rig()
        down, down_transport = rig.client()
        up, _ = rig.accept()
        up.dataReceived(AUTH_OK + reply(0))
        down.dataReceived(b"select 1")
        up.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(rig.dialled()), 1)
        self.assertTrue(down_transport.disconnecting)


class LineTests(SynchronousTestCase):
    def test_golden_line(self) -> None:
        """The TUNNEL line is the access log's eight fields, then via= and failed=."""
        record = TunnelRecord(1780819893.49, "127.0.0.1:50122", "db.example.com:5432", 1284, 892, 45, ("UC",),
                              "socks5://app@[fdaa::5]:1080", ("socks5://app@my-egress.flycast:1080(UT)",))
        self.assertEqual(
            format_line(record),
            '[2026-06-07T08:11:33.490Z] TUNNEL 127.0.0.1:50122 db.example.com:5432 1284 892 45 "UC" '
            "via=socks5://app@[fdaa::5]:1080 failed=socks5://app@my-egress.flycast:1080(UT)",
        )


class CheckTests(SynchronousTestCase):
    def run_check(self, answer: bytes) -> tuple[bool, str]:
        reactor = MemoryReactorClock()
        results: list[Any] = []
        check_one(reactor, PathOrder((FIRST, SECOND), reactor, holdoff=0.0), DEST, 2.0).addBoth(results.append)
        host, port, factory, _, _ = reactor.tcpClients[-1]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = HalfCloseTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(AUTH_OK + answer)
        if answer == reply(0):
            self.assertTrue(transport.disconnecting)  # the probe closes at once
        [result] = results
        return result

    def test_ok_line(self) -> None:
        """A destination the egress app connected passes, with the path that carried it."""
        passed, line = self.run_check(reply(0))
        self.assertTrue(passed)
        self.assertTrue(line.startswith("ok   db.egress.test:5432 via socks5://app@10.0.0.21:1080 ("), line)

    def test_refused_line(self) -> None:
        """A destination the allowlist refuses fails, saying so, without trying the second path."""
        self.assertEqual(self.run_check(reply(2)), (
            False, "FAIL db.egress.test:5432: refused by the egress proxy's allowlist (socks5://app@10.0.0.21:1080)"))
