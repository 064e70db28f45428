"""direct_writer over a real TCP connection: order and completeness under pushback."""

from __future__ import annotations

import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from egressproxy.fastwrite import direct_writer
from tests.integration.proxy import inline, wait_until


class Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class DirectWriterTests(TestCase):
    @inline
    async def test_order_kept_across_partial_sends(self) -> None:
        """Chunks written while the peer stops reading arrive complete and in order once it reads again."""
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
        received[0].transport.pauseProducing()  # the peer stops reading: the kernel buffers fill
        sender.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        write = direct_writer(sender.transport)
        self.assertIsNot(write, sender.transport.write)
        chunks = [bytes([i % 251]) * (1000 + 37 * (i % 500)) for i in range(1500)]  # ~16 MB, odd sizes
        for chunk in chunks:
            write(chunk)
        expected = b"".join(chunks)
        self.assertTrue(sender.transport.dataBuffer or sender.transport._tempDataLen,
                        "the kernel took everything: pushback never happened")
        received[0].transport.resumeProducing()
        await wait_until(lambda: len(received[0].data) >= len(expected), timeout=30)
        self.assertEqual(bytes(received[0].data), expected)


class FallbackTests(SynchronousTestCase):
    def test_non_tcp_transport_uses_write(self) -> None:
        """A transport that is not plain TCP keeps its own write."""
        transport = StringTransport()
        self.assertEqual(direct_writer(transport), transport.write)
