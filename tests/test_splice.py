"""Unit tests of the tcp-mode data path: sessions, splices, limits, timers.

The splice's guarantees (:class:`SpliceContract`) run four times: on
StringTransports, and in the service on real loopback sockets handed to the
compiled relay (``fast_path: relay``), on the Python fast path
(``fast_path: python``) and on Twisted's ordinary path (``fast_path: off``);
see ``tests/splicerig.py``.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from egressproxy.addresses import format_peer
from egressproxy.config import Address
from egressproxy.datapath.fastpath import FastPath
from egressproxy.datapath.splice import PENDING_LIMIT
from tests.helpers import Harness, cluster_config, listener_config
from tests.integration.proxy import inline
from tests.relaykit import relay_module
from tests.splicerig import HOLD_BOUND, LoopbackRig, MemoryRig, flood_payload

import ipaddress


def refuse_newest(harness: Harness) -> None:
    """Fail the newest recorded dial with ECONNREFUSED and let HostnameEndpoint report it."""
    connector = harness.reactor.connectors[-1]
    _host, _port, factory, _timeout, _bind = harness.reactor.tcpClients[-1]
    factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
    harness.reactor.advance(0.3)


class SpliceContract:
    """The splice's guarantees, run once per kind of transport (see tests/splicerig.py).

    A subclass sets ``rig(idle_timeout=None)``: a fresh rig on its transport kind.
    """

    rig: Callable[..., Any]

    # -- forwarding ------------------------------------------------------------

    @inline
    async def test_client_paused_until_upstream_connects(self) -> None:
        """The client leg is paused while the upstream connects and resumed after."""
        r = self.rig()
        await r.connect_client()
        self.assertFalse(r.reading("down"))
        await r.accept_upstream()
        await r.until(lambda: r.reading("down"), 5)

    @inline
    async def test_bytes_flow_both_ways(self) -> None:
        """Bytes from each side reach the other side unchanged."""
        r = self.rig()
        await r.connect_client()
        await r.accept_upstream()
        r.client_send(b"query")
        await r.upstream_got(b"query")
        r.upstream_send(b"reply")
        await r.client_got(b"reply")

    @inline
    async def test_preconnect_bytes_delivered_first(self) -> None:
        """Bytes a client sends before the upstream is connected are written first, in order."""
        r = self.rig()
        await r.connect_client()
        r.client_send(b"early-1 ")
        r.client_send(b"early-2 ")
        await r.accept_upstream()
        r.client_send(b"late")
        await r.upstream_got(b"early-1 early-2 late")

    @inline
    async def test_legs_are_each_others_producers(self) -> None:
        """Each transport is registered as the other's streaming producer."""
        r = self.rig()
        await r.connect_client()
        await r.accept_upstream()
        down_t, up_t = r.transports()
        self.assertIs(down_t.producer, up_t)
        self.assertIs(up_t.producer, down_t)
        for t in (down_t, up_t):  # tcp transports call it streamingProducer, StringTransport streaming
            self.assertTrue(getattr(t, "streamingProducer", getattr(t, "streaming", False)))

    @inline
    async def test_backpressure_from_client_pauses_upstream(self) -> None:
        """A client that stops reading pauses reading from the upstream; what the proxy holds stays bounded."""
        r = self.rig()
        await r.connect_client()
        await r.accept_upstream()
        await r.push_back("down")
        self.assertFalse(r.reading("up"))
        held = r.held("down")
        if held is not None:
            self.assertLessEqual(held, HOLD_BOUND, f"the proxy holds {held} bytes for a client that does not read")
        await r.release("down")
        await r.until(lambda: r.reading("up"), 10)
        await r.flood_delivered("down")

    @inline
    async def test_backpressure_from_upstream_pauses_client(self) -> None:
        """An upstream that stops reading pauses reading from the client; what the proxy holds stays bounded."""
        r = self.rig()
        await r.connect_client()
        await r.accept_upstream()
        await r.push_back("up")
        self.assertFalse(r.reading("down"))
        held = r.held("up")
        if held is not None:
            self.assertLessEqual(held, HOLD_BOUND, f"the proxy holds {held} bytes for an upstream that does not read")
        await r.release("up")
        await r.until(lambda: r.reading("down"), 10)
        await r.flood_delivered("up")

    @inline
    async def test_counts_bytes(self) -> None:
        """The session counts bytes received from and sent to downstream exactly."""
        r = self.rig()
        await r.connect_client()
        await r.accept_upstream()
        r.client_send(b"a" * 10)
        await r.upstream_got(b"a" * 10)
        r.client_send(b"b" * 5)
        await r.upstream_got(b"a" * 10 + b"b" * 5)
        r.upstream_send(b"c" * 7)
        await r.client_got(b"c" * 7)
        self.assertEqual((r.session.bytes_received, r.session.bytes_sent), (15, 7))
        self.assertEqual((r.listener.bytes_received, r.listener.bytes_sent), (15, 7))

    # -- splice filters (splice note 7) ----------------------------------------------

    @inline
    async def test_unfiltered_legs_forward_through_bare_write(self) -> None:
        """Without a filter, a leg's forward is the write itself: nothing per chunk to pay."""
        r = self.rig()
        await r.connect_client()
        await r.accept_upstream()
        for leg in (r.session.down, r.session.up):
            self.assertIsNone(leg.filter)
            self.assertIs(leg.forward, leg._write)

    @inline
    async def test_filter_sees_one_leg_only(self) -> None:
        """A filter on the client leg changes what reaches the upstream, not the replies; counts are of bytes read."""
        r = self.rig()
        await r.connect_client()
        await r.accept_upstream()
        r.session.down.set_filter(lambda data: data.upper())
        r.client_send(b"query")
        await r.upstream_got(b"QUERY")
        r.upstream_send(b"reply")
        await r.client_got(b"reply")
        self.assertEqual((r.session.bytes_received, r.session.bytes_sent), (5, 5))
        r.session.down.set_filter(None)
        self.assertIs(r.session.down.forward, r.session.down._write)
        r.client_send(b"more")
        await r.upstream_got(b"QUERYmore")

    @inline
    async def test_filter_set_before_splice_sees_held_bytes(self) -> None:
        """A filter set before the splice sees the held bytes too; dropping bytes keeps EOF and counts."""
        r = self.rig()
        await r.connect_client()
        kept = bytearray()

        def first_ten(data: bytes) -> bytes:
            out = data[:max(10 - len(kept), 0)]
            kept.extend(out)
            return out

        r.session.down.set_filter(first_ten)
        r.client_send(b"0123456")
        await r.accept_upstream()
        r.client_send(b"789abcdef")
        r.client_eof()
        await r.upstream_got(b"0123456789")
        await r.upstream_sees_eof()
        self.assertEqual(r.session.bytes_received, 16)

    # -- half-close --------------------------------------------------------------

    @inline
    async def test_client_eof_shuts_upstream_write_side(self) -> None:
        """EOF from the client becomes a write-side shutdown towards the upstream."""
        r = self.rig()
        await r.connect_client()
        await r.accept_upstream()
        r.client_eof()
        await r.upstream_sees_eof()
        _down_t, up_t = r.transports()
        self.assertFalse(up_t.disconnecting)
        self.assertIsNone(up_t.producer)

    @inline
    async def test_reply_flows_after_client_eof(self) -> None:
        """After the client's EOF, the upstream's reply still reaches the client."""
        r = self.rig()
        await r.connect_client()
        await r.accept_upstream()
        r.client_send(b"request")
        r.client_eof()
        await r.upstream_got(b"request")
        await r.upstream_sees_eof()
        r.upstream_send(b"late reply")
        await r.client_got(b"late reply")
        down_t, _up_t = r.transports()
        self.assertFalse(down_t.disconnecting)

    @inline
    async def test_upstream_eof_shuts_client_write_side(self) -> None:
        """EOF from the upstream becomes a write-side shutdown towards the client."""
        r = self.rig()
        await r.connect_client()
        await r.accept_upstream()
        r.upstream_eof()
        await r.client_sees_eof()
        down_t, _up_t = r.transports()
        self.assertFalse(down_t.disconnecting)
        r.client_send(b"still heard")
        await r.upstream_got(b"still heard")

    @inline
    async def test_both_eofs_close_both(self) -> None:
        """Once both sides have sent EOF, both connections are closed and the session ends."""
        r = self.rig()
        await r.connect_client()
        await r.accept_upstream()
        r.client_eof()
        await r.upstream_sees_eof()
        r.upstream_eof()
        await r.ended()
        self.assertTrue(r.session.down.lost and r.session.up.lost)

    @inline
    async def test_eof_before_upstream_connects(self) -> None:
        """A client EOF that arrives before the upstream exists is replayed after its bytes."""
        r = self.rig()
        await r.connect_client()
        r.client_send(b"request")
        r.client_eof()
        await r.accept_upstream()
        await r.upstream_got(b"request")
        await r.upstream_sees_eof()

    # -- closing -------------------------------------------------------------------

    @inline
    async def test_flushes_before_close(self) -> None:
        """What the upstream sent before its EOF reaches the client in full before the client's EOF."""
        r = self.rig()
        await r.connect_client()
        await r.accept_upstream()
        payload = flood_payload(1024 * 1024)
        r.upstream_send(payload)
        r.upstream_eof()
        await r.client_got(payload)
        await r.client_sees_eof()
        r.client_eof()
        await r.ended()
        [record] = r.records()
        self.assertEqual((record.bytes_received, record.bytes_sent, record.flags), (0, len(payload), ()))

    @inline
    async def test_finishes_once_with_one_record(self) -> None:
        """A session emits exactly one access record, with exact byte counts, when both legs are gone."""
        r = self.rig()
        await r.connect_client()
        await r.accept_upstream()
        r.client_send(b"12345")
        await r.upstream_got(b"12345")
        r.upstream_send(b"123")
        await r.client_got(b"123")
        r.client_eof()
        await r.upstream_sees_eof()
        self.assertEqual(r.records(), [])
        r.upstream_eof()
        await r.ended()
        [record] = r.records()
        self.assertEqual(
            (record.prefix, record.upstream.split(":")[-1] != "", record.bytes_received, record.bytes_sent, record.flags),
            (r.listener.config.log_prefix, True, 5, 3, ()),
        )
        self.assertEqual(r.listener.active, 0)
        self.assertEqual(r.listener.cluster.breaker.active, 0)

    @inline
    async def test_client_reset_closes_upstream_flags_dc(self) -> None:
        """A client reset closes the upstream and is flagged DC."""
        r = self.rig()
        await r.connect_client()
        await r.accept_upstream()
        r.client_reset()
        await r.upstream_sees_eof()
        await r.ended()
        self.assertEqual(r.records()[0].flags, ("DC",))

    @inline
    async def test_upstream_reset_flags_uc(self) -> None:
        """An upstream reset is flagged UC and closes the client."""
        r = self.rig()
        await r.connect_client()
        await r.accept_upstream()
        r.upstream_reset()
        await r.client_sees_eof()
        await r.ended()
        self.assertEqual(r.records()[0].flags, ("UC",))

    # -- idle timeout -----------------------------------------------------------------

    @inline
    async def test_idle_session_aborted(self) -> None:
        """A session with no traffic for idle_timeout is aborted with flag DI, not before."""
        r = self.rig(idle_timeout=self.rig.idle)  # type: ignore[attr-defined]
        await r.connect_client()
        await r.accept_upstream()
        await r.elapse(0.8 * r.idle)
        self.assertFalse(r.session.finished)
        await r.until(lambda: r.session.finished, 1.0 * r.idle)
        self.assertEqual(r.records()[0].flags, ("DI",))

    @inline
    async def test_traffic_keeps_session_open(self) -> None:
        """Traffic in either direction postpones the idle timeout."""
        r = self.rig(idle_timeout=self.rig.idle)  # type: ignore[attr-defined]
        await r.connect_client()
        await r.accept_upstream()
        for i in range(8):
            await r.elapse(0.5 * r.idle)
            r.upstream_send(b"notify")
            await r.client_got(b"notify" * (i + 1))
        self.assertFalse(r.session.finished)
        await r.until(lambda: r.session.finished, 1.5 * r.idle)
        self.assertEqual(r.records()[0].flags, ("DI",))

    @inline
    async def test_no_idle_timeout_by_default(self) -> None:
        """Without idle_timeout, a spliced session has no timer at all."""
        r = self.rig()
        await r.connect_client()
        await r.accept_upstream()
        self.assertEqual([t for t in r.session._timers if t.active()], [])


