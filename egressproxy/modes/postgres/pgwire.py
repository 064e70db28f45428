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
- a server's startup answer, up to the first ReadyForQuery ('Z') or
  ErrorResponse (``StartupAnswer``): the BackendKeyData ('K') that tells
  which backend a later CancelRequest is for, the SQLSTATE of a refused
  login, and the SASL mechanism list, from which a TLS-originating proxy
  removes ``SCRAM-SHA-256-PLUS`` (see below);
- the client's SASLInitialResponse (``read_sasl_initial_response``): which
  SCRAM mechanism it chose and its GS2 channel-binding flag.

Why the proxy touches SCRAM at all: channel binding (``SCRAM-SHA-256-PLUS``,
RFC 5802/5929) ties the login to the TLS certificate the *client* sees.
Where the proxy ends the client's TLS and opens its own to the server
(``tls: originate``), the two can never agree, by design.  A plaintext client
offered ``-PLUS`` gives up ("server offered SCRAM-SHA-256-PLUS authentication
over a non-SSL connection"), so the proxy removes it from the list; a client
that still asks for binding (GS2 flag ``p`` or ``y``) is told why by the
proxy instead of failing at the server.  The proof itself is never touched:
it covers the client's messages, so rewriting them would fail the login.

It does not parse anything after the startup phase and does not validate
StartupMessage parameters (the server does).  Every parser is bounded: an initial packet may be at most
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
_AUTHENTICATION = ord("R")
#: Frontend message type of every authentication answer (password, SASL).
_PASSWORD_MESSAGE = ord("p")

#: Authentication request codes (the int32 after an 'R' message's length).
AUTH_OK = 0
AUTH_SASL = 10

#: SASL mechanism names PostgreSQL offers.
SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"

#: A startup-phase backend message longer than this is a broken stream
#: (the longest, an ErrorResponse or SASL exchange, is a few KiB).
_MAX_STARTUP_MESSAGE = 1 << 20


def error_fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse or NoticeResponse body, by their one-letter codes."""
    fields: dict[str, str] = {}
    for part in body.split(b"\x00"):
        if part:
            fields.setdefault(chr(part[0]), part[1:].decode("utf-8", "replace"))
    return fields


def _sasl_mechanisms(body: bytes) -> list[str] | None:
    """The mechanism names of an AuthenticationSASL body (after its code), or None if malformed."""
    if not body.endswith(b"\x00\x00") and body != b"\x00":
        return None
    names = body[:-1].split(b"\x00")[:-1] if body != b"\x00" else []
    return [name.decode("ascii", "replace") for name in names]


def sasl_request(mechanisms: list[str]) -> bytes:
    """An AuthenticationSASL message offering ``mechanisms``."""
    body = struct.pack("!i", AUTH_SASL) + b"".join(m.encode("ascii") + b"\x00" for m in mechanisms) + b"\x00"
    return b"R" + struct.pack("!i", len(body) + 4) + body


class StartupAnswer:
    """Reads a server's startup answer in order, whole messages at a time.

    Feed it the server's plaintext bytes; :meth:`feed` returns the bytes to
    relay to the client: the same bytes, except that with
    ``strip_channel_binding`` an AuthenticationSASL offering
    ``SCRAM-SHA-256-PLUS`` is rewritten without it (length adjusted).  A
    partial message is held until complete, so memory is bounded by one
    message (``_MAX_STARTUP_MESSAGE``).  At ReadyForQuery or an
    ErrorResponse, or on anything malformed, ``done`` is set and every later
    byte passes through untouched; the caller then stops feeding it.

    What it learnt: ``key`` (BackendKeyData), ``refused`` (SQLSTATE and
    message of an ErrorResponse), ``authenticated`` (AuthenticationOk seen),
    ``sasl`` (AuthenticationSASL seen), ``stripped`` (``-PLUS`` removed) and
    ``error`` (why reading stopped early).
    """

    def __init__(self, strip_channel_binding: bool = False) -> None:
        self.strip_channel_binding = strip_channel_binding
        self.key: CancelKey | None = None
        self.refused: tuple[str, str] | None = None
        self.authenticated = False
        self.sasl = False
        self.stripped = False
        self.done = False
        self.error: str | None = None
        self._buffer = bytearray()

    def feed(self, data: bytes) -> bytes:
        """Read ``data``; return what to relay now.  Never raises."""
        if self.done:
            return data
        self._buffer += data
        out = bytearray()
        while not self.done and len(self._buffer) >= 5:
            kind = self._buffer[0]
            (length,) = struct.unpack_from("!i", self._buffer, 1)
            if length < 4 or length > _MAX_STARTUP_MESSAGE:
                self._stop(f"invalid message length {length} for type {chr(kind)!r}")
                break
            if len(self._buffer) < 1 + length:
                break
            message = bytes(self._buffer[:1 + length])
            del self._buffer[:1 + length]
            out += self._message(kind, message)
        if self.done:
            out += self._buffer
            self._buffer = bytearray()
        return bytes(out)

    def _message(self, kind: int, message: bytes) -> bytes:
        body = message[5:]
        if kind == _AUTHENTICATION and len(body) >= 4:
            (code,) = struct.unpack_from("!i", body)
            if code == AUTH_OK:
                self.authenticated = True
            elif code == AUTH_SASL:
                self.sasl = True
                return self._sasl(message, body[4:])
        elif kind == _BACKEND_KEY_DATA:
            if not MIN_CANCEL_KEY <= len(body) - 4 <= MAX_CANCEL_KEY:
                self._stop(f"invalid BackendKeyData length {len(body) + 4}")
            else:
                (pid,) = struct.unpack_from("!i", body)
                self.key = CancelKey(pid, body[4:])
        elif kind == _ERROR_RESPONSE:
            fields = error_fields(body)
            self.refused = (fields.get("C", "?????"), fields.get("M", ""))
            self.done = True
        elif kind == _READY_FOR_QUERY:
            self.done = True
        return message

    def _sasl(self, message: bytes, names: bytes) -> bytes:
        mechanisms = _sasl_mechanisms(names)
        if mechanisms is None:
            self._stop("malformed AuthenticationSASL")
            return message
        if not self.strip_channel_binding or SCRAM_SHA_256_PLUS not in mechanisms:
            return message
        kept = [m for m in mechanisms if m != SCRAM_SHA_256_PLUS]
        if not kept:
            return message  # nothing else offered: the client will say so itself
        self.stripped = True
        return sasl_request(kept)

    def _stop(self, why: str) -> None:
        self.error = why
        self.done = True


@attrs.frozen
class SaslInitialResponse:
    """What a client's SASLInitialResponse says about channel binding."""

    mechanism: str
    #: The GS2 channel-binding flag: ``n`` (no binding), ``y`` (client could
    #: bind but thinks the server cannot), ``p`` (binding), or "" if absent.
    binding_flag: str


def read_sasl_initial_response(buffer: bytes | bytearray) -> SaslInitialResponse | None:
    """The client's first authentication message in ``buffer``, if complete.

    None while incomplete.  Raises :class:`ProtocolError` when the buffer
    does not start with a well-formed ``p`` message carrying a mechanism name.
    """
    if len(buffer) < 5:
        return None
    if buffer[0] != _PASSWORD_MESSAGE:
        raise ProtocolError(f"expected a SASLInitialResponse, got message type {chr(buffer[0])!r}")
    (length,) = struct.unpack_from("!i", buffer, 1)
    if length < 4 or length > _MAX_STARTUP_MESSAGE:
        raise ProtocolError(f"invalid SASLInitialResponse length {length}")
    if len(buffer) < 1 + length:
        return None
    body = bytes(buffer[5:1 + length])
    end = body.find(b"\x00")
    if end <= 0:
        raise ProtocolError("SASLInitialResponse without a mechanism name")
    mechanism = body[:end].decode("ascii", "replace")
    data = body[end + 5:] if len(body) >= end + 5 else b""
    return SaslInitialResponse(mechanism, chr(data[0]) if data else "")
