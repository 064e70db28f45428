"""The forward-proxy modes over real loopback sockets, driven by curl, requests and raw clients.

The proxy runs in trial's reactor (``InProcessProxy``) with an
``http_connect`` and a ``socks5`` listener.  The destinations are servers
the test starts on 127.0.0.1: an HTTPS server with a certificate for
``api.egress.test`` from a throwaway CA, and a plain HTTP server that
echoes what it received.  The names resolve through the config's
``hosts:`` pins, so nothing leaves loopback, and TLS is verified end to end
by the clients (``curl --cacert``, never ``-k``).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from typing import Any, NamedTuple

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from egressproxy.modes.http_connect import front as http_connect
from egressproxy.modes.socks5 import front as socks5
from tests.integration.proxy import InProcessProxy, inline, wait_until
from tests.tlsfixtures import TestCA

PASSWORD = "s3cret-pw"
BODY = b"hello from api.egress.test\n"

#: A forward listener's access line: Envoy's eight fields, then user= and dialled=.
FORWARD_LINE = re.compile(
    r'^\[[^\]]+\] (?P<prefix>\S+) (?P<peer>\S+) (?P<upstream>\S+) \d+ \d+ \d+ "(?P<flags>[^"]*)" '
    r"user=(?P<user>\S+) dialled=(?P<dialled>\S+)$"
)


class ForwardLine(NamedTuple):
    upstream: str
    flags: str
    user: str
    dialled: str


def parse_forward(line: str) -> ForwardLine:
    """A forward listener's access line as fields; fails the test on any other shape."""
    match = FORWARD_LINE.match(line)
    if match is None:
        raise AssertionError(f"not a forward access-log line: {line!r}")
    return ForwardLine(match["upstream"], match["flags"], match["user"], match["dialled"])


class Hello(Resource):
    """GET /hello: a fixed body."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return BODY


class Echo(Resource):
    """Any request: what the origin received (target, some headers, body length)."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        body = request.content.read()
        headers = request.requestHeaders
        lines = [f"{request.method.decode()} {request.uri.decode()} {request.clientproto.decode()}"]
        for name in ("host", "proxy-authorization", "proxy-connection", "connection"):
            lines.append(f"{name}={headers.getRawHeaders(name)}")
        lines.append(f"body={len(body)}")
        return ("\n".join(lines) + "\n").encode()


class CountingSite(Site):
    """A Site that counts the connections it accepted and those still open."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.accepted = 0
        self.open = 0

    def log(self, request: Request) -> None:
        """No access log lines of its own in the test log."""

    def buildProtocol(self, addr: Any) -> Any:
        self.accepted += 1
        self.open += 1
        channel = super().buildProtocol(addr)
        lost = channel.connectionLost

        def connection_lost(reason: Any) -> None:
            self.open -= 1
            lost(reason)

        channel.connectionLost = connection_lost
        return channel


class RawClient(protocol.Protocol):
    """Sends what it is told, records everything it receives, fires ``closed`` at the end."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        if not self.closed.called:
            self.closed.callback(None)


def clean_environment() -> dict[str, str]:
    """PATH and locale only: no *_proxy variables from the developer's shell."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "HOME": os.environ.get("HOME", "/")}


async def run(argv: list[str], timeout: float = 30.0) -> tuple[str, str, int]:
    d = getProcessOutputAndValue(argv[0], argv[1:], env=clean_environment())
    d.addTimeout(timeout, reactor)
    out, err, code = await d
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), code


class ForwardProxyTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl not found on PATH: install Debian's curl")
        self.curl = curl
        directory = self.mktemp()
        ca = TestCA.create(os.path.join(directory, "ca"))
        self.ca_path = ca.ca_path
        cert_path, key_path = ca.issue(["api.egress.test"], directory, "api")
        with open(cert_path) as cert, open(key_path) as key:
            self.tls_options = ssl.PrivateCertificate.loadPEM(cert.read() + key.read()).options()
        self.tls_site, self.tls_port = self.server(Hello(), tls=True)
        self.other_site, self.other_port = self.server(Hello(), tls=True)
        self.plain_site, self.plain_port = self.server(Echo())
        self.proxy = InProcessProxy(
            self,
            f"""
