"""HTTP/1.1 requests as a forward proxy reads them: sans-I/O, bounded, strict.

This module owns the bytes of the ``http_connect`` mode's conversation: the
request head (:class:`HeadParser`), the framing of a forwarded request's
body (:func:`body_framing`, :class:`ChunkedBody`), the head sent on to an
origin (:func:`forward_head`) and the proxy's own answers
(:func:`response`).  It does no I/O, keeps no clock and knows no policy
(credentials and allowlists are ``modes/forward/destinations.py``'s).

Limits, each answered with the status RFC 9110/9112 gives it:

- a request line longer than ``MAX_REQUEST_LINE`` bytes: ``414``;
- a head (request line, fields, line ends) longer than ``MAX_HEAD`` bytes,
  or more than ``MAX_FIELDS`` field lines: ``431``;
- a version other than ``HTTP/1.0``/``HTTP/1.1`` that looks like one: ``505``;
- anything else malformed: ``400``.  That includes what request smuggling
  is made of: obs-fold, whitespace before a field's colon, a bare CR, a NUL,
  control characters in values, conflicting or unparsable ``Content-Length``,
  ``Transfer-Encoding`` together with ``Content-Length``, a
  ``Transfer-Encoding`` that does not end in ``chunked``, and malformed chunks.

Lines may end in CRLF or a bare LF (RFC 9112 section 2.2 allows the latter);
empty lines before the request line are skipped.
"""

from __future__ import annotations

import re
from typing import Iterable

import attrs

#: Longest request line accepted (method, target, version).
MAX_REQUEST_LINE = 8 * 1024
#: Longest request head accepted, request line and field lines together.
MAX_HEAD = 16 * 1024
#: Most field lines accepted in a head.
MAX_FIELDS = 100
#: Longest chunk-size line (with extensions) and longest trailer section.
MAX_CHUNK_LINE = 4 * 1024
MAX_TRAILERS = 16 * 1024

REASONS = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
_VERSION_LIKE = re.compile(rb"HTTP/[0-9]\.[0-9]\Z")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(rb"[0-9]{1,18}\Z")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}\Z")

#: Fields that describe one connection, never forwarded (RFC 9110 section
#: 7.6.1), besides those the request's ``Connection`` lists and every
#: ``Proxy-*`` field.  ``Transfer-Encoding`` and ``Trailer`` stay: the body
#: is forwarded byte for byte, in the framing they describe.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "upgrade"})
#: Never removed, even when ``Connection`` names them: the body's framing.
_FRAMING = frozenset({"content-length", "transfer-encoding"})


