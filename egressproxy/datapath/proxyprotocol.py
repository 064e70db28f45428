"""PROXY protocol v1 and v2: the header a load balancer puts before the client's bytes.

Fly's ``proxy_proto`` handler (like HAProxy's ``send-proxy`` or an AWS NLB)
opens each connection it relays with one header naming the real client.  A
listener with ``proxy_protocol: true`` reads that header before anything else,
and from then on the header's source address is the client: in the access log
and for ``allow_sources``.

This module is a sans-I/O parser: bytes in, a :class:`ProxyHeader` plus the
bytes that followed it out, or :class:`InvalidProxyHeader`.  It does not own
the connection: the session feeds it, applies the address, admits and dials,
and refuses the client on an error, an EOF or :data:`HEADER_TIMEOUT` (see
``Session._await_proxy_header``).  It never guesses whether a header is
present: on such a listener a connection without one is refused, since
guessing would let any client choose its own source address.

What is accepted (HAProxy's ``doc/proxy-protocol.txt``), strictly:

- v1: ``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` with single spaces, the
  addresses in the family the line names (IPv4 dotted quads without leading
  zeros; IPv6 without a zone), ports 0-65535 without leading zeros, and the
  CRLF within the first :data:`V1_MAX_LINE` bytes.  ``PROXY UNKNOWN`` (anything
  may follow, up to the CRLF) keeps the real peer.
- v2: the 12-byte signature, version 2, command ``LOCAL`` (keep the real peer:
  the balancer's own health check) or ``PROXY``; TCP over IPv4 (0x11) or IPv6
  (0x21) gives the source; the other valid families and transports (UNSPEC,
  UDP, AF_UNIX) fall back to the real peer, as the spec asks of receivers that
  do not carry them.  TLVs are skipped.  The whole header may be at most
  :data:`V2_MAX_HEADER` bytes.

A byte that cannot begin a header (neither ``PROXY `` nor the v2 signature)
is refused at once rather than at the timeout, so a misconfigured client
(one that speaks Postgres directly, say) learns quickly.

Error messages never quote the peer's bytes: they go to the log.

Rejected alternative: ``twisted.protocols.haproxy``'s parsers (private
modules).  ``V2Parser.feed`` raises on a header that arrives in pieces shorter
than 16 bytes, and ``V1Parser`` accepts any text as an address, ports above
65535 and trailing junk, and lets ``ValueError`` escape on a non-numeric port.
"""

from __future__ import annotations

import ipaddress
import re
import struct

import attrs
from twisted.internet.address import IPv4Address, IPv6Address

#: How long a client may take to deliver its whole header (the spec asks for
#: at least 3 s, to cover a TCP retransmit).
HEADER_TIMEOUT = 5.0

#: The v1 line's first bytes.
V1_PREFIX = b"PROXY "
#: Longest v1 line, CRLF included (``PROXY UNKNOWN`` with two full IPv6 addresses).
V1_MAX_LINE = 107

#: The v2 header's first 12 bytes.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Longest v2 header accepted, addresses and TLVs included: the spec sizes the
#: header to fit the minimal TCP segment (536 bytes).
V2_MAX_HEADER = 536
_V2_FIXED = 16  # signature, ver/cmd, fam, length

_LOCAL, _PROXY = 0x0, 0x1
_TCP4, _TCP6 = 0x11, 0x21

_PORT = re.compile(r"0|[1-9][0-9]{0,4}")


class InvalidProxyHeader(ValueError):
    """The bytes are not a PROXY header this proxy accepts; the message says why."""


@attrs.frozen
class ProxyHeader:
    """A complete, valid header.

    ``source`` and ``destination`` are None when the header says to keep the
    connection's real addresses (v2 ``LOCAL``, v1 ``UNKNOWN``, a v2 family
    or transport other than TCP over IPv4/IPv6).
    """

    version: int
    source: IPv4Address | IPv6Address | None
    destination: IPv4Address | IPv6Address | None


