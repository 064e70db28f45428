"""Unit tests of ``mode: postgres`` (the front) on MemoryReactorClock and StringTransports."""

from __future__ import annotations

import struct
from ipaddress import ip_network
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.config import Address, ClusterTLS
from egressproxy.modes.postgres import pgwire, tlshello
from egressproxy.modes.postgres.options import ClientTLS, PostgresOptions, PostgresRoute
from egressproxy.modes.postgres.pgwire import CancelKey
from egressproxy.modes.postgres.problems import HANDSHAKE_TIMEOUT
from egressproxy.modes.postgres.routing import match_route, route_address, valid_server_name
from egressproxy.modes.postgres.state import MAX_CANCEL_FANOUT, PostgresListenerState
from egressproxy.upstream.cluster import UpstreamCluster
from tests.helpers import HalfCloseTransport, Harness, cluster_config, listener_config
from tests.test_pgwire import BACKEND_START, STARTUP, message, parse_error
from tests.tlsclient import client_hello
from tests.tlsfixtures import TestCA

SSL_REQUEST = pgwire.SSL_REQUEST
GSSENC_REQUEST = struct.pack("!ii", 8, pgwire.GSSENC_REQUEST_CODE)
HELLO_A = client_hello(b"a.db.egress.test")
CANCEL = struct.pack("!iiii", 16, pgwire.CANCEL_REQUEST_CODE, 4242, 77)
KEY = CancelKey(4242, struct.pack("!i", 77))
ALERT_NO_ROUTE = tlshello.alert_record(tlshello.UNRECOGNIZED_NAME)
ALERT_INTERNAL = tlshello.alert_record(tlshello.INTERNAL_ERROR)


class TLSTransport(HalfCloseTransport):
    """A transport that records startTLS (bytes stay plain: the tests play both ends)."""

    tls_options: Any = None

    def startTLS(self, options: Any, normal: bool = True) -> None:
        self.tls_options = options


def harness(pins: dict[str, str] | None = None, **listener: Any) -> Harness:
    """A postgres listener; the mode's own keys (tls, require_tls, routes, client_tls) go to its options."""
    values: dict[str, Any] = dict(mode="postgres", cluster="pg")
    values.update(listener)
    options = {key: values.pop(key) for key in ("tls", "require_tls", "routes", "client_tls") if key in values}
    return Harness(listener=listener_config(options=PostgresOptions(**options), **values), pins=pins)


def routed(pins: dict[str, str] | None = None, **listener: Any) -> Harness:
    """a.db.egress.test -> cluster a; *.db.egress.test -> {sni}:6543 (b pinned to 127.0.0.7, others by ``pins``)."""
    routes = (
        PostgresRoute(sni="a.db.egress.test", cluster="a"),
        PostgresRoute(sni="*.db.egress.test", upstream="{sni}:6543"),
    )
    h = harness(pins={"b.db.egress.test": "127.0.0.7", **(pins or {})}, cluster=None, routes=routes, **listener)
    cluster_a = UpstreamCluster(
        cluster_config(name="a", endpoints=(Address("127.0.0.5", 5432),)), h.reactor, lambda host: None
    )
    h.listener.named_cluster = {"a": cluster_a}.get
    h.cluster_a = cluster_a  # type: ignore[attr-defined]
    return h


def accept(h: Harness, transport: HalfCloseTransport | None = None) -> tuple[Any, HalfCloseTransport]:
    """Answer the newest dial with ``transport``; (upstream leg, transport)."""
    host, port, factory, _timeout, _bind = h.reactor.tcpClients[-1]
    wrapper = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = transport or HalfCloseTransport()
    wrapper.makeConnection(transport)
    transport.protocol = wrapper
    return wrapper._wrappedProtocol, transport


def refuse_dial(h: Harness) -> None:
    connector = h.reactor.connectors[-1]
    h.reactor.tcpClients[-1][2].clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
    h.reactor.advance(0.3)


def lose(leg: Any, transport: HalfCloseTransport, reason: Failure | None = None) -> None:
    """The connection of ``leg`` is gone (what the reactor does after a close)."""
    leg.connectionLost(reason or Failure(ConnectionDone()))


class Case(SynchronousTestCase):
    def tearDown(self) -> None:
        # Every test leaves no timer behind once its sessions have ended.
        for h in getattr(self, "harnesses", []):
            self.assertEqual(h.reactor.getDelayedCalls(), [])

    def h(self, h: Harness) -> Harness:
        self.harnesses = getattr(self, "harnesses", []) + [h]
        return h

    def end(self, h: Harness, *legs: tuple[Any, HalfCloseTransport]) -> None:
        for leg, transport in legs:
            if not leg.lost:
                lose(leg, transport)

    def record(self, h: Harness) -> Any:
        [record] = h.records()
        return record

    def server_hangs_up(self, cct: HalfCloseTransport, cup: Any, cut: HalfCloseTransport) -> None:
        """A sent cancel's client stays open until the server closes (as libpq waits), then is closed."""
        self.assertFalse(cct.disconnecting)
        lose(cup, cut)
        self.assertTrue(cct.disconnecting)