class RequestError(Exception):
    """The request cannot be served; ``status`` is the answer, ``reason`` says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


@attrs.frozen
class RequestHead:
    """A parsed request head; field names and values as received (values trimmed)."""

    method: str
    target: str
    version: str
    fields: tuple[tuple[bytes, bytes], ...]

    def values(self, name: str) -> list[bytes]:
        """The values of every field called ``name`` (case-insensitive), in order."""
        wanted = name.lower().encode("ascii")
        return [value for field, value in self.fields if field.lower() == wanted]


class HeadParser:
    """Collects one request head from chunks; see the module docstring for limits.

    :meth:`feed` returns None until the head is complete, then the head and
    the bytes that followed it; it raises :class:`RequestError` as soon as
    the bytes seen so far cannot become an acceptable head.  Each byte is
    scanned once, so feeding one byte at a time costs no more than one feed.
    """

    def __init__(
        self, max_head: int = MAX_HEAD, max_request_line: int = MAX_REQUEST_LINE, max_fields: int = MAX_FIELDS
    ) -> None:
        self.max_head = max_head
        self.max_request_line = max_request_line
        self.max_fields = max_fields
        self._buffer = bytearray()
        self._line_start = 0
        self._scanned = 0
        self._lines: list[bytes] = []
        #: Some byte has arrived (an empty connection is no protocol error).
        self.started = False

    def feed(self, data: bytes) -> tuple[RequestHead, bytes] | None:
        if data:
            self.started = True
        buffer = self._buffer
        buffer += data
        while True:
            end = buffer.find(b"\n", self._scanned)
            if end < 0:
                self._scanned = len(buffer)
                self._check_size(len(buffer) - self._line_start, len(buffer))
                return None
            self._scanned = end + 1
            line = bytes(buffer[self._line_start : end])
            if line.endswith(b"\r"):
                line = line[:-1]
            self._check_size(len(line), end + 1)
            self._line_start = end + 1
            if line:
                self._lines.append(line)
                if len(self._lines) > self.max_fields + 1:
                    raise RequestError(431, f"more than {self.max_fields} header fields")
            elif self._lines:
                rest = bytes(buffer[end + 1 :])
                return _parse_head(self._lines), rest
            # An empty line before the request line is skipped (RFC 9112 2.2).

    def _check_size(self, line_length: int, head_length: int) -> None:
        if not self._lines and line_length > self.max_request_line:
            raise RequestError(414, f"request line longer than {self.max_request_line} bytes")
        if head_length > self.max_head:
            raise RequestError(431, f"request head larger than {self.max_head} bytes")


def _parse_head(lines: list[bytes]) -> RequestHead:
    for line in lines:
        if b"\r" in line or b"\x00" in line:
            raise RequestError(400, "bare CR or NUL in the request head")
    request_line, *field_lines = lines
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise RequestError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise RequestError(400, "malformed method")
    if not _TARGET.match(target):
        raise RequestError(400, "malformed request target")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if _VERSION_LIKE.match(version):
            raise RequestError(505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
        raise RequestError(400, "malformed HTTP version")
    fields = []
    for line in field_lines:
        if line[:1] in (b" ", b"\t"):
            raise RequestError(400, "obsolete line folding in the request head")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise RequestError(400, "malformed header field")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise RequestError(400, "control character in a header field value")
        fields.append((name, value))
    return RequestHead(method.decode("ascii"), target.decode("ascii"), version.decode("ascii"), tuple(fields))


def split_absolute_http(target: str) -> tuple[str, str]:
    """(authority, origin-form) of an ``http://`` absolute-form request target.

    ``http://api.example/v1?x=1`` gives ``("api.example", "/v1?x=1")``; an
    empty path becomes ``/``.  Other schemes, origin-form targets and
    fragments are :class:`RequestError` 400 (``https://`` URLs go through
    CONNECT, so TLS stays end to end).
    """
    scheme, sep, remainder = target.partition("://")
    if not sep or scheme.lower() != "http":
        if scheme.lower() == "https" and sep:
            raise RequestError(400, "https:// URLs go through CONNECT (TLS stays end to end)")
        raise RequestError(400, "a proxy request needs CONNECT or an absolute http:// URL")
    if "#" in remainder:
        raise RequestError(400, "a fragment in the request target")
    cut = min((i for i in (remainder.find("/"), remainder.find("?")) if i >= 0), default=len(remainder))
    authority, path = remainder[:cut], remainder[cut:]
    if not path.startswith("/"):
        path = "/" + path
    return authority, path


def _list_items(values: Iterable[bytes]) -> list[bytes]:
    """The members of comma-separated list fields, trimmed, empty members dropped."""
    return [item.strip(b" \t") for value in values for item in value.split(b",") if item.strip(b" \t")]


# -- bodies of forwarded requests ------------------------------------------


@attrs.frozen
class Framing:
    """How a request's body ends: ``length`` bytes, or chunked (``length`` None)."""

    length: int | None


def body_framing(head: RequestHead) -> Framing:
    """The framing of ``head``'s body (RFC 9112 section 6.3), or :class:`RequestError` 400."""
    codings = head.values("transfer-encoding")
    lengths = head.values("content-length")
    if codings:
        if head.version == "HTTP/1.0":
            raise RequestError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if lengths:
            raise RequestError(400, "both Transfer-Encoding and Content-Length")
        items = _list_items(codings)
        if not items or items[-1].lower() != b"chunked":
            raise RequestError(400, "Transfer-Encoding does not end in chunked")
        return Framing(None)
    if lengths:
        items = [item.strip(b" \t") for value in lengths for item in value.split(b",")]
        if not all(_DIGITS.match(item) for item in items) or len(set(items)) != 1:
            raise RequestError(400, "invalid Content-Length")
        return Framing(int(items[0]))
    return Framing(0)


