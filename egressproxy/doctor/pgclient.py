"""The client side of a PostgreSQL startup, as bytes: the messages the login step sends and reads.

Sans-I/O and small: a StartupMessage (protocol 3.0), password and SASL
messages, and the parsing of the server's answers that a login meets
(Authentication requests, ErrorResponse fields).  The conversation itself
is ``login.py``'s; anything after ReadyForQuery is out of scope.
"""

from __future__ import annotations

import hashlib
import struct

import attrs

PROTOCOL_3_0 = 196608
#: Authentication request codes (the int32 after an 'R').
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12
#: A server message larger than this ends the login (none of the startup's comes close).
MAX_MESSAGE = 1 << 20


class WireError(Exception):
    """The server sent something no PostgreSQL startup contains."""


def startup_message(user: str, database: str, application_name: str = "egressproxy-doctor") -> bytes:
    """A protocol 3.0 StartupMessage (no type byte)."""
    params = b"".join(
        key.encode() + b"\0" + value.encode("utf-8") + b"\0"
        for key, value in (("user", user), ("database", database), ("application_name", application_name))
    ) + b"\0"
    return struct.pack("!ii", 8 + len(params), PROTOCOL_3_0) + params


def message(kind: bytes, payload: bytes) -> bytes:
    """A typed frontend message: type byte, int32 length (itself included), payload."""
    return kind + struct.pack("!i", len(payload) + 4) + payload


def password_message(password: str) -> bytes:
    """A PasswordMessage carrying ``password`` (cleartext, or md5's hex answer)."""
    return message(b"p", password.encode("utf-8") + b"\0")


def md5_password(user: str, password: str, salt: bytes) -> str:
    """The answer to AuthenticationMD5Password: ``md5`` + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode("utf-8")).hexdigest()
    return "md5" + hashlib.md5(inner.encode("ascii") + salt).hexdigest()


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", mechanism.encode("ascii") + b"\0" + struct.pack("!i", len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return message(b"p", data)


TERMINATE = message(b"X", b"")


def read_header(header: bytes) -> tuple[bytes, int]:
    """(type byte, payload length) of a backend message's 5-byte header."""
    kind, length = header[:1], struct.unpack("!i", header[1:5])[0]
    if length < 4 or length - 4 > MAX_MESSAGE:
        raise WireError(f"message {kind!r} with length {length}")
    return kind, length - 4


def auth_request(payload: bytes) -> tuple[int, bytes]:
    """(code, the rest) of an Authentication message."""
    if len(payload) < 4:
        raise WireError("a short Authentication message")
    return struct.unpack("!i", payload[:4])[0], payload[4:]


def sasl_mechanisms(rest: bytes) -> list[str]:
    """The mechanisms AuthenticationSASL lists (NUL-terminated names, an empty one last)."""
    return [name.decode("ascii", "replace") for name in rest.split(b"\0") if name]


@attrs.frozen
class ServerError:
    """An ErrorResponse's fields that matter here."""

    severity: str
    code: str
    message: str
    detail: str | None = None
    hint: str | None = None


def error_fields(payload: bytes) -> ServerError:
    """Parse an ErrorResponse (or NoticeResponse) payload: one-byte field codes, NUL-terminated values."""
    fields: dict[str, str] = {}
    for part in payload.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return ServerError(
        severity=fields.get("V", fields.get("S", "ERROR")),
        code=fields.get("C", "?????"),
        message=fields.get("M", ""),
        detail=fields.get("D"),
        hint=fields.get("H"),
    )