hosts:
  api.egress.test: 127.0.0.1
  plain.egress.test: 127.0.0.1
  denied.egress.test: 127.0.0.1
listeners:
  - name: fwd
    listen: "127.0.0.1:0"
    mode: http_connect
    allow_destinations: ["api.egress.test:{self.tls_port}", "plain.egress.test:{self.plain_port}"]
    users: [{{name: alice, password: "${{PROXY_PASSWORD}}"}}]
  - name: socks
    listen: "127.0.0.1:0"
    mode: socks5
    allow_destinations: ["api.egress.test:{self.tls_port}", "127.0.0.1/32:{self.plain_port}"]
    accept_risk: ["127.0.0.1/32:{self.plain_port}"]
    users: [{{name: alice, password: "${{PROXY_PASSWORD}}"}}]
clusters:
  - name: unused
    endpoints: ["127.0.0.1:1"]
""",
            environ={"PROXY_PASSWORD": PASSWORD},
        )
        self.http_proxy = self.proxy.port("fwd")
        self.socks_proxy = self.proxy.port("socks")

    def server(self, resource: Resource, tls: bool = False) -> tuple[CountingSite, int]:
        site = CountingSite(resource)
        if tls:
            port = reactor.listenSSL(0, site, self.tls_options, interface="127.0.0.1")
        else:
            port = reactor.listenTCP(0, site, interface="127.0.0.1")

        async def stop() -> None:
            await wait_until(lambda: site.open == 0, timeout=10)
            await port.stopListening()

        self.addCleanup(lambda: defer.ensureDeferred(stop()))
        return site, port.getHost().port

    def proxy_url(self, password: str | None = PASSWORD) -> str:
        if password is None:
            return f"http://127.0.0.1:{self.http_proxy}"
        return f"http://alice:{password}@127.0.0.1:{self.http_proxy}"

    async def curl_https(self, *options: str, port: int | None = None, host: str = "api.egress.test") -> tuple[str, str, int]:
        url = f"https://{host}:{port or self.tls_port}/hello"
        out, err, code = await run([self.curl, "-sS", "-i", "--max-time", "20", "--cacert", self.ca_path, *options, url])
        # What curl printed (status lines, or its error), for the record in the test log.
        shown = " ".join(["curl", *options, url]).replace(PASSWORD, "***")
        print(shown, "->", [l for l in out.splitlines() if l.startswith("HTTP/")] or err.strip(), "exit", code)
        return out, err, code

    async def raw(self, port: int, data: bytes, timeout: float = 10.0) -> RawClient:
        """Connect, send ``data``, and wait until the proxy closes the connection."""
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), RawClient())
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        client.transport.write(data)
        client.closed.addTimeout(timeout, reactor)
        await client.closed
        return client

    def access_line(self, needle: str) -> str:
        [line] = [line for line in self.proxy.access_lines() if needle in line]
        return line

    # -- http_connect: CONNECT tunnels ------------------------------------

    @inline
    async def test_curl_connect_tls_verified(self) -> None:
        """curl through the HTTP proxy with credentials gets the body, TLS verified end to end."""
        out, err, code = await self.curl_https("--proxy", self.proxy_url())
        self.assertEqual(code, 0, err)
        self.assertIn("HTTP/1.1 200 Connection established", out)
        self.assertIn("HTTP/1.1 200 OK", out)
        self.assertTrue(out.endswith(BODY.decode()))
        self.assertEqual(self.tls_site.accepted, 1)
        [line] = await self.proxy.wait_for_lines(1)
        self.assertIn(" FWD 127.0.0.1:", line)
        self.assertEqual(
            parse_forward(line),
            ForwardLine(f"api.egress.test:{self.tls_port}", "-", "alice", f"127.0.0.1:{self.tls_port}"),
        )
        self.assertNotIn(PASSWORD, line)

    @inline
    async def test_tunnel_keeps_certificate_checks(self) -> None:
        """The tunnel leaves verification to the client: a certificate for another name fails in curl."""
        # curl asks the proxy for api.egress.test (allowlisted) but checks the
        # certificate against other.egress.test, which it does not name.
        out, err, code = await self.curl_https(
            "--proxy", self.proxy_url(), "--connect-to", f"other.egress.test:{self.tls_port}:api.egress.test:{self.tls_port}",
            host="other.egress.test",
        )
        self.assertIn("HTTP/1.1 200 Connection established", out)
        self.assertEqual(code, 60, err)  # CURLE_PEER_FAILED_VERIFICATION

    @inline
    async def test_requests_connect(self) -> None:
        """Python requests with proxies= gets the body over a verified TLS tunnel."""
        import requests

        def fetch() -> tuple[int, bytes]:
            with requests.Session() as session:
                session.trust_env = False
                answer = session.get(
                    f"https://api.egress.test:{self.tls_port}/hello",
                    proxies={"https": self.proxy_url()},
                    verify=self.ca_path,
                    timeout=20,
                )
                return answer.status_code, answer.content

        status, content = await deferToThread(fetch)
        self.assertEqual((status, content), (200, BODY))

    @inline
    async def test_wrong_password_407(self) -> None:
        """A wrong password is answered 407 with the Basic challenge; nothing is dialled."""
        out, err, code = await self.curl_https("--proxy", self.proxy_url("wrong"))
        self.assertNotEqual(code, 0)
        self.assertIn("HTTP/1.1 407 Proxy Authentication Required", out)
        self.assertIn('Proxy-Authenticate: Basic realm="egressproxy"', out)
        self.assertEqual(self.tls_site.accepted, 0)
        await self.proxy.wait_for_lines(1)
        line = self.access_line(f"api.egress.test:{self.tls_port}")
        self.assertEqual(parse_forward(line), ForwardLine(f"api.egress.test:{self.tls_port}", "UAEX", "-", "-"))
        self.assertNotIn("wrong", line)

    @inline
    async def test_no_credentials_407(self) -> None:
        """No credentials at all: 407."""
        out, err, code = await self.curl_https("--proxy", self.proxy_url(None))
        self.assertNotEqual(code, 0)
        self.assertIn("HTTP/1.1 407 ", out)
        self.assertEqual(self.tls_site.accepted, 0)

    @inline
    async def test_destination_not_allowed_403(self) -> None:
        """A destination outside the list is 403 and its server sees no connection at all."""
        out, err, code = await self.curl_https("--proxy", self.proxy_url(), port=self.other_port)
        self.assertNotEqual(code, 0)
        self.assertIn("HTTP/1.1 403 Forbidden", out)
        out, err, code = await self.curl_https("--proxy", self.proxy_url(), port=self.other_port, host="denied.egress.test")
        self.assertIn("HTTP/1.1 403 Forbidden", out)
        await self.proxy.wait_for_lines(2)
        await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.other_site.accepted, 0)
        line = self.access_line(f"denied.egress.test:{self.other_port}")
        self.assertEqual(parse_forward(line), ForwardLine(f"denied.egress.test:{self.other_port}", "NR", "alice", "-"))

    @inline
    async def test_refused_502(self) -> None:
        """An allowlisted destination that refuses connections is 502."""
        # A port that was just free: bind, note it, close.
        port = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        free = port.getHost().port
        await port.stopListening()
        proxy = InProcessProxy(self, f"""
