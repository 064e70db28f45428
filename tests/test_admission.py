"""Admission per source: ``max_connections_per_source`` on a listener (issue 11, item 4).

Clients are StringTransports on a MemoryReactorClock (``tests.helpers.Harness``):
the peer address each one is given is the source the listener counts.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.datapath.listener import REJECT_REASONS
from egressproxy.datapath.proxyprotocol import HEADER_TIMEOUT
from tests.helpers import Harness, cluster_config, listener_config


def peer(host: str, port: int = 40000) -> IPv4Address | IPv6Address:
    return IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)


def end(leg) -> None:  # type: ignore[no-untyped-def]
    """A leg's connection goes away cleanly (what the reactor reports after a close)."""
    leg.connectionLost(Failure(ConnectionDone()))


def rejected(h: Harness) -> dict[str, int]:
    return {reason: n for reason, n in h.listener.rejected.items() if n}


class PerSourceTests(SynchronousTestCase):
    def test_default_is_half_of_max_connections(self) -> None:
        """Without the key, one source may hold half the listener (at least 1)."""
        self.assertEqual(listener_config(max_connections=10000).max_connections_per_source, 5000)
        self.assertEqual(listener_config(max_connections=7).max_connections_per_source, 3)
        self.assertEqual(listener_config(max_connections=1).max_connections_per_source, 1)

    def test_known_reason_exported_at_zero(self) -> None:
        """max_connections_per_source is a known reason: counted from zero before the first refusal."""
        self.assertIn("max_connections_per_source", REJECT_REASONS)
        self.assertEqual(Harness().listener.rejected["max_connections_per_source"], 0)

    def test_source_at_cap_refused_before_dial(self) -> None:
        """The source's next connection past the cap is closed (OM) without a dial; others still get in."""
        h = Harness(listener=listener_config(max_connections=100, max_connections_per_source=2))
        for port in (1, 2):
            _client, ct = h.connect_client(peer("192.0.2.1", port))
            self.assertFalse(ct.disconnecting)
        self.assertEqual(len(h.reactor.tcpClients), 2)
        third, third_transport = h.connect_client(peer("192.0.2.1", 3))
        self.assertTrue(third_transport.disconnecting)
        self.assertEqual(len(h.reactor.tcpClients), 2)
        _other, other_transport = h.connect_client(peer("192.0.2.2", 1))
        self.assertFalse(other_transport.disconnecting)
        self.assertEqual(len(h.reactor.tcpClients), 3)
        end(third)
        [record] = h.records()
        self.assertEqual((record.downstream, record.flags), ("192.0.2.1:3", ("OM",)))
        self.assertEqual(rejected(h), {"max_connections_per_source": 1})
        self.assertEqual(h.listener.per_source, {
            ipaddress.ip_address("192.0.2.1"): 2, ipaddress.ip_address("192.0.2.2"): 1,
        })
        self.assertEqual((h.listener.connections_total, h.listener.active), (4, 3))

    def test_room_again_after_a_session_ends(self) -> None:
        """Once one of its sessions ends, the source may connect again."""
        h = Harness(listener=listener_config(max_connections_per_source=1))
        first, _ = h.connect_client(peer("192.0.2.1", 1))
        _, refused = h.connect_client(peer("192.0.2.1", 2))
        self.assertTrue(refused.disconnecting)
        end(first)  # before its upstream connected: the dial is cancelled
        _, again = h.connect_client(peer("192.0.2.1", 3))
        self.assertFalse(again.disconnecting)

    def test_max_connections_checked_first(self) -> None:
        """A full listener refuses with reason max_connections, whatever the source holds."""
        h = Harness(listener=listener_config(max_connections=2, max_connections_per_source=2))
        h.connect_client(peer("192.0.2.1", 1))
        h.connect_client(peer("192.0.2.2", 1))
        client, ct = h.connect_client(peer("192.0.2.3", 1))
        self.assertTrue(ct.disconnecting)
        end(client)
        self.assertEqual(rejected(h), {"max_connections": 1})

    def test_ipv4_mapped_counts_as_ipv4(self) -> None:
        """A dual-stack socket's ::ffff:a.b.c.d and a plain a.b.c.d are one source."""
        h = Harness(listener=listener_config(max_connections_per_source=1))
        h.connect_client(peer("192.0.2.1"))
        _client, ct = h.connect_client(peer("::ffff:192.0.2.1"))
        self.assertTrue(ct.disconnecting)

    def test_disallowed_source_not_counted(self) -> None:
        """A source refused by allow_sources takes no place in the count."""
        h = Harness(listener=listener_config(
            max_connections_per_source=1, allow_sources=(ipaddress.ip_network("10.0.0.0/8"),)))
        client, ct = h.connect_client(peer("192.0.2.1"))
        self.assertTrue(ct.disconnecting)
        end(client)
        self.assertEqual((rejected(h), h.listener.per_source), ({"source": 1}, {}))

    def test_unix_peers_not_counted(self) -> None:
        """Peers without an IP address (a unix socket) are not counted per source: they would all look alike."""
        h = Harness(listener=listener_config(max_connections=10, max_connections_per_source=1))
        for _ in range(3):
            _client, ct = h.connect_client(UNIXAddress(b"/run/egress.sock"))  # type: ignore[arg-type]
            self.assertFalse(ct.disconnecting)
        self.assertEqual((h.listener.active, h.listener.per_source), (3, {}))

    def test_reload_lowers_cap_for_new_connections_only(self) -> None:
        """A lower cap after a reload refuses new connections; live ones stay and still count."""
        h = Harness(listener=listener_config(max_connections_per_source=3))
        clients = [h.connect_client(peer("192.0.2.1", p)) for p in (1, 2)]
        h.listener.config = listener_config(max_connections_per_source=1)
        _client, ct = h.connect_client(peer("192.0.2.1", 3))
        self.assertTrue(ct.disconnecting)
        self.assertTrue(all(not transport.disconnecting for _, transport in clients))
        for client, _ in clients:
            end(client)
        self.assertEqual(h.listener.per_source, {})

    def test_no_leak_whatever_the_ending(self) -> None:
        """Thousands of sessions opened and closed every way leave the per-source dict empty.

        Endings: refused at the cap, refused by max_connections, closed and
        reset while dialling, closed after the splice, aborted, and a dial
        that times out (UT).
        """
        h = Harness(
            cluster=cluster_config(connect_timeout=2.0, max_connections=100000, max_pending=100000),
            listener=listener_config(max_connections=100, max_connections_per_source=15),
        )
        sources = [f"198.51.100.{i}" for i in range(1, 11)] + [f"2001:db8::{i:x}" for i in range(1, 11)]
        for round_ in range(5):
            admitted = []
            for i in range(400):
                # Every other connection comes from one busy source.
                source = sources[0] if i % 2 == 0 else sources[i % len(sources)]
                client, ct = h.connect_client(peer(source, 1000 + i))
                if ct.disconnecting:
                    end(client)  # refused: never admitted
                    continue
                fate = (len(admitted) + round_) % 5
                up = h.accept_upstream()[0] if fate == 2 else None
                admitted.append((fate, client, up))
            self.assertEqual(max(h.listener.per_source.values()), 15)
            self.assertEqual(sum(h.listener.per_source.values()), h.listener.active)
            for fate, client, up in admitted:
                if fate == 0:
                    end(client)  # closed while dialling
                elif fate == 1:
                    client.connectionLost(Failure(ConnectionLost()))  # reset while dialling
                elif fate == 2:
                    end(client)  # spliced: the client leaves, then the upstream
                    end(up)
                elif fate == 3:
                    client.session.abort()
                    end(client)
            h.reactor.advance(2.0)  # the rest time out dialling (UT) and are closed
            for fate, client, _up in admitted:
                if fate == 4:
                    self.assertTrue(client.transport.disconnecting)
                    end(client)
            self.assertEqual((h.listener.per_source, h.listener.sessions), ({}, set()))
        self.assertGreater(h.listener.rejected["max_connections_per_source"], 0)
        self.assertGreater(h.listener.rejected["max_connections"], 0)
        self.assertEqual(len(h.records()), h.listener.connections_total)
        self.assertEqual({r.flags for r in h.records()}, {(), ("OM",), ("DC",), ("UT",)})


