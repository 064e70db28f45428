"""The few pieces of the PostgreSQL wire protocol the proxy reads and writes.

Sans-I/O: functions over ``bytes`` and one small incremental scanner, no
sockets, no reactor.  What the proxy needs from the protocol is narrow:

- the *initial packet* a client sends on a new connection, which has no
  type byte: an SSLRequest, a GSSENCRequest, a CancelRequest or a protocol
  3.x StartupMessage (``read_initial_packet``).  A TLS ClientHello in its
  place is a PostgreSQL 17 direct-TLS client (``sslnegotiation=direct``);
  it is recognised here by its first byte and parsed by ``tlshello.py``;
- an ErrorResponse to send a client that is still in plaintext
  (``error_response``): severity, SQLSTATE, message, detail and hint;
- the BackendKeyData ('K') in a server's startup answer, which tells which
  backend a later CancelRequest is for (``BackendKeyScanner``), scanned only
  up to the first ReadyForQuery ('Z').

It does not parse anything after the startup phase, does not know about
authentication, and does not validate StartupMessage parameters (the server
does).  Every parser is bounded: an initial packet may be at most
``MAX_STARTUP_PACKET`` bytes, as PostgreSQL itself enforces, and anything
malformed raises :class:`ProtocolError` with a message fit for the log.
"""

from __future__ import annotations

import struct

import attrs

#: Request codes of the initial packets that are not a StartupMessage.
CANCEL_REQUEST_CODE = 80877102  # (1234 << 16) | 5678
SSL_REQUEST_CODE = 80877103  # (1234 << 16) | 5679
GSSENC_REQUEST_CODE = 80877104  # (1234 << 16) | 5680

#: PostgreSQL refuses longer startup packets (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET = 10000

#: A cancel key is 4 bytes in protocol 3.0 and 4 to 256 bytes in 3.2.
MIN_CANCEL_KEY = 4
MAX_CANCEL_KEY = 256

#: The byte that starts a TLS handshake record (content type 22).
TLS_HANDSHAKE_RECORD = 0x16

SSL_REQUEST = struct.pack("!ii", 8, SSL_REQUEST_CODE)

#: Answers to an SSLRequest or GSSENCRequest.
ACCEPT = b"S"
DECLINE = b"N"

#: SQLSTATEs the proxy uses in its own ErrorResponses.
SQLSTATE_CANNOT_CONNECT = "08001"  # sqlclient_unable_to_establish_sqlconnection
SQLSTATE_CONNECTION_FAILURE = "08006"
SQLSTATE_PROTOCOL_VIOLATION = "08P01"
SQLSTATE_TOO_MANY_CONNECTIONS = "53300"
SQLSTATE_NOT_AUTHORIZED = "28000"  # invalid_authorization_specification, as pg_hba uses

#: ErrorResponse / NoticeResponse field codes.
_FIELD_SEVERITY = b"S"
_FIELD_SEVERITY_NONLOCALIZED = b"V"
_FIELD_CODE = b"C"
_FIELD_MESSAGE = b"M"
_FIELD_DETAIL = b"D"
_FIELD_HINT = b"H"


class ProtocolError(Exception):
    """The peer's bytes are not the protocol; the message says how."""


@attrs.frozen
class CancelKey:
    """Which backend a CancelRequest is for: its process id and secret."""

    pid: int
    secret: bytes = attrs.field(repr=False)


@attrs.frozen
class InitialPacket:
    """One initial packet: ``kind`` is ssl, gssenc, cancel, startup or tls.

    ``data`` is the whole packet as received (empty for ``tls``: the
    ClientHello is left in the buffer for ``tlshello``), ``cancel`` the key
    of a CancelRequest, ``version`` the (major, minor) of a StartupMessage.
    """

    kind: str
    data: bytes = attrs.field(repr=False)
    cancel: CancelKey | None = None
    version: tuple[int, int] | None = None


def read_initial_packet(buffer: bytes | bytearray) -> tuple[InitialPacket, bytes] | None:
    """The first complete initial packet in ``buffer`` and the bytes after it.

    None when more bytes are needed.  A buffer starting with a TLS handshake
    record is a direct-TLS client: returned as kind ``tls`` consuming
    nothing.  Raises :class:`ProtocolError` for anything else that cannot be
    a valid packet (bad length, unknown request code, protocol other than 3).
    O(1) while the packet is incomplete, so a caller may re-parse per chunk.
    """
    if not buffer:
        return None
    if buffer[0] == TLS_HANDSHAKE_RECORD:
        # As a length, 0x16 in the top byte would be a packet of hundreds
        # of megabytes, so this cannot be a PostgreSQL packet.
        return InitialPacket("tls", b""), bytes(buffer)
    if len(buffer) < 4:
        return None
    (length,) = struct.unpack_from("!i", buffer)
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolError(f"invalid startup packet length {length}")
    if len(buffer) < length:
        return None
    packet, rest = bytes(buffer[:length]), bytes(buffer[length:])
    (code,) = struct.unpack_from("!i", packet, 4)
    if code == SSL_REQUEST_CODE or code == GSSENC_REQUEST_CODE:
        if length != 8:
            raise ProtocolError(f"invalid length {length} for an SSLRequest or GSSENCRequest")
        return InitialPacket("ssl" if code == SSL_REQUEST_CODE else "gssenc", packet), rest
    if code == CANCEL_REQUEST_CODE:
        key_length = length - 12
        if not MIN_CANCEL_KEY <= key_length <= MAX_CANCEL_KEY:
            raise ProtocolError(f"invalid length {length} for a CancelRequest")
        (pid,) = struct.unpack_from("!i", packet, 8)
        return InitialPacket("cancel", packet, cancel=CancelKey(pid, packet[12:])), rest
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise ProtocolError(f"unsupported frontend protocol {major}.{minor}: egressproxy speaks 3.x")
    if packet[-1:] != b"\x00":
        raise ProtocolError("StartupMessage is not terminated by a zero byte")
    return InitialPacket("startup", packet, version=(major, minor)), rest


