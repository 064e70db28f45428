"""Reading a TLS ClientHello without terminating TLS, and saying no in TLS.

Sans-I/O.  A Postgres listener that routes by server name answers the
client's SSLRequest with ``S`` (or sees a direct-TLS ClientHello at once),
and then needs two things from the ClientHello before anything is dialled:
the server name (SNI, RFC 6066 extension 0) and, for the log, the ALPN
protocols offered (RFC 7301 extension 16).  The ClientHello itself is then
forwarded untouched, so TLS stays end to end.

When the proxy must refuse a client that is already speaking TLS, a
PostgreSQL ErrorResponse is useless (libpq does not show one sent in answer
to an SSLRequest), so it answers with a fatal TLS alert instead
(``alert_record``), which OpenSSL-based clients print by name
("tlsv1 unrecognized name").

Limits: the handshake message may span up to ``MAX_HELLO_RECORDS``
records, which together may not exceed ``MAX_CLIENT_HELLO`` bytes on the wire; SSL 2.0
hellos and anything that is not a handshake record are refused.  This
module never decrypts anything and keeps no state between calls: the caller
keeps the buffer and calls :func:`parse_client_hello` again with more bytes.
"""

from __future__ import annotations

import struct

import attrs

#: TLS record content types and the handshake type we read.
CONTENT_ALERT = 21
CONTENT_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1

#: Extension types.
EXT_SERVER_NAME = 0
EXT_ALPN = 16
SNI_HOST_NAME = 0

#: Alert level and the descriptions the proxy sends.
ALERT_FATAL = 2
HANDSHAKE_FAILURE = 40
ACCESS_DENIED = 49
INTERNAL_ERROR = 80
UNRECOGNIZED_NAME = 112

#: A plaintext record carries at most 2**14 bytes (RFC 8446 5.1).
MAX_RECORD = 1 << 14
#: Wire bytes the proxy reads looking for a complete ClientHello.
MAX_CLIENT_HELLO = MAX_RECORD + 5
#: Records a ClientHello may be fragmented into (real clients use one): keeps
#: re-parsing a growing buffer linear, whatever the fragment sizes.
MAX_HELLO_RECORDS = 8

#: The ALPN protocol PostgreSQL 17+ clients and servers use.
ALPN_POSTGRESQL = b"postgresql"


class HelloError(Exception):
    """The bytes are not a TLS ClientHello the proxy can read."""


@attrs.frozen
class ClientHello:
    """What the proxy reads from a ClientHello.

    ``server_name`` is the SNI host name, lower-cased, or None when the
    client sent none (libpq sends none for an IP address, or with
    ``sslsni=0``).  ``size`` is the number of wire bytes the ClientHello's
    records took, which the caller forwards as they are.
    """

    server_name: str | None
    alpn: tuple[bytes, ...]
    size: int


def parse_client_hello(buffer: bytes | bytearray) -> ClientHello | None:
    """The ClientHello at the start of ``buffer``, or None if more bytes are needed.

    Raises :class:`HelloError` for anything that is not a well-formed
    ClientHello within ``MAX_CLIENT_HELLO`` wire bytes and
    ``MAX_HELLO_RECORDS`` records.  A call costs O(1) while the first record
    is incomplete, so a caller may re-parse a growing buffer per chunk.
    """
    handshake = b""
    position = 0
    wanted: int | None = None  # the handshake message's length, once known
    for _ in range(MAX_HELLO_RECORDS):
        if position + 5 > len(buffer):
            _check_size(len(buffer))
            return None
        content_type, major, _minor, length = struct.unpack_from("!BBBH", buffer, position)
        if content_type != CONTENT_HANDSHAKE:
            raise HelloError(f"expected a TLS handshake record, got content type {content_type}")
        if major != 3:
            raise HelloError(f"unsupported TLS record version {major}.x")
        if length == 0 or length > MAX_RECORD:
            raise HelloError(f"invalid TLS record length {length}")
        end = position + 5 + length
        _check_size(end)
        if end > len(buffer):
            return None
        handshake += buffer[position + 5:end]
        position = end
        if wanted is None and len(handshake) >= 4:
            if handshake[0] != HANDSHAKE_CLIENT_HELLO:
                raise HelloError(f"expected a ClientHello, got handshake type {handshake[0]}")
            wanted = 4 + int.from_bytes(handshake[1:4], "big")
            if wanted > MAX_CLIENT_HELLO:
                raise HelloError(f"ClientHello of {wanted - 4} bytes is too large")
        if wanted is not None and len(handshake) >= wanted:
            name, alpn = _read_hello_body(bytes(handshake[4:wanted]))
            return ClientHello(server_name=name, alpn=alpn, size=position)
    raise HelloError(f"ClientHello fragmented over more than {MAX_HELLO_RECORDS} records")