class BodyReader:
    """Finds where a forwarded request's body ends, passing its bytes on unchanged.

    :meth:`feed` returns how many leading bytes of the chunk belong to the
    body; ``done`` turns true at its last byte.  Chunked bodies are parsed
    only for their boundaries (sizes, extensions and trailers are passed on
    as they came, bounded by ``MAX_CHUNK_LINE`` and ``MAX_TRAILERS``).
    """

    def __init__(self, framing: Framing) -> None:
        self._chunked = framing.length is None
        self._remaining = framing.length or 0
        # Chunked states: "size", "data", "data-end", "trailers".
        self._state = "size"
        self._line = bytearray()
        self._trailers = 0
        self.done = not self._chunked and self._remaining == 0

    def feed(self, data: bytes) -> int:
        if self.done:
            return 0
        if not self._chunked:
            taken = min(self._remaining, len(data))
            self._remaining -= taken
            self.done = self._remaining == 0
            return taken
        position = 0
        while position < len(data) and not self.done:
            if self._state == "data":
                taken = min(self._remaining, len(data) - position)
                self._remaining -= taken
                position += taken
                if self._remaining == 0:
                    self._state = "data-end"
                continue
            end = data.find(b"\n", position)
            piece = data[position:] if end < 0 else data[position:end]
            self._line += piece
            limit = MAX_CHUNK_LINE if self._state != "trailers" else MAX_TRAILERS - self._trailers
            if len(self._line) > limit:
                raise RequestError(400, "chunk framing line too long")
            if end < 0:
                return len(data)
            position = end + 1
            line = bytes(self._line).removesuffix(b"\r")
            self._line.clear()
            self._end_of_line(line)
        return position

    def _end_of_line(self, line: bytes) -> None:
        if b"\r" in line or b"\x00" in line:
            raise RequestError(400, "bare CR or NUL in chunk framing")
        if self._state == "size":
            size = line.split(b";", 1)[0].strip(b" \t")
            if not _HEX.match(size):
                raise RequestError(400, "malformed chunk size")
            self._remaining = int(size, 16)
            self._state = "data" if self._remaining else "trailers"
        elif self._state == "data-end":
            if line:
                raise RequestError(400, "chunk data longer than its size")
            self._state = "size"
        else:  # trailers, ended by an empty line
            self._trailers += len(line) + 2
            if self._trailers > MAX_TRAILERS:
                raise RequestError(400, "trailer section too large")
            self.done = not line


# -- what the proxy writes ---------------------------------------------------


def forward_head(head: RequestHead, origin_form: str, host: str) -> bytes:
    """The head to send an origin for an absolute-form request.

    The request line gets ``origin_form`` and keeps the client's version (the
    response is passed back untouched, so the origin must frame it for the
    client); ``Host`` becomes ``host`` (RFC 9112 section 3.2.2); hop-by-hop
    fields, those ``Connection`` names and every ``Proxy-*`` field are
    dropped; ``Connection: close`` is added, so the origin ends the
    connection after its response: one request per client connection.
    """
    named = {item.lower().decode("latin-1") for item in _list_items(head.values("connection"))}
    drop = (HOP_BY_HOP | named | {"host"}) - _FRAMING
    lines = [f"{head.method} {origin_form} {head.version}".encode("ascii"), b"Host: " + host.encode("ascii")]
    for name, value in head.fields:
        lowered = name.lower().decode("ascii")
        if lowered in drop or lowered.startswith("proxy-"):
            continue
        lines.append(name + b": " + value)
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def response(status: int, detail: str, extra: Iterable[tuple[str, str]] = ()) -> bytes:
    """A complete ``HTTP/1.1`` answer from the proxy: a short text body, ``Connection: close``."""
    phrase = REASONS[status]
    body = f"{status} {phrase}: {detail}\n".encode("utf-8")
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    lines.extend(f"{name}: {value}" for name, value in extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


#: The answer that opens a tunnel (no fields: RFC 9110 section 9.3.6 forbids framing ones).
CONNECTION_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
