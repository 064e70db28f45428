"""Unit tests of the tcp-mode data path: sessions, splices, limits, timers."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.addresses import format_peer
from egressproxy.config import Address
from egressproxy.splice import PENDING_LIMIT
from tests.helpers import Harness, cluster_config, listener_config

import ipaddress


def refuse_newest(harness: Harness) -> None:
    """Fail the newest recorded dial with ECONNREFUSED and let HostnameEndpoint report it."""
    connector = harness.reactor.connectors[-1]
    _host, _port, factory, _timeout, _bind = harness.reactor.tcpClients[-1]
    factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
    harness.reactor.advance(0.3)


class ForwardingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()

    def test_dials_cluster_endpoint(self) -> None:
        """A new client makes the proxy dial the cluster's endpoint."""
        self.h.connect_client()
        host, port = self.h.reactor.tcpClients[-1][:2]
        self.assertEqual((host, port), ("127.0.0.1", 5432))

    def test_pinned_host_is_dialled(self) -> None:
        """A hosts: pin replaces the endpoint's name by its address."""
        h = Harness(pins={"db.egress.test": "127.0.0.9"})
        h.connect_client()
        self.assertEqual(h.reactor.tcpClients[-1][:2], ("127.0.0.9", 5432))

    def test_client_paused_until_upstream_connects(self) -> None:
        """The client leg is paused while the upstream connects and resumed after."""
        _client, ct = self.h.connect_client()
        self.assertEqual(ct.producerState, "paused")
        self.h.accept_upstream()
        self.assertEqual(ct.producerState, "producing")

    def test_bytes_flow_both_ways(self) -> None:
        """Bytes from each side reach the other side unchanged."""
        client, ct = self.h.connect_client()
        up, ut = self.h.accept_upstream()
        client.dataReceived(b"query")
        up.dataReceived(b"reply")
        self.assertEqual(ut.value(), b"query")
        self.assertEqual(ct.value(), b"reply")

    def test_preconnect_bytes_delivered_first(self) -> None:
        """Bytes a client sends before the upstream is connected are written first, in order."""
        client, _ct = self.h.connect_client()
        client.dataReceived(b"early-1 ")
        client.dataReceived(b"early-2 ")
        up, ut = self.h.accept_upstream()
        client.dataReceived(b"late")
        self.assertEqual(ut.value(), b"early-1 early-2 late")

    def test_preconnect_limit(self) -> None:
        """A client delivering more than PENDING_LIMIT before connecting is dropped."""
        client, ct = self.h.connect_client()
        client.dataReceived(b"x" * (PENDING_LIMIT + 1))
        self.assertTrue(ct.disconnecting)

    def test_legs_are_each_others_producers(self) -> None:
        """Each transport is registered as the other's streaming producer."""
        _client, ct = self.h.connect_client()
        _up, ut = self.h.accept_upstream()
        self.assertIs(ct.producer, ut)
        self.assertIs(ut.producer, ct)
        self.assertTrue(ct.streaming and ut.streaming)

    def test_backpressure_from_client_pauses_upstream(self) -> None:
        """A client that stops reading pauses reading from the upstream."""
        _client, ct = self.h.connect_client()
        _up, ut = self.h.accept_upstream()
        ct.producer.pauseProducing()  # what the client transport does when its buffer is full
        self.assertEqual(ut.producerState, "paused")
        ct.producer.resumeProducing()
        self.assertEqual(ut.producerState, "producing")

    def test_backpressure_from_upstream_pauses_client(self) -> None:
        """An upstream that stops reading pauses reading from the client."""
        _client, ct = self.h.connect_client()
        _up, ut = self.h.accept_upstream()
        ut.producer.pauseProducing()
        self.assertEqual(ct.producerState, "paused")

    def test_counts_bytes(self) -> None:
        """The session counts bytes received from and sent to downstream exactly."""
        client, _ct = self.h.connect_client()
        up, _ut = self.h.accept_upstream()
        client.dataReceived(b"a" * 10)
        client.dataReceived(b"b" * 5)
        up.dataReceived(b"c" * 7)
        self.assertEqual((client.session.bytes_received, client.session.bytes_sent), (15, 7))
        self.assertEqual((self.h.listener.bytes_received, self.h.listener.bytes_sent), (15, 7))


class HalfCloseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.client, self.ct = self.h.connect_client()
        self.up, self.ut = self.h.accept_upstream()

    def test_client_eof_shuts_upstream_write_side(self) -> None:
        """EOF from the client becomes a write-side shutdown towards the upstream."""
        self.client.readConnectionLost()
        self.assertTrue(self.ut.write_closed)
        self.assertFalse(self.ut.disconnecting)
        self.assertIsNone(self.ut.producer)

    def test_reply_flows_after_client_eof(self) -> None:
        """After the client's EOF, the upstream's reply still reaches the client."""
        self.client.readConnectionLost()
        self.up.dataReceived(b"late reply")
        self.assertEqual(self.ct.value(), b"late reply")
        self.assertFalse(self.ct.disconnecting)

    def test_upstream_eof_shuts_client_write_side(self) -> None:
        """EOF from the upstream becomes a write-side shutdown towards the client."""
        self.up.readConnectionLost()
        self.assertTrue(self.ct.write_closed)
        self.assertFalse(self.ct.disconnecting)

    def test_both_eofs_close_both(self) -> None:
        """Once both sides have sent EOF, both connections are closed."""
        self.client.readConnectionLost()
        self.up.readConnectionLost()
        self.assertTrue(self.ct.disconnecting)
        self.assertTrue(self.ut.disconnecting)

    def test_eof_before_upstream_connects(self) -> None:
        """A client EOF that arrives before the upstream exists is replayed after its bytes."""
        h = Harness()
        client, _ct = h.connect_client()
        client.dataReceived(b"request")
        client.readConnectionLost()
        _up, ut = h.accept_upstream()
        self.assertEqual(ut.value(), b"request")
        self.assertTrue(ut.write_closed)


class CloseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.client, self.ct = self.h.connect_client()
        self.up, self.ut = self.h.accept_upstream()

    def test_client_loss_closes_upstream(self) -> None:
        """Losing the client closes the upstream gracefully, producer unregistered first."""
        self.client.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.ut.disconnecting)
        self.assertIsNone(self.ut.producer)

    def test_finishes_once_with_one_record(self) -> None:
        """A session emits exactly one access record, when both legs are gone."""
        self.client.dataReceived(b"12345")
        self.up.dataReceived(b"123")
        self.h.reactor.advance(0.045)
        self.client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.h.records(), [])
        self.up.connectionLost(Failure(ConnectionDone()))
        self.up.connectionLost(Failure(ConnectionDone()))
        [record] = self.h.records()
        self.assertEqual(
            (record.prefix, record.downstream, record.upstream, record.bytes_received,
             record.bytes_sent, record.duration_ms, record.flags),
            ("DIRECT", "127.0.0.1:50000", "db.egress.test:5432", 5, 3, 45, ()),
        )
        self.assertEqual(self.h.listener.active, 0)
        self.assertEqual(self.h.cluster.breaker.active, 0)

    def test_reset_flags_dc(self) -> None:
        """A client reset is flagged DC."""
        self.client.connectionLost(Failure(ConnectionLost()))
        self.up.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.h.records()[0].flags, ("DC",))

    def test_upstream_reset_flags_uc(self) -> None:
        """An upstream reset is flagged UC and closes the client."""
        self.up.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(self.ct.disconnecting)
        self.client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.h.records()[0].flags, ("UC",))

    def test_stuck_leg_aborted_after_linger(self) -> None:
        """A leg that does not finish closing after its partner left is aborted."""
        self.client.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(self.ut.disconnected)
        self.h.reactor.advance(30)
        self.assertTrue(self.ut.disconnected)
        self.up.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.h.reactor.getDelayedCalls(), [])


