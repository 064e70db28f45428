"""The STUN client and the egress-address watch: real UDP on loopback, a STUN server of the test's own."""

from __future__ import annotations

from typing import Any

from aioice import stun
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from egressproxy.observe.egressip import EgressIpWatch, ProbeFailed, binding_request, mapped_address, probe


def response(transaction_id: bytes, address: str, xor: bool = True, port: int = 40000) -> bytes:
    name = "XOR-MAPPED-ADDRESS" if xor else "MAPPED-ADDRESS"
    message = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, transaction_id, {name: (address, port)})
    return bytes(message)


class StunServer(DatagramProtocol):
    """Answers Binding requests with ``address`` (changeable), after ignoring the first ``drop`` requests."""

    def __init__(self, address: str, drop: int = 0) -> None:
        self.address = address
        self.drop = drop
        self.requests = 0

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.requests += 1
        if self.requests <= self.drop:
            return
        request = stun.parse_message(data)
        self.transport.write(b"garbage", addr)  # noise first: must be ignored
        self.transport.write(response(request.transaction_id, self.address), addr)


class MessageTests(SynchronousTestCase):
    def test_xor_and_plain(self) -> None:
        data, tid = binding_request()
        self.assertEqual(len(data), 20)
        self.assertEqual(mapped_address(response(tid, "203.0.113.7"), tid), "203.0.113.7")
        self.assertEqual(mapped_address(response(tid, "2001:db8::7", xor=False), tid), "2001:db8::7")

    def test_wrong_transaction_or_kind(self) -> None:
        _, tid = binding_request()
        _, other = binding_request()
        self.assertIsNone(mapped_address(response(other, "203.0.113.7"), tid))
        request = bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST, tid))
        self.assertIsNone(mapped_address(request, tid))

    @given(st.binary(max_size=120))
    @settings(max_examples=500, deadline=None)
    def test_random_bytes_never_raise(self, data: bytes) -> None:
        _, tid = binding_request()
        self.assertIsNone(mapped_address(data, tid))


class ProbeTests(TestCase):
    def serve(self, address: str, drop: int = 0) -> tuple[StunServer, int]:
        server = StunServer(address, drop)
        port = reactor.listenUDP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return server, port.getHost().port

    @defer.inlineCallbacks
    def test_probe(self) -> Any:
        """A probe learns the mapped address; noise before the answer is ignored."""
        _, port = self.serve("203.0.113.7")
        seen = yield defer.ensureDeferred(probe(reactor, "127.0.0.1", port))
        self.assertEqual(seen, "203.0.113.7")

    @defer.inlineCallbacks
    def test_retransmits(self) -> Any:
        """A lost request is sent again (0.5 s later) and the second answer counts."""
        server, port = self.serve("203.0.113.8", drop=1)
        seen = yield defer.ensureDeferred(probe(reactor, "127.0.0.1", port))
        self.assertEqual((seen, server.requests), ("203.0.113.8", 2))

    @defer.inlineCallbacks
    def test_silence_fails(self) -> Any:
        """A server that never answers fails the probe, bounded in time."""
        _, port = self.serve("203.0.113.9", drop=100)
        with self.assertRaises(ProbeFailed):
            yield defer.ensureDeferred(probe(reactor, "127.0.0.1", port))

    @defer.inlineCallbacks
    def test_watch_turns_ready_when_address_changes(self) -> Any:
        """Not ready while the seen address is unexpected; ready after it changes to an expected one."""
        server, port = self.serve("203.0.113.7")
        changes: list[tuple[str | None, bool]] = []
        watch = EgressIpWatch(reactor, [("127.0.0.1", port)], frozenset({"203.0.113.50"}), 60,
                              on_change=lambda w: changes.append((w.seen, w.ready)))
        self.assertFalse(watch.ready)
        yield defer.ensureDeferred(watch.check())
        self.assertFalse(watch.ready)
        self.assertIn("203.0.113.7 is not in expected_egress_ips", watch.reason())
        server.address = "203.0.113.50"
        yield defer.ensureDeferred(watch.check())
        self.assertTrue(watch.ready)
        yield defer.ensureDeferred(watch.check())
        self.assertEqual(changes, [("203.0.113.7", False), ("203.0.113.50", True)])

    def test_no_expectation_is_always_ready(self) -> None:
        watch = EgressIpWatch(reactor, [], None, 60)
        watch.start()
        self.assertTrue(watch.ready)
        self.assertEqual(watch.reason(), "ok")
