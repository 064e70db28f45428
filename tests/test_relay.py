"""The compiled relay (``egressproxy._relay``) on its own, over real sockets.

Each test relays real loopback TCP connections (or, for the thousand-pair
test, socketpairs) with a ``Relay`` of its own and checks one guarantee of
the data path: exact counts both ways, the backpressure bound, half-close in
each direction, resets, the two closes (abort: idle timeout and drain
deadline; graceful: flush then FIN, bounded by linger), the bytes owed from
before the hand-off, and many pairs at once.  The service's use of it is
tested in ``tests/test_relay_service.py`` and the splice contract
(``tests/test_splice.py``).
"""

from __future__ import annotations

import hashlib
import socket
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.relaykit import (
    Relayed, exchange, flood, pattern, recv_all, recv_eof, relay_module, reset, wait_ended,
)

MB = 1024 * 1024


class RelayTestCase(SynchronousTestCase):
    """A fresh relay per test, closed at cleanup."""

    linger = 30.0

    def setUp(self) -> None:
        self.module = relay_module()
        self.relay = self.module.Relay(linger=self.linger)
        self.addCleanup(self.relay.close)

    def pair(self, **add: object) -> Relayed:
        p = Relayed(self.relay, **add)
        self.addCleanup(p.close)
        return p


class CountsAndOrderTests(RelayTestCase):
    def test_exact_counts_50mb_each_way(self) -> None:
        """50 MB each way at once arrive intact and in order; the counts are exact, live and at the end."""
        p = self.pair()
        up, down = pattern(50 * MB, 1), pattern(50 * MB, 2)
        at_client, at_server = exchange(p.client, p.server, up, down)
        self.assertEqual(at_server, hashlib.sha256(up).hexdigest())
        self.assertEqual(at_client, hashlib.sha256(down).hexdigest())
        self.assertEqual(self.relay.counts(p.handle), (len(up), len(down)))
        self.assertEqual(self.relay.held(p.handle), (0, 0))
        p.client.shutdown(socket.SHUT_WR)
        p.server.shutdown(socket.SHUT_WR)
        [(cookie, a_to_b, b_to_a, reason)] = wait_ended(self.relay)
        self.assertEqual((cookie, a_to_b, b_to_a, reason), (p, len(up), len(down), "eof"))
        self.assertRaises(KeyError, self.relay.counts, p.handle)
        self.assertEqual(len(self.relay), 0)

    def test_owed_bytes_go_first(self) -> None:
        """Bytes handed over at add() reach each side before anything read later, in order."""

        class Early(Relayed):
            def before_add(self, a: socket.socket, b: socket.socket) -> None:
                # Already in the kernel before the relay exists: read after the owed bytes were sent.
                self.client.sendall(b"early-from-client;")
                self.server.sendall(b"early-from-server;")

        p = Early(self.relay, to_a=b"owed-to-client;", to_b=b"owed-to-server;")
        self.addCleanup(p.close)
        p.client.sendall(b"late")
        p.server.sendall(b"late")
        self.assertEqual(recv_all(p.server, 37), b"owed-to-server;early-from-client;late")
        self.assertEqual(recv_all(p.client, 37), b"owed-to-client;early-from-server;late")
        self.assertEqual(self.relay.counts(p.handle), (22, 22))  # the owed bytes are not counted again

    def test_big_owed_buffer_and_eof_already_read(self) -> None:
        """A large owed buffer (past the buffer size) is delivered whole; an EOF read before becomes the FIN after it."""
        owed = pattern(4 * MB, 3)
        p = self.pair(to_b=owed, eof_a=True)
        self.assertEqual(recv_eof(p.server, timeout=20), owed)
        p.server.sendall(b"reply")
        self.assertEqual(recv_all(p.client, 5), b"reply")
        p.server.close()
        self.assertEqual(recv_eof(p.client), b"")
        [(_, a_to_b, b_to_a, reason)] = wait_ended(self.relay)
        self.assertEqual((a_to_b, b_to_a, reason), (0, 5, "eof"))


