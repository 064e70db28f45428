"""PROXY protocol over real loopback sockets: the header's client is logged and checked.

The addresses in the headers (203.0.113.7, 2001:db8::7) are documentation
addresses: they are only text in a header, no packet goes to them.
"""

from __future__ import annotations

import ipaddress
import struct

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tests.integration.proxy import InProcessProxy, inline, wait_until

SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"


def v1(source: str, sport: int, dport: int) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    destination = "::1" if ":" in source else "127.0.0.1"
    return f"PROXY {family} {source} {destination} {sport} {dport}\r\n".encode()


def v2(source: str, sport: int, dport: int) -> bytes:
    src = ipaddress.ip_address(source)
    dst = ipaddress.ip_address("::1" if src.version == 6 else "127.0.0.1")
    block = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    return SIGNATURE + struct.pack("!BBH", 0x21, 0x11 if src.version == 4 else 0x21, len(block)) + block


@implementer(IHalfCloseableProtocol)
class Recorder(protocol.Protocol):
    """Upstream: keeps what it receives; at the client's EOF answers with it and closes."""

    def connectionMade(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.transport.write(b"upstream got: " + self.received)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class RecorderFactory(protocol.Factory):
    def __init__(self) -> None:
        self.connections: list[Recorder] = []

    def buildProtocol(self, addr: object) -> Recorder:
        self.connections.append(Recorder())
        return self.connections[-1]


@implementer(IHalfCloseableProtocol)
class Client(protocol.Protocol):
    """A test client that records what it receives and when its connection ends."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: object) -> None:
        if not self.closed.called:
            self.closed.callback(None)


class ProxyProtocolIntegrationTests(TestCase):
    def setUp(self) -> None:
        self.upstream = RecorderFactory()
        port = reactor.listenTCP(0, self.upstream, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.upstream_port = port.getHost().port

    def proxy(self, allow_sources: str = "") -> InProcessProxy:
        return InProcessProxy(
            self,
            f"""
listeners:
  - name: behind_fly
    listen: "127.0.0.1:0"
    cluster: up
    log_prefix: PP
    proxy_protocol: true
    {allow_sources}
clusters:
  - name: up
    endpoints: ["127.0.0.1:{self.upstream_port}"]
    connect_timeout: 2s
""",
        )

    async def exchange(self, proxy: InProcessProxy, *chunks: bytes) -> Client:
        """Connect, send each chunk (a moment apart), shut the write side, wait for the close."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port("behind_fly"))
        client = await connectProtocol(endpoint, Client())
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        for chunk in chunks:
            client.transport.write(chunk)
            await deferLater(reactor, 0.05, lambda: None)
        if client.transport.connected:
            client.transport.loseWriteConnection()
        await client.closed
        return client

    @inline
    async def test_v1_client_reaches_upstream_as_header_address(self) -> None:
        """After a v1 header (sent in two pieces), data reaches the upstream and the log shows the header's client."""
        proxy = self.proxy()
        header = v1("203.0.113.7", 40123, proxy.port("behind_fly"))
        client = await self.exchange(proxy, header[:9], header[9:] + b"hello")
        self.assertEqual(client.received, b"upstream got: hello")
        [upstream] = self.upstream.connections
        self.assertEqual(upstream.received, b"hello")
        [line] = await proxy.wait_for_lines(1)
        sent = len(header) + 5
        self.assertRegex(line, rf"\] PP 203\.0\.113\.7:40123 127\.0\.0\.1:{self.upstream_port} {sent} 19 \d+ \"-\"$")

    @inline
    async def test_v1_source_outside_allow_sources_refused(self) -> None:
        """A v1 header naming a client outside allow_sources is refused (RBAC), though the real peer is inside."""
        proxy = self.proxy('allow_sources: ["127.0.0.0/8", "::1/128"]')
        client = await self.exchange(proxy, v1("203.0.113.7", 40124, proxy.port("behind_fly")) + b"hello")
        self.assertEqual(client.received, b"")
        [line] = await proxy.wait_for_lines(1)
        self.assertRegex(line, r"\] PP 203\.0\.113\.7:40124 - \d+ 0 \d+ \"RBAC\"$")
        self.assertEqual(self.upstream.connections, [])

    @inline
    async def test_v2_client_reaches_upstream_as_header_address(self) -> None:
        """After a v2 TCP6 header, data reaches the upstream and the log shows the header's client."""
        proxy = self.proxy('allow_sources: ["2001:db8::/32"]')
        client = await self.exchange(proxy, v2("2001:db8::7", 40125, proxy.port("behind_fly")) + b"hello")
        self.assertEqual(client.received, b"upstream got: hello")
        self.assertEqual(self.upstream.connections[0].received, b"hello")
        [line] = await proxy.wait_for_lines(1)
        self.assertRegex(line, r"\] PP \[2001:db8::7\]:40125 127\.0\.0\.1:\d+ 57 19 \d+ \"-\"$")

    @inline
    async def test_v2_source_outside_allow_sources_refused(self) -> None:
        """A v2 header naming a client outside allow_sources is refused (RBAC) and nothing is dialled."""
        proxy = self.proxy('allow_sources: ["127.0.0.0/8"]')
        client = await self.exchange(proxy, v2("203.0.113.7", 40126, proxy.port("behind_fly")) + b"hello")
        self.assertEqual(client.received, b"")
        [line] = await proxy.wait_for_lines(1)
        self.assertRegex(line, r"\] PP 203\.0\.113\.7:40126 - 33 0 \d+ \"RBAC\"$")
        self.assertEqual(self.upstream.connections, [])

    @inline
    async def test_client_without_header_refused(self) -> None:
        """A client that sends data without a header is closed (DPE) under its real address, nothing dialled."""
        proxy = self.proxy()
        client = await self.exchange(proxy, b"hello")
        self.assertEqual(client.received, b"")
        [line] = await proxy.wait_for_lines(1)
        self.assertRegex(line, r"\] PP 127\.0\.0\.1:\d+ - 5 0 \d+ \"DPE\"$")
        self.assertEqual(self.upstream.connections, [])
        runtime = proxy.service.listeners["behind_fly"]
        self.assertEqual((runtime.rejected.get("proxy_protocol"), runtime.connections_total), (1, 1))

    @inline
    async def test_eof_before_header_refused(self) -> None:
        """A client that shuts its write side before a complete header is closed (DPE)."""
        proxy = self.proxy()
        await self.exchange(proxy, b"PROXY TCP4 203.0")
        [line] = await proxy.wait_for_lines(1)
        self.assertRegex(line, r"\] PP 127\.0\.0\.1:\d+ - 16 0 \d+ \"DPE\"$")
        self.assertEqual(self.upstream.connections, [])

    @inline
    async def test_untrusted_sender_refused_unread(self) -> None:
        """A peer outside proxy_protocol_trusted is closed (DPE) under its real address; its header is never read."""
        proxy = self.proxy('proxy_protocol_trusted: ["fdaa::/16", "10.0.0.0/8"]')
        client = await self.exchange(proxy, v1("203.0.113.7", 40127, proxy.port("behind_fly")) + b"hello")
        self.assertEqual(client.received, b"")
        [line] = await proxy.wait_for_lines(1)
        self.assertRegex(line, r"\] PP 127\.0\.0\.1:\d+ - \d+ 0 \d+ \"DPE\"$")
        self.assertEqual(self.upstream.connections, [])
        runtime = proxy.service.listeners["behind_fly"]
        self.assertEqual((runtime.rejected["proxy_protocol_untrusted"], runtime.connections_total), (1, 1))

    @inline
    async def test_trusted_sender_header_used(self) -> None:
        """A peer inside proxy_protocol_trusted has its header read: the upstream sees the data, the log the header's client."""
        proxy = self.proxy('proxy_protocol_trusted: ["127.0.0.0/8"]')
        client = await self.exchange(proxy, v1("203.0.113.7", 40128, proxy.port("behind_fly")) + b"hello")
        self.assertEqual(client.received, b"upstream got: hello")
        [line] = await proxy.wait_for_lines(1)
        self.assertRegex(line, r"\] PP 203\.0\.113\.7:40128 ")

    @inline
    async def test_per_source_cap_by_header_source(self) -> None:
        """max_connections_per_source counts the header's source: a second connection naming it is refused (OM)."""
        proxy = self.proxy("max_connections_per_source: 1")
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port("behind_fly"))
        first = await connectProtocol(endpoint, Client())
        self.addCleanup(lambda: first.transport.abortConnection() if first.transport.connected else None)
        first.transport.write(v1("203.0.113.7", 40129, proxy.port("behind_fly")))
        await wait_until(lambda: len(self.upstream.connections) == 1)
        second = await self.exchange(proxy, v1("203.0.113.7", 40130, proxy.port("behind_fly")) + b"hello")
        other = await self.exchange(proxy, v1("203.0.113.8", 40131, proxy.port("behind_fly")) + b"hello")
        self.assertEqual((second.received, other.received), (b"", b"upstream got: hello"))
        lines = await proxy.wait_for_lines(2)
        self.assertRegex(lines[0], r"\] PP 203\.0\.113\.7:40130 - \d+ 0 \d+ \"OM\"$")
        runtime = proxy.service.listeners["behind_fly"]
        self.assertEqual(runtime.rejected["max_connections_per_source"], 1)
        first.transport.loseWriteConnection()
        await first.closed
        await wait_until(lambda: runtime.per_source == {})
