"""Unit tests of the Postgres wire pieces: initial packets, ErrorResponse, BackendKeyData."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from egressproxy import pgwire
from egressproxy.pgwire import BackendKeyScanner, CancelKey, ProtocolError, error_response, read_initial_packet
from tests.tlsclient import client_hello


def startup(params: dict[str, str], version: int = 196608) -> bytes:
    body = struct.pack("!i", version)
    for key, value in params.items():
        body += key.encode() + b"\x00" + value.encode() + b"\x00"
    body += b"\x00"
    return struct.pack("!i", len(body) + 4) + body


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def parse_error(data: bytes) -> dict[str, str]:
    """The fields of one ErrorResponse."""
    assert data[:1] == b"E"
    (length,) = struct.unpack_from("!i", data, 1)
    assert length == len(data) - 1
    fields = {}
    for part in data[5:-2].split(b"\x00"):
        fields[chr(part[0])] = part[1:].decode()
    assert data[-2:] == b"\x00\x00"
    return fields


STARTUP = startup({"user": "postgres", "database": "postgres"})
BACKEND_START = (
    message(b"R", struct.pack("!i", 0))
    + message(b"S", b"server_version\x0015.0\x00")
    + message(b"K", struct.pack("!ii", 4242, 77))
    + message(b"Z", b"I")
)


class InitialPacketTests(SynchronousTestCase):
    def test_ssl_request(self) -> None:
        """Eight bytes with code 80877103 are an SSLRequest; the bytes after it are left."""
        packet, rest = read_initial_packet(pgwire.SSL_REQUEST + b"more")  # type: ignore[misc]
        self.assertEqual((packet.kind, packet.data, rest), ("ssl", pgwire.SSL_REQUEST, b"more"))

    def test_gssenc_request(self) -> None:
        """Code 80877104 is a GSSENCRequest."""
        packet, _ = read_initial_packet(struct.pack("!ii", 8, 80877104))  # type: ignore[misc]
        self.assertEqual(packet.kind, "gssenc")

    def test_cancel_request(self) -> None:
        """A 16-byte CancelRequest carries the backend's pid and key."""
        data = struct.pack("!iiii", 16, 80877102, 4242, 77)
        packet, _ = read_initial_packet(data)  # type: ignore[misc]
        self.assertEqual((packet.kind, packet.cancel), ("cancel", CancelKey(4242, struct.pack("!i", 77))))
        self.assertEqual(pgwire.cancel_request(packet.cancel), data)

    def test_long_cancel_key(self) -> None:
        """A protocol 3.2 CancelRequest with a 32-byte key is read whole."""
        data = struct.pack("!iii", 44, 80877102, 1) + b"k" * 32
        packet, _ = read_initial_packet(data)  # type: ignore[misc]
        self.assertEqual(packet.cancel, CancelKey(1, b"k" * 32))

    def test_cancel_key_bounds(self) -> None:
        """Cancel keys shorter than 4 or longer than 256 bytes are refused."""
        for size in (3, 257):
            data = struct.pack("!iii", 12 + size, 80877102, 1) + b"k" * size
            self.assertRaises(ProtocolError, read_initial_packet, data)

    def test_startup(self) -> None:
        """A protocol 3.0 StartupMessage is read whole with its version."""
        packet, rest = read_initial_packet(STARTUP)  # type: ignore[misc]
        self.assertEqual((packet.kind, packet.data, packet.version, rest), ("startup", STARTUP, (3, 0), b""))

    def test_startup_3_2(self) -> None:
        """Protocol 3.2 is accepted (the server negotiates)."""
        packet, _ = read_initial_packet(startup({"user": "u"}, version=(3 << 16) | 2))  # type: ignore[misc]
        self.assertEqual(packet.version, (3, 2))

    def test_prefixes_need_more(self) -> None:
        """Every proper prefix of a packet asks for more bytes."""
        for data in (pgwire.SSL_REQUEST, STARTUP, struct.pack("!iiii", 16, 80877102, 1, 2)):
            for end in range(len(data)):
                self.assertIsNone(read_initial_packet(data[:end]))

    def test_direct_tls(self) -> None:
        """A TLS handshake record is a direct-TLS client; nothing is consumed."""
        hello = client_hello()
        packet, rest = read_initial_packet(hello[:1])  # type: ignore[misc]
        self.assertEqual((packet.kind, rest), ("tls", hello[:1]))

    def test_bad_lengths(self) -> None:
        """Lengths under 8 or over 10000 are refused from the header alone."""
        for length in (0, 7, -1, 10001, 1 << 30):
            self.assertRaises(ProtocolError, read_initial_packet, struct.pack("!i", length))

    def test_ssl_request_wrong_length(self) -> None:
        """An SSLRequest code in a longer packet is refused."""
        self.assertRaises(ProtocolError, read_initial_packet, struct.pack("!iii", 12, 80877103, 0))

    def test_old_protocol(self) -> None:
        """Protocol 2.0 is refused."""
        self.assertRaises(ProtocolError, read_initial_packet, startup({"user": "u"}, version=2 << 16))

    def test_unterminated_startup(self) -> None:
        """A StartupMessage not ending in a zero byte is refused."""
        data = STARTUP[:-1] + b"x"
        self.assertRaises(ProtocolError, read_initial_packet, data)

    def test_http_request(self) -> None:
        """An HTTP request on the port is a protocol error, not a hang."""
        self.assertRaises(ProtocolError, read_initial_packet, b"GET / HTTP/1.1\r\n\r\n")

    @given(st.binary(max_size=300))
    @settings(max_examples=500, deadline=None)
    def test_random_bytes(self, data: bytes) -> None:
        """Random bytes give a packet, None or ProtocolError, never another exception."""
        try:
            result = read_initial_packet(data)
        except ProtocolError:
            return
        if result is not None:
            packet, rest = result
            self.assertEqual(packet.data + rest, data)

    @given(st.integers(min_value=-(2**31), max_value=2**31 - 1), st.binary(max_size=64))
    @settings(max_examples=300, deadline=None)
    def test_random_lengths(self, length: int, body: bytes) -> None:
        """Any declared length is either waited for within the bound or refused."""
        try:
            result = read_initial_packet(struct.pack("!i", length) + body)
        except ProtocolError:
            return
        if result is None:
            self.assertTrue(8 <= length <= pgwire.MAX_STARTUP_PACKET or length >> 24 == 0x16)


