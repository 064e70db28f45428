"""Unit tests of the forward-proxy fronts (http_connect, socks5) on a MemoryReactorClock."""

from __future__ import annotations

import base64
from ipaddress import ip_network

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet._resolver import HostResolution
from twisted.internet.address import IPv6Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IHostnameResolver
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from egressproxy.modes.forward import front as forward
from egressproxy.modes.forward.options import ForwardOptions
from egressproxy.modes.forward.rules import DestinationRule, User
from egressproxy.modes.http_connect import front as http_connect
from egressproxy.modes.http_connect.httpreq import MAX_HEAD
from egressproxy.modes.socks5 import front as socks5
from egressproxy.modes.socks5.socks import reply
from egressproxy.datapath.splice import PENDING_LIMIT
from tests.helpers import Harness, cluster_config, listener_config

RULES = (
    DestinationRule(host="api.egress.test", port=443),
    DestinationRule(host="*.egress.test", port=80),
    DestinationRule(network=ip_network("10.9.0.0/16"), port=None),
)
USERS = (User("alice", "s3cret"),)
#: bob has his own list, which replaces the listener's for him.
BOB_RULES = (DestinationRule(host="bob.egress.test", port=443),)
USERS_OWN = (User("alice", "s3cret"), User("bob", "b0b", allow_destinations=BOB_RULES))
PINS = {
    "api.egress.test": "127.0.0.5", "www.egress.test": "127.0.0.6", "bob.egress.test": "127.0.0.7",
    "evil.example": "127.0.0.8",
}


def basic(name: str, password: str) -> bytes:
    return b"Proxy-Authorization: Basic " + base64.b64encode(f"{name}:{password}".encode()) + b"\r\n"


def harness(
    mode: str = "http_connect", users: tuple[User, ...] = USERS, policy: str = "enforce", **cluster: object
) -> Harness:
    values: dict[str, object] = dict(name="fwd", endpoints=(), max_connect_attempts=1)
    values.update(cluster)
    return Harness(
        cluster_config(**values),
        listener_config(
            name="fwd", mode=mode, cluster=None, log_prefix="FWD", policy=policy,
            options=ForwardOptions(allow_destinations=RULES, users=users),
        ),
        pins=PINS,
    )


def capture_log(h: Harness) -> list[dict]:
    """The listener's own log events (refusals, reports), from now on."""
    events: list[dict] = []
    h.listener.log = Logger(observer=events.append)  # type: ignore[misc]
    return events


def log_text(events: list[dict]) -> str:
    return "\n".join(formatEvent(event) for event in events)


def refuse_newest(h: Harness) -> None:
    """Fail the newest dial with ECONNREFUSED and let HostnameEndpoint report it."""
    _host, _port, factory, _timeout, _bind = h.reactor.tcpClients[-1]
    factory.clientConnectionFailed(h.reactor.connectors[-1], Failure(ConnectionRefusedError()))
    h.reactor.advance(0.3)


@implementer(IHostnameResolver)
class NoAddresses:
    """A resolver that finds no address for any name (NXDOMAIN)."""

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):  # type: ignore[no-untyped-def]
        resolution = HostResolution(hostName)
        receiver.resolutionBegan(resolution)
        receiver.resolutionComplete()
        return resolution


class FrontTestCase(SynchronousTestCase):
    mode = "http_connect"

    def setUp(self) -> None:
        self.h = harness(self.mode)

    def finish(self, client, up=None) -> list:  # type: ignore[no-untyped-def]
        """End the client's connection (and the upstream's); the access records, and no timer left behind."""
        client.connectionLost(Failure(ConnectionDone()))
        if up is not None:
            up.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.h.reactor.getDelayedCalls(), [])
        return self.h.records()

    def assert_lingering_close(self, client, ct) -> None:  # type: ignore[no-untyped-def]
        """The answer is followed by our FIN; later bytes are dropped; the client's EOF closes."""
        self.assertTrue(ct.write_closed)
        self.assertFalse(ct.disconnecting)
        sent = ct.value()
        client.dataReceived(b"more bytes the client had in flight")
        self.assertEqual(ct.value(), sent)
        client.readConnectionLost()
        self.assertTrue(ct.disconnecting)


