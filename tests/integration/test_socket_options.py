"""TCP_NODELAY and keepalive on both legs of real connections, set once per listening socket.

The downstream leg gets its options from the listening socket (Linux copies
them to accepted sockets; see sockopts.py), the upstream leg per
connection.  These tests read the options back from the proxy's own sockets,
and check that a reload that changes the keepalive reaches connections
accepted after it.
"""

from __future__ import annotations

import socket

from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from egressproxy.config import parse_config
from egressproxy.datapath.sockopts import NOT_TUNED
from tests.integration.proxy import InProcessProxy, inline, wait_until
from tests.integration.test_forwarding import Client

# fast_path: python keeps the spliced sockets in Twisted's hands, where the
# test can read them back (the compiled relay owns and detaches them); the
# options are set before any splice, whichever data path follows.
CONFIG = """
fast_path: python
listeners:
  - {{name: direct, listen: "127.0.0.1:0", cluster: up}}
  - {{name: unix, listen: "unix:{unix}", cluster: up}}
clusters:
  - {{name: up, endpoints: ["127.0.0.1:{port}"], keepalive: {keepalive}}}
"""


def options(sock: socket.socket) -> tuple[int, ...]:
    """NODELAY, SO_KEEPALIVE, idle, interval, count as the kernel reports them."""
    return (
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


class SocketOptionTests(TestCase):
    def setUp(self) -> None:
        self.upstream = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")
        self.addCleanup(self.upstream.stopListening)
        self.unix = self.mktemp()

    def config(self, keepalive: str) -> str:
        return CONFIG.format(port=self.upstream.getHost().port, keepalive=keepalive, unix=self.unix)

    async def legs(self, proxy: InProcessProxy) -> tuple[socket.socket, socket.socket]:
        """A new connection's (downstream, upstream) sockets inside the proxy, once both exist."""
        before = set(proxy.service.listeners["direct"].sessions)
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port("direct")), Client())
        self.addCleanup(lambda: client.transport.abortConnection())
        runtime = proxy.service.listeners["direct"]
        await wait_until(lambda: any(s.up is not None and s.up.transport for s in runtime.sessions - before))
        (session,) = runtime.sessions - before
        return session.down.transport.getHandle(), session.up.transport.getHandle()

    @inline
    async def test_both_legs_tuned(self) -> None:
        """Each leg has NODELAY and the cluster's keepalive; the listening socket carries them."""
        proxy = InProcessProxy(self, self.config("{idle: 61s, interval: 16s, count: 5}"))
        runtime = proxy.service.listeners["direct"]
        self.assertEqual(runtime.socket_options, runtime.cluster.config.keepalive)
        down, up = await self.legs(proxy)
        self.assertEqual(options(down), (1, 1, 61, 16, 5))
        self.assertEqual(options(up), (1, 1, 61, 16, 5))
        # A unix listener has no TCP options to pass on: its connections are tuned one by one.
        self.assertIs(proxy.service.listeners["unix"].socket_options, NOT_TUNED)

    @inline
    async def test_reload_changes_new_connections(self) -> None:
        """After a reload with another keepalive, new connections have the new values; old ones keep theirs."""
        proxy = InProcessProxy(self, self.config("{idle: 61s, interval: 16s, count: 5}"))
        old_down, _ = await self.legs(proxy)
        changed = parse_config(self.config("{idle: 30s, interval: 7s, count: 3}"), "test.yaml", {})
        proxy.service._reload_config = lambda: changed
        ok, summary = proxy.service.reload()
        self.assertTrue(ok, summary)
        down, up = await self.legs(proxy)
        self.assertEqual(options(down), (1, 1, 30, 7, 3))
        self.assertEqual(options(up), (1, 1, 30, 7, 3))
        self.assertEqual(options(old_down), (1, 1, 61, 16, 5))

    @inline
    async def test_keepalive_off(self) -> None:
        """keepalive: false leaves keepalive off on both legs, NODELAY still on."""
        proxy = InProcessProxy(self, self.config("false"))
        self.assertIsNone(proxy.service.listeners["direct"].socket_options)
        down, up = await self.legs(proxy)
        self.assertEqual(options(down)[:2], (1, 0))
        self.assertEqual(options(up)[:2], (1, 0))
