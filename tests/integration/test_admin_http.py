"""The admin service over real HTTP: the bearer token, and requests that come through the proxy itself."""

from __future__ import annotations

import attrs
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from egressproxy.config import Address
from tests.integration.proxy import InProcessProxy, inline, wait_until

TOKEN = "integration-token-0123"


class RawHttp(protocol.Protocol):
    """Sends one request as given and keeps everything the server answers until it closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.closed.callback(None)


def post(path: str, authorization: str | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: admin", "Content-Length: 0", "Connection: close"]
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class AdminHttpTests(TestCase):
    def proxy(self) -> InProcessProxy:
        return InProcessProxy(self, """
listeners:
  - {name: loop, listen: "127.0.0.1:0", cluster: admin_loop}
clusters:
  - {name: admin_loop, endpoints: ["127.0.0.1:9"], max_connect_attempts: 1}
""")

    def admin_port(self, proxy: InProcessProxy) -> int:
        return proxy.service.http_ports["admin"].getHost().port

    async def request(self, proxy: InProcessProxy, method: bytes, path: str, token: str | None = None) -> tuple[int, bytes, Headers]:
        headers = Headers({b"Authorization": [f"Bearer {token}".encode()]} if token is not None else {})
        url = f"http://127.0.0.1:{self.admin_port(proxy)}{path}".encode()
        response = await Agent(reactor).request(method, url, headers)
        return response.code, await readBody(response), response.headers

    @inline
    async def test_token_required_for_drain_and_reload(self) -> None:
        """With a token: 401 without it, 403 with a wrong one, GETs open, and the right one drains."""
        proxy = self.proxy()
        proxy.service.admin_token = TOKEN  # as read from EGRESSPROXY_ADMIN_TOKEN at start-up
        code, _body, headers = await self.request(proxy, b"POST", "/drain")
        self.assertEqual(code, 401)
        self.assertEqual(headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="egressproxy admin"'])
        self.assertEqual((await self.request(proxy, b"POST", "/reload", "nope"))[:2], (403, b"wrong token\n"))
        self.assertEqual((await self.request(proxy, b"GET", "/stats"))[0], 200)
        self.assertFalse(proxy.service.draining)
        self.assertEqual((await self.request(proxy, b"POST", "/drain", TOKEN))[:2], (202, b"draining\n"))
        self.assertTrue(proxy.service.draining)

    @inline
    async def test_drain_through_the_proxy_refused(self) -> None:
        """POST /drain sent through one of the proxy's own listeners to the admin port is answered 403.

        The listener's cluster is pointed at the admin port after start-up
        (a config check may refuse such a file).  The address guard on dials
        would refuse this connection outright; it is switched off here, so
        the test shows the admin service's own check holding by itself.
        """
        proxy = self.proxy()
        proxy.service.admin_token = TOKEN
        cluster = proxy.service.clusters["admin_loop"]
        cluster.reconfigure(attrs.evolve(cluster.config, endpoints=(Address("127.0.0.1", self.admin_port(proxy)),)))
        if hasattr(cluster, "own"):
            from egressproxy.upstream import addrguard  # the dial-side guard, where present

            cluster.own = addrguard.NO_SOCKETS
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port("loop"))
        for authorization in (None, f"Bearer {TOKEN}"):
            client = await connectProtocol(endpoint, RawHttp(post("/drain", authorization)))
            await client.closed
            self.assertTrue(client.received.startswith(b"HTTP/1.1 403 "), client.received)
            self.assertTrue(client.received.endswith(b"request came through this proxy\n"), client.received)
        self.assertFalse(proxy.service.draining)
        await wait_until(lambda: proxy.live_sessions() == 0)
        # The same request straight to the admin port is served.
        direct = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.admin_port(proxy)), RawHttp(post("/drain", f"Bearer {TOKEN}")))
        await direct.closed
        self.assertTrue(direct.received.startswith(b"HTTP/1.1 202 "), direct.received)
        self.assertTrue(proxy.service.draining)
