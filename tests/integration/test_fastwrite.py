"""direct_writer over a real TCP connection: order and completeness under pushback."""

from __future__ import annotations

import socket

from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from egressproxy.datapath.fastwrite import direct_writer
from tests.integration.proxy import inline, wait_until


class Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class DirectWriterTests(TestCase):
    @inline
    async def test_order_kept_across_partial_sends(self) -> None:
        """Chunks written across reactor turns, with sends often partial, arrive complete and in order."""
        received: list[Collect] = []

        class Factory(protocol.Factory):
            def buildProtocol(self, addr: object) -> Collect:
                received.append(Collect())
                return received[-1]

        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        sender = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), protocol.Protocol())
        self.addCleanup(sender.transport.abortConnection)
        await wait_until(lambda: bool(received))
        # A small send buffer makes sends partial while the peer keeps reading,
        # so the kernel often has room while Twisted still holds bytes: a
        # direct send then would overtake them.
        sender.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        write = direct_writer(sender.transport)
        self.assertIsNot(write, sender.transport.write)
        chunks = [i.to_bytes(4, "big") * (250 + 9 * (i % 300)) for i in range(3000)]  # ~20 MB, odd sizes
        held = 0
        for batch in range(100):  # bounded: 100 reactor turns of 30 chunks
            for chunk in chunks[batch * 30:(batch + 1) * 30]:
                write(chunk)
            held += bool(sender.transport.dataBuffer or sender.transport._tempDataLen)
            await deferLater(reactor, 0, lambda: None)
        self.assertGreater(held, 10, "sends were never partial: the test did not exercise buffering")
        expected = b"".join(chunks)
        await wait_until(lambda: len(received[0].data) >= len(expected), timeout=30)
        self.assertEqual(bytes(received[0].data), expected)


class FallbackTests(SynchronousTestCase):
    def test_non_tcp_transport_uses_write(self) -> None:
        """A transport that is not plain TCP keeps its own write."""
        transport = StringTransport()
        self.assertEqual(direct_writer(transport), transport.write)
