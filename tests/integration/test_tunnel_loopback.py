"""The tunnel over real loopback sockets, against the real egress service in the same reactor.

Quicker and narrower than the namespace lab: the egress app is an
:class:`~tests.integration.proxy.InProcessProxy` with a ``socks5`` listener
(user and allowlist), the destinations are small servers of the test's own,
and the tunnel's listener is built as ``run.py`` builds it.  What it proves
on real sockets: a large upload whose sender half-closes still gets the
whole answer back (half-close crosses the tunnel and the egress app), the
counts on the ``TUNNEL`` line are the bytes that moved, a server that
speaks first (a banner right after connect) reaches the app, and a path
whose port refuses is failed over within the same connection.
"""

from __future__ import annotations

import io
import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from egressproxy.tunnel.connection import TunnelFactory, TunnelSite
from egressproxy.tunnel.failover import PathOrder
from egressproxy.tunnel.logline import TunnelLog
from egressproxy.tunnel.parse import Destination, Path
from tests.integration.proxy import InProcessProxy, inline, wait_until

SIZE = 4 * 1024 * 1024


@implementer(IHalfCloseableProtocol)
class Echo(protocol.Protocol):
    """Echoes until the peer's EOF, then closes (a half-close aware server)."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class Banner(protocol.Protocol):
    """Speaks first, as SMTP and SSH servers do."""

    def connectionMade(self) -> None:
        self.transport.write(b"220 banner.egress.test ready\r\n")


@implementer(IHalfCloseableProtocol)
class Client(protocol.Protocol):
    """Sends ``payload``, half-closes, and keeps what comes back until the connection ends."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = bytearray()
        self.ended: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        if self.payload:
            self.transport.write(self.payload)
            self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: object = None) -> None:
        if not self.ended.called:
            self.ended.callback(bytes(self.received))


class LoopbackTests(TestCase):
    def listen(self, factory: protocol.Factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def egress(self, allowed: list[str]) -> InProcessProxy:
        return InProcessProxy(self, f"""
hosts: {{echo.egress.test: 127.0.0.1, banner.egress.test: 127.0.0.1}}
listeners:
  - name: socks
    listen: "127.0.0.1:0"
    mode: socks5
    log_prefix: SOCKS
    allow_destinations: {allowed!r}
    allow_addresses: ["127.0.0.0/8"]
    users: [{{name: app, password: pw}}]
clusters:
  - name: unused
    endpoints: ["127.0.0.1:1"]
""")

    def tunnel(self, paths: tuple[Path, ...], destination: Destination) -> tuple[int, io.StringIO]:
        stream = io.StringIO()
        site = TunnelSite(reactor, destination, PathOrder(paths, reactor), TunnelLog(stream), timeout=5.0)
        self.addCleanup(site.abort_all)
        return self.listen(TunnelFactory(site)), stream

    async def exchange(self, port: int, payload: bytes) -> bytes:
        client = Client(payload)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        return await client.ended.addTimeout(30, reactor)

    @inline
    async def test_upload_half_close_and_counts(self) -> None:
        """4 MiB sent then half-closed come back whole, and the TUNNEL line counts them both ways."""
        echo_port = self.listen(protocol.Factory.forProtocol(Echo))
        destination = Destination("echo.egress.test", echo_port)
        proxy = self.egress([str(destination)])
        socks = Path("socks5", "127.0.0.1", proxy.port("socks"), "app", "pw")
        port, log = self.tunnel((socks,), destination)
        payload = bytes(range(256)) * (SIZE // 256)
        received = await self.exchange(port, payload)
        self.assertEqual(len(received), SIZE)
        self.assertEqual(received, payload)
        await wait_until(lambda: " TUNNEL " in log.getvalue())
        self.assertIn(f' echo.egress.test:{echo_port} {SIZE} {SIZE} ', log.getvalue())
        self.assertIn(f'"-" via=socks5://app@127.0.0.1:{socks.port}', log.getvalue())

    @inline
    async def test_server_speaks_first(self) -> None:
        """A banner the destination sends at once reaches the app through the SOCKS5 reply's tail."""
        banner_port = self.listen(protocol.Factory.forProtocol(Banner))
        destination = Destination("banner.egress.test", banner_port)
        proxy = self.egress([str(destination)])
        port, _ = self.tunnel((Path("socks5", "127.0.0.1", proxy.port("socks"), "app", "pw"),), destination)
        client = Client(b"")
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        await wait_until(lambda: bytes(client.received) == b"220 banner.egress.test ready\r\n")
        client.transport.loseConnection()
        await client.ended

    @inline
    async def test_refused_path_then_the_next(self) -> None:
        """A path whose port refuses is followed, in the same connection, by the next one."""
        echo_port = self.listen(protocol.Factory.forProtocol(Echo))
        destination = Destination("echo.egress.test", echo_port)
        proxy = self.egress([str(destination)])
        # A port bound but not listening: every connect to it is refused, and no one else can take it.
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        closed = holder.getsockname()[1]
        dead = Path("socks5", "127.0.0.1", closed, "app", "pw")
        port, log = self.tunnel((dead, Path("socks5", "127.0.0.1", proxy.port("socks"), "app", "pw")), destination)
        self.assertEqual(await self.exchange(port, b"ping"), b"ping")
        await wait_until(lambda: " TUNNEL " in log.getvalue())
        self.assertIn(f"failing over to socks5://app@127.0.0.1:{proxy.port('socks')}", log.getvalue())
        self.assertIn(f"failed=socks5://app@127.0.0.1:{closed}(UF)", log.getvalue())
