"""Rigs that run the splice's tests on either kind of transport.

``tests/test_splice.py`` states the splice's guarantees once (bytes both
ways, pre-connect holding, backpressure, half-close, closing, exact counts,
idle timeout) against the small interface below, and runs them on:

- :class:`MemoryRig`: ``StringTransport`` legs on a ``MemoryReactorClock``
  (``tests.helpers.Harness``), the legs driven by hand;
- :class:`LoopbackRig`: the real service (:class:`InProcessProxy`) on the
  test reactor, a real client and a real upstream on 127.0.0.1, with
  ``fast_path: relay`` (each splice checked to be handed to the compiled
  relay, unless a splice filter keeps it in Python), ``fast_path: python``
  (checked to use the direct reads and writes) or ``fast_path: off``
  (checked to use Twisted's ordinary path).  On the relay, "reading" and
  "held" are read from the relay's queues instead of Twisted's transports.

In both, "the client" and "the upstream" are the proxy's peers, and the
proxy's own transports are ``transports()``.  The upstream dial is held
until :meth:`accept_upstream` (the loopback rig gates ``UpstreamDial._connect``),
so what happens before the upstream exists can be tested on real sockets too.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from typing import Any, Callable

from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from egressproxy.datapath.quicklane import QuickLane
from egressproxy.upstream.dial import UpstreamDial
from egressproxy.datapath.fastread import ATTRIBUTE, READ_SIZE
from tests.helpers import Harness, cluster_config
from tests.integration.proxy import InProcessProxy, wait_until

#: What a flood sends: numbered 64 KiB blocks, so loss, duplication and
#: reordering all show; more than loopback's kernel buffers take (several MiB
#: per socket), so that the flood is pushed back long before its end.
FLOOD_BLOCK = 64 * 1024
FLOOD_BYTES = 64 * 1024 * 1024

#: Twisted's write buffer high-water mark: past it a transport pauses its producer.
HIGH_WATER = 64 * 1024


def flood_block(index: int) -> bytes:
    return struct.pack(">I", index) * (FLOOD_BLOCK // 4)


def flood_payload(size: int = FLOOD_BYTES) -> bytes:
    return b"".join(flood_block(i) for i in range(size // FLOOD_BLOCK))


def flood_digest(size: int = FLOOD_BYTES) -> str:
    digest = hashlib.sha256()
    for i in range(size // FLOOD_BLOCK):
        digest.update(flood_block(i))
    return digest.hexdigest()


@implementer(IHalfCloseableProtocol)
class Peer(protocol.Protocol):
    """A real client or upstream: records bytes and each direction's end; can flood."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.read_eof = False
        self.lost: Failure | None = None
        self.flooded = 0
        self.flood_limit = 0
        self.flood_paused = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.read_eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason

    # -- flooding: a streaming producer for its own transport ------------------

    def flood(self, limit: int = FLOOD_BYTES) -> None:
        self.flood_limit = limit
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.flood_paused = True

    def stopProducing(self) -> None:
        self.flood_paused = True

    def resumeProducing(self) -> None:
        self.flood_paused = False
        for _ in range(16):  # bounded per turn
            if self.flood_paused or self.flood_done:
                break
            self.transport.write(flood_block(self.flooded // FLOOD_BLOCK))
            self.flooded += FLOOD_BLOCK
        if self.flood_done:
            reactor.callLater(0, self._unregister)
        elif not self.flood_paused:
            reactor.callLater(0, self._again)

    @property
    def flood_done(self) -> bool:
        return self.flooded >= self.flood_limit

    def _again(self) -> None:
        if not self.flood_paused and self.transport.connected:
            self.resumeProducing()

    def _unregister(self) -> None:
        if self.transport.connected and self.transport.producer is self:
            self.transport.unregisterProducer()


class MemoryRig:
    """The splice on StringTransports, driven by hand (see the module notes)."""

    kind = "memory"
    #: idle_timeout for the idle tests: the clock is ours, so a realistic one.
    idle = 10.0

    def __init__(self, testcase: TestCase, idle_timeout: float | None = None) -> None:
        self.testcase = testcase
        self.h = Harness(cluster_config(idle_timeout=idle_timeout))
        self.listener = self.h.listener
        self.client: Any = None
        self.ct: Any = None
        self.up: Any = None
        self.ut: Any = None

    @property
    def session(self) -> Any:
        return self.client.session

    def transports(self) -> tuple[Any, Any]:
        return self.ct, self.ut

    async def connect_client(self) -> None:
        self.client, self.ct = self.h.connect_client()

    async def accept_upstream(self) -> None:
        self.up, self.ut = self.h.accept_upstream()

    def reading(self, side: str) -> bool:
        transport = self.ct if side == "down" else self.ut
        return transport.producerState == "producing"

    def held(self, side: str) -> int | None:
        return None  # a StringTransport keeps everything: nothing to bound

    def client_send(self, data: bytes) -> None:
        self.client.dataReceived(data)

    def upstream_send(self, data: bytes) -> None:
        self.up.dataReceived(data)

    async def upstream_got(self, expected: bytes) -> None:
        self.testcase.assertEqual(self.ut.value(), expected)

    async def client_got(self, expected: bytes) -> None:
        self.testcase.assertEqual(self.ct.value(), expected)

    def client_eof(self) -> None:
        self.client.readConnectionLost()

    def upstream_eof(self) -> None:
        self.up.readConnectionLost()

    async def upstream_sees_eof(self) -> None:
        self.testcase.assertTrue(self.ut.write_closed or self.ut.disconnecting)

    async def client_sees_eof(self) -> None:
        self.testcase.assertTrue(self.ct.write_closed or self.ct.disconnecting)

    def client_reset(self) -> None:
        self.client.connectionLost(Failure(ConnectionLost()))

    def upstream_reset(self) -> None:
        self.up.connectionLost(Failure(ConnectionLost()))

    async def push_back(self, side: str) -> None:
        """``side``'s peer stops reading: its transport pauses its producer (the other leg)."""
        transport = self.ct if side == "down" else self.ut
        transport.producer.pauseProducing()

    async def release(self, side: str) -> None:
        transport = self.ct if side == "down" else self.ut
        transport.producer.resumeProducing()

    async def flood_delivered(self, side: str) -> None:
        pass

    def _settle(self) -> None:
        """A closing StringTransport never finishes: finish it, as the reactor would."""
        for leg, transport in ((self.client, self.ct), (self.up, self.ut)):
            if leg is not None and not leg.lost and (transport.disconnecting or transport.disconnected):
                leg.connectionLost(Failure(ConnectionDone()))

    async def elapse(self, seconds: float) -> None:
        step = self.idle / 40
        for _ in range(int(round(seconds / step))):
            self.h.reactor.advance(step)
            self._settle()

    async def until(self, predicate: Callable[[], bool], within: float) -> None:
        step = self.idle / 40
        for _ in range(int(within / step) + 1):
            self._settle()
            if predicate():
                return
            self.h.reactor.advance(step)
        raise AssertionError(f"not within {within}s of the clock: {predicate}")

    async def ended(self) -> None:
        """Wait until the session has ended (both legs gone, its record written)."""
        await self.until(lambda: self.session.finished, 5.0)

    def records(self) -> list[Any]:
        return self.h.records()


class LoopbackRig:
    """The splice in the real service, on real loopback sockets (see the module notes)."""

    kind = "loopback"
    idle = 0.6

    def __init__(self, testcase: TestCase, path: str | bool, idle_timeout: float | None = None) -> None:
        self.testcase = testcase
        #: The data path: relay, python (the fast path) or off; True/False mean python/off.
        self.path = {True: "python", False: "off"}.get(path, path) if isinstance(path, bool) else path
        self.fast = self.path != "off"
        self.upstreams: list[Peer] = []
        self._gated: list[tuple[UpstreamDial, Any]] = []
        self._records: list[Any] = []
        upstreams = self.upstreams

        class UpstreamFactory(protocol.Factory):
            def buildProtocol(self, addr: object) -> Peer:
                upstreams.append(Peer())
                return upstreams[-1]

        port = reactor.listenTCP(0, UpstreamFactory(), interface="127.0.0.1")
        testcase.addCleanup(port.stopListening)
        gated = self._gated

        def connect(dial: UpstreamDial, endpoint: Any) -> None:
            gated.append((dial, endpoint))

        self._connect = UpstreamDial._connect
        testcase.patch(UpstreamDial, "_connect", connect)
        # The splice is what is under test, on the ordinary path the rig can
        # gate; the quick lane, which skips that path, has its own tests
        # (tests/integration/test_quick_lane.py).
        testcase.patch(QuickLane, "wanted", lambda lane: False)
        idle = f"    idle_timeout: {int(idle_timeout * 1000)}ms\n" if idle_timeout else ""
        self.proxy = InProcessProxy(
            testcase,
            f"fast_path: {self.path}\n"
            "drain_timeout: 5s\n"
            "listeners:\n"
            "  - name: t\n"
            '    listen: "127.0.0.1:0"\n'
            "    cluster: up\n"
            "clusters:\n"
            "  - name: up\n"
            f'    endpoints: ["127.0.0.1:{port.getHost().port}"]\n'
            "    connect_timeout: 5s\n" + idle,
        )
        self.listener = self.proxy.service.listeners["t"]
        original = self.listener.session_finished
        records = self._records

        def finished(session: Any, record: Any) -> None:
            records.append(record)
            original(session, record)

        self.listener.session_finished = finished
        self.client: Peer | None = None
        self.session: Any = None

    @property
    def server(self) -> Peer:
        return self.upstreams[0]

    def transports(self) -> tuple[Any, Any]:
        return self.session.down.transport, self.session.up.transport

    async def connect_client(self) -> None:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.port("t"))
        self.client = await connectProtocol(endpoint, Peer())
        self.testcase.addCleanup(lambda: self.client.transport.abortConnection() if self.client.transport.connected else None)
        await wait_until(lambda: bool(self.listener.sessions) and bool(self._gated))
        [self.session] = self.listener.sessions

    async def accept_upstream(self) -> None:
        dial, endpoint = self._gated.pop()
        self._connect(dial, endpoint)
        await wait_until(lambda: bool(self.upstreams) and self.session.up is not None and self.session.up.peer is not None)
        self.testcase.addCleanup(lambda: self.server.transport.abortConnection() if self.server.transport.connected else None)
        down_t, up_t = self.transports()
        filtered = self.session.down.filter is not None or self.session.up.filter is not None
        if self.path == "relay":
            self.testcase.assertEqual(self.relayed, not filtered, "relayed exactly when no splice filter is set")
            if self.relayed:
                for transport in (down_t, up_t):
                    self.testcase.assertNotIn(transport, reactor.getReaders(), "Twisted still reads a relayed socket")
                    self.testcase.assertNotIn(transport, reactor.getWriters(), "Twisted still writes a relayed socket")
                return
        for leg, transport, other in ((self.session.down, down_t, up_t), (self.session.up, up_t, down_t)):
            if self.fast:
                self.testcase.assertTrue(hasattr(transport, ATTRIBUTE), "the fast path's direct read is not in use")
                self.testcase.assertNotEqual(leg._write, other.write, "the fast path's direct write is not in use")
            else:
                self.testcase.assertFalse(hasattr(transport, ATTRIBUTE), "fast_path: false, yet a direct read is in use")
                self.testcase.assertEqual(leg._write, other.write, "fast_path: false, yet transport.write is not used")

    @property
    def relayed(self) -> bool:
        """Whether the compiled relay carries the session now."""
        return bool(getattr(self.session, "relayed", False))

    def _relay_held(self) -> tuple[int, int]:
        """(toward the upstream, toward the client): bytes the relay read and has not sent yet."""
        return self.session._relay.held(self.session._handle)

    def reading(self, side: str) -> bool:
        if self.relayed:
            # The relay reads a side exactly when nothing it read from there is still queued.
            return self._relay_held()[0 if side == "down" else 1] == 0
        down_t, up_t = self.transports()
        return (down_t if side == "down" else up_t) in reactor.getReaders()

    def held(self, side: str) -> int | None:
        """Bytes the proxy holds in its write buffer towards ``side``'s peer."""
        if self.relayed:
            held = self._relay_held()[1 if side == "down" else 0]
            bound = self.session._relay.buffer_size
            self.testcase.assertLessEqual(held, bound, f"the relay holds {held} bytes, past its bound {bound}")
            return held
        down_t, up_t = self.transports()
        t = down_t if side == "down" else up_t
        return len(t.dataBuffer) - t.offset + t._tempDataLen

    def client_send(self, data: bytes) -> None:
        self.client.transport.write(data)

    def upstream_send(self, data: bytes) -> None:
        self.server.transport.write(data)

    async def _got(self, peer: Peer, expected: bytes) -> None:
        await wait_until(lambda: len(peer.received) >= len(expected), timeout=20)
        await deferLater(reactor, 0.05, lambda: None)  # anything extra would show now
        self.testcase.assertEqual(bytes(peer.received), expected)

    async def upstream_got(self, expected: bytes) -> None:
        await wait_until(lambda: bool(self.upstreams), timeout=5)
        await self._got(self.server, expected)

    async def client_got(self, expected: bytes) -> None:
        await self._got(self.client, expected)

    def client_eof(self) -> None:
        self.client.transport.loseWriteConnection()

    def upstream_eof(self) -> None:
        self.server.transport.loseWriteConnection()

    async def upstream_sees_eof(self) -> None:
        await wait_until(lambda: self.server.read_eof or self.server.lost is not None)

    async def client_sees_eof(self) -> None:
        await wait_until(lambda: self.client.read_eof or self.client.lost is not None)

    @staticmethod
    def _reset(peer: Peer) -> None:
        """Close with RST (SO_LINGER 0), not FIN."""
        peer.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.transport.abortConnection()

    def client_reset(self) -> None:
        self._reset(self.client)

    def upstream_reset(self) -> None:
        self._reset(self.server)

    async def push_back(self, side: str) -> None:
        """``side``'s peer stops reading while the other floods, until the proxy stops reading that other."""
        reader, flooder = (self.client, self.server) if side == "down" else (self.server, self.client)
        other = "up" if side == "down" else "down"
        reader.transport.pauseProducing()
        flooder.flood()
        await wait_until(lambda: flooder.flood_paused and not self.reading(other), timeout=20)
        # Nothing more moves through the proxy once the kernel buffers are full.
        counter = "bytes_sent" if side == "down" else "bytes_received"
        before = -1
        for _ in range(50):
            now = getattr(self.session, counter)
            if now == before:
                break
            before = now
            await deferLater(reactor, 0.2, lambda: None)
        else:
            raise AssertionError("the proxy kept reading a flow whose reader stopped")
        self.testcase.assertFalse(flooder.flood_done, "the flood was never pushed back")

    async def release(self, side: str) -> None:
        reader = self.client if side == "down" else self.server
        reader.transport.resumeProducing()

    async def flood_delivered(self, side: str) -> None:
        """Everything the flood sent reached ``side``'s peer, exactly, and was counted exactly."""
        reader, flooder = (self.client, self.server) if side == "down" else (self.server, self.client)
        await wait_until(lambda: flooder.flood_done and len(reader.received) >= FLOOD_BYTES, timeout=60)
        await deferLater(reactor, 0.05, lambda: None)  # anything extra would show now
        self.testcase.assertEqual(len(reader.received), FLOOD_BYTES)
        self.testcase.assertEqual(hashlib.sha256(reader.received).hexdigest(), flood_digest())
        counter = "bytes_sent" if side == "down" else "bytes_received"
        self.testcase.assertEqual(getattr(self.session, counter), FLOOD_BYTES)

    async def elapse(self, seconds: float) -> None:
        await deferLater(reactor, seconds, lambda: None)

    async def until(self, predicate: Callable[[], bool], within: float) -> None:
        await wait_until(predicate, timeout=within)

    async def ended(self) -> None:
        await wait_until(lambda: self.session.finished, timeout=10)

    def records(self) -> list[Any]:
        return list(self._records)


#: The most a spliced leg may hold for a peer that does not read: Twisted's
#: buffer up to its high-water mark plus one read (256 KiB on the fast path).
HOLD_BOUND = HIGH_WATER + READ_SIZE
