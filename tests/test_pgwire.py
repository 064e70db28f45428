"""Unit tests of the Postgres wire pieces: initial packets, ErrorResponse, BackendKeyData."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.modes.postgres import pgwire
from egressproxy.modes.postgres.pgwire import (
    CancelKey,
    ProtocolError,
    SaslInitialResponse,
    StartupAnswer,
    error_response,
    read_initial_packet,
    read_sasl_initial_response,
    sasl_request,
)
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


class StartupAnswerTests(SynchronousTestCase):
    def test_finds_key_and_stops_at_ready(self) -> None:
        """BackendKeyData is found, reading ends at ReadyForQuery, and the bytes relay unchanged."""
        answer = StartupAnswer()
        relayed = answer.feed(BACKEND_START)
        self.assertEqual((answer.key, answer.done, answer.error), (CancelKey(4242, struct.pack("!i", 77)), True, None))
        self.assertEqual(relayed, BACKEND_START)
        self.assertTrue(answer.authenticated)

    def test_byte_by_byte(self) -> None:
        """The same answer fed one byte at a time gives the same key and the same bytes."""
        answer = StartupAnswer(strip_channel_binding=True)
        relayed = b""
        for i in range(len(BACKEND_START)):
            self.assertFalse(answer.done)
            relayed += answer.feed(BACKEND_START[i:i + 1])
        self.assertEqual(answer.key, CancelKey(4242, struct.pack("!i", 77)))
        self.assertTrue(answer.done)
        self.assertEqual(relayed, BACKEND_START)

    def test_long_cancel_key(self) -> None:
        """PostgreSQL 18's protocol 3.2 keys (up to 256 bytes) are kept whole."""
        secret = bytes(range(32))
        answer = StartupAnswer()
        answer.feed(message(b"K", struct.pack("!i", 9) + secret) + message(b"Z", b"I"))
        self.assertEqual(answer.key, CancelKey(9, secret))

    def test_error_response_ends_with_sqlstate(self) -> None:
        """An ErrorResponse (a refused login) ends reading and names its SQLSTATE and message."""
        answer = StartupAnswer()
        error = error_response("28P01", 'password authentication failed for user "app"')
        self.assertEqual(answer.feed(error + b"trailing"), error + b"trailing")
        self.assertEqual((answer.key, answer.done), (None, True))
        self.assertEqual(answer.refused, ("28P01", 'password authentication failed for user "app"'))
        self.assertFalse(answer.authenticated)

    def test_bad_length(self) -> None:
        """A message length under 4 stops reading with an error, and the bytes still pass."""
        answer = StartupAnswer()
        self.assertEqual(answer.feed(b"R\x00\x00\x00\x02"), b"R\x00\x00\x00\x02")
        self.assertTrue(answer.done)
        self.assertIsNotNone(answer.error)

    def test_bad_key_length(self) -> None:
        """A BackendKeyData with a 2-byte key stops reading with an error."""
        answer = StartupAnswer()
        answer.feed(message(b"K", b"\x00" * 6))
        self.assertEqual((answer.key, answer.done), (None, True))

    def test_partial_message_is_held(self) -> None:
        """Nothing of a message is relayed until the whole of it has arrived."""
        answer = StartupAnswer()
        sasl = sasl_request(["SCRAM-SHA-256"])
        self.assertEqual(answer.feed(sasl[:7]), b"")
        self.assertEqual(answer.feed(sasl[7:]), sasl)
        self.assertTrue(answer.sasl)

    def test_strips_plus(self) -> None:
        """With strip_channel_binding, SCRAM-SHA-256-PLUS leaves the list and the length follows."""
        answer = StartupAnswer(strip_channel_binding=True)
        offered = sasl_request(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
        relayed = answer.feed(offered)
        self.assertEqual(relayed, sasl_request(["SCRAM-SHA-256"]))
        self.assertEqual(relayed, b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00")
        self.assertTrue(answer.stripped)

    def test_strip_keeps_other_messages(self) -> None:
        """Messages around the rewritten one pass byte for byte, in order."""
        answer = StartupAnswer(strip_channel_binding=True)
        before = message(b"N", b"SNOTICE\x00Mhello\x00\x00")
        after = message(b"R", struct.pack("!i", 11) + b"r=abc")
        relayed = answer.feed(before + sasl_request(["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]) + after)
        self.assertEqual(relayed, before + sasl_request(["SCRAM-SHA-256"]) + after)

    def test_no_strip_without_the_option(self) -> None:
        """Without strip_channel_binding (passthrough) the list is relayed as it came."""
        answer = StartupAnswer()
        offered = sasl_request(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
        self.assertEqual(answer.feed(offered), offered)
        self.assertFalse(answer.stripped)

    def test_plus_alone_is_left(self) -> None:
        """A list of only -PLUS is left alone: the client then says itself that it cannot log in."""
        answer = StartupAnswer(strip_channel_binding=True)
        offered = sasl_request(["SCRAM-SHA-256-PLUS"])
        self.assertEqual(answer.feed(offered), offered)

    def test_md5_and_cleartext_requests_pass(self) -> None:
        """md5 and cleartext password requests are relayed unchanged."""
        for code, extra in ((5, b"salt"), (3, b"")):
            answer = StartupAnswer(strip_channel_binding=True)
            request = message(b"R", struct.pack("!i", code) + extra)
            self.assertEqual(answer.feed(request), request)
            self.assertFalse(answer.sasl)

    def test_malformed_sasl_list(self) -> None:
        """A mechanism list without its terminator stops reading; the bytes pass unchanged."""
        answer = StartupAnswer(strip_channel_binding=True)
        bad = message(b"R", struct.pack("!i", 10) + b"SCRAM-SHA-256-PLUS")
        self.assertEqual(answer.feed(bad), bad)
        self.assertTrue(answer.done)

    @given(st.lists(st.binary(max_size=40), max_size=20))
    @settings(max_examples=300, deadline=None)
    def test_random_chunks(self, chunks: list[bytes]) -> None:
        """Random bytes in random chunks never raise, and without -PLUS come out as they went in."""
        answer = StartupAnswer(strip_channel_binding=True)
        relayed = b"".join(answer.feed(chunk) for chunk in chunks)
        joined = b"".join(chunks)
        if not answer.stripped:
            self.assertTrue(joined.startswith(relayed))


class SaslInitialResponseTests(SynchronousTestCase):
    @staticmethod
    def initial(mechanism: bytes, data: bytes) -> bytes:
        return message(b"p", mechanism + b"\x00" + struct.pack("!i", len(data)) + data)

    def test_flags(self) -> None:
        """The mechanism and GS2 flag are read for n, y and p."""
        for data, flag in ((b"n,,n=,r=abc", "n"), (b"y,,n=,r=abc", "y"), (b"p=tls-server-end-point,,n=,r=x", "p")):
            self.assertEqual(
                read_sasl_initial_response(self.initial(b"SCRAM-SHA-256", data)),
                SaslInitialResponse("SCRAM-SHA-256", flag),
            )

    def test_incomplete(self) -> None:
        """None until the whole message is there."""
        full = self.initial(b"SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=x")
        for cut in range(len(full)):
            self.assertIsNone(read_sasl_initial_response(full[:cut]))

    def test_not_a_password_message(self) -> None:
        """Another message type is a protocol error."""
        with self.assertRaises(ProtocolError):
            read_sasl_initial_response(message(b"Q", b"select 1\x00"))

    def test_no_mechanism(self) -> None:
        """An empty mechanism name is a protocol error."""
        with self.assertRaises(ProtocolError):
            read_sasl_initial_response(message(b"p", b"\x00\x00\x00\x00\x00"))

    def test_no_data(self) -> None:
        """A response with length -1 (no initial data) has no flag."""
        self.assertEqual(
            read_sasl_initial_response(message(b"p", b"SCRAM-SHA-256\x00\xff\xff\xff\xff")),
            SaslInitialResponse("SCRAM-SHA-256", ""),
        )

    @given(st.binary(max_size=80))
    @settings(max_examples=300, deadline=None)
    def test_random_bytes(self, data: bytes) -> None:
        """Random bytes give a result, None or ProtocolError, never another exception."""
        try:
            read_sasl_initial_response(b"p" + data)
        except ProtocolError:
            pass