class ProxyProtocolSourceTests(SynchronousTestCase):
    """On a proxy_protocol listener the header's source is what is counted."""

    BALANCER = IPv6Address("TCP", "fdaa:0:1::2", 61000)

    @staticmethod
    def header(source: str, sport: int) -> bytes:
        return f"PROXY TCP4 {source} 10.0.0.1 {sport} 5432\r\n".encode()

    def test_counted_by_header_source(self) -> None:
        """Many clients behind one balancer: the cap applies to each header source, not to the balancer."""
        h = Harness(listener=listener_config(proxy_protocol=True, max_connections_per_source=2))
        outcomes = []
        for source, sport in (("203.0.113.7", 1), ("203.0.113.7", 2), ("203.0.113.8", 3), ("203.0.113.7", 4)):
            client, ct = h.connect_client(self.BALANCER)
            client.dataReceived(self.header(source, sport))
            outcomes.append(ct.disconnecting)
        self.assertEqual(outcomes, [False, False, False, True])
        self.assertEqual(rejected(h), {"max_connections_per_source": 1})
        self.assertEqual(h.listener.per_source, {
            ipaddress.ip_address("203.0.113.7"): 2, ipaddress.ip_address("203.0.113.8"): 1,
        })

    def test_awaiting_header_not_counted_and_closed_at_timeout(self) -> None:
        """5,000 sockets from one peer that never send a header hold no per-source place and are closed at HEADER_TIMEOUT.

        Before its header a connection has no source yet (its peer is the
        balancer every client shares), so it is not counted per source;
        HEADER_TIMEOUT bounds how long it holds its descriptor.
        """
        h = Harness(listener=listener_config(proxy_protocol=True, max_connections_per_source=2))
        idle = [h.connect_client(self.BALANCER) for _ in range(5000)]
        self.assertEqual((len(h.listener.awaiting), h.listener.per_source), (5000, {}))
        client, ct = h.connect_client(self.BALANCER)
        client.dataReceived(self.header("203.0.113.7", 1))
        self.assertFalse(ct.disconnecting)  # a real client still gets in meanwhile
        h.reactor.advance(HEADER_TIMEOUT)
        self.assertTrue(all(transport.disconnecting for _, transport in idle))
        for leg, _ in idle:
            end(leg)
        self.assertEqual(len(h.listener.awaiting), 0)
        self.assertEqual(h.listener.rejected["proxy_protocol"], 5000)
        self.assertEqual(h.listener.per_source, {ipaddress.ip_address("203.0.113.7"): 1})

    def test_refused_header_leaves_no_count(self) -> None:
        """Connections that end before or at their header (bad header, EOF, reset) leave the dict empty."""
        h = Harness(listener=listener_config(proxy_protocol=True, max_connections_per_source=1))
        bad, _ = h.connect_client(self.BALANCER)
        bad.dataReceived(b"GET / HTTP/1.1\r\n")
        end(bad)
        early, _ = h.connect_client(self.BALANCER)
        early.dataReceived(b"PROXY")
        early.connectionLost(Failure(ConnectionLost()))
        admitted, _ = h.connect_client(self.BALANCER)
        admitted.dataReceived(self.header("203.0.113.7", 1))
        self.assertEqual(h.listener.per_source, {ipaddress.ip_address("203.0.113.7"): 1})
        end(admitted)
        self.assertEqual(h.listener.per_source, {})
