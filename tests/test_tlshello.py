"""Unit tests of the ClientHello reader and the TLS alert builder."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.modes.postgres import tlshello
from egressproxy.modes.postgres.tlshello import HelloError, alert_record, parse_client_hello
from tests.tlsclient import client_hello


def record(body: bytes, content_type: int = 22, version: bytes = b"\x03\x01") -> bytes:
    return bytes([content_type]) + version + struct.pack("!H", len(body)) + body


def hello_body(extensions: bytes | None, session_id: bytes = b"", suites: bytes = b"\x13\x01") -> bytes:
    body = b"\x03\x03" + b"\x00" * 32 + bytes([len(session_id)]) + session_id
    body += struct.pack("!H", len(suites)) + suites + b"\x01\x00"
    if extensions is not None:
        body += struct.pack("!H", len(extensions)) + extensions
    return b"\x01" + len(body).to_bytes(3, "big") + body


def extension(kind: int, data: bytes) -> bytes:
    return struct.pack("!HH", kind, len(data)) + data


def sni(*names: bytes, kind: int = 0) -> bytes:
    entries = b"".join(bytes([kind]) + struct.pack("!H", len(n)) + n for n in names)
    return extension(0, struct.pack("!H", len(entries)) + entries)


class ClientHelloTests(SynchronousTestCase):
    def test_reads_openssl_sni_and_alpn(self) -> None:
        """The SNI and ALPN protocols of a real OpenSSL ClientHello are read, and its size is the whole record."""
        data = client_hello(b"A.DB.Egress.Test", [b"postgresql"])
        hello = parse_client_hello(data)
        assert hello is not None
        self.assertEqual((hello.server_name, hello.alpn, hello.size), ("a.db.egress.test", (b"postgresql",), len(data)))

    def test_no_sni(self) -> None:
        """A ClientHello without server_name has server_name None."""
        hello = parse_client_hello(client_hello(None))
        assert hello is not None
        self.assertIsNone(hello.server_name)

    def test_no_extensions(self) -> None:
        """A TLS 1.2-style ClientHello without any extensions is read (no SNI)."""
        hello = parse_client_hello(record(hello_body(None)))
        assert hello is not None
        self.assertEqual((hello.server_name, hello.alpn), (None, ()))

    def test_every_prefix_needs_more(self) -> None:
        """Every proper prefix of a ClientHello asks for more bytes."""
        data = client_hello()
        for end in range(len(data)):
            self.assertIsNone(parse_client_hello(data[:end]), end)

    def test_split_over_records(self) -> None:
        """A ClientHello fragmented over two records is read, its size counting both."""
        body = hello_body(sni(b"b.db.egress.test"))
        data = record(body[:10]) + record(body[10:])
        hello = parse_client_hello(data + b"trailing")
        assert hello is not None
        self.assertEqual((hello.server_name, hello.size), ("b.db.egress.test", len(data)))

    def test_too_many_records(self) -> None:
        """A ClientHello fragmented over more than MAX_HELLO_RECORDS records is refused."""
        body = hello_body(sni(b"a.test"))
        data = b"".join(record(body[i:i + 2]) for i in range(0, len(body), 2))
        self.assertRaises(HelloError, parse_client_hello, data)

    def test_bytearray(self) -> None:
        """A bytearray buffer (what the front keeps) parses like bytes."""
        hello = parse_client_hello(bytearray(client_hello()))
        assert hello is not None
        self.assertEqual(hello.server_name, "a.db.egress.test")

    def test_not_handshake(self) -> None:
        """A record that is not a handshake is refused."""
        self.assertRaises(HelloError, parse_client_hello, record(b"\x01\x00", content_type=23))

    def test_not_client_hello(self) -> None:
        """A handshake message other than ClientHello is refused."""
        self.assertRaises(HelloError, parse_client_hello, record(b"\x02\x00\x00\x00"))

    def test_bad_record_version(self) -> None:
        """An SSL 2.0-looking or otherwise odd record version is refused."""
        self.assertRaises(HelloError, parse_client_hello, record(hello_body(None), version=b"\x02\x00"))

    def test_oversized_record(self) -> None:
        """A record longer than 2**14 bytes is refused from its header alone."""
        self.assertRaises(HelloError, parse_client_hello, b"\x16\x03\x01\x40\x01")

    def test_oversized_hello(self) -> None:
        """A ClientHello spanning more than MAX_CLIENT_HELLO wire bytes is refused."""
        body = hello_body(extension(21, b"\x00" * 20000))
        data = record(body[:16000]) + record(body[16000:])
        self.assertRaises(HelloError, parse_client_hello, data)

    def test_truncated_inside(self) -> None:
        """A ClientHello whose inner lengths overrun it is refused."""
        body = bytearray(hello_body(sni(b"a.db.egress.test")))
        body[4 + 2 + 32] = 40  # a session id longer than what follows allows
        self.assertRaises(HelloError, parse_client_hello, record(bytes(body)))

    def test_two_host_names(self) -> None:
        """A server_name list with two host names is refused."""
        self.assertRaises(HelloError, parse_client_hello, record(hello_body(sni(b"a.test", b"b.test"))))

    def test_other_name_types_ignored(self) -> None:
        """Name types other than host_name are skipped."""
        hello = parse_client_hello(record(hello_body(sni(b"opaque", kind=7))))
        assert hello is not None
        self.assertIsNone(hello.server_name)

    def test_non_ascii_name(self) -> None:
        """A non-ASCII host name is refused."""
        self.assertRaises(HelloError, parse_client_hello, record(hello_body(sni("é.test".encode()))))

    def test_repeated_extension(self) -> None:
        """An extension that appears twice is refused."""
        self.assertRaises(
            HelloError, parse_client_hello, record(hello_body(sni(b"a.test") + sni(b"b.test")))
        )

    @given(st.binary(max_size=600))
    @settings(max_examples=400, deadline=None)
    def test_random_bytes(self, data: bytes) -> None:
        """Random bytes give a ClientHello, None or HelloError, never another exception."""
        try:
            parse_client_hello(data)
        except HelloError:
            pass

    @given(st.binary(max_size=300), st.integers(min_value=0, max_value=2000))
    @settings(max_examples=300, deadline=None)
    def test_mutated_hello(self, noise: bytes, offset: int) -> None:
        """A real ClientHello with bytes overwritten never raises anything but HelloError."""
        data = bytearray(client_hello(b"a.db.egress.test", [b"postgresql"]))
        offset %= len(data)
        data[offset:offset + len(noise)] = noise
        try:
            result = parse_client_hello(bytes(data))
        except HelloError:
            return
        if result is not None:
            self.assertLessEqual(result.size, len(data))


class AlertTests(SynchronousTestCase):
    def test_alert_record(self) -> None:
        """A fatal alert is a 7-byte record: type 21, version 3.3, length 2, level 2, description."""
        self.assertEqual(alert_record(tlshello.UNRECOGNIZED_NAME), bytes([21, 3, 3, 0, 2, 2, 112]))
        self.assertEqual(alert_record(tlshello.ACCESS_DENIED)[-1], 49)
        self.assertEqual(alert_record(tlshello.INTERNAL_ERROR)[-1], 80)