class RoutedTests(Case):
    def test_ssl_request_answered_s_then_routed_by_sni(self) -> None:
        """An SSLRequest gets S; the ClientHello's name picks the cluster, which gets an SSLRequest, then the hello."""
        h = self.h(routed())
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST)
        self.assertEqual(ct.value(), b"S")
        self.assertEqual(h.reactor.tcpClients, [])
        client.dataReceived(HELLO_A[:20])
        self.assertEqual(h.reactor.tcpClients, [])
        client.dataReceived(HELLO_A[20:])
        self.assertEqual(h.reactor.tcpClients[-1][:2], ("127.0.0.5", 5432))
        up, ut = accept(h)
        self.assertEqual(ut.value(), SSL_REQUEST)
        up.dataReceived(b"S")
        self.assertEqual(ut.value(), SSL_REQUEST + HELLO_A)
        self.assertEqual(ct.value(), b"S")  # the server's S is not relayed
        up.dataReceived(b"server hello")
        client.dataReceived(b"finished")
        self.assertEqual(ct.value(), b"Sserver hello")
        self.assertEqual(ut.value(), SSL_REQUEST + HELLO_A + b"finished")
        self.assertIs(ct.producer, ut)
        self.end(h, (client, ct), (up, ut))
        record = self.record(h)
        self.assertEqual((record.upstream, record.flags), ("127.0.0.5:5432", ()))
        self.assertEqual((record.bytes_received, record.bytes_sent), (8 + len(HELLO_A) + 8, 1 + 12))

    def test_one_byte_at_a_time(self) -> None:
        """An SSLRequest and ClientHello arriving a byte at a time are routed the same."""
        h = self.h(routed())
        client, ct = h.connect_client()
        for byte in SSL_REQUEST + HELLO_A:
            client.dataReceived(bytes([byte]))
        self.assertEqual(h.reactor.tcpClients[-1][:2], ("127.0.0.5", 5432))
        up, ut = accept(h)
        self.end(h, (client, ct), (up, ut))

    def test_wildcard_template(self) -> None:
        """A name matching *.db.egress.test dials {sni}:6543 through its hosts: pin; the log names the host."""
        h = self.h(routed())
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST + client_hello(b"b.db.egress.test"))
        self.assertEqual(h.reactor.tcpClients[-1][:2], ("127.0.0.7", 6543))
        up, ut = accept(h)
        self.end(h, (client, ct), (up, ut))
        self.assertEqual(self.record(h).upstream, "b.db.egress.test:6543")

    def test_direct_tls_converted_to_ssl_request(self) -> None:
        """A direct-TLS ClientHello gets no S from the proxy; upstream gets an SSLRequest and then the hello."""
        h = self.h(routed())
        client, ct = h.connect_client()
        client.dataReceived(HELLO_A)
        up, ut = accept(h)
        self.assertEqual(ut.value(), SSL_REQUEST)
        up.dataReceived(b"S")
        self.assertEqual((ct.value(), ut.value()), (b"", SSL_REQUEST + HELLO_A))
        self.end(h, (client, ct), (up, ut))

    def test_unknown_name(self) -> None:
        """A name no route matches gets unrecognized_name, flag NR, and nothing is dialled."""
        h = self.h(routed())
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST + client_hello(b"x.other.test"))
        self.assertEqual(ct.value(), b"S" + ALERT_NO_ROUTE)
        self.assertTrue(ct.disconnecting)
        self.assertEqual(h.reactor.tcpClients, [])
        self.end(h, (client, ct))
        record = self.record(h)
        self.assertEqual((record.upstream, record.flags), ("-", ("NR",)))
        self.assertEqual(h.listener.rejected["no_route"], 1)

    def test_suffix_alone_does_not_match_wildcard(self) -> None:
        """*.db.egress.test does not match db.egress.test itself."""
        h = self.h(routed())
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST + client_hello(b"db.egress.test"))
        self.assertEqual(ct.value(), b"S" + ALERT_NO_ROUTE)
        self.end(h, (client, ct))

    def test_no_sni(self) -> None:
        """A ClientHello without SNI (an IP address as host) gets unrecognized_name, flag NR."""
        h = self.h(routed())
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST + client_hello(None))
        self.assertEqual(ct.value(), b"S" + ALERT_NO_ROUTE)
        self.assertEqual(h.reactor.tcpClients, [])
        self.end(h, (client, ct))
        self.assertEqual(self.record(h).flags, ("NR",))

    def test_plaintext_startup_refused(self) -> None:
        """A plaintext StartupMessage on a routed listener gets an ErrorResponse, flag DPE."""
        h = self.h(routed())
        client, ct = h.connect_client()
        client.dataReceived(STARTUP)
        fields = parse_error(ct.value())
        self.assertEqual(fields["C"], "08001")
        self.assertIn("TLS required on this listener", fields["M"])
        self.assertTrue(ct.disconnecting)
        self.end(h, (client, ct))
        self.assertEqual(self.record(h).flags, ("DPE",))

    def test_upstream_refused(self) -> None:
        """A refused dial gets the internal_error alert, flag UF."""
        h = self.h(routed())
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST + HELLO_A)
        refuse_dial(h)
        self.assertEqual(ct.value(), b"S" + ALERT_INTERNAL)
        self.assertTrue(ct.disconnecting)
        self.end(h, (client, ct))
        self.assertEqual(self.record(h).flags, ("UF",))

    def test_upstream_says_n(self) -> None:
        """An upstream that declines TLS gets the client an internal_error alert; the upstream is closed."""
        h = self.h(routed())
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST + HELLO_A)
        up, ut = accept(h)
        up.dataReceived(b"N")
        self.assertEqual(ct.value(), b"S" + ALERT_INTERNAL)
        self.assertTrue(ut.disconnecting)
        self.end(h, (up, ut), (client, ct))
        record = self.record(h)
        self.assertEqual((record.flags, record.bytes_sent), (("UF",), 1 + len(ALERT_INTERNAL)))
        self.assertEqual(h.cluster_a.connect_failures["tls"], 1)  # type: ignore[attr-defined]

    def test_upstream_closes_before_answering(self) -> None:
        """An upstream that closes before answering the SSLRequest gets the client an alert."""
        h = self.h(routed())
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST + HELLO_A)
        up, ut = accept(h)
        up.readConnectionLost()
        self.assertTrue(ut.disconnecting)
        lose(up, ut)
        self.assertEqual(ct.value(), b"S" + ALERT_INTERNAL)
        self.end(h, (client, ct))
        self.assertEqual(self.record(h).flags, ("UF",))

    def test_upstream_silent(self) -> None:
        """An upstream that never answers the SSLRequest times out: alert, flag UT."""
        h = self.h(routed())
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST + HELLO_A)
        up, ut = accept(h)
        h.reactor.advance(HANDSHAKE_TIMEOUT)
        self.assertEqual(ct.value(), b"S" + ALERT_INTERNAL)
        self.end(h, (up, ut), (client, ct))
        self.assertEqual(self.record(h).flags, ("UT",))

    def test_breaker_open(self) -> None:
        """A full circuit breaker gets the internal_error alert, flag UO, without dialling."""
        h = self.h(routed())
        h.cluster_a.breaker.max_pending = 0  # type: ignore[attr-defined]
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST + HELLO_A)
        self.assertEqual(ct.value(), b"S" + ALERT_INTERNAL)
        self.assertEqual(h.reactor.tcpClients, [])
        self.end(h, (client, ct))
        self.assertEqual(self.record(h).flags, ("UO",))

    def test_plaintext_cancel_not_routable(self) -> None:
        """A plaintext CancelRequest from a source with no live session is closed, flag NR, nothing dialled."""
        h = self.h(routed())
        client, ct = h.connect_client()
        client.dataReceived(CANCEL)
        self.assertEqual((ct.value(), ct.disconnecting, h.reactor.tcpClients), (b"", True, []))
        self.end(h, (client, ct))
        self.assertEqual(self.record(h).flags, ("NR",))

    def live_session(self, h: Harness, hello: bytes, source: str = "127.0.0.1", port: int = 50000) -> list[Any]:
        """A routed session spliced for ``hello`` from ``source``; its legs and transports."""
        client, ct = h.connect_client(IPv4Address("TCP", source, port))
        client.dataReceived(SSL_REQUEST + hello)
        up, ut = accept(h)
        up.dataReceived(b"S")
        self.assertIs(ct.producer, ut)
        return [(client, ct), (up, ut)]

    def test_plaintext_cancel_goes_to_the_sources_endpoint(self) -> None:
        """A plaintext cancel from a source with a live routed session is sent to that session's endpoint only."""
        h = self.h(routed())
        session = self.live_session(h, HELLO_A)
        other = self.live_session(h, client_hello(b"b.db.egress.test"), source="127.0.0.9")
        canceller, cct = h.connect_client(IPv4Address("TCP", "127.0.0.1", 50001))
        canceller.dataReceived(CANCEL)
        self.assertEqual(h.reactor.tcpClients[-1][:2], ("127.0.0.5", 5432))
        self.assertEqual(len(h.reactor.tcpClients), 3)  # the two sessions and this cancel: 127.0.0.9's endpoint untouched
        cup, cut = accept(h)
        self.assertEqual(cut.value(), CANCEL)
        self.server_hangs_up(cct, cup, cut)
        self.end(h, (canceller, cct), (cup, cut), *session, *other)
        records = h.records()
        self.assertEqual([(r.upstream, r.flags) for r in records[:1]], [("127.0.0.5:5432", ())])

    def test_cancel_copies_to_each_endpoint_of_the_source(self) -> None:
        """Sessions of one source to two endpoints: the cancel reaches both, newest first; copies leave no record."""
        h = self.h(routed())
        first = self.live_session(h, HELLO_A)
        second = self.live_session(h, client_hello(b"b.db.egress.test"), port=50002)
        canceller, cct = h.connect_client(IPv4Address("TCP", "127.0.0.1", 50001))
        canceller.dataReceived(CANCEL)
        dialled = [client[:2] for client in h.reactor.tcpClients[2:]]
        self.assertEqual(sorted(dialled), [("127.0.0.5", 5432), ("127.0.0.7", 6543)])
        copy_host, copy_port, copy_factory, _, _ = h.reactor.tcpClients[2]
        copy = copy_factory.buildProtocol(IPv4Address("TCP", copy_host, copy_port))
        copy_transport = HalfCloseTransport()
        copy.makeConnection(copy_transport)
        self.assertEqual((copy_transport.value(), copy_transport.disconnecting), (CANCEL, False))
        cup, cut = accept(h)
        self.assertEqual(cut.value(), CANCEL)
        h.reactor.advance(5)  # CANCEL_LINGER: the server said nothing, the copy hangs up itself
        self.assertTrue(copy_transport.disconnecting)
        copy.connectionLost(Failure(ConnectionDone()))
        self.end(h, (canceller, cct), (cup, cut), *first, *second)
        self.assertEqual(len(h.records()), 3)
        self.assertEqual(h.listener.cluster.breaker.active + h.cluster_a.breaker.active, 0)

    def test_cancel_fanout_is_bounded(self) -> None:
        """However many endpoints a source has sessions with, one cancel reaches at most MAX_CANCEL_FANOUT."""
        names = [f"n{i}.db.egress.test" for i in range(MAX_CANCEL_FANOUT + 3)]
        h = self.h(routed(pins={name: f"127.0.1.{i}" for i, name in enumerate(names)}))
        sessions = []
        for i, name in enumerate(names):
            sessions += self.live_session(h, client_hello(name.encode()), port=51000 + i)
        before = len(h.reactor.tcpClients)
        canceller, cct = h.connect_client(IPv4Address("TCP", "127.0.0.1", 50001))
        canceller.dataReceived(CANCEL)
        dialled = {client[0] for client in h.reactor.tcpClients[before:]}
        newest = {f"127.0.1.{i}" for i in range(len(names) - MAX_CANCEL_FANOUT, len(names))}
        self.assertEqual(dialled, newest)
        lose(canceller, cct)
        self.end(h, *sessions)
        for _ in range(5):  # the copies' dials are never answered: let them time out (bounded attempts)
            h.reactor.advance(6)
        self.assertEqual(h.listener.cluster.breaker.pending, 0)

    def test_finished_session_is_forgotten(self) -> None:
        """Once a source's session has ended, its cancel is refused again (NR)."""
        h = self.h(routed())
        session = self.live_session(h, HELLO_A)
        self.end(h, *session)
        self.assertEqual(PostgresListenerState.of(h.listener).routed_by_source, {})
        canceller, cct = h.connect_client()
        canceller.dataReceived(CANCEL)
        self.assertTrue(cct.disconnecting)
        self.end(h, (canceller, cct))
        self.assertEqual(h.records()[-1].flags, ("NR",))

    def test_long_cancel_key_forwarded(self) -> None:
        """A protocol 3.2 CancelRequest (PostgreSQL 18, 32-byte key) is forwarded whole."""
        h = self.h(routed())
        session = self.live_session(h, HELLO_A)
        long_cancel = struct.pack("!iii", 12 + 32, pgwire.CANCEL_REQUEST_CODE, 4242) + bytes(range(32))
        canceller, cct = h.connect_client()
        canceller.dataReceived(long_cancel)
        cup, cut = accept(h)
        self.assertEqual(cut.value(), long_cancel)
        self.end(h, (canceller, cct), (cup, cut), *session)

    def test_client_gone_while_dialling(self) -> None:
        """A client that leaves while the route is dialled cancels the dial; one record, no timers."""
        h = self.h(routed())
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST + HELLO_A)
        lose(client, ct, Failure(ConnectionLost()))
        self.assertEqual(len(h.records()), 1)