class BackpressureTests(RelayTestCase):
    def check_direction(self, reader_is_server: bool) -> None:
        p = self.pair()
        sender, reader = (p.client, p.server) if reader_is_server else (p.server, p.client)
        toward = 0 if reader_is_server else 1
        sent = flood(sender)
        counts = self.relay.counts(p.handle)[toward]
        time.sleep(0.3)
        self.assertEqual(self.relay.counts(p.handle)[toward], counts, "the relay kept reading a stalled flow")
        held = self.relay.held(p.handle)[toward]
        self.assertLessEqual(held, self.relay.buffer_size, f"the relay holds {held} bytes for a reader that does not read")
        self.assertLess(counts, sent, "everything was read: the kernel buffers did not fill")
        # The reader starts again: every byte arrives, and the count is exact.
        self.assertEqual(len(recv_all(reader, sent, timeout=30)), sent)
        self.assertEqual(self.relay.counts(p.handle)[toward], sent)
        # The relay stores what it holds after its send returns, and the
        # reader may already have the bytes by then: wait a moment for it.
        for _ in range(500):  # bounded: 5 s
            if not self.relay.held(p.handle)[toward]:
                break
            time.sleep(0.01)
        self.assertEqual(self.relay.held(p.handle)[toward], 0)

    def test_server_not_reading_stops_reads_from_client(self) -> None:
        """A server that does not read: the relay stops reading the client, holding at most one buffer."""
        self.check_direction(reader_is_server=True)

    def test_client_not_reading_stops_reads_from_server(self) -> None:
        """A client that does not read: the relay stops reading the server, holding at most one buffer."""
        self.check_direction(reader_is_server=False)


class HalfCloseTests(RelayTestCase):
    def test_client_eof_then_replies_flow(self) -> None:
        """Client EOF: the server sees EOF after the client's bytes, and its replies still reach the client."""
        p = self.pair()
        p.client.sendall(b"request")
        p.client.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_eof(p.server), b"request")
        p.server.sendall(b"late reply")
        self.assertEqual(recv_all(p.client, 10), b"late reply")
        self.assertEqual(len(self.relay), 1, "a half-closed pair is still live")
        p.server.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_eof(p.client), b"")
        [(_, a_to_b, b_to_a, reason)] = wait_ended(self.relay)
        self.assertEqual((a_to_b, b_to_a, reason), (7, 10, "eof"))

    def test_server_eof_then_requests_flow(self) -> None:
        """Server EOF: the client sees EOF after the server's bytes, and its bytes still reach the server."""
        p = self.pair()
        p.server.sendall(b"banner")
        p.server.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_eof(p.client), b"banner")
        p.client.sendall(b"still heard")
        self.assertEqual(recv_all(p.server, 11), b"still heard")
        p.client.close()
        self.assertEqual(recv_eof(p.server), b"")
        [(_, a_to_b, b_to_a, reason)] = wait_ended(self.relay)
        self.assertEqual((a_to_b, b_to_a, reason), (11, 6, "eof"))


class ResetTests(RelayTestCase):
    def test_client_reset(self) -> None:
        """A client reset ends the pair as reset_a; the server gets what was owed, then a FIN."""
        p = self.pair()
        p.client.sendall(b"last words")
        self.assertEqual(recv_all(p.server, 10), b"last words")
        reset(p.client)
        self.assertEqual(recv_eof(p.server), b"")
        [(_, a_to_b, _, reason)] = wait_ended(self.relay)
        self.assertEqual((a_to_b, reason), (10, "reset_a"))

    def test_server_reset(self) -> None:
        """A server reset ends the pair as reset_b and closes the client."""
        p = self.pair()
        reset(p.server)
        self.assertEqual(recv_eof(p.client), b"")
        [(_, _, _, reason)] = wait_ended(self.relay)
        self.assertEqual(reason, "reset_b")

    def test_reset_while_pushed_back(self) -> None:
        """A reset is seen even while the relay is not reading that side (its peer does not read)."""
        p = self.pair()
        flood(p.server)
        self.assertGreater(self.relay.held(p.handle)[1], 0)
        reset(p.client)
        [(_, _, _, reason)] = wait_ended(self.relay)
        self.assertEqual(reason, "reset_a")

    def test_reset_after_eof_is_not_abrupt(self) -> None:
        """A reset after an EOF is how many peers finish: error_b, not reset_b."""
        p = self.pair()
        p.client.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_eof(p.server), b"")
        reset(p.server)
        [(_, _, _, reason)] = wait_ended(self.relay)
        self.assertEqual(reason, "error_b")


