"""Unit tests of the SOCKS5 handshake state machine (RFC 1928, RFC 1929)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.modes.socks5.socks import (
    ADDRESS_TYPE_NOT_SUPPORTED,
    BIND,
    CONNECT,
    DOMAIN_NAME,
    GENERAL_FAILURE,
    IPV4,
    IPV6,
    SUCCEEDED,
    Rejected,
    Request,
    Socks5Handshake,
    reply,
)

GREETING_NO_AUTH = b"\x05\x01\x00"
GREETING_BOTH = b"\x05\x02\x00\x02"


def userpass(name: bytes, password: bytes) -> bytes:
    return bytes((1, len(name))) + name + bytes((len(password),)) + password


def connect_domain(name: bytes, port: int, command: int = CONNECT) -> bytes:
    return bytes((5, command, 0, DOMAIN_NAME, len(name))) + name + port.to_bytes(2, "big")


def check(name: bytes, password: bytes) -> bool:
    return (name, password) == (b"alice", b"s3cret")


class NoAuthTests(SynchronousTestCase):
    def test_connect_domain(self) -> None:
        """Without credentials: method 0, then the request's name and port."""
        machine = Socks5Handshake(None)
        self.assertEqual(machine.feed(GREETING_NO_AUTH), (b"\x05\x00", None))
        answer, request = machine.feed(connect_domain(b"api.egress.test", 443))
        self.assertEqual((answer, request), (b"", Request(CONNECT, DOMAIN_NAME, "api.egress.test", 443)))

    def test_connect_ipv4_and_ipv6(self) -> None:
        """IPv4 and IPv6 requests give the address as text."""
        for atyp, packed, text in ((IPV4, b"\x7f\x00\x00\x01", "127.0.0.1"), (IPV6, b"\x00" * 15 + b"\x01", "::1")):
            with self.subTest(text=text):
                machine = Socks5Handshake(None)
                machine.feed(GREETING_NO_AUTH)
                _, request = machine.feed(bytes((5, 1, 0, atyp)) + packed + b"\x01\xbb")
                self.assertEqual(request, Request(CONNECT, atyp, text, 443))

    def test_pipelined_in_one_chunk(self) -> None:
        """A greeting, request and tunnel bytes in one chunk: answer, request, rest."""
        machine = Socks5Handshake(None)
        answer, request = machine.feed(GREETING_NO_AUTH + connect_domain(b"a.example", 80) + b"GET /")
        self.assertEqual(answer, b"\x05\x00")
        self.assertEqual(request, Request(CONNECT, DOMAIN_NAME, "a.example", 80))
        self.assertEqual(machine.rest, b"GET /")

    def test_byte_by_byte(self) -> None:
        """The same handshake fed one byte at a time gives the same result."""
        data = GREETING_NO_AUTH + connect_domain(b"a.example", 80)
        machine = Socks5Handshake(None)
        answers, request = b"", None
        for i in range(len(data)):
            answer, request = machine.feed(data[i : i + 1])
            answers += answer
        self.assertEqual((answers, request), (b"\x05\x00", Request(CONNECT, DOMAIN_NAME, "a.example", 80)))

    def test_user_pass_only_refused(self) -> None:
        """A client offering only username/password to a no-auth proxy gets 0xFF."""
        with self.assertRaises(Rejected) as caught:
            Socks5Handshake(None).feed(b"\x05\x01\x02")
        self.assertEqual(caught.exception.answer, b"\x05\xff")

    def test_bind_is_returned(self) -> None:
        """Commands are the front's business: BIND comes back as a request."""
        machine = Socks5Handshake(None)
        machine.feed(GREETING_NO_AUTH)
        _, request = machine.feed(connect_domain(b"a.example", 80, BIND))
        self.assertEqual(request.command, BIND)  # type: ignore[union-attr]