def cancel_request(key: CancelKey) -> bytes:
    """A CancelRequest packet for ``key``."""
    return struct.pack("!iii", 12 + len(key.secret), CANCEL_REQUEST_CODE, key.pid) + key.secret


def _field(code: bytes, text: str) -> bytes:
    # A C string: no NUL inside.
    return code + text.replace("\x00", " ").encode("utf-8", "replace") + b"\x00"


def error_response(
    code: str,
    message: str,
    detail: str | None = None,
    hint: str | None = None,
    severity: str = "FATAL",
) -> bytes:
    """An ErrorResponse message ('E') with the given SQLSTATE and texts.

    Severity is given both localized (S) and not (V), as servers since 9.6
    do; libpq shows ``FATAL:  message`` and, when present, DETAIL and HINT.
    """
    body = _field(_FIELD_SEVERITY, severity) + _field(_FIELD_SEVERITY_NONLOCALIZED, severity)
    body += _field(_FIELD_CODE, code) + _field(_FIELD_MESSAGE, message)
    if detail:
        body += _field(_FIELD_DETAIL, detail)
    if hint:
        body += _field(_FIELD_HINT, hint)
    body += b"\x00"
    return b"E" + struct.pack("!i", len(body) + 4) + body


#: Backend message types the scanner cares about.
_BACKEND_KEY_DATA = ord("K")
_READY_FOR_QUERY = ord("Z")
_ERROR_RESPONSE = ord("E")

#: A startup-phase backend message longer than this is a broken stream
#: (the longest, an ErrorResponse or SASL exchange, is a few KiB).
_MAX_STARTUP_MESSAGE = 1 << 20


class BackendKeyScanner:
    """Finds the BackendKeyData in a server's startup answer, then stops.

    Feed it the server's (plaintext) bytes in order.  It walks message
    headers and skips bodies without keeping them, except BackendKeyData's
    few bytes; at ReadyForQuery, an ErrorResponse or anything malformed it
    sets ``done``, after which the caller stops feeding it.  ``key`` is the
    BackendKeyData seen, if any.  Memory is bounded by one header plus one
    BackendKeyData body.
    """

    def __init__(self) -> None:
        self.key: CancelKey | None = None
        self.done = False
        #: Why scanning stopped early (a malformed stream), for the log.
        self.error: str | None = None
        self._header = b""
        self._type = 0
        self._remaining = 0  # body bytes of the current message still to come
        self._body = b""  # kept for BackendKeyData only

    def feed(self, data: bytes) -> None:
        """Scan ``data``; never raises."""
        position, size = 0, len(data)
        while position < size and not self.done:
            if self._remaining == 0 and len(self._header) < 5:
                take = min(5 - len(self._header), size - position)
                self._header += data[position:position + take]
                position += take
                if len(self._header) < 5:
                    return
                self._start_message()
                if self.done:
                    return
                if self._remaining == 0:
                    self._end_message()
                continue
            take = min(self._remaining, size - position)
            if self._type == _BACKEND_KEY_DATA:
                self._body += data[position:position + take]
            position += take
            self._remaining -= take
            if self._remaining == 0:
                self._end_message()

    def _start_message(self) -> None:
        self._type = self._header[0]
        (length,) = struct.unpack_from("!i", self._header, 1)
        if length < 4 or length > _MAX_STARTUP_MESSAGE:
            self._stop(f"invalid message length {length} for type {chr(self._type)!r}")
            return
        if self._type == _BACKEND_KEY_DATA and not 4 + 4 + MIN_CANCEL_KEY <= length <= 4 + 4 + MAX_CANCEL_KEY:
            self._stop(f"invalid BackendKeyData length {length}")
            return
        self._remaining = length - 4
        self._body = b""

    def _end_message(self) -> None:
        kind = self._type
        self._header = b""
        if kind == _BACKEND_KEY_DATA:
            (pid,) = struct.unpack_from("!i", self._body)
            self.key = CancelKey(pid, self._body[4:])
            self._body = b""
        elif kind == _READY_FOR_QUERY or kind == _ERROR_RESPONSE:
            self.done = True

    def _stop(self, why: str) -> None:
        self.error = why
        self.done = True