class ErrorResponseTests(SynchronousTestCase):
    def test_fields(self) -> None:
        """An ErrorResponse carries S, V, C, M and the optional D and H fields."""
        data = error_response("08001", "egressproxy: no", detail="why", hint="try")
        self.assertEqual(
            parse_error(data), {"S": "FATAL", "V": "FATAL", "C": "08001", "M": "egressproxy: no", "D": "why", "H": "try"}
        )

    def test_no_nul_inside(self) -> None:
        """A NUL in a text cannot end its field early."""
        self.assertEqual(parse_error(error_response("08001", "a\x00b"))["M"], "a b")


class BackendKeyScannerTests(SynchronousTestCase):
    def test_finds_key_and_stops_at_ready(self) -> None:
        """BackendKeyData is found and scanning ends at ReadyForQuery."""
        scanner = BackendKeyScanner()
        scanner.feed(BACKEND_START)
        self.assertEqual((scanner.key, scanner.done, scanner.error), (CancelKey(4242, struct.pack("!i", 77)), True, None))

    def test_byte_by_byte(self) -> None:
        """The same answer fed one byte at a time gives the same key."""
        scanner = BackendKeyScanner()
        for i in range(len(BACKEND_START)):
            self.assertFalse(scanner.done)
            scanner.feed(BACKEND_START[i:i + 1])
        self.assertEqual(scanner.key, CancelKey(4242, struct.pack("!i", 77)))
        self.assertTrue(scanner.done)

    def test_error_response_ends(self) -> None:
        """An ErrorResponse (failed authentication) ends the scan without a key."""
        scanner = BackendKeyScanner()
        scanner.feed(message(b"E", b"SFATAL\x00\x00"))
        self.assertEqual((scanner.key, scanner.done), (None, True))

    def test_bad_length(self) -> None:
        """A message length under 4 stops the scan with an error."""
        scanner = BackendKeyScanner()
        scanner.feed(b"R\x00\x00\x00\x02")
        self.assertTrue(scanner.done)
        self.assertIsNotNone(scanner.error)

    def test_bad_key_length(self) -> None:
        """A BackendKeyData with a 2-byte key stops the scan with an error."""
        scanner = BackendKeyScanner()
        scanner.feed(message(b"K", b"\x00" * 6))
        self.assertEqual((scanner.key, scanner.done), (None, True))

    @given(st.lists(st.binary(max_size=40), max_size=20))
    @settings(max_examples=300, deadline=None)
    def test_random_chunks(self, chunks: list[bytes]) -> None:
        """Random bytes in random chunks never raise."""
        scanner = BackendKeyScanner()
        for chunk in chunks:
            scanner.feed(chunk)