class SingleClusterTests(Case):
    def test_ssl_request_relayed(self) -> None:
        """The SSLRequest goes upstream after the dial and the server's S is relayed; then bytes flow."""
        h = self.h(harness())
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST)
        self.assertEqual(ct.value(), b"")
        up, ut = accept(h)
        self.assertEqual(ut.value(), SSL_REQUEST)
        up.dataReceived(b"S")
        self.assertEqual(ct.value(), b"S")
        client.dataReceived(HELLO_A)
        self.assertEqual(ut.value(), SSL_REQUEST + HELLO_A)
        self.end(h, (client, ct), (up, ut))
        record = self.record(h)
        self.assertEqual((record.bytes_received, record.bytes_sent, record.flags), (8 + len(HELLO_A), 1, ()))

    def test_n_relayed(self) -> None:
        """A server's N is relayed and the client's plaintext startup follows through the splice."""
        h = self.h(harness())
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST)
        up, ut = accept(h)
        up.dataReceived(b"N")
        client.dataReceived(STARTUP)
        self.assertEqual((ct.value(), ut.value()), (b"N", SSL_REQUEST + STARTUP))
        self.end(h, (client, ct), (up, ut))

    def test_n_with_require_tls(self) -> None:
        """With require_tls, a server's N ends that upstream; the client hears N, then an ErrorResponse."""
        h = self.h(harness(require_tls=True))
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST)
        up, ut = accept(h)
        up.dataReceived(b"N")
        self.assertTrue(ut.disconnecting)
        lose(up, ut)
        self.assertEqual(ct.value(), b"N")
        client.dataReceived(STARTUP)
        self.assertIn("TLS required", parse_error(ct.value()[1:])["M"])
        self.end(h, (client, ct))
        self.assertEqual(self.record(h).flags, ("DPE",))

    def test_refused_then_alert(self) -> None:
        """A refused dial answers the SSLRequest with S, reads the ClientHello, then sends internal_error."""
        h = self.h(harness())
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST)
        refuse_dial(h)
        self.assertEqual((ct.value(), ct.disconnecting), (b"S", False))
        client.dataReceived(HELLO_A)
        self.assertEqual((ct.value(), ct.disconnecting), (b"S" + ALERT_INTERNAL, True))
        self.end(h, (client, ct))
        self.assertEqual(self.record(h).flags, ("UF",))

    def test_refused_plaintext(self) -> None:
        """A refused dial answers a plaintext startup with an ErrorResponse naming the upstream."""
        h = self.h(harness())
        client, ct = h.connect_client()
        client.dataReceived(STARTUP)
        refuse_dial(h)
        fields = parse_error(ct.value())
        self.assertEqual(
            (fields["S"], fields["C"], fields["M"]),
            ("FATAL", "08001", "egressproxy: could not connect to db.egress.test:5432: connection refused"),
        )
        self.end(h, (client, ct))

    def test_timeout_plaintext(self) -> None:
        """A connect timeout's message points at the allowlist."""
        h = self.h(harness())
        client, ct = h.connect_client()
        client.dataReceived(STARTUP)
        h.reactor.advance(5.0)
        h.reactor.advance(0.5)
        fields = parse_error(ct.value())
        self.assertIn("timed out: is this proxy's egress IP on the database's allowlist?", fields["M"])
        self.end(h, (client, ct))
        self.assertEqual(self.record(h).flags, ("UT",))

    def test_closed_before_answering_plaintext(self) -> None:
        """An upstream that closes before answering a plaintext startup gets the client 08006."""
        h = self.h(harness())
        client, ct = h.connect_client()
        client.dataReceived(STARTUP)
        up, ut = accept(h)
        self.assertEqual(ut.value(), STARTUP)
        lose(up, ut, Failure(ConnectionLost()))
        fields = parse_error(ct.value())
        self.assertEqual(fields["C"], "08006")
        self.assertIn("closed the connection before answering", fields["M"])
        self.end(h, (client, ct))
        self.assertEqual(self.record(h).flags, ("UF",))
        self.assertEqual(h.cluster.breaker.active, 0)

    def test_plaintext_startup_relayed_and_key_seen(self) -> None:
        """A plaintext startup is relayed; the BackendKeyData is remembered until the session ends."""
        h = self.h(harness())
        client, ct = h.connect_client()
        client.dataReceived(STARTUP)
        up, ut = accept(h)
        up.dataReceived(BACKEND_START[:7])
        up.dataReceived(BACKEND_START[7:])
        self.assertEqual(ct.value(), BACKEND_START)
        state = PostgresListenerState.of(h.listener)
        self.assertEqual(state.backend_keys[KEY].address, Address("db.egress.test", 5432))
        self.assertFalse(state.backend_keys[KEY].tls)
        client.dataReceived(b"Q")
        self.assertEqual(ut.value(), STARTUP + b"Q")
        self.assertIs(ct.producer, ut)
        self.end(h, (client, ct), (up, ut))
        self.assertEqual(state.backend_keys, {})
        record = self.record(h)
        self.assertEqual((record.bytes_received, record.bytes_sent), (len(STARTUP) + 1, len(BACKEND_START)))

    def test_authentication_exchange_relayed(self) -> None:
        """Before ReadyForQuery, messages flow both ways (an authentication exchange)."""
        h = self.h(harness())
        client, ct = h.connect_client()
        client.dataReceived(STARTUP)
        up, ut = accept(h)
        up.dataReceived(message(b"R", struct.pack("!i", 3)))
        client.dataReceived(message(b"p", b"secret\x00"))
        self.assertEqual(ut.value(), STARTUP + message(b"p", b"secret\x00"))
        up.dataReceived(message(b"E", b"SFATAL\x00\x00"))
        lose(up, ut)
        self.assertTrue(ct.disconnecting)
        self.end(h, (client, ct))

    def test_cancel_routed_by_key(self) -> None:
        """A CancelRequest with a known key goes to that backend's address, then both close."""
        h = self.h(harness())
        client, ct = h.connect_client()
        client.dataReceived(STARTUP)
        up, ut = accept(h)
        up.dataReceived(BACKEND_START)
        canceller, cct = h.connect_client(IPv4Address("TCP", "127.0.0.1", 50001))
        canceller.dataReceived(CANCEL)
        cup, cut = accept(h)
        self.assertEqual(cut.value(), CANCEL)
        self.server_hangs_up(cct, cup, cut)
        self.end(h, (canceller, cct), (cup, cut), (client, ct), (up, ut))

    def test_unknown_cancel_forwarded_to_cluster(self) -> None:
        """An unknown cancel key is forwarded to the listener's cluster (another instance may own it)."""
        h = self.h(harness())
        client, ct = h.connect_client()
        client.dataReceived(CANCEL)
        up, ut = accept(h)
        self.assertEqual(ut.value(), CANCEL)
        self.end(h, (client, ct), (up, ut))

    def test_direct_tls_single_cluster(self) -> None:
        """A direct-TLS client of a single cluster: SSLRequest upstream, then its ClientHello."""
        h = self.h(harness())
        client, ct = h.connect_client()
        client.dataReceived(HELLO_A)
        up, ut = accept(h)
        up.dataReceived(b"S")
        self.assertEqual((ct.value(), ut.value()), (b"", SSL_REQUEST + HELLO_A))
        self.end(h, (client, ct), (up, ut))

    def test_bytes_after_s_refused(self) -> None:
        """Bytes after the server's S (before the ClientHello) are refused, never relayed."""
        h = self.h(harness())
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST)
        up, ut = accept(h)
        up.dataReceived(b"Sinjected")
        self.assertEqual(ct.value(), b"S")
        client.dataReceived(HELLO_A)
        self.assertEqual(ct.value(), b"S" + ALERT_INTERNAL)
        self.end(h, (up, ut), (client, ct))