class MemorySpliceTests(SpliceContract, TestCase):
    """The splice on StringTransports (MemoryReactorClock)."""

    def rig(self, idle_timeout: float | None = None) -> MemoryRig:
        return MemoryRig(self, idle_timeout)

    rig.idle = MemoryRig.idle  # type: ignore[attr-defined]


class LoopbackRelaySpliceTests(SpliceContract, TestCase):
    """The splice in the service on real loopback sockets, handed to the compiled relay.

    Three of the contract's tests look at how Python joins the legs; here
    they check what the relay does instead (each says how).
    """

    def setUp(self) -> None:
        relay_module()  # a skip saying why, or a failure with EGRESSPROXY_TEST_DATA_PATH=relay

    def rig(self, idle_timeout: float | None = None) -> LoopbackRig:
        return LoopbackRig(self, "relay", idle_timeout)

    rig.idle = LoopbackRig.idle  # type: ignore[attr-defined]

    @inline
    async def test_legs_are_each_others_producers(self) -> None:
        """Instead of producers: Twisted let go of both sockets (neither polled, the transports replaced)."""
        from egressproxy.datapath.relayjoin import DetachedTransport

        r = self.rig()
        await r.connect_client()
        await r.accept_upstream()  # checks neither transport is a reader or writer any more
        self.assertTrue(r.relayed)
        for transport in r.transports():
            # Twisted's transport (and its socket object) is gone: a stand-in without a socket is left.
            self.assertIsInstance(transport, DetachedTransport)
            self.assertIsNone(transport.getHandle())
            self.assertIsNone(transport.producer)

    @inline
    async def test_unfiltered_legs_forward_through_bare_write(self) -> None:
        """Without a filter, no Python runs per chunk at all: the relay carries the pair and counts it."""
        r = self.rig()
        await r.connect_client()
        await r.accept_upstream()
        self.assertTrue(r.relayed)
        r.client_send(b"query")
        await r.upstream_got(b"query")
        self.assertEqual(r.session._relay.counts(r.session._handle), (5, 0))

    @inline
    async def test_filter_sees_one_leg_only(self) -> None:
        """A filter (set before the splice, as modes do) keeps the pair in Python, where it sees one leg only."""
        r = self.rig()
        await r.connect_client()
        r.session.down.set_filter(lambda data: data.upper())
        await r.accept_upstream()  # checks it was not relayed
        r.client_send(b"query")
        await r.upstream_got(b"QUERY")
        r.upstream_send(b"reply")
        await r.client_got(b"reply")
        self.assertEqual((r.session.bytes_received, r.session.bytes_sent), (5, 5))
        r.session.down.set_filter(None)
        self.assertIs(r.session.down.forward, r.session.down._write)
        r.client_send(b"more")
        await r.upstream_got(b"QUERYmore")