class ConnectTests(FrontTestCase):
    def connect(self, target: bytes = b"api.egress.test:443", credentials: bytes = basic("alice", "s3cret"),
                extra: bytes = b""):  # type: ignore[no-untyped-def]
        client, ct = self.h.connect_client()
        client.dataReceived(b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n" + credentials + b"\r\n"
                            + extra)
        return client, ct

    def test_tunnel(self) -> None:
        """An allowed CONNECT with credentials dials the pinned destination, answers 200 and splices."""
        client, ct = self.connect()
        self.assertEqual(self.h.reactor.tcpClients[-1][:2], ("127.0.0.5", 443))
        self.assertEqual(ct.value(), b"")
        self.assertEqual(ct.producerState, "paused")
        up, ut = self.h.accept_upstream()
        self.assertEqual(ct.value(), b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.assertEqual(ct.producerState, "producing")
        client.dataReceived(b"\x16\x03\x01hello")
        up.dataReceived(b"\x16\x03\x03world")
        self.assertEqual(ut.value(), b"\x16\x03\x01hello")
        self.assertTrue(ct.value().endswith(b"\x16\x03\x03world"))
        self.assertIs(ct.producer, ut)
        [record] = self.finish(client, up)
        self.assertEqual((record.upstream, record.flags), ("api.egress.test:443", ()))

    def test_record_names_user_and_dialled(self) -> None:
        """The access record names the authenticated user and the address the upstream socket reached."""
        client, _ct = self.connect()
        up, _ut = self.h.accept_upstream(peer=IPv6Address("TCP", "2001:db8::5", 443))
        [record] = self.finish(client, up)
        self.assertEqual(
            (record.upstream, record.user, record.upstream_address),
            ("api.egress.test:443", "alice", "[2001:db8::5]:443"),
        )

    def test_record_without_user_or_connect(self) -> None:
        """Refused credentials: no user and nothing dialled, both "-"; never the password."""
        client, _ct = self.connect(credentials=basic("alice", "hunter2"))
        [record] = self.finish(client)
        self.assertEqual((record.user, record.upstream_address), ("-", "-"))
        self.h = harness(users=())
        client, _ct = self.connect(credentials=b"")
        up, _ut = self.h.accept_upstream()
        [record] = self.finish(client, up)
        self.assertEqual(record.user, "-")
        self.assertEqual(record.upstream_address, "192.168.1.1:54321")  # StringTransport's peer

    def test_bytes_after_head_go_first(self) -> None:
        """Tunnel bytes sent with the CONNECT head reach the destination first."""
        _client, _ct = self.connect(extra=b"early")
        _up, ut = self.h.accept_upstream()
        self.assertEqual(ut.value(), b"early")

    def test_no_credentials_407(self) -> None:
        """Without Proxy-Authorization: 407 with the Basic challenge, no dial, flag UAEX."""
        client, ct = self.connect(credentials=b"")
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n"))
        self.assertIn(b'\r\nProxy-Authenticate: Basic realm="egressproxy"\r\n', ct.value())
        self.assertEqual(self.h.reactor.tcpClients, [])
        self.assert_lingering_close(client, ct)
        [record] = self.finish(client)
        self.assertEqual((record.upstream, record.flags), ("api.egress.test:443", ("UAEX",)))

    def test_wrong_password_407(self) -> None:
        """A wrong password is 407 and never dials."""
        client, ct = self.connect(credentials=basic("alice", "s3cre"))
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 407 "))
        self.assertEqual(self.h.reactor.tcpClients, [])

    def test_password_never_logged(self) -> None:
        """Neither a wrong nor a right password appears in any log event."""
        for password in ("s3cret", "hunter2"):
            client, _ct = self.connect(credentials=basic("alice", password))
            client.connectionLost(Failure(ConnectionDone()))
        text = repr(self.h.events) + repr(self.h.records())
        self.assertNotIn("hunter2", text)
        self.assertNotIn("s3cret", text)
        self.assertNotIn(base64.b64encode(b"alice:hunter2").decode(), text)

    def test_no_users_no_credentials_needed(self) -> None:
        """A listener without users tunnels without credentials."""
        self.h = harness(users=())
        self.connect(credentials=b"")
        self.assertEqual(len(self.h.reactor.tcpClients), 1)

    def test_not_allowed_403(self) -> None:
        """A destination outside the list is 403, never dialled, flag NR, logged by name."""
        for target in (b"api.egress.test:8443", b"evil.example:443", b"127.0.0.1:443", b"[::1]:443"):
            with self.subTest(target=target):
                self.h = harness()
                client, ct = self.connect(target=target)
                self.assertTrue(ct.value().startswith(b"HTTP/1.1 403 Forbidden\r\n"))
                self.assertEqual(self.h.reactor.tcpClients, [])
                [record] = self.finish(client)
                self.assertEqual(record.flags, ("NR",))
                self.assertEqual(record.upstream, target.decode())

    def test_cidr_allowed(self) -> None:
        """An IP literal inside an allowlisted CIDR is dialled as is."""
        self.connect(target=b"10.9.1.2:5432")
        self.assertEqual(self.h.reactor.tcpClients[-1][:2], ("10.9.1.2", 5432))

    def test_refused_502(self) -> None:
        """A refused connect is 502, flag UF."""
        client, ct = self.connect()
        refuse_newest(self.h)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        self.assertIn(b"connection refused", ct.value())
        self.assertEqual(ct.producerState, "producing")
        self.assert_lingering_close(client, ct)
        [record] = self.finish(client)
        self.assertEqual(record.flags, ("UF",))

    def test_unresolvable_502(self) -> None:
        """A name that does not resolve is 502."""
        self.h.reactor.installNameResolver(NoAddresses())
        # A pinned name skips resolution: this one is not pinned.
        _client, ct = self.connect(target=b"other.egress.test:80")
        self.h.reactor.advance(0.1)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 502 "), ct.value())
        self.assertIn(b"does not resolve", ct.value())

    def test_timeout_504(self) -> None:
        """A connect that times out is 504, flag UT."""
        self.h = harness(connect_timeout=2.0)
        client, ct = self.connect()
        self.h.reactor.advance(2.1)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"))
        client.readConnectionLost()
        [record] = self.finish(client)
        self.assertEqual(record.flags, ("UT",))

    def test_breaker_open_503(self) -> None:
        """The breaker is the listener's, across destinations: when full, another destination gets 503."""
        self.h = harness(max_pending=1)
        self.connect()
        _client, ct = self.connect(target=b"www.egress.test:80")
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 503 "))
        self.assertEqual(len(self.h.reactor.tcpClients), 1)

    def test_garbage_400(self) -> None:
        """A garbage request line is 400, flag DPE."""
        client, ct = self.h.connect_client()
        client.dataReceived(b"\x00\x01garbage\r\n\r\n")
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        [record] = self.finish(client)
        self.assertEqual((record.upstream, record.flags), ("-", ("DPE",)))

    def test_missing_port_400(self) -> None:
        """CONNECT without a port is 400."""
        _client, ct = self.connect(target=b"api.egress.test")
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 400 "))

    def test_origin_form_400(self) -> None:
        """A request for a path (not a proxy request) is 400."""
        client, ct = self.h.connect_client()
        client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 400 "))

    def test_huge_header_431(self) -> None:
        """A 1 MiB header is answered 431 on its first 16 KiB and the rest is dropped."""
        client, ct = self.h.connect_client()
        client.dataReceived(b"CONNECT api.egress.test:443 HTTP/1.1\r\nX-Big: ")
        for _ in range(64):
            client.dataReceived(b"x" * 16384)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 431 "))
        self.assertEqual(ct.value().count(b"HTTP/1.1"), 1)
        self.assertEqual(self.h.reactor.tcpClients, [])
        self.assertFalse(ct.disconnecting)

    def test_linger_bounded_by_bytes(self) -> None:
        """A refused client that keeps sending is closed after LINGER_BYTES."""
        client, ct = self.h.connect_client()
        client.dataReceived(b"X" * (MAX_HEAD + 1))
        for _ in range(forward.LINGER_BYTES // 65536 + 1):
            client.dataReceived(b"x" * 65536)
        self.assertTrue(ct.disconnecting)

    def test_linger_bounded_by_time(self) -> None:
        """A refused client that never sends EOF is closed after LINGER seconds."""
        client, ct = self.connect(credentials=b"")
        self.h.reactor.advance(forward.LINGER - 0.1)
        self.assertFalse(ct.disconnecting)
        self.h.reactor.advance(0.2)
        self.assertTrue(ct.disconnecting)
        self.finish(client)

    def test_slow_header_408(self) -> None:
        """A head trickling in one byte a second is answered 408 at HEADER_TIMEOUT, flag DPE."""
        client, ct = self.h.connect_client()
        data = b"CONNECT api.egress.test:443 HTTP/1.1\r\n"
        for i in range(int(http_connect.HEADER_TIMEOUT) - 1):
            client.dataReceived(data[i : i + 1])
            self.h.reactor.advance(1.0)
        self.assertEqual(ct.value(), b"")
        self.h.reactor.advance(1.0)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n"))
        self.h.reactor.advance(forward.LINGER)
        self.assertTrue(ct.disconnecting)
        [record] = self.finish(client)
        self.assertEqual(record.flags, ("DPE",))

    def test_silent_client_closed_quietly(self) -> None:
        """A client that connects and sends EOF without a byte is closed without a flag."""
        client, ct = self.h.connect_client()
        client.readConnectionLost()
        self.assertTrue(ct.disconnecting)
        [record] = self.finish(client)
        self.assertEqual(record.flags, ())

    def test_partial_head_then_eof(self) -> None:
        """EOF in the middle of a head closes with flag DPE."""
        client, ct = self.h.connect_client()
        client.dataReceived(b"CONNECT api")
        client.readConnectionLost()
        self.assertTrue(ct.disconnecting)
        [record] = self.finish(client)
        self.assertEqual(record.flags, ("DPE",))

    def test_client_gone_during_head(self) -> None:
        """A client that resets mid-head leaves no timer behind."""
        client, _ct = self.h.connect_client()
        client.dataReceived(b"CONN")
        self.finish(client)

    def test_client_gone_during_dial(self) -> None:
        """A client that leaves while the destination connects cancels the dial."""
        client, _ct = self.connect()
        self.assertEqual(self.h.cluster.breaker.pending, 1)
        self.finish(client)
        self.assertEqual(self.h.cluster.breaker.pending, 0)

    def test_source_refused_403(self) -> None:
        """A source outside allow_sources is answered 403 and closed."""
        self.h = Harness(
            cluster_config(name="fwd", endpoints=()),
            listener_config(mode="http_connect", cluster=None, allow_sources=(ip_network("10.0.0.0/8"),),
                            options=ForwardOptions(allow_destinations=RULES)),
        )
        _client, ct = self.h.connect_client()
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 403 "))
        self.assertTrue(ct.disconnecting)


class PlainHttpTests(FrontTestCase):
    def setUp(self) -> None:
        self.h = harness(users=())

    def test_get_forwarded(self) -> None:
        """GET http://host/path goes to host:80 in origin-form, cleaned, with Connection: close."""
        client, ct = self.h.connect_client()
        client.dataReceived(b"GET http://www.egress.test/a?b=1 HTTP/1.1\r\nHost: www.egress.test\r\n"
                            b"Proxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n")
        self.assertEqual(self.h.reactor.tcpClients[-1][:2], ("127.0.0.6", 80))
        up, ut = self.h.accept_upstream()
        self.assertEqual(ut.value(), b"GET /a?b=1 HTTP/1.1\r\nHost: www.egress.test\r\nAccept: */*\r\n"
                                     b"Connection: close\r\n\r\n")
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        self.assertEqual(ct.value(), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        up.readConnectionLost()
        self.assertTrue(ct.write_closed)
        [record] = self.finish(client, up)
        self.assertEqual((record.upstream, record.flags), ("www.egress.test:80", ()))

    def test_content_length_body(self) -> None:
        """A Content-Length body passes through untouched; a pipelined request after it does not."""
        client, _ct = self.h.connect_client()
        client.dataReceived(b"POST http://www.egress.test/ HTTP/1.1\r\nContent-Length: 10\r\n\r\n01234")
        _up, ut = self.h.accept_upstream()
        client.dataReceived(b"56789GET http://www.egress.test/ HTTP/1.1\r\nProxy-Authorization: Basic eA==\r\n\r\n")
        self.assertTrue(ut.value().endswith(b"\r\n\r\n0123456789"), ut.value())

    CHUNKED = b"POST http://www.egress.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"

    def test_chunked_body(self) -> None:
        """A chunked body is read whole before the dial, then sent untouched with the head, trailers included."""
        client, _ct = self.h.connect_client()
        body = b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
        client.dataReceived(self.CHUNKED + body[:4])
        self.assertEqual(self.h.reactor.tcpClients, [])
        client.dataReceived(body[4:] + b"junk")
        _up, ut = self.h.accept_upstream()
        self.assertTrue(ut.value().endswith(b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body))
        client.dataReceived(b"GET http://www.egress.test/ HTTP/1.1\r\n\r\n")
        self.assertTrue(ut.value().endswith(body), ut.value())

    def test_bad_chunk_400(self) -> None:
        """Malformed chunk framing is answered 400 and nothing is dialled, flag DPE."""
        for body in (b"zz\r\n", b"3\r\nabc\r\n4\r\nabcdEXTRA\r\n", b"3\r\nabc\r\n1\x00\r\n"):
            with self.subTest(body=body):
                self.h = harness(users=())
                client, ct = self.h.connect_client()
                client.dataReceived(self.CHUNKED + body[:3])
                client.dataReceived(body[3:])
                self.assertTrue(ct.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"), ct.value())
                self.assertEqual(self.h.reactor.tcpClients, [])
                self.assert_lingering_close(client, ct)
                [record] = self.finish(client)
                self.assertEqual((record.upstream, record.flags), ("www.egress.test:80", ("DPE",)))

    def test_chunked_body_too_large_413(self) -> None:
        """A chunked body larger than PENDING_LIMIT is answered 413 before anything is dialled."""
        client, ct = self.h.connect_client()
        client.dataReceived(self.CHUNKED + b"%x\r\n" % (PENDING_LIMIT + 1))
        for _ in range(PENDING_LIMIT // 65536 + 1):
            client.dataReceived(b"x" * 65536)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 413 Content Too Large\r\n"), ct.value())
        self.assertEqual(ct.value().count(b"HTTP/1.1"), 1)
        self.assertEqual(self.h.reactor.tcpClients, [])
        [record] = self.finish(client)
        self.assertEqual(record.flags, ("DPE",))

    def test_chunked_body_under_the_deadline(self) -> None:
        """A chunked body must arrive within HEADER_TIMEOUT of admission, else 408 and no dial."""
        client, ct = self.h.connect_client()
        client.dataReceived(self.CHUNKED + b"3\r\nab")
        self.h.reactor.advance(http_connect.HEADER_TIMEOUT)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 408 "), ct.value())
        self.assertEqual(self.h.reactor.tcpClients, [])
        self.h.reactor.advance(forward.LINGER)
        [record] = self.finish(client)
        self.assertEqual(record.flags, ("DPE",))

    def test_chunked_eof_mid_body(self) -> None:
        """EOF before the chunked body's end: closed, nothing dialled, flag DPE."""
        client, ct = self.h.connect_client()
        client.dataReceived(self.CHUNKED + b"3\r\nab")
        client.readConnectionLost()
        self.assertTrue(ct.disconnecting)
        self.assertEqual(self.h.reactor.tcpClients, [])
        [record] = self.finish(client)
        self.assertEqual(record.flags, ("DPE",))

    def test_chunked_refusal_before_body(self) -> None:
        """Policy is decided on the head: a refused destination is answered without waiting for the body."""
        client, ct = self.h.connect_client()
        client.dataReceived(self.CHUNKED.replace(b"www.egress.test/", b"www.egress.test:8080/"))
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 403 "))

    def test_content_length_body_streams(self) -> None:
        """A Content-Length body is dialled at once and streamed, whatever its size."""
        client, _ct = self.h.connect_client()
        size = 4 * PENDING_LIMIT
        client.dataReceived(b"POST http://www.egress.test/ HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size)
        self.assertEqual(len(self.h.reactor.tcpClients), 1)
        _up, ut = self.h.accept_upstream()
        for _ in range(size // 65536):
            client.dataReceived(b"y" * 65536)
        self.assertTrue(ut.value().endswith(b"\r\n\r\n" + b"y" * size))

    def test_client_eof_after_request(self) -> None:
        """The client's EOF after its request shuts the origin's write side (half-close)."""
        client, _ct = self.h.connect_client()
        client.dataReceived(b"GET http://www.egress.test/ HTTP/1.0\r\n\r\n")
        _up, ut = self.h.accept_upstream()
        client.readConnectionLost()
        self.assertTrue(ut.write_closed)

    def test_port_not_allowed(self) -> None:
        """Plain http:// to a port outside the list is 403."""
        _client, ct = self.h.connect_client()
        _client.dataReceived(b"GET http://www.egress.test:8080/ HTTP/1.1\r\n\r\n")
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 403 "))
        self.assertEqual(self.h.reactor.tcpClients, [])

    def test_smuggling_framing_400(self) -> None:
        """Transfer-Encoding with Content-Length is 400 and never dialled."""
        _client, ct = self.h.connect_client()
        _client.dataReceived(b"POST http://www.egress.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                             b"Content-Length: 3\r\n\r\n")
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 400 "))
        self.assertEqual(self.h.reactor.tcpClients, [])


GREETING_AUTH = b"\x05\x02\x00\x02"


def userpass(name: bytes, password: bytes) -> bytes:
    return bytes((1, len(name))) + name + bytes((len(password),)) + password


def socks_connect(name: bytes, port: int, command: int = 1) -> bytes:
    return bytes((5, command, 0, 3, len(name))) + name + port.to_bytes(2, "big")


class Socks5Tests(FrontTestCase):
    mode = "socks5"

    def handshake(self, request: bytes, password: bytes = b"s3cret"):  # type: ignore[no-untyped-def]
        client, ct = self.h.connect_client()
        client.dataReceived(GREETING_AUTH)
        client.dataReceived(userpass(b"alice", password))
        client.dataReceived(request)
        return client, ct

    def test_connect(self) -> None:
        """Credentials and an allowed name: dialled by the proxy, success reply with the bound address, splice."""
        client, ct = self.handshake(socks_connect(b"api.egress.test", 443))
        self.assertEqual(ct.value(), b"\x05\x02\x01\x00")
        self.assertEqual(self.h.reactor.tcpClients[-1][:2], ("127.0.0.5", 443))
        up, ut = self.h.accept_upstream()
        self.assertEqual(ct.value()[4:6], b"\x05\x00")
        client.dataReceived(b"ping")
        up.dataReceived(b"pong")
        self.assertEqual(ut.value(), b"ping")
        self.assertTrue(ct.value().endswith(b"pong"))
        [record] = self.finish(client, up)
        self.assertEqual((record.upstream, record.flags), ("api.egress.test:443", ()))

    def test_wrong_credentials(self) -> None:
        """Wrong credentials: status 1, closed, never dialled, flag UAEX."""
        client, ct = self.handshake(socks_connect(b"api.egress.test", 443), password=b"nope")
        self.assertEqual(ct.value(), b"\x05\x02\x01\x01")
        self.assertEqual(self.h.reactor.tcpClients, [])
        self.assert_lingering_close(client, ct)
        [record] = self.finish(client)
        self.assertEqual(record.flags, ("UAEX",))

    def test_no_auth_offered_with_users(self) -> None:
        """Offering only "no authentication" to a listener with users gets 0xFF."""
        client, ct = self.h.connect_client()
        client.dataReceived(b"\x05\x01\x00")
        self.assertEqual(ct.value(), b"\x05\xff")
        self.assertTrue(ct.write_closed)

    def test_no_users_no_auth(self) -> None:
        """Without users, "no authentication" is chosen."""
        self.h = harness("socks5", users=())
        client, ct = self.h.connect_client()
        client.dataReceived(b"\x05\x01\x00" + socks_connect(b"api.egress.test", 443))
        self.assertEqual(ct.value(), b"\x05\x00")
        self.assertEqual(len(self.h.reactor.tcpClients), 1)

    def test_not_allowed(self) -> None:
        """A name outside the list gets 0x02, is never dialled, flag NR."""
        client, ct = self.handshake(socks_connect(b"evil.example", 443))
        self.assertEqual(ct.value()[4:], reply(0x02))
        self.assertEqual(self.h.reactor.tcpClients, [])
        [record] = self.finish(client)
        self.assertEqual((record.upstream, record.flags), ("evil.example:443", ("NR",)))

    def test_ip_needs_cidr(self) -> None:
        """An IPv4 request is allowed only inside an allowlisted CIDR."""
        _client, ct = self.handshake(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x01\xbb")
        self.assertEqual(ct.value()[4:], reply(0x02))
        self.h = harness("socks5")
        self.handshake(b"\x05\x01\x00\x01\x0a\x09\x00\x01\x01\xbb")
        self.assertEqual(self.h.reactor.tcpClients[-1][:2], ("10.9.0.1", 443))

    def test_unsupported_commands(self) -> None:
        """BIND and UDP ASSOCIATE get 0x07 command not supported."""
        for command in (2, 3):
            with self.subTest(command=command):
                self.h = harness("socks5")
                client, ct = self.handshake(socks_connect(b"api.egress.test", 443, command))
                self.assertEqual(ct.value()[4:], reply(0x07))
                self.assertEqual(self.h.reactor.tcpClients, [])
                [record] = self.finish(client)
                self.assertEqual(record.flags, ("DPE",))

    def test_address_type_not_supported(self) -> None:
        """An unknown address type gets 0x08."""
        _client, ct = self.handshake(b"\x05\x01\x00\x09")
        self.assertEqual(ct.value()[4:], reply(0x08))

    def test_invalid_name(self) -> None:
        """A name that is no host name gets 0x04."""
        _client, ct = self.handshake(socks_connect(b"bad name", 443))
        self.assertEqual(ct.value()[4:], reply(0x04))
        self.assertEqual(self.h.reactor.tcpClients, [])

    def test_refused(self) -> None:
        """A refused connect gets 0x05."""
        _client, ct = self.handshake(socks_connect(b"api.egress.test", 443))
        refuse_newest(self.h)
        self.assertEqual(ct.value()[4:], reply(0x05))

    def test_timeout(self) -> None:
        """A connect timeout gets 0x06 (TTL expired), flag UT."""
        self.h = harness("socks5", connect_timeout=1.0)
        client, ct = self.handshake(socks_connect(b"api.egress.test", 443))
        self.h.reactor.advance(1.1)
        self.assertEqual(ct.value()[4:], reply(0x06))
        client.readConnectionLost()
        [record] = self.finish(client)
        self.assertEqual(record.flags, ("UT",))

    def test_unresolvable(self) -> None:
        """A name that does not resolve gets 0x04."""
        self.h.reactor.installNameResolver(NoAddresses())
        _client, ct = self.handshake(socks_connect(b"other.egress.test", 80))
        self.h.reactor.advance(0.1)
        self.assertEqual(ct.value()[4:], reply(0x04))

    def test_handshake_timeout(self) -> None:
        """A handshake not complete within HANDSHAKE_TIMEOUT is closed, flag DPE."""
        client, ct = self.h.connect_client()
        client.dataReceived(b"\x05\x02")
        self.h.reactor.advance(socks5.HANDSHAKE_TIMEOUT)
        self.assertTrue(ct.write_closed)
        self.h.reactor.advance(forward.LINGER)
        self.assertTrue(ct.disconnecting)
        [record] = self.finish(client)
        self.assertEqual(record.flags, ("DPE",))

    def test_not_socks(self) -> None:
        """An HTTP request on a SOCKS listener is closed without an answer, flag DPE."""
        client, ct = self.h.connect_client()
        client.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(ct.value(), b"")
        self.assertTrue(ct.write_closed)
        [record] = self.finish(client)
        self.assertEqual(record.flags, ("DPE",))

    @settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.binary(min_size=1, max_size=64), max_size=8), st.booleans())
    def test_random_bytes(self, chunks: list[bytes], auth: bool) -> None:
        """Random bytes never raise, never dial, and end waiting or answered and closing."""
        h = harness("socks5", users=USERS if auth else ())
        client, ct = h.connect_client()
        for chunk in chunks:
            client.dataReceived(chunk)
        self.assertLessEqual(len(h.reactor.tcpClients), 1)
        h.reactor.advance(socks5.HANDSHAKE_TIMEOUT)
        h.reactor.advance(forward.LINGER)
        self.assertTrue(ct.disconnecting or h.reactor.tcpClients)
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(h.records()), 1)

    @settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=300))
    def test_random_requests_after_handshake(self, request: bytes) -> None:
        """Random request bytes after a valid greeting never raise and dial only allowed names."""
        h = harness("socks5", users=())
        client, ct = h.connect_client()
        client.dataReceived(b"\x05\x01\x00" + request)
        for host, port, *_ in h.reactor.tcpClients:
            # api.egress.test:443 (pinned), *.egress.test:80, or 10.9.0.0/16.
            self.assertTrue((host, port) == ("127.0.0.5", 443) or port == 80 or host.startswith("10.9."), (host, port))
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(h.records()), 1)


class PerUserDestinationTests(FrontTestCase):
    """A user's own allow_destinations replaces the listener's; a user without one gets the listener's."""

    def setUp(self) -> None:
        self.h = harness(users=USERS_OWN)

    def connect(self, target: bytes, name: str, password: str):  # type: ignore[no-untyped-def]
        client, ct = self.h.connect_client()
        client.dataReceived(b"CONNECT " + target + b" HTTP/1.1\r\n" + basic(name, password) + b"\r\n")
        return client, ct

    def test_own_list(self) -> None:
        """bob reaches his own destination, not the listener's (the lists are not merged)."""
        client, ct = self.connect(b"api.egress.test:443", "bob", "b0b")
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 403 "), ct.value())
        self.assertEqual(self.h.reactor.tcpClients, [])
        [record] = self.finish(client)
        self.assertEqual((record.flags, record.user), (("NR",), "bob"))
        self.connect(b"bob.egress.test:443", "bob", "b0b")
        self.assertEqual(self.h.reactor.tcpClients[-1][:2], ("127.0.0.7", 443))

    def test_listener_list_for_others(self) -> None:
        """alice (no list of her own) gets the listener's list, not bob's."""
        _client, ct = self.connect(b"bob.egress.test:443", "alice", "s3cret")
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 403 "))
        self.connect(b"api.egress.test:443", "alice", "s3cret")
        self.assertEqual(self.h.reactor.tcpClients[-1][:2], ("127.0.0.5", 443))

    def test_wrong_password_for_a_user_with_a_list(self) -> None:
        """bob's name with alice's password is no one: 407."""
        _client, ct = self.connect(b"bob.egress.test:443", "bob", "s3cret")
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 407 "))
        self.assertEqual(self.h.reactor.tcpClients, [])

    def test_socks5(self) -> None:
        """The same rule on a socks5 listener."""
        for name, password, host, allowed in (
            (b"bob", b"b0b", b"bob.egress.test", True),
            (b"bob", b"b0b", b"api.egress.test", False),
            (b"alice", b"s3cret", b"bob.egress.test", False),
            (b"alice", b"s3cret", b"api.egress.test", True),
        ):
            with self.subTest(name=name, host=host):
                self.h = harness("socks5", users=USERS_OWN)
                client, ct = self.h.connect_client()
                client.dataReceived(GREETING_AUTH + userpass(name, password) + socks_connect(host, 443))
                self.assertEqual(ct.value()[:4], b"\x05\x02\x01\x00")
                self.assertEqual(len(self.h.reactor.tcpClients), int(allowed))
                if not allowed:
                    self.assertEqual(ct.value()[4:], reply(0x02))
                    [record] = self.finish(client)
                    self.assertEqual((record.flags, record.user), (("NR",), name.decode()))


class ReportModeTests(FrontTestCase):
    """policy: report dials what enforce would refuse, flags RP, logs and counts it; credentials still apply."""

    def setUp(self) -> None:
        self.h = harness(users=USERS_OWN, policy="report")
        self.log = capture_log(self.h)

    def connect(self, target: bytes, credentials: bytes = basic("alice", "s3cret")):  # type: ignore[no-untyped-def]
        client, ct = self.h.connect_client()
        client.dataReceived(b"CONNECT " + target + b" HTTP/1.1\r\n" + credentials + b"\r\n")
        return client, ct

    def test_outside_the_list_is_dialled_and_reported(self) -> None:
        """A destination enforce would refuse is dialled, tunnelled, flagged RP, counted and logged at warn."""
        client, ct = self.connect(b"evil.example:443")
        self.assertEqual(self.h.reactor.tcpClients[-1][:2], ("127.0.0.8", 443))
        up, _ut = self.h.accept_upstream()
        self.assertEqual(ct.value(), b"HTTP/1.1 200 Connection established\r\n\r\n")
        [record] = self.finish(client, up)
        self.assertEqual((record.upstream, record.flags, record.user), ("evil.example:443", ("RP",), "alice"))
        self.assertEqual(self.h.listener.reported, {"destination": 1})
        [event] = self.log
        self.assertEqual(event["log_level"].name, "warn")
        self.assertEqual(
            log_text(self.log),
            "fwd: report mode: 127.0.0.1:50000 -> evil.example:443 is not in the listener's allow_destinations "
            "(CONNECT); enforce would refuse it",
        )

    def test_inside_the_list_is_not_reported(self) -> None:
        """An allowed destination is neither flagged nor counted."""
        client, _ct = self.connect(b"api.egress.test:443")
        up, _ut = self.h.accept_upstream()
        [record] = self.finish(client, up)
        self.assertEqual(record.flags, ())
        self.assertEqual(self.h.listener.reported, {})

    def test_user_list_named(self) -> None:
        """The report names the user's own list when that is the one that applies."""
        self.connect(b"api.egress.test:443", basic("bob", "b0b"))
        self.assertEqual(len(self.h.reactor.tcpClients), 1)
        self.assertIn("-> api.egress.test:443 is not in user bob's allow_destinations", log_text(self.log))

    def test_credentials_still_required(self) -> None:
        """Report mode never bypasses credentials: wrong or missing ones are 407, nothing dialled."""
        for credentials in (basic("alice", "wrong"), b""):
            with self.subTest(credentials=credentials):
                client, ct = self.connect(b"evil.example:443", credentials)
                self.assertTrue(ct.value().startswith(b"HTTP/1.1 407 "))
                self.assertEqual(self.h.reactor.tcpClients, [])
                [*_, record] = self.finish(client)
                self.assertEqual(record.flags, ("UAEX",))
        self.assertEqual(self.h.listener.reported, {})

    def test_plain_http(self) -> None:
        """A plain http:// request to a port outside the list goes through, reported."""
        client, _ct = self.h.connect_client()
        client.dataReceived(b"GET http://www.egress.test:8080/ HTTP/1.1\r\n" + basic("alice", "s3cret") + b"\r\n")
        self.assertEqual(self.h.reactor.tcpClients[-1][:2], ("127.0.0.6", 8080))
        up, ut = self.h.accept_upstream()
        self.assertTrue(ut.value().startswith(b"GET / HTTP/1.1\r\nHost: www.egress.test:8080\r\n"))
        [record] = self.finish(client, up)
        self.assertEqual(record.flags, ("RP",))

    def test_socks5(self) -> None:
        """socks5: success reply and splice to a destination enforce would refuse; wrong credentials still fail."""
        self.h = harness("socks5", users=USERS_OWN, policy="report")
        client, ct = self.h.connect_client()
        client.dataReceived(GREETING_AUTH + userpass(b"alice", b"s3cret") + socks_connect(b"evil.example", 443))
        up, _ut = self.h.accept_upstream()
        self.assertEqual(ct.value()[4:6], b"\x05\x00")
        [record] = self.finish(client, up)
        self.assertEqual(record.flags, ("RP",))
        self.assertEqual(self.h.listener.reported, {"destination": 1})
        client, ct = self.h.connect_client()
        client.dataReceived(GREETING_AUTH + userpass(b"alice", b"nope") + socks_connect(b"evil.example", 443))
        self.assertEqual(ct.value(), b"\x05\x02\x01\x01")
        self.assertEqual(len(self.h.reactor.tcpClients), 1)


class HttpFuzzTests(SynchronousTestCase):
    @settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.binary(min_size=1, max_size=256), max_size=8))
    def test_random_bytes(self, chunks: list[bytes]) -> None:
        """Random bytes on an http_connect listener never raise and never dial."""
        h = harness()
        client, ct = h.connect_client()
        for chunk in chunks:
            client.dataReceived(chunk)
        self.assertEqual(h.reactor.tcpClients, [])
        h.reactor.advance(http_connect.HEADER_TIMEOUT)
        h.reactor.advance(forward.LINGER)
        self.assertTrue(ct.disconnecting)
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(h.records()), 1)
        self.assertEqual(h.reactor.getDelayedCalls(), [])
