"""The server side of a SOCKS5 handshake (RFC 1928, RFC 1929), sans-I/O.

:class:`Socks5Handshake` is fed the client's bytes and answers with the
bytes to send back, until the client's request (command, address, port) is
complete.  It owns the wire format only: which method to choose given
whether credentials are required, the username/password subnegotiation
(the check itself is a function it is given), and the reply encoding
(:func:`reply`).  Policy (which commands are served, which destinations
are allowed) and I/O are the front's (``front.py``).

Wire format, for reference:

- greeting: VER=5, NMETHODS, METHODS; answer VER=5, METHOD (``0x00`` no
  authentication, ``0x02`` username/password, ``0xFF`` none acceptable);
- subnegotiation (RFC 1929): VER=1, ULEN, UNAME, PLEN, PASSWD; answer
  VER=1, STATUS (0 success; anything else and the server closes);
- request: VER=5, CMD (1 CONNECT, 2 BIND, 3 UDP ASSOCIATE), RSV, ATYP
  (1 IPv4, 3 domain name with a length byte, 4 IPv6), DST.ADDR, DST.PORT;
- reply: VER=5, REP, RSV=0, ATYP, BND.ADDR, BND.PORT.

Every message is bounded by its length bytes (at most 513 bytes), so the
buffer is too.  A handshake that cannot continue raises :class:`Rejected`
carrying the bytes to send before closing (possibly none).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Callable

import attrs

VERSION = 5
AUTH_VERSION = 1

NO_AUTHENTICATION = 0x00
USERNAME_PASSWORD = 0x02
NO_ACCEPTABLE_METHODS = 0xFF

CONNECT = 1
BIND = 2
UDP_ASSOCIATE = 3

IPV4 = 1
DOMAIN_NAME = 3
IPV6 = 4

SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08


def reply(code: int, bound: IPv4Address | IPv6Address | None = None, port: int = 0) -> bytes:
    """A reply to the request: ``code`` and the address the proxy bound (0.0.0.0:0 if None)."""
    if bound is None:
        bound = IPv4Address(0)
    kind = IPV4 if bound.version == 4 else IPV6
    return bytes((VERSION, code, 0, kind)) + bound.packed + port.to_bytes(2, "big")


#: The subnegotiation's answers.
AUTH_SUCCESS = bytes((AUTH_VERSION, 0))
AUTH_FAILURE = bytes((AUTH_VERSION, 1))


@attrs.frozen
class Request:
    """A complete request.  ``host`` is an IP literal for address types 1 and 4,
    and for type 3 the name as sent (decoded as Latin-1, so no byte is lost;
    the front checks it is a host name)."""

    command: int
    address_type: int
    host: str
    port: int


class Rejected(Exception):
    """The handshake ends here: send ``answer`` (may be empty), then close.

    ``authentication`` is true when the client's credentials were refused.
    """

    def __init__(self, answer: bytes, reason: str, authentication: bool = False) -> None:
        super().__init__(reason)
        self.answer = answer
        self.reason = reason
        self.authentication = authentication


class Socks5Handshake:
    """One client's handshake; see the module docstring.

    ``authenticate(username, password)`` is None when no credentials are
    configured: the client must then offer "no authentication".  Otherwise
    the client must offer and pass username/password; "no authentication"
    is never chosen.
    """

    def __init__(self, authenticate: Callable[[bytes, bytes], bool] | None) -> None:
        self._authenticate = authenticate
        self._buffer = b""
        self._state = "greeting"
        #: Bytes the client sent after its request (for the tunnel).
        self.rest = b""

    def feed(self, data: bytes) -> tuple[bytes, Request | None]:
        """Take client bytes: (bytes to send now, the request once it is complete)."""
        if self._state == "done":
            raise RuntimeError("the handshake is already complete")
        self._buffer += data
        answer = b""
        steps = {"greeting": self._greeting, "credentials": self._credentials, "request": self._request}
        while True:
            try:
                result = steps[self._state]()
            except Rejected as e:
                self._state = "done"
                raise Rejected(answer + e.answer, e.reason, e.authentication) from None
            if result is None:
                return answer, None
            if isinstance(result, Request):
                return answer, result
            answer += result

    def _take(self, size: int) -> bytes | None:
        if len(self._buffer) < size:
            return None
        taken, self._buffer = self._buffer[:size], self._buffer[size:]
        return taken

    def _greeting(self) -> bytes | None:
        buffer = self._buffer
        if buffer[:1] and buffer[0] != VERSION:
            raise Rejected(b"", "not a SOCKS5 greeting")
        if len(buffer) < 2 or len(buffer) < 2 + buffer[1]:
            return None
        message = self._take(2 + buffer[1])
        assert message is not None
        methods = message[2:]
        wanted = NO_AUTHENTICATION if self._authenticate is None else USERNAME_PASSWORD
        if wanted not in methods:
            raise Rejected(bytes((VERSION, NO_ACCEPTABLE_METHODS)), "no acceptable authentication method")
        self._state = "credentials" if wanted == USERNAME_PASSWORD else "request"
        return bytes((VERSION, wanted))

    def _credentials(self) -> bytes | None:
        buffer = self._buffer
        if buffer[:1] and buffer[0] != AUTH_VERSION:
            raise Rejected(AUTH_FAILURE, "bad username/password subnegotiation version")
        if len(buffer) < 2:
            return None
        name_end = 2 + buffer[1]
        if len(buffer) < name_end + 1 or len(buffer) < name_end + 1 + buffer[name_end]:
            return None
        message = self._take(name_end + 1 + buffer[name_end])
        assert message is not None and self._authenticate is not None
        name, password = message[2:name_end], message[name_end + 1 :]
        if not self._authenticate(name, password):
            raise Rejected(AUTH_FAILURE, "wrong username or password", authentication=True)
        self._state = "request"
        return AUTH_SUCCESS

    def _request(self) -> Request | None:
        buffer = self._buffer
        if buffer[:1] and buffer[0] != VERSION:
            raise Rejected(reply(GENERAL_FAILURE), "not a SOCKS5 request")
        if len(buffer) < 4:
            return None
        address_type = buffer[3]
        if address_type == IPV4:
            size = 4 + 4 + 2
        elif address_type == IPV6:
            size = 4 + 16 + 2
        elif address_type == DOMAIN_NAME:
            if len(buffer) < 5:
                return None
            size = 4 + 1 + buffer[4] + 2
        else:
            raise Rejected(reply(ADDRESS_TYPE_NOT_SUPPORTED), f"address type {address_type} is not supported")
        message = self._take(size)
        if message is None:
            return None
        raw = message[4:-2]
        if address_type == DOMAIN_NAME:
            host = raw[1:].decode("latin-1")
        else:
            host = str(ip_address(raw))
        self._state = "done"
        self.rest, self._buffer = self._buffer, b""
        return Request(message[1], address_type, host, int.from_bytes(message[-2:], "big"))