class CloseTests(RelayTestCase):
    linger = 0.5

    def test_abort_resets_both(self) -> None:
        """close_pair(graceful=False) (idle timeout, drain deadline): both peers see a reset at once."""
        p = self.pair()
        p.client.sendall(b"abc")
        self.assertEqual(recv_all(p.server, 3), b"abc")
        self.relay.close_pair(p.handle, False)
        for peer in (p.client, p.server):
            with self.assertRaises(ConnectionResetError):
                recv_eof(peer)
        [(_, a_to_b, b_to_a, reason)] = wait_ended(self.relay)
        self.assertEqual((a_to_b, b_to_a, reason), (3, 0, "aborted"))

    def test_graceful_close_flushes_then_fin(self) -> None:
        """close_pair(graceful=True): what was read is delivered, then each side gets a FIN."""
        p = self.pair()
        payload = pattern(64 * MB, 4)
        sent = flood(p.server, payload=payload)
        self.assertGreater(self.relay.held(p.handle)[1], 0, "the relay holds nothing for the client")
        self.relay.close_pair(p.handle, True)
        got = recv_eof(p.client, timeout=20)
        read = self.relay_ended_counts()
        self.assertEqual(len(got), read[1])
        self.assertEqual(got, payload[:len(got)])
        self.assertLessEqual(len(got), sent)

    def relay_ended_counts(self) -> tuple[int, int]:
        [(_, a_to_b, b_to_a, reason)] = wait_ended(self.relay)
        self.assertEqual(reason, "closed")
        return a_to_b, b_to_a

    def test_graceful_close_bounded_by_linger(self) -> None:
        """A peer that never reads cannot hold a graceful close past linger: it is aborted then."""
        p = self.pair()
        flood(p.server)
        self.assertGreater(self.relay.held(p.handle)[1], 0, "the relay holds nothing for the client")
        started = time.monotonic()
        self.relay.close_pair(p.handle, True)
        [(_, _, _, reason)] = wait_ended(self.relay, timeout=5)
        self.assertEqual(reason, "closed")
        self.assertGreaterEqual(time.monotonic() - started, self.linger * 0.9)

    def test_close_stops_the_thread_and_aborts_live_pairs(self) -> None:
        """Relay.close(): live pairs end as 'stopped', their sockets closed; no new pair is taken."""
        p = self.pair()
        self.relay.close()
        self.assertTrue(self.relay.closed)
        [(cookie, _, _, reason)] = self.relay.ended()
        self.assertEqual((cookie, reason), (p, "stopped"))
        with self.assertRaises(ConnectionResetError):
            recv_eof(p.client)
        self.assertRaises(ValueError, Relayed, self.relay)


class ManyPairsTests(RelayTestCase):
    def test_thousand_pairs(self) -> None:
        """1,000 pairs added at once each carry a message both ways and all end, within bounded time."""
        started = time.monotonic()
        pairs = [Relayed(self.relay, unix=True) for _ in range(1000)]
        for p in pairs:
            self.addCleanup(p.close)
        self.assertEqual(len(self.relay), 1000)
        for i, p in enumerate(pairs):
            p.client.sendall(b"ping %d" % i)
            p.server.sendall(b"pong %d" % i)
        for i, p in enumerate(pairs):
            self.assertEqual(recv_all(p.server, len(b"ping %d" % i)), b"ping %d" % i)
            self.assertEqual(recv_all(p.client, len(b"pong %d" % i)), b"pong %d" % i)
            p.client.shutdown(socket.SHUT_WR)
            p.server.shutdown(socket.SHUT_WR)
        ended = wait_ended(self.relay, 1000, timeout=30)
        self.assertEqual({reason for *_, reason in ended}, {"eof"})
        self.assertEqual({id(cookie) for cookie, *_ in ended}, {id(p) for p in pairs})
        self.assertEqual(len(self.relay), 0)
        self.assertLess(time.monotonic() - started, 30)