def _check_size(size: int) -> None:
    if size > MAX_CLIENT_HELLO:
        raise HelloError(f"no complete ClientHello within {MAX_CLIENT_HELLO} bytes")


class _Reader:
    """Bounds-checked reads over one byte string; raises HelloError at its end."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.position = 0
        self.what = what

    def take(self, count: int) -> bytes:
        end = self.position + count
        if end > len(self.data):
            raise HelloError(f"truncated {self.what}")
        chunk = self.data[self.position:end]
        self.position = end
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> bytes:
        return self.take(self.number(length_size))

    @property
    def left(self) -> int:
        return len(self.data) - self.position


def _read_hello_body(body: bytes) -> tuple[str | None, tuple[bytes, ...]]:
    reader = _Reader(body, "ClientHello")
    reader.take(2 + 32)  # legacy_version, random
    session_id = reader.vector(1)
    if len(session_id) > 32:
        raise HelloError("ClientHello session id longer than 32 bytes")
    suites = reader.vector(2)
    if not suites or len(suites) % 2:
        raise HelloError("ClientHello with an invalid cipher suite list")
    if not reader.vector(1):
        raise HelloError("ClientHello without compression methods")
    if reader.left == 0:
        return None, ()  # no extensions at all (TLS 1.2 and older allow it)
    extensions = _Reader(reader.vector(2), "ClientHello extensions")
    if reader.left:
        raise HelloError("bytes after the ClientHello extensions")
    name: str | None = None
    alpn: tuple[bytes, ...] = ()
    seen: set[int] = set()
    while extensions.left:
        kind = extensions.number(2)
        data = extensions.vector(2)
        if kind in seen:
            raise HelloError(f"ClientHello repeats extension {kind}")
        seen.add(kind)
        if kind == EXT_SERVER_NAME:
            name = _read_server_name(data)
        elif kind == EXT_ALPN:
            alpn = _read_alpn(data)
    return name, alpn


def _read_server_name(data: bytes) -> str | None:
    outer = _Reader(data, "server_name extension")
    names = _Reader(outer.vector(2), "server name list")
    if outer.left:
        raise HelloError("bytes after the server name list")
    host: str | None = None
    while names.left:
        kind = names.number(1)
        value = names.vector(2)
        if kind != SNI_HOST_NAME:
            continue
        if host is not None:
            raise HelloError("more than one host_name in server_name")
        if not value:
            raise HelloError("empty host_name in server_name")
        try:
            host = value.decode("ascii").lower()
        except UnicodeDecodeError:
            raise HelloError("host_name in server_name is not ASCII") from None
    return host


def _read_alpn(data: bytes) -> tuple[bytes, ...]:
    outer = _Reader(data, "ALPN extension")
    names = _Reader(outer.vector(2), "ALPN protocol list")
    if outer.left:
        raise HelloError("bytes after the ALPN protocol list")
    protocols = []
    while names.left:
        protocol = names.vector(1)
        if not protocol:
            raise HelloError("empty ALPN protocol name")
        protocols.append(protocol)
    return tuple(protocols)


def alert_record(description: int) -> bytes:
    """A plaintext fatal alert record (sent before any ServerHello).

    The record version is TLS 1.2's (0x0303), which TLS 1.3 also uses for
    every record after the ClientHello (RFC 8446 5.1).
    """
    return struct.pack("!BBBHBB", CONTENT_ALERT, 3, 3, 2, ALERT_FATAL, description)