class AuthTests(SynchronousTestCase):
    def test_good_credentials(self) -> None:
        """With credentials required: method 2, status 0, then the request."""
        machine = Socks5Handshake(check)
        self.assertEqual(machine.feed(GREETING_BOTH), (b"\x05\x02", None))
        self.assertEqual(machine.feed(userpass(b"alice", b"s3cret")), (b"\x01\x00", None))
        _, request = machine.feed(connect_domain(b"a.example", 443))
        self.assertEqual(request, Request(CONNECT, DOMAIN_NAME, "a.example", 443))

    def test_wrong_credentials(self) -> None:
        """Wrong credentials: status 1, marked as an authentication refusal."""
        machine = Socks5Handshake(check)
        machine.feed(GREETING_BOTH)
        with self.assertRaises(Rejected) as caught:
            machine.feed(userpass(b"alice", b"wrong"))
        self.assertEqual(caught.exception.answer, b"\x01\x01")
        self.assertTrue(caught.exception.authentication)

    def test_no_auth_offer_refused(self) -> None:
        """A client offering only "no authentication" when credentials are required gets 0xFF."""
        with self.assertRaises(Rejected) as caught:
            Socks5Handshake(check).feed(GREETING_NO_AUTH)
        self.assertEqual(caught.exception.answer, b"\x05\xff")
        self.assertFalse(caught.exception.authentication)

    def test_pipelined_refusal_keeps_earlier_answers(self) -> None:
        """A refusal in the same chunk as the greeting carries the method answer too."""
        with self.assertRaises(Rejected) as caught:
            Socks5Handshake(check).feed(GREETING_BOTH + userpass(b"bob", b"x"))
        self.assertEqual(caught.exception.answer, b"\x05\x02\x01\x01")

    def test_bad_subnegotiation_version(self) -> None:
        """A subnegotiation with a version other than 1 fails."""
        machine = Socks5Handshake(check)
        machine.feed(GREETING_BOTH)
        with self.assertRaises(Rejected) as caught:
            machine.feed(b"\x05\x05alice\x06s3cret")
        self.assertEqual(caught.exception.answer, b"\x01\x01")


class MalformedTests(SynchronousTestCase):
    def test_not_socks5(self) -> None:
        """A first byte other than 5 (SOCKS4, HTTP) is refused without an answer."""
        for data in (b"\x04\x01\x00\x50", b"GET / HTTP/1.1\r\n"):
            with self.subTest(data=data):
                with self.assertRaises(Rejected) as caught:
                    Socks5Handshake(None).feed(data)
                self.assertEqual(caught.exception.answer, b"")

    def test_unknown_address_type(self) -> None:
        """An unknown address type gets reply 0x08."""
        machine = Socks5Handshake(None)
        machine.feed(GREETING_NO_AUTH)
        with self.assertRaises(Rejected) as caught:
            machine.feed(b"\x05\x01\x00\x02abcd")
        self.assertEqual(caught.exception.answer, reply(ADDRESS_TYPE_NOT_SUPPORTED))

    def test_bad_request_version(self) -> None:
        """A request with a version other than 5 gets a general failure."""
        machine = Socks5Handshake(None)
        machine.feed(GREETING_NO_AUTH)
        with self.assertRaises(Rejected) as caught:
            machine.feed(b"\x04\x01\x00\x01")
        self.assertEqual(caught.exception.answer, reply(GENERAL_FAILURE))

    def test_zero_methods(self) -> None:
        """A greeting with no methods gets 0xFF."""
        with self.assertRaises(Rejected) as caught:
            Socks5Handshake(None).feed(b"\x05\x00")
        self.assertEqual(caught.exception.answer, b"\x05\xff")

    @settings(max_examples=500)
    @given(st.booleans(), st.binary(max_size=600), st.integers(1, 32))
    def test_random_bytes(self, auth: bool, data: bytes, step: int) -> None:
        """Random bytes end in a request, a wait or Rejected, the same however they are split."""
        outcomes = []
        for size in (len(data) or 1, step):
            machine = Socks5Handshake(check if auth else None)
            answers = b""
            try:
                request, rest = None, None
                for i in range(0, len(data), size):
                    answer, request = machine.feed(data[i : i + size])
                    answers += answer
                    if request is not None:
                        rest = machine.rest + data[i + size :]
                        break
                outcomes.append((answers, request, rest))
            except Rejected as e:
                outcomes.append((answers + e.answer, "rejected", e.authentication))
        self.assertEqual(outcomes[0], outcomes[1])
        self.assertLessEqual(len(outcomes[0][0]), 2 + 2 + 22)


class ReplyTests(SynchronousTestCase):
    def test_failure_reply(self) -> None:
        """A failure reply carries 0.0.0.0:0."""
        self.assertEqual(reply(GENERAL_FAILURE), b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00")

    def test_success_reply(self) -> None:
        """A success reply carries the bound address, IPv4 or IPv6."""
        self.assertEqual(reply(SUCCEEDED, IPv4Address("127.0.0.1"), 5000), b"\x05\x00\x00\x01\x7f\x00\x00\x01\x13\x88")
        self.assertEqual(reply(SUCCEEDED, IPv6Address("::1"), 1), b"\x05\x00\x00\x04" + b"\x00" * 15 + b"\x01\x00\x01")