class LoopbackFastSpliceTests(SpliceContract, TestCase):
    """The splice in the service on real loopback sockets, on the Python fast path (``fast_path: python``)."""

    def setUp(self) -> None:
        if FastPath().check(reactor):
            raise SkipTest(f"the fast path cannot run here: {FastPath().check(reactor)}")

    def rig(self, idle_timeout: float | None = None) -> LoopbackRig:
        return LoopbackRig(self, "python", idle_timeout)

    rig.idle = LoopbackRig.idle  # type: ignore[attr-defined]


class LoopbackOrdinarySpliceTests(SpliceContract, TestCase):
    """The splice in the service on real loopback sockets, ``fast_path: off``."""

    def rig(self, idle_timeout: float | None = None) -> LoopbackRig:
        return LoopbackRig(self, "off", idle_timeout)

    rig.idle = LoopbackRig.idle  # type: ignore[attr-defined]


class MemoryOnlyTests(SynchronousTestCase):
    """What only the clock and StringTransports can show exactly."""

    def setUp(self) -> None:
        self.h = Harness()

    def test_preconnect_limit(self) -> None:
        """A client delivering more than PENDING_LIMIT before connecting is dropped."""
        client, ct = self.h.connect_client()
        client.dataReceived(b"x" * (PENDING_LIMIT + 1))
        self.assertTrue(ct.disconnecting)

    def test_client_loss_closes_upstream(self) -> None:
        """Losing the client closes the upstream gracefully, producer unregistered first."""
        client, _ct = self.h.connect_client()
        _up, ut = self.h.accept_upstream()
        client.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(ut.disconnecting)
        self.assertIsNone(ut.producer)

    def test_record_duration(self) -> None:
        """The record's duration runs from accept to the second leg's loss."""
        client, _ct = self.h.connect_client()
        up, _ut = self.h.accept_upstream()
        client.dataReceived(b"12345")
        up.dataReceived(b"123")
        self.h.reactor.advance(0.045)
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.h.records(), [])
        up.connectionLost(Failure(ConnectionDone()))
        up.connectionLost(Failure(ConnectionDone()))
        [record] = self.h.records()
        self.assertEqual(
            (record.prefix, record.downstream, record.upstream, record.bytes_received,
             record.bytes_sent, record.duration_ms, record.flags),
            ("DIRECT", "127.0.0.1:50000", "db.egress.test:5432", 5, 3, 45, ()),
        )

    def test_stuck_leg_aborted_after_linger(self) -> None:
        """A leg that does not finish closing after its partner left is aborted."""
        client, _ct = self.h.connect_client()
        up, ut = self.h.accept_upstream()
        client.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(ut.disconnected)
        self.h.reactor.advance(30)
        self.assertTrue(ut.disconnected)
        up.connectionLost(Failure(ConnectionDone()))
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