class UpstreamFailureTests(SynchronousTestCase):
    def test_refused_closes_client_with_uf(self) -> None:
        """A refused upstream closes the client promptly, flag UF."""
        h = Harness()
        client, ct = h.connect_client()
        refuse_newest(h)
        self.assertTrue(ct.disconnecting)
        client.connectionLost(Failure(ConnectionDone()))
        [record] = h.records()
        self.assertEqual((record.flags, record.upstream), (("UF",), "db.egress.test:5432"))
        self.assertEqual(h.cluster.connect_failures["refused"], 1)
        self.assertEqual(sum(h.cluster.connect_failures.values()), 1)
        self.assertEqual(h.cluster.breaker.pending, 0)
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_failover_to_next_endpoint(self) -> None:
        """A refused endpoint is followed by an attempt on the next one."""
        h = Harness(cluster_config(
            endpoints=(Address("a.egress.test", 5432), Address("b.egress.test", 6432)),
            max_connect_attempts=2,
        ), pins={"a.egress.test": "127.0.0.1", "b.egress.test": "127.0.0.2"})
        client, ct = h.connect_client()
        refuse_newest(h)
        self.assertEqual(h.reactor.tcpClients[-1][:2], ("127.0.0.2", 6432))
        self.assertFalse(ct.disconnecting)
        client.dataReceived(b"hello")
        _up, ut = h.accept_upstream()
        self.assertEqual(ut.value(), b"hello")
        self.assertEqual(client.session.upstream_name, "b.egress.test:6432")

    def test_round_robin(self) -> None:
        """Successive clients start at successive endpoints."""
        h = Harness(cluster_config(endpoints=(Address("127.0.0.1", 1), Address("127.0.0.2", 2))))
        h.connect_client()
        h.connect_client()
        self.assertEqual([c[:2] for c in h.reactor.tcpClients], [("127.0.0.1", 1), ("127.0.0.2", 2)])

    def test_attempts_are_bounded(self) -> None:
        """The proxy gives up after max_connect_attempts refusals."""
        h = Harness(cluster_config(max_connect_attempts=3))
        _client, ct = h.connect_client()
        for _ in range(3):
            self.assertFalse(ct.disconnecting)
            refuse_newest(h)
        self.assertTrue(ct.disconnecting)
        self.assertEqual(len(h.reactor.tcpClients), 3)

    def test_connect_timeout_flags_ut(self) -> None:
        """An upstream that never answers is abandoned after connect_timeout, flag UT."""
        h = Harness(cluster_config(connect_timeout=2.0))
        client, ct = h.connect_client()
        h.reactor.advance(1.9)
        self.assertFalse(ct.disconnecting)
        h.reactor.advance(0.2)
        self.assertTrue(ct.disconnecting)
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.records()[0].flags, ("UT",))
        self.assertEqual(h.cluster.breaker.pending, 0)

    def test_client_leaving_cancels_dial(self) -> None:
        """A client that leaves while the upstream connects cancels the dial and frees the slot."""
        h = Harness()
        client, _ct = h.connect_client()
        self.assertEqual(h.cluster.breaker.pending, 1)
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.cluster.breaker.pending, 0)
        self.assertEqual(len(h.records()), 1)
        self.assertEqual(h.reactor.getDelayedCalls(), [])