class AdmissionAndProtocolTests(Case):
    def test_gssenc_declined(self) -> None:
        """A GSSENCRequest gets N, and the SSLRequest after it is handled."""
        h = self.h(routed())
        client, ct = h.connect_client()
        client.dataReceived(GSSENC_REQUEST)
        self.assertEqual(ct.value(), b"N")
        client.dataReceived(SSL_REQUEST)
        self.assertEqual(ct.value(), b"NS")
        lose(client, ct)

    def test_refused_source_tls(self) -> None:
        """A refused source that asks for TLS gets S, then access_denied after its ClientHello."""
        h = self.h(harness(allow_sources=(ip_network("10.0.0.0/8"),)))
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST + HELLO_A)
        self.assertEqual(ct.value(), b"S" + tlshello.alert_record(tlshello.ACCESS_DENIED))
        self.assertEqual(h.reactor.tcpClients, [])
        self.end(h, (client, ct))
        self.assertEqual(self.record(h).flags, ("RBAC",))

    def test_refused_source_plaintext(self) -> None:
        """A refused plaintext source gets an ErrorResponse 28000."""
        h = self.h(harness(allow_sources=(ip_network("10.0.0.0/8"),)))
        client, ct = h.connect_client()
        client.dataReceived(STARTUP)
        fields = parse_error(ct.value())
        self.assertEqual((fields["C"], fields["M"]), (
            "28000", "egressproxy: connections from 127.0.0.1 are not allowed on this listener"
        ))
        self.end(h, (client, ct))

    def test_overload_plaintext(self) -> None:
        """A client over max_connections gets 53300 too many connections."""
        h = self.h(harness(max_connections=1))
        first, ft = h.connect_client()
        client, ct = h.connect_client(IPv4Address("TCP", "127.0.0.1", 50001))
        client.dataReceived(STARTUP)
        self.assertEqual(parse_error(ct.value())["C"], "53300")
        self.end(h, (client, ct), (first, ft))

    def test_per_source_overload_plaintext(self) -> None:
        """A source over max_connections_per_source is told so, with the key to raise; another source gets in."""
        h = self.h(harness(max_connections=10, max_connections_per_source=1))
        first, ft = h.connect_client()
        client, ct = h.connect_client(IPv4Address("TCP", "127.0.0.1", 50001))
        client.dataReceived(STARTUP)
        fields = parse_error(ct.value())
        self.assertEqual((fields["C"], fields["M"]), ("53300", "egressproxy: too many connections from 127.0.0.1 to this listener"))
        self.assertIn("max_connections_per_source", fields["H"])
        other, ot = h.connect_client(IPv4Address("TCP", "127.0.0.9", 50002))
        other.dataReceived(STARTUP)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.end(h, (client, ct), (first, ft), (other, ot))

    def test_handshake_timeout(self) -> None:
        """A client that sends nothing is closed after the handshake timeout, flag DPE."""
        h = self.h(routed())
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST)
        h.reactor.advance(HANDSHAKE_TIMEOUT)
        self.assertTrue(ct.disconnecting)
        self.end(h, (client, ct))
        self.assertEqual(self.record(h).flags, ("DPE",))

    def test_garbage(self) -> None:
        """An HTTP request gets an ErrorResponse 08P01 and a close, flag DPE."""
        h = self.h(harness())
        client, ct = h.connect_client()
        client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(parse_error(ct.value())["C"], "08P01")
        self.assertTrue(ct.disconnecting)
        self.assertEqual(h.reactor.tcpClients, [])
        self.end(h, (client, ct))
        self.assertEqual(self.record(h).flags, ("DPE",))

    def test_oversized_hello(self) -> None:
        """A ClientHello larger than the bound is refused without dialling."""
        h = self.h(routed())
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST + b"\x16\x03\x01\x40\x00" + b"\x01" + b"\x00" * 20000)
        self.assertTrue(ct.disconnecting)
        self.assertEqual(h.reactor.tcpClients, [])
        self.end(h, (client, ct))

    def test_proxy_protocol_leftover(self) -> None:
        """Bytes after a PROXY header (the SSLRequest) are read by the front."""
        h = self.h(routed(proxy_protocol=True))
        client, ct = h.connect_client()
        client.dataReceived(b"PROXY TCP4 10.1.2.3 10.0.0.1 1234 5432\r\n" + SSL_REQUEST)
        self.assertEqual(ct.value(), b"S")
        lose(client, ct)

    def test_client_eof_while_waiting(self) -> None:
        """A client EOF before the splice closes it and the dial."""
        h = self.h(harness())
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST)
        client.readConnectionLost()
        self.assertTrue(ct.disconnecting)
        lose(client, ct)
        self.assertEqual(len(h.records()), 1)

    @given(st.lists(st.binary(min_size=1, max_size=80), max_size=6), st.sampled_from(["routed", "single", "orig"]))
    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_random_client_bytes(self, chunks: list[bytes], kind: str) -> None:
        """Random client bytes never raise; within the timeout every session is closed or dialling."""
        if kind == "routed":
            h = routed()
        elif kind == "single":
            h = harness()
        else:
            h = harness(tls="originate")
        client, ct = h.connect_client()
        for chunk in chunks:
            if ct.disconnecting:
                break
            client.dataReceived(chunk)
        h.reactor.advance(HANDSHAKE_TIMEOUT)
        for _ in range(5):
            if h.reactor.tcpClients:
                refuse_dial(h)
            h.reactor.advance(HANDSHAKE_TIMEOUT)
        self.assertTrue(ct.disconnecting)
        lose(client, ct)
        self.assertEqual(len(h.records()), 1)
        self.assertEqual(h.reactor.getDelayedCalls(), [])