hosts: {{api.egress.test: 127.0.0.1}}
listeners:
  - name: fwd2
    listen: "127.0.0.1:0"
    mode: http_connect
    allow_destinations: ["api.egress.test:{free}"]
clusters:
  - name: unused
    endpoints: ["127.0.0.1:1"]
""")
        client = await self.raw(proxy.port("fwd2"), f"CONNECT api.egress.test:{free} HTTP/1.1\r\n\r\n".encode())
        self.assertTrue(client.received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), client.received)
        [line] = await proxy.wait_for_lines(1)
        self.assertEqual(parse_forward(line).flags, "UF")

    # -- http_connect: plain http:// ---------------------------------------

    @inline
    async def test_curl_plain_get(self) -> None:
        """A plain GET through the proxy reaches the origin in origin-form without proxy fields."""
        url = f"http://plain.egress.test:{self.plain_port}/path?q=1"
        out, err, code = await run([self.curl, "-sS", "-i", "--max-time", "20", "--proxy", self.proxy_url(), url])
        print("curl --proxy", self.proxy_url().replace(PASSWORD, "***"), url, "->",
              [l for l in out.splitlines() if l.startswith("HTTP/")], code)
        self.assertEqual(code, 0, err)
        self.assertIn("HTTP/1.1 200 OK", out)
        self.assertIn("GET /path?q=1 HTTP/1.1", out)
        self.assertIn(f"host=['plain.egress.test:{self.plain_port}']", out)
        self.assertIn("proxy-authorization=None", out)
        self.assertIn("proxy-connection=None", out)
        self.assertIn("connection=['close']", out)

    @inline
    async def test_requests_plain_post_chunked(self) -> None:
        """requests' chunked POST body passes through untouched; a second request on the session works."""
        import requests

        def post() -> list[bytes]:
            with requests.Session() as session:
                session.trust_env = False
                url = f"http://plain.egress.test:{self.plain_port}/upload"
                proxies = {"http": self.proxy_url()}
                first = session.post(url, data=iter([b"a" * 1000, b"b" * 5000]), proxies=proxies, timeout=20)
                second = session.post(url, data=b"x" * 70000, proxies=proxies, timeout=20)
                return [first.content, second.content]

        first, second = await deferToThread(post)
        self.assertIn(b"POST /upload HTTP/1.1", first)
        self.assertIn(b"body=6000", first)
        self.assertIn(b"body=70000", second)

    @inline
    async def test_malformed_chunked_body_400(self) -> None:
        """Bad chunk framing is answered 400, an oversized chunked body 413: the origin sees no connection."""
        auth = base64.b64encode(f"alice:{PASSWORD}".encode())
        head = (
            f"POST http://plain.egress.test:{self.plain_port}/upload HTTP/1.1\r\n"
            f"Host: plain.egress.test:{self.plain_port}\r\n".encode()
            + b"Proxy-Authorization: Basic " + auth + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        client = await self.raw(self.http_proxy, head + b"5\r\nhello\r\nzz\r\n0\r\n\r\n")
        self.assertTrue(client.received.startswith(b"HTTP/1.1 400 Bad Request\r\n"), client.received)
        self.assertIn(b"malformed chunk size", client.received)
        big = b"%x\r\n" % (512 * 1024) + b"x" * (512 * 1024) + b"\r\n0\r\n\r\n"
        client = await self.raw(self.http_proxy, head + big)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 413 Content Too Large\r\n"), client.received)
        lines = await self.proxy.wait_for_lines(2)
        await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.plain_site.accepted, 0)
        self.assertEqual(
            [parse_forward(line) for line in lines],
            [ForwardLine(f"plain.egress.test:{self.plain_port}", "DPE", "alice", "-")] * 2,
        )

    # -- per-user destinations, policy: report ----------------------------------

    def two_users_proxy(self) -> InProcessProxy:
        """An enforce and a report listener; bob has his own list (plain only), alice the listener's (api only)."""
        listener = f"""
    mode: http_connect
    allow_addresses: ["127.0.0.0/8"]
    allow_destinations: ["api.egress.test:{self.tls_port}"]
    users:
      - {{name: alice, password: pw-a}}
      - {{name: bob, password: pw-b, allow_destinations: ["plain.egress.test:{self.plain_port}"]}}"""
        return InProcessProxy(self, f"""
hosts: {{api.egress.test: 127.0.0.1, plain.egress.test: 127.0.0.1}}
listeners:
  - name: strict
    listen: "127.0.0.1:0"{listener}
  - name: rep
    listen: "127.0.0.1:0"
    policy: report{listener}
clusters:
  - name: unused
    endpoints: ["127.0.0.1:1"]
""")

    def plain_get(self, name: str, password: str) -> bytes:
        auth = base64.b64encode(f"{name}:{password}".encode())
        return (
            f"GET http://plain.egress.test:{self.plain_port}/who HTTP/1.1\r\n".encode()
            + b"Proxy-Authorization: Basic " + auth + b"\r\n\r\n"
        )

    @inline
    async def test_per_user_destinations(self) -> None:
        """bob reaches only his own list, alice only the listener's: the lists are not merged."""
        proxy = self.two_users_proxy()
        port = proxy.port("strict")
        bob = await self.raw(port, self.plain_get("bob", "pw-b"))
        self.assertTrue(bob.received.startswith(b"HTTP/1.1 200 OK\r\n"), bob.received)
        alice = await self.raw(port, self.plain_get("alice", "pw-a"))
        self.assertTrue(alice.received.startswith(b"HTTP/1.1 403 Forbidden\r\n"), alice.received)
        out, err, code = await self.curl_https("--proxy", f"http://bob:pw-b@127.0.0.1:{port}")
        self.assertIn("HTTP/1.1 403 Forbidden", out)
        out, err, code = await self.curl_https("--proxy", f"http://alice:pw-a@127.0.0.1:{port}")
        self.assertEqual(code, 0, err)
        lines = [parse_forward(line) for line in await proxy.wait_for_lines(4)]
        self.assertEqual(
            [(line.flags, line.user) for line in lines], [("-", "bob"), ("NR", "alice"), ("NR", "bob"), ("-", "alice")]
        )
        self.assertEqual(self.plain_site.accepted, 1)

    @inline
    async def test_report_mode(self) -> None:
        """policy: report serves what enforce refuses, flagged RP and counted; a wrong password is still 407."""
        proxy = self.two_users_proxy()
        port = proxy.port("rep")
        alice = await self.raw(port, self.plain_get("alice", "pw-a"))
        self.assertTrue(alice.received.startswith(b"HTTP/1.1 200 OK\r\n"), alice.received)
        self.assertIn(b"GET /who HTTP/1.1", alice.received)
        wrong = await self.raw(port, self.plain_get("alice", "pw-b"))
        self.assertTrue(wrong.received.startswith(b"HTTP/1.1 407 "), wrong.received)
        lines = [parse_forward(line) for line in await proxy.wait_for_lines(2)]
        self.assertEqual(
            lines,
            [
                ForwardLine(f"plain.egress.test:{self.plain_port}", "RP", "alice", f"127.0.0.1:{self.plain_port}"),
                ForwardLine(f"plain.egress.test:{self.plain_port}", "UAEX", "-", "-"),
            ],
        )
        self.assertEqual(proxy.service.listeners["rep"].reported, {"destination": 1})
        self.assertEqual(self.plain_site.accepted, 1)

    # -- socks5 ---------------------------------------------------------------

    @inline
    async def test_curl_socks5_hostname(self) -> None:
        """curl --socks5-hostname with credentials gets the body, TLS verified end to end."""
        out, err, code = await self.curl_https(
            "--socks5-hostname", f"127.0.0.1:{self.socks_proxy}", "--proxy-user", f"alice:{PASSWORD}"
        )
        self.assertEqual(code, 0, err)
        self.assertIn("HTTP/1.1 200 OK", out)
        self.assertTrue(out.endswith(BODY.decode()))
        [line] = await self.proxy.wait_for_lines(1)
        self.assertIn(" SOCKS 127.0.0.1:", line)
        self.assertEqual(
            parse_forward(line),
            ForwardLine(f"api.egress.test:{self.tls_port}", "-", "alice", f"127.0.0.1:{self.tls_port}"),
        )

    @inline
    async def test_curl_socks5_wrong_credentials(self) -> None:
        """curl with wrong SOCKS credentials is rejected and nothing is dialled."""
        out, err, code = await self.curl_https(
            "--socks5-hostname", f"127.0.0.1:{self.socks_proxy}", "--proxy-user", "alice:wrong"
        )
        self.assertNotEqual(code, 0)
        self.assertEqual(self.tls_site.accepted, 0)
        [line] = await self.proxy.wait_for_lines(1)
        self.assertEqual(parse_forward(line).flags, "UAEX")

    @inline
    async def test_curl_socks5_not_allowed(self) -> None:
        """curl to a name outside the list is refused with reply 2; the server sees nothing."""
        out, err, code = await self.curl_https(
            "--socks5-hostname", f"127.0.0.1:{self.socks_proxy}", "--proxy-user", f"alice:{PASSWORD}",
            port=self.other_port,
        )
        self.assertNotEqual(code, 0)
        self.assertIn("(2)", err)
        self.assertEqual(self.other_site.accepted, 0)

    def socks_handshake(self, request: bytes, password: bytes = PASSWORD.encode()) -> bytes:
        return b"\x05\x01\x02" + bytes((1, 5)) + b"alice" + bytes((len(password),)) + password + request

    @inline
    async def test_socks_reply_codes(self) -> None:
        """Wrong credentials, a disallowed name, BIND and UDP get their reply codes, then a close."""
        name = b"api.egress.test"
        allowed = bytes((5, 1, 0, 3, len(name))) + name + self.tls_port.to_bytes(2, "big")
        other = bytes((5, 1, 0, 3, len(name))) + name + self.other_port.to_bytes(2, "big")
        cases = [
            (self.socks_handshake(allowed, b"wrong"), b"\x05\x02\x01\x01"),
            (self.socks_handshake(other), b"\x05\x02\x01\x00\x05\x02\x00\x01" + b"\x00" * 6),
            (self.socks_handshake(b"\x05\x02" + allowed[2:]), b"\x05\x02\x01\x00\x05\x07\x00\x01" + b"\x00" * 6),
            (self.socks_handshake(b"\x05\x03" + allowed[2:]), b"\x05\x02\x01\x00\x05\x07\x00\x01" + b"\x00" * 6),
            (self.socks_handshake(b"\x05\x01\x00\x07"), b"\x05\x02\x01\x00\x05\x08\x00\x01" + b"\x00" * 6),
            (b"\x05\x01\x00", b"\x05\xff"),
        ]
        clients = await defer.gatherResults([defer.ensureDeferred(self.raw(self.socks_proxy, data)) for data, _ in cases])
        for client, (_data, expected) in zip(clients, cases):
            self.assertEqual(client.received, expected)
        self.assertEqual((self.tls_site.accepted, self.other_site.accepted), (0, 0))

    @inline
    async def test_socks_ip_needs_cidr(self) -> None:
        """An IPv4 SOCKS request is served inside an allowlisted CIDR only."""
        ip = b"\x05\x01\x00\x01\x7f\x00\x00\x01"
        request = self.socks_handshake(ip + self.plain_port.to_bytes(2, "big") + b"GET /x HTTP/1.0\r\n\r\n")
        client = await self.raw(self.socks_proxy, request)
        self.assertEqual(client.received[:6], b"\x05\x02\x01\x00\x05\x00")
        self.assertIn(b"GET /x HTTP/1.0", client.received)
        client = await self.raw(self.socks_proxy, self.socks_handshake(ip + self.tls_port.to_bytes(2, "big")))
        self.assertEqual(client.received[4:6], b"\x05\x02")

    # -- malformed input --------------------------------------------------------

    @inline
    async def test_garbage_request_lines(self) -> None:
        """Garbage request lines are answered 400 and closed."""
        for data in (b"garbage\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
                     b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"CONNECT api.egress.test HTTP/1.1\r\n\r\n"):
            client = await self.raw(self.http_proxy, data)
            self.assertTrue(client.received.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (data, client.received))
        self.assertEqual(self.tls_site.accepted, 0)

    @inline
    async def test_one_mebibyte_header(self) -> None:
        """A 1 MiB header is answered 431 and closed, the answer readable by the client."""
        data = f"CONNECT api.egress.test:{self.tls_port} HTTP/1.1\r\nX-Big: ".encode() + b"x" * (1 << 20) + b"\r\n\r\n"
        client = await self.raw(self.http_proxy, data)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"))
        self.assertEqual(self.tls_site.accepted, 0)

    @inline
    async def test_slowloris_does_not_block_others(self) -> None:
        """A client sending a byte a second gets 408 at the header timeout; others are served meanwhile."""
        self.patch(http_connect, "HEADER_TIMEOUT", 3.0)
        slow = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.http_proxy), RawClient())
        self.addCleanup(lambda: slow.transport.abortConnection() if slow.transport.connected else None)
        request = f"CONNECT api.egress.test:{self.tls_port} HTTP/1.1\r\n".encode()

        async def trickle() -> None:
            for byte in request[:20]:
                if slow.closed.called:
                    return
                slow.transport.write(bytes((byte,)))
                await deferLater(reactor, 1.0, lambda: None)

        trickling = defer.ensureDeferred(trickle())
        out, err, code = await self.curl_https("--proxy", self.proxy_url())
        self.assertEqual(code, 0, err)
        self.assertFalse(slow.closed.called)
        slow.closed.addTimeout(10, reactor)
        await slow.closed
        await trickling
        self.assertTrue(slow.received.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), slow.received)
        await self.proxy.wait_for_lines(2)
        self.assertEqual(parse_forward(self.access_line('"DPE"')).flags, "DPE")

    @inline
    async def test_random_socks_bytes(self) -> None:
        """Random bytes (hypothesis) at the SOCKS listener end in clean closes; a good client is served meanwhile."""
        self.patch(socks5, "HANDSHAKE_TIMEOUT", 1.0)
        payloads: list[bytes] = []

        # Drawn by hypothesis, derandomized (the same examples each run), then
        # sent over real sockets all at once.
        prefixes = st.sampled_from([b"", b"\x05\x01\x02", b"\x05\x01\x00", b"\x05\x01\x00\x05\x01\x00"])

        @settings(max_examples=60, derandomize=True, database=None)
        @given(prefixes, st.binary(min_size=1, max_size=600))
        def draw(prefix: bytes, data: bytes) -> None:
            payloads.append(prefix + data)

        draw()
        bad = [defer.ensureDeferred(self.raw(self.socks_proxy, p, timeout=20)) for p in payloads]
        out, err, code = await self.curl_https(
            "--socks5-hostname", f"127.0.0.1:{self.socks_proxy}", "--proxy-user", f"alice:{PASSWORD}"
        )
        self.assertEqual(code, 0, err)
        self.assertTrue(out.endswith(BODY.decode()))
        await defer.gatherResults(bad)
        await wait_until(lambda: self.proxy.live_sessions() == 0)
        self.assertEqual(len(self.proxy.access_lines()), len(payloads) + 1)
        self.assertEqual(self.other_site.accepted, 0)

    # -- limits -------------------------------------------------------------------

    @inline
    async def test_named_cluster_limits_apply_per_listener(self) -> None:
        """A listener's named cluster supplies the limits, shared by all its destinations."""
        proxy = InProcessProxy(self, f"""
hosts: {{api.egress.test: 127.0.0.1, plain.egress.test: 127.0.0.1}}
listeners:
  - name: tight
    listen: "127.0.0.1:0"
    mode: http_connect
    cluster: one_at_a_time
    allow_destinations: ["api.egress.test:{self.tls_port}", "plain.egress.test:{self.plain_port}"]
clusters:
  - name: one_at_a_time
    endpoints: ["127.0.0.1:1"]
    max_connections: 1
""")
        first = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port("tight")), RawClient())
        first.transport.write(f"CONNECT api.egress.test:{self.tls_port} HTTP/1.1\r\n\r\n".encode())
        await wait_until(lambda: b"\r\n\r\n" in first.received)
        self.assertTrue(first.received.startswith(b"HTTP/1.1 200 "))
        second = await self.raw(proxy.port("tight"), f"CONNECT plain.egress.test:{self.plain_port} HTTP/1.1\r\n\r\n".encode())
        self.assertTrue(second.received.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), second.received)
        first.transport.loseConnection()
        await first.closed
        lines = await proxy.wait_for_lines(2)
        refused = ForwardLine(f"plain.egress.test:{self.plain_port}", "UO", "-", "-")
        self.assertIn(refused, [parse_forward(line) for line in lines])
        self.assertEqual(self.plain_site.accepted, 0)