class HeaderParser:
    """Incremental parser of one header: feed it chunks until it answers.

    Holds at most one header's worth of bytes (:data:`V2_MAX_HEADER`) plus the
    chunk that completes it.  Once it has answered or raised, it is spent.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """Add a chunk: the header and the bytes after it, or None for "need more".

        Raises :class:`InvalidProxyHeader` as soon as the bytes seen cannot be
        (the start of) an acceptable header.
        """
        buffer = self._buffer = self._buffer + data
        if V2_SIGNATURE.startswith(buffer[: len(V2_SIGNATURE)]):
            return self._feed_v2(buffer)
        if V1_PREFIX.startswith(buffer[: len(V1_PREFIX)]):
            return self._feed_v1(buffer)
        raise InvalidProxyHeader("the connection does not start with a PROXY protocol header")

    def _feed_v1(self, buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
        end = buffer.find(b"\r\n", 0, V1_MAX_LINE)
        if end < 0:
            if len(buffer) >= V1_MAX_LINE:
                raise InvalidProxyHeader(f"v1 line without CRLF in its first {V1_MAX_LINE} bytes")
            return None
        return _parse_v1(buffer[:end]), buffer[end + 2 :]

    def _feed_v2(self, buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
        if len(buffer) < _V2_FIXED:
            return None
        command, fam, length = _v2_fixed_part(buffer)
        size = _V2_FIXED + length
        if size > V2_MAX_HEADER:
            raise InvalidProxyHeader(f"v2 header of {size} bytes, more than {V2_MAX_HEADER}")
        if len(buffer) < size:
            return None
        return _v2_addresses(command, fam, buffer[_V2_FIXED:size]), buffer[size:]


def _parse_v1(line: bytes) -> ProxyHeader:
    """Parse a v1 line without its CRLF."""
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        # Whatever follows UNKNOWN is to be ignored, whatever its bytes.
        return ProxyHeader(1, None, None)
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidProxyHeader("v1 line with a non-ASCII byte") from None
    fields = text.split(" ")
    if len(fields) < 2 or fields[1] not in ("TCP4", "TCP6"):
        raise InvalidProxyHeader("v1 protocol is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise InvalidProxyHeader("v1 line does not have exactly 6 single-space separated fields")
    _proxy, protocol, source, destination, source_port, destination_port = fields
    kind = IPv4Address if protocol == "TCP4" else IPv6Address
    return ProxyHeader(
        1,
        kind("TCP", _v1_ip(source, protocol), _v1_port(source_port)),
        kind("TCP", _v1_ip(destination, protocol), _v1_port(destination_port)),
    )


def _v1_ip(text: str, protocol: str) -> str:
    try:
        if protocol == "TCP4":
            return str(ipaddress.IPv4Address(text))
        if "%" not in text:
            return str(ipaddress.IPv6Address(text))
    except ValueError:
        pass
    raise InvalidProxyHeader(f"v1 address is not a valid {protocol} address")


def _v1_port(text: str) -> int:
    if _PORT.fullmatch(text) is None or int(text) > 65535:
        raise InvalidProxyHeader("v1 port is not a number from 0 to 65535")
    return int(text)


def _v2_fixed_part(buffer: bytes) -> tuple[int, int, int]:
    """Check the v2 version, command and family bytes: (command, fam, length)."""
    ver_cmd, fam, length = struct.unpack_from("!BBH", buffer, len(V2_SIGNATURE))
    if ver_cmd >> 4 != 2:
        raise InvalidProxyHeader("v2 header with a version other than 2")
    command = ver_cmd & 0x0F
    if command not in (_LOCAL, _PROXY):
        raise InvalidProxyHeader("v2 header with an unassigned command")
    # For LOCAL the family is ignored; for PROXY it must be an assigned one.
    if command == _PROXY and (fam >> 4 > 3 or fam & 0x0F > 2):
        raise InvalidProxyHeader("v2 header with an unassigned address family or transport")
    return command, fam, length


def _v2_addresses(command: int, fam: int, block: bytes) -> ProxyHeader:
    """The header a complete v2 address block (TLVs included, ignored) describes."""
    if command == _LOCAL:
        # The balancer's own connection (a health check): keep the real peer.
        return ProxyHeader(2, None, None)
    if fam == _TCP4:
        if len(block) < 12:
            raise InvalidProxyHeader("v2 TCP4 header shorter than its addresses")
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", block)
        return ProxyHeader(
            2,
            IPv4Address("TCP", str(ipaddress.IPv4Address(src)), sport),
            IPv4Address("TCP", str(ipaddress.IPv4Address(dst)), dport),
        )
    if fam == _TCP6:
        if len(block) < 36:
            raise InvalidProxyHeader("v2 TCP6 header shorter than its addresses")
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", block)
        return ProxyHeader(
            2,
            IPv6Address("TCP", str(ipaddress.IPv6Address(src)), sport),
            IPv6Address("TCP", str(ipaddress.IPv6Address(dst)), dport),
        )
    # UNSPEC, UDP or AF_UNIX: valid, not carried here; keep the real peer.
    return ProxyHeader(2, None, None)