class OriginateTests(Case):
    def originate(self, **listener: Any) -> Harness:
        h = self.h(harness(tls="originate", **listener))
        h.listener.cluster.config = cluster_config(tls=ClusterTLS(server_name="db.egress.test"))
        return h

    def test_ssl_request_declined(self) -> None:
        """Without client_tls, an SSLRequest gets N and the startup follows in plaintext."""
        h = self.originate()
        client, ct = h.connect_client()
        client.dataReceived(SSL_REQUEST)
        self.assertEqual(ct.value(), b"N")
        self.assertEqual(h.reactor.tcpClients, [])
        client.dataReceived(STARTUP)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        lose(client, ct)

    def test_tls_upstream_and_key(self) -> None:
        """Upstream: SSLRequest, S, TLS with the server name, the startup; the key is kept with TLS."""
        h = self.originate()
        client, ct = h.connect_client()
        client.dataReceived(STARTUP)
        up, ut = accept(h, TLSTransport())
        self.assertEqual(ut.value(), SSL_REQUEST)
        up.dataReceived(b"S")
        self.assertIsNotNone(ut.tls_options)
        self.assertEqual(ut.tls_options._hostnameASCII, "db.egress.test")
        self.assertEqual(ut.value(), SSL_REQUEST + STARTUP)
        up.dataReceived(BACKEND_START)
        self.assertEqual(ct.value(), BACKEND_START)
        state = PostgresListenerState.of(h.listener)
        self.assertTrue(state.backend_keys[KEY].tls)
        self.end(h, (client, ct), (up, ut))
        record = self.record(h)
        self.assertEqual((record.bytes_sent, record.flags), (len(BACKEND_START), ()))
        self.assertEqual(state.backend_keys, {})

    def test_cancel_over_tls(self) -> None:
        """A cancel for an originated session goes over TLS: SSLRequest, S, TLS, the CancelRequest."""
        h = self.originate()
        client, ct = h.connect_client()
        client.dataReceived(STARTUP)
        up, ut = accept(h, TLSTransport())
        up.dataReceived(b"S")
        up.dataReceived(BACKEND_START)
        canceller, cct = h.connect_client(IPv4Address("TCP", "127.0.0.1", 50001))
        canceller.dataReceived(CANCEL)
        cup, cut = accept(h, TLSTransport())
        self.assertEqual(cut.value(), SSL_REQUEST)
        cup.dataReceived(b"S")
        self.assertIsNotNone(cut.tls_options)
        self.assertEqual(cut.value(), SSL_REQUEST + CANCEL)
        self.server_hangs_up(cct, cup, cut)
        self.end(h, (canceller, cct), (cup, cut), (client, ct), (up, ut))

    def test_server_without_tls(self) -> None:
        """A server answering N is refused with an ErrorResponse: never plaintext upstream."""
        h = self.originate()
        client, ct = h.connect_client()
        client.dataReceived(STARTUP)
        up, ut = accept(h, TLSTransport())
        up.dataReceived(b"N")
        self.assertIsNone(ut.tls_options)
        self.assertEqual(ut.value(), SSL_REQUEST)
        fields = parse_error(ct.value())
        self.assertIn("does not accept TLS", fields["M"])
        self.end(h, (up, ut), (client, ct))
        self.assertEqual(self.record(h).flags, ("UF",))

    def test_tls_failure(self) -> None:
        """A failed TLS handshake (verification) is an ErrorResponse naming the upstream and the reason."""
        h = self.originate()
        client, ct = h.connect_client()
        client.dataReceived(STARTUP)
        up, ut = accept(h, TLSTransport())
        up.dataReceived(b"S")
        lose(up, ut, Failure(SSL.Error([("SSL routines", "", "certificate verify failed")])))
        fields = parse_error(ct.value())
        self.assertEqual(fields["M"], "egressproxy: TLS with db.egress.test:5432 failed: certificate verify failed")
        self.end(h, (client, ct))
        self.assertEqual(h.cluster.connect_failures["tls"], 1)

    def login(self, h: Harness, answer: bytes) -> tuple[list[Any], bytes]:
        """A plaintext client's startup through originate, the server answering ``answer``; (legs, relayed)."""
        client, ct = h.connect_client()
        client.dataReceived(STARTUP)
        up, ut = accept(h, TLSTransport())
        up.dataReceived(b"S")
        up.dataReceived(answer)
        return [(client, ct), (up, ut)], ct.value()

    def test_plus_withheld_from_plaintext_client(self) -> None:
        """The server's SCRAM-SHA-256-PLUS is removed before the list reaches a plaintext client; counts follow."""
        h = self.originate()
        offered = pgwire.sasl_request(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
        legs, relayed = self.login(h, offered)
        self.assertEqual(relayed, pgwire.sasl_request(["SCRAM-SHA-256"]))
        [(client, ct), (up, ut)] = legs
        first = message(b"p", b"SCRAM-SHA-256\x00" + struct.pack("!i", 11) + b"n,,n=,r=abc")
        client.dataReceived(first[:4])
        client.dataReceived(first[4:])
        self.assertTrue(ut.value().endswith(first))
        up.dataReceived(BACKEND_START)
        self.end(h, *legs)
        record = self.record(h)
        self.assertEqual(record.flags, ())
        self.assertEqual(record.bytes_sent, len(relayed) + len(BACKEND_START))

    def test_wrong_password_flagged(self) -> None:
        """An ErrorResponse in the startup answer is relayed, flagged LR:<SQLSTATE> and counted."""
        h = self.originate()
        error = pgwire.error_response("28P01", 'password authentication failed for user "app"')
        legs, relayed = self.login(h, message(b"R", struct.pack("!i", 5) + b"salt") + error)
        self.assertTrue(relayed.endswith(error))
        self.end(h, *legs)
        self.assertEqual(self.record(h).flags, ("LR:28P01",))
        self.assertEqual(h.listener.login_refused, {"28P01": 1})

    def test_channel_binding_flag_refused(self) -> None:
        """A client sending GS2 flag y or p (or choosing -PLUS) gets the proxy's FATAL; nothing goes upstream."""
        cases = [
            (b"SCRAM-SHA-256", b"y,,n=,r=abc"),
            (b"SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abc"),
        ]
        for mechanism, data in cases:
            h = self.originate()
            legs, _ = self.login(h, pgwire.sasl_request(["SCRAM-SHA-256"]))
            [(client, ct), (up, ut)] = legs
            sent_before = ut.value()
            ct.clear()
            client.dataReceived(message(b"p", mechanism + b"\x00" + struct.pack("!i", len(data)) + data))
            self.assertEqual(ut.value(), sent_before)
            fields = parse_error(ct.value())
            self.assertEqual(fields["C"], "08P01")
            self.assertIn("channel binding cannot pass through this listener", fields["M"])
            self.assertIn("channel_binding=disable", fields["H"])
            self.assertTrue(ct.disconnecting)
            self.end(h, *legs)
            self.assertEqual(self.record(h).flags, ("DPE",))
            self.assertEqual(h.listener.rejected["channel_binding"], 1)

    def test_md5_request_relayed_unchanged(self) -> None:
        """An md5 request and the client's answer pass unchanged; no SASL check holds the answer back."""
        h = self.originate()
        request = message(b"R", struct.pack("!i", 5) + b"salt")
        legs, relayed = self.login(h, request)
        self.assertEqual(relayed, request)
        [(client, ct), (up, ut)] = legs
        answer = message(b"p", b"md5abcdef\x00")
        client.dataReceived(answer)
        self.assertTrue(ut.value().endswith(answer))
        self.end(h, *legs)

    def test_direct_tls_without_client_tls(self) -> None:
        """A direct-TLS client of an originate listener without client_tls gets a handshake_failure alert."""
        h = self.originate()
        client, ct = h.connect_client()
        client.dataReceived(HELLO_A)
        self.assertEqual(ct.value(), tlshello.alert_record(tlshello.HANDSHAKE_FAILURE))
        self.end(h, (client, ct))


class ClientTLSTests(Case):
    def test_ssl_request_accepted_and_tls_started(self) -> None:
        """With client_tls, an SSLRequest gets S and TLS starts on the client leg, offering ALPN postgresql."""
        cert, key = TestCA.create(self.mktemp()).issue(["proxy.egress.test"], self.mktemp(), "proxy")
        h = self.h(harness(tls="originate", client_tls=ClientTLS(cert=cert, key=key)))
        peer = IPv4Address("TCP", "127.0.0.1", 50000)
        client = h.factory.buildProtocol(peer)
        ct = TLSTransport(peerAddress=peer)
        client.makeConnection(ct)
        client.dataReceived(SSL_REQUEST)
        self.assertEqual(ct.value(), b"S")
        self.assertIsNotNone(ct.tls_options)
        self.assertEqual(ct.tls_options._acceptableProtocols, [tlshello.ALPN_POSTGRESQL])
        # Inside TLS (decrypted by the layer the test leaves out), the startup follows.
        client.dataReceived(STARTUP)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        # Options are built once per certificate.
        state = PostgresListenerState.of(h.listener)
        self.assertIs(state.server_options(ClientTLS(cert=cert, key=key)), ct.tls_options)
        lose(client, ct)

    def test_require_tls_refuses_plaintext(self) -> None:
        """With client_tls and require_tls, a plaintext startup gets the ErrorResponse."""
        cert, key = TestCA.create(self.mktemp()).issue(["proxy.egress.test"], self.mktemp(), "proxy")
        h = self.h(harness(tls="originate", client_tls=ClientTLS(cert=cert, key=key), require_tls=True))
        client, ct = h.connect_client()
        client.dataReceived(STARTUP)
        self.assertIn("TLS required", parse_error(ct.value())["M"])
        self.end(h, (client, ct))


class RouteTests(SynchronousTestCase):
    def test_match_order(self) -> None:
        """The first matching route wins; wildcards need at least one label."""
        routes = (PostgresRoute("a.example.test", cluster="x"), PostgresRoute("*.example.test", cluster="y"))
        self.assertEqual(match_route(routes, "a.example.test").cluster, "x")  # type: ignore[union-attr]
        self.assertEqual(match_route(routes, "b.c.example.test").cluster, "y")  # type: ignore[union-attr]
        self.assertIsNone(match_route(routes, "example.test"))
        self.assertIsNone(match_route(routes, "aexample.test"))

    def test_names(self) -> None:
        """Only DNS host names are routable: no IP literals, empty labels or odd characters."""
        for name in ("a.b", "db-1.example.test", "x"):
            self.assertTrue(valid_server_name(name), name)
        for name in ("", "1.2.3.4", "a..b", "a.b.", "-a.b", "a_b.test", "a b", "x" * 64 + ".test"):
            self.assertFalse(valid_server_name(name), name)

    def test_template(self) -> None:
        """{sni} in an upstream template is the name the client sent."""
        self.assertEqual(route_address("{sni}:6543", "a.test"), Address("a.test", 6543))
        self.assertEqual(route_address("[::1]:5432", "a.test"), Address("::1", 5432))