class LimitTests(SynchronousTestCase):
    def test_breaker_overflow_on_pending(self) -> None:
        """Past max_pending connects in progress, a new client is closed at once with UO."""
        h = Harness(cluster_config(max_pending=1))
        h.connect_client()
        client, ct = h.connect_client()
        self.assertTrue(ct.disconnecting)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.records()[0].flags, ("UO",))
        self.assertEqual(h.cluster.breaker.overflows, 1)

    def test_breaker_overflow_on_active(self) -> None:
        """Past max_connections active upstreams, a new client is closed at once with UO."""
        h = Harness(cluster_config(max_connections=1))
        h.connect_client()
        h.accept_upstream()
        _client, ct = h.connect_client()
        self.assertTrue(ct.disconnecting)
        self.assertEqual(len(h.reactor.tcpClients), 1)

    def test_listener_max_connections(self) -> None:
        """Past the listener's max_connections, a new client is refused without a dial."""
        h = Harness(listener=listener_config(max_connections=1))
        h.connect_client()
        client, ct = h.connect_client()
        self.assertTrue(ct.disconnecting)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.records()[0].flags, ("OM",))
        self.assertEqual({r: n for r, n in h.listener.rejected.items() if n}, {"max_connections": 1})

    def test_disallowed_source_refused_before_dial(self) -> None:
        """A peer outside allow_sources is closed before any upstream is dialled."""
        h = Harness(listener=listener_config(allow_sources=(ipaddress.ip_network("10.0.0.0/8"),)))
        client, ct = h.connect_client(IPv4Address("TCP", "127.0.0.1", 40000))
        self.assertTrue(ct.disconnecting)
        self.assertEqual(h.reactor.tcpClients, [])
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.records()[0].flags, ("RBAC",))
        self.assertEqual({r: n for r, n in h.listener.rejected.items() if n}, {"source": 1})

    def test_ipv4_mapped_source_matches_ipv4_cidr(self) -> None:
        """An IPv4 client on a dual-stack socket is matched against IPv4 CIDRs."""
        h = Harness(listener=listener_config(allow_sources=(ipaddress.ip_network("127.0.0.0/8"),)))
        _client, ct = h.connect_client(IPv6Address("TCP", "::ffff:127.0.0.1", 40000))
        self.assertFalse(ct.disconnecting)
        self.assertEqual(len(h.reactor.tcpClients), 1)

    def test_ipv6_peer_format(self) -> None:
        """IPv6 peers are written in brackets, IPv4-mapped ones as plain IPv4."""
        self.assertEqual(format_peer(IPv6Address("TCP", "fdaa:0:1::3", 63276)), "[fdaa:0:1::3]:63276")
        self.assertEqual(format_peer(IPv6Address("TCP", "::ffff:10.1.2.3", 5)), "10.1.2.3:5")


def tick(reactor, seconds: float, step: float = 0.5) -> None:  # type: ignore[no-untyped-def]
    """Advance the clock in small steps, as time passes for a real reactor."""
    for _ in range(int(round(seconds / step))):
        reactor.advance(step)


class IdleTimeoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(cluster_config(idle_timeout=10.0))
        self.client, self.ct = self.h.connect_client()
        self.up, self.ut = self.h.accept_upstream()

    def test_idle_session_aborted(self) -> None:
        """A session with no traffic for idle_timeout is aborted with flag DI."""
        tick(self.h.reactor, 9.5)
        self.assertFalse(self.ct.disconnected)
        tick(self.h.reactor, 0.5)
        self.assertTrue(self.ct.disconnected and self.ut.disconnected)
        self.client.connectionLost(Failure(ConnectionDone()))
        self.up.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.h.records()[0].flags, ("DI",))
        self.assertEqual(self.h.reactor.getDelayedCalls(), [])

    def test_traffic_keeps_session_open(self) -> None:
        """Traffic in either direction postpones the idle timeout."""
        for _ in range(8):
            tick(self.h.reactor, 5)
            self.up.dataReceived(b"notify")
        self.assertFalse(self.ct.disconnected)
        tick(self.h.reactor, 12.5)
        self.assertTrue(self.ct.disconnected)

    def test_no_idle_timeout_by_default(self) -> None:
        """Without idle_timeout, an idle session has no timer at all."""
        h = Harness()
        h.connect_client()
        h.accept_upstream()
        self.assertEqual(h.reactor.getDelayedCalls(), [])
