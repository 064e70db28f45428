"""The tunnel's SOCKS5 client: exact bytes, replies in pieces, refusals, and one attempt over a path."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.modes.socks5.socks import Socks5Handshake, reply
from egressproxy.tunnel.dial import PathAttempt, PathFailed, PathLeg
from egressproxy.tunnel.parse import Destination, Path
from egressproxy.tunnel.socks import Socks5Client, SocksFailed
from tests.helpers import HalfCloseTransport

OK_REPLY = reply(0)


class ClientTests(SynchronousTestCase):
    def test_no_authentication_bytes(self) -> None:
        """Without a user the client offers method 0 and asks for the name with ATYP 3."""
        client = Socks5Client("db.egress.test", 5432)
        self.assertEqual(client.greeting(), b"\x05\x01\x00")
        out, rest = client.feed(b"\x05\x00")
        self.assertEqual(out, b"\x05\x01\x00\x03\x0edb.egress.test\x15\x38")
        self.assertIsNone(rest)

    def test_username_password_bytes(self) -> None:
        """With a user the client offers method 2 only and sends RFC 1929 credentials, then the request."""
        client = Socks5Client("10.0.0.5", 443, "app", "pw")
        self.assertEqual(client.greeting(), b"\x05\x01\x02")
        out, _ = client.feed(b"\x05\x02")
        self.assertEqual(out, b"\x01\x03app\x02pw")
        out, _ = client.feed(b"\x01\x00")
        self.assertEqual(out, b"\x05\x01\x00\x01\x0a\x00\x00\x05\x01\xbb")

    def test_reply_in_pieces_and_bytes_after_it(self) -> None:
        """A reply split over reads completes once whole; bytes after it are handed back."""
        client = Socks5Client("db.egress.test", 5432)
        client.feed(b"\x05\x00")
        domain_reply = b"\x05\x00\x00\x03\x04abcd\x00\x50"
        self.assertEqual(client.feed(domain_reply[:3]), (b"", None))
        self.assertEqual(client.feed(domain_reply[3:6]), (b"", None))
        self.assertEqual(client.feed(domain_reply[6:] + b"SSH-2.0"), (b"", b"SSH-2.0"))

    def test_refused_by_rule_is_final(self) -> None:
        """Reply code 2 is a refusal by rule: flag NR, final for every path."""
        client = Socks5Client("api.evil.example", 443)
        client.feed(b"\x05\x00")
        with self.assertRaises(SocksFailed) as caught:
            client.feed(reply(2))
        self.assertTrue(caught.exception.refused_by_rule)
        self.assertEqual((caught.exception.flag, caught.exception.code), ("NR", 2))

    def test_other_failures_are_not_final(self) -> None:
        """Refused (5) and TTL expired (6) are not refusals by rule; 6 is flagged UT."""
        for code, flag in ((5, "UF"), (6, "UT"), (4, "UF")):
            client = Socks5Client("db.egress.test", 5432)
            client.feed(b"\x05\x00")
            with self.assertRaises(SocksFailed) as caught:
                client.feed(reply(code))
            self.assertFalse(caught.exception.refused_by_rule)
            self.assertEqual(caught.exception.flag, flag)

    def test_credentials_refused(self) -> None:
        """No acceptable method, or a failed subnegotiation, is a credentials failure (UAEX) that says what to change."""
        client = Socks5Client("db", 1)
        with self.assertRaises(SocksFailed) as caught:
            client.feed(b"\x05\xff")
        self.assertEqual(caught.exception.flag, "UAEX")
        self.assertIn("add USER:PASSWORD@", caught.exception.reason)
        client = Socks5Client("db", 1, "app", "bad")
        client.feed(b"\x05\x02")
        with self.assertRaises(SocksFailed) as caught:
            client.feed(b"\x01\x01")
        self.assertIn("wrong user name or password", caught.exception.reason)

    def test_against_the_proxys_own_server_machine(self) -> None:
        """The client's bytes are what the egress app's SOCKS5 parser reads as the request."""
        server = Socks5Handshake(lambda name, password: (name, password) == (b"app", b"pw"))
        client = Socks5Client("api.egress.test", 443, "app", "pw")
        answer, request = server.feed(client.greeting())
        while request is None:
            out, _ = client.feed(answer)
            answer, request = server.feed(out)
        self.assertEqual((request.address_type, request.host, request.port), (3, "api.egress.test", 443))


class Session:
    """The least a leg needs of its session."""

    keepalive = None
    bytes_received = 0
    bytes_sent = 0

    def __init__(self) -> None:
        self.lost: list[Any] = []

    def leg_lost(self, leg: object, reason: Failure) -> None:
        self.lost.append(leg)


PATH = Path("socks5", "10.0.0.21", 1080, "app", "pw")
DEST = Destination("db.egress.test", 5432)


def accept(reactor: MemoryReactorClock) -> tuple[Any, HalfCloseTransport]:
    """Answer the newest dial the reactor recorded."""
    host, port, factory, _timeout, _bind = reactor.tcpClients[-1]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = HalfCloseTransport()
    protocol.makeConnection(transport)
    return protocol, transport


class AttemptTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.session = Session()
        self.attempt = PathAttempt(self.reactor, PATH, DEST, self.session, timeout=2.0)
        self.results: list[Any] = []
        self.attempt.result.addBoth(self.results.append)

    def test_dials_the_path_address(self) -> None:
        """The attempt connects to the path's host and port with the connect timeout."""
        host, port, _, timeout, _ = self.reactor.tcpClients[-1]
        self.assertEqual((host, port, timeout), ("10.0.0.21", 1080, 2.0))

    def test_ready_after_the_reply(self) -> None:
        """After a successful reply the leg is ready, and bytes after the reply wait for the splice."""
        protocol, transport = accept(self.reactor)
        self.assertEqual(transport.value(), b"\x05\x01\x02")
        protocol.dataReceived(b"\x05\x02\x01\x00")
        self.assertEqual(self.results, [])
        protocol.dataReceived(OK_REPLY + b"220 hello")
        [leg] = self.results
        self.assertIsInstance(leg, PathLeg)
        self.assertFalse(leg.handshaking)
        self.assertEqual(leg.pending, [b"220 hello"])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_refusal_by_rule(self) -> None:
        """Reply code 2 fails the attempt as final with flag NR, and drops the connection."""
        protocol, transport = accept(self.reactor)
        protocol.dataReceived(b"\x05\x02\x01\x00" + reply(2))
        [failure] = self.results
        self.assertTrue(failure.check(PathFailed))
        self.assertTrue(failure.value.final)
        self.assertEqual(failure.value.flag, "NR")
        self.assertFalse(failure.value.path_down)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.session.lost, [])

    def test_connect_refused(self) -> None:
        """A refused TCP connect fails the attempt (UF), not final, the path down."""
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(ConnectionRefusedError()))
        [failure] = self.results
        self.assertEqual((failure.value.flag, failure.value.final, failure.value.path_down), ("UF", False, True))
        self.assertIn("connection refused", failure.value.reason)

    def test_no_answer_times_out(self) -> None:
        """A path that accepts but never answers fails after the timeout with flag UT."""
        _, transport = accept(self.reactor)
        self.reactor.advance(2.0)
        [failure] = self.results
        self.assertEqual(failure.value.flag, "UT")
        self.assertIn("no SOCKS5 answer within 2s", failure.value.reason)
        self.assertTrue(transport.disconnecting)

    def test_closed_during_handshake(self) -> None:
        """An EOF before the reply fails the attempt; the session hears nothing."""
        protocol, _ = accept(self.reactor)
        protocol.readConnectionLost()
        [failure] = self.results
        self.assertIn("closed the connection during the SOCKS5 handshake", failure.value.reason)
        self.assertEqual(self.session.lost, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancel_during_handshake(self) -> None:
        """Cancelling while the handshake runs aborts the connection and cancels its timer."""
        _, transport = accept(self.reactor)
        self.attempt.cancel()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class TcpPathTests(SynchronousTestCase):
    def test_ready_on_connect(self) -> None:
        """A tcp:// path is ready as soon as TCP connects, and writes nothing of its own."""
        reactor = MemoryReactorClock()
        attempt = PathAttempt(reactor, Path("tcp", "10.0.0.21", 5432), DEST, Session(), timeout=2.0)
        results: list[Any] = []
        attempt.result.addBoth(results.append)
        _, transport = accept(reactor)
        self.assertIsInstance(results[0], PathLeg)
        self.assertEqual(transport.value(), b"")
