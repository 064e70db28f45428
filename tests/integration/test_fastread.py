"""direct_reader over real TCP connections, and the proxy actually using it."""

from __future__ import annotations

from twisted.internet import protocol, reactor
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from egressproxy.datapath.fastpath import FastPath
from egressproxy.datapath.fastread import ATTRIBUTE, direct_reader
from egressproxy.datapath.session import Session
from tests.integration.proxy import InProcessProxy, inline, wait_until


@implementer(IHalfCloseableProtocol)
class Recorder(protocol.Protocol):
    """Records what arrives through dataReceived, and the end of each direction."""

    def __init__(self) -> None:
        self.through_protocol = bytearray()
        self.read_eof = False
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.through_protocol += data

    def readConnectionLost(self) -> None:
        self.read_eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


class DirectReaderTests(TestCase):
    async def _pair(self) -> tuple[Recorder, protocol.Protocol]:
        """A server-side Recorder and the client connected to it."""
        accepted: list[Recorder] = []

        class Factory(protocol.Factory):
            def buildProtocol(self, addr: object) -> Recorder:
                accepted.append(Recorder())
                return accepted[-1]

        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), protocol.Protocol())
        self.addCleanup(client.transport.abortConnection)
        await wait_until(lambda: bool(accepted))
        return accepted[0], client

    @inline
    async def test_chunks_go_to_deliver_and_eof_half_closes(self) -> None:
        """Chunks reach ``deliver`` (not the old chain); a FIN is a half-close, as before."""
        fast = FastPath()
        self.assertIn("dispatch", fast.install(reactor))
        self.addCleanup(fast.uninstall)
        server, client = await self._pair()
        delivered = bytearray()
        self.assertTrue(fast.reader(server.transport, server, delivered.extend))
        self.assertTrue(callable(getattr(server.transport, ATTRIBUTE)))
        payload = bytes(range(256)) * 4096  # 1 MiB: many reads
        client.transport.write(payload)
        client.transport.loseWriteConnection()
        await wait_until(lambda: server.read_eof, timeout=20)
        self.assertEqual(bytes(delivered), payload)
        self.assertEqual(bytes(server.through_protocol), b"")
        self.assertIsNone(server.lost, "a FIN must only end the read side")
        # The write side still works after the half-close.
        server.transport.write(b"reply")
        server.transport.loseConnection()
        await wait_until(lambda: server.lost is not None)
        server.lost.trap(ConnectionDone)

    @inline
    async def test_upstream_leg_behind_endpoint_wrapper(self) -> None:
        """A connection made through HostnameEndpoint qualifies despite its wrapper protocol."""
        server, _client = await self._pair()
        port = server.transport.getHost().port
        upstream = await connectProtocol(HostnameEndpoint(reactor, b"127.0.0.1", port), Recorder())
        self.addCleanup(upstream.transport.abortConnection)
        delivered = bytearray()
        self.assertFalse(direct_reader(upstream.transport, upstream, delivered.extend), "no wrapper was named")
        fast = FastPath()
        fast.install(reactor)
        self.addCleanup(fast.uninstall)
        self.assertTrue(fast.reader(upstream.transport, upstream, delivered.extend))

    @inline
    async def test_other_protocol_in_between_declines(self) -> None:
        """When the transport's protocol is not the leg, the reader is not replaced."""
        server, _client = await self._pair()
        other = Recorder()
        self.assertFalse(direct_reader(server.transport, other, other.dataReceived))
        self.assertFalse(hasattr(server.transport, ATTRIBUTE))

    @inline
    async def test_proxy_splice_reads_directly(self) -> None:
        """Both legs of a real tcp-mode splice read directly, and byte counts stay exact."""
        echo_port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(echo_port.stopListening)
        proxy = InProcessProxy(
            self,
            "fast_path: python\n"  # the Python fast path's reads (the relay, when it runs, takes plain TCP)
            "listeners:\n"
            "  - name: t\n"
            '    listen: "127.0.0.1:0"\n'
            "    cluster: echo\n"
            "clusters:\n"
            "  - name: echo\n"
            f'    endpoints: ["127.0.0.1:{echo_port.getHost().port}"]\n',
        )
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port("t")), Recorder()
        )
        self.addCleanup(client.transport.abortConnection)
        client.transport.write(b"ping" * 1000)
        await wait_until(lambda: len(client.through_protocol) >= 4000)
        sessions: list[Session] = list(proxy.service.listeners["t"].sessions)
        self.assertEqual(len(sessions), 1)
        session = sessions[0]
        for leg in (session.down, session.up):
            self.assertTrue(hasattr(leg.transport, ATTRIBUTE), f"{type(leg).__name__} kept Twisted's read path")
        self.assertEqual((session.bytes_received, session.bytes_sent), (4000, 4000))


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class DeclineTests(SynchronousTestCase):
    def test_non_tcp_transport_declines(self) -> None:
        """A transport that is not plain TCP keeps its own read path."""
        transport = StringTransport()
        leg = Recorder()
        transport.protocol = leg
        self.assertFalse(direct_reader(transport, leg, leg.dataReceived))
