"""The client side of a SOCKS5 CONNECT (RFC 1928, RFC 1929), sans-I/O.

Why our own: Twisted ships only a SOCKS4 server (``twisted.protocols.socks``)
and no SOCKS5 client endpoint (checked on 26.10); txtorcon has one, but
not as a dependency worth taking for forty lines of wire format.  The wire
constants are the server's (``egressproxy.modes.socks5.socks``): one
definition of the format for both halves.

:class:`Socks5Client` is told the destination and the credentials; its
:meth:`~Socks5Client.greeting` is the first bytes to send, and
:meth:`~Socks5Client.feed` takes the server's bytes and returns what to send
next, and, once the server's reply has arrived whole, the bytes that came
after it (the destination's first bytes, for server-first protocols).  A
failure raises :class:`SocksFailed`.

A destination name is always sent as a name (ATYP 3): the egress app
resolves it, so its allowlist and address checks apply to the name, as with
``socks5h://``.  IP literals are sent as addresses (ATYP 1 or 4).

Reply code 2, "connection not allowed by ruleset", is what the egress app
answers for a destination outside its allowlist (or an address its checks
refuse): :attr:`SocksFailed.refused_by_rule` is then set, and the caller
must not try another path, which would refuse it too.
"""

from __future__ import annotations

import ipaddress

from egressproxy.modes.socks5.socks import (
    AUTH_VERSION,
    CONNECT,
    DOMAIN_NAME,
    IPV4,
    IPV6,
    NO_ACCEPTABLE_METHODS,
    NO_AUTHENTICATION,
    NOT_ALLOWED,
    SUCCEEDED,
    USERNAME_PASSWORD,
    VERSION,
)

#: The reply codes' meanings (RFC 1928 section 6), as the tunnel's messages say them.
REPLY_MESSAGES = {
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired (the egress app's connect timed out)",
    7: "command not supported",
    8: "address type not supported",
}

#: Reply code -> the access-log flag the tunnel's line carries.
REPLY_FLAGS = {2: "NR", 6: "UT"}


class SocksFailed(Exception):
    """The handshake cannot succeed; ``reason`` says why, for the log."""

    def __init__(self, reason: str, flag: str = "UF", code: int | None = None, authentication: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.flag = flag
        self.code = code
        self.authentication = authentication

    @property
    def refused_by_rule(self) -> bool:
        """The egress app refused this destination by its allowlist: final, for every path."""
        return self.code == NOT_ALLOWED


def request_address(host: str) -> bytes:
    """DST.ADDR with its ATYP byte: an IP literal as an address, anything else as a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna") if not host.isascii() else host.encode("ascii")
        if not 0 < len(name) < 256:
            raise ValueError(f"{host!r} is too long for SOCKS5 (255 bytes at most)") from None
        return bytes((DOMAIN_NAME, len(name))) + name
    return bytes((IPV4 if ip.version == 4 else IPV6,)) + ip.packed


class Socks5Client:
    """One CONNECT handshake; see the module notes.

    ``username`` None: offer "no authentication" only.  Otherwise offer
    username/password only, so a server without users cannot let a client
    that meant to authenticate through unauthenticated by accident.
    """

    def __init__(self, host: str, port: int, username: str | None = None, password: str | None = None) -> None:
        self._address = request_address(host) + port.to_bytes(2, "big")
        self._username = username
        self._password = password or ""
        self._buffer = b""
        self._state = "method"

    def greeting(self) -> bytes:
        """The first message: the one method offered."""
        method = NO_AUTHENTICATION if self._username is None else USERNAME_PASSWORD
        return bytes((VERSION, 1, method))

    def _request(self) -> bytes:
        return bytes((VERSION, CONNECT, 0)) + self._address

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """Take server bytes: (bytes to send now, the bytes after the reply once it succeeded)."""
        if self._state == "done":
            raise RuntimeError("the handshake is already complete")
        self._buffer += data
        out = b""
        while True:
            step = {"method": self._method, "auth": self._auth, "reply": self._reply}[self._state]
            result = step()
            if result is None:
                return out, None
            if self._state == "done":
                rest, self._buffer = self._buffer, b""
                return out, rest
            out += result

    def _take(self, size: int) -> bytes | None:
        if len(self._buffer) < size:
            return None
        taken, self._buffer = self._buffer[:size], self._buffer[size:]
        return taken

    def _method(self) -> bytes | None:
        answer = self._take(2)
        if answer is None:
            return None
        if answer[0] != VERSION:
            raise SocksFailed(f"not a SOCKS5 server (first byte {answer[0]:#04x})")
        if answer[1] == NO_ACCEPTABLE_METHODS:
            if self._username is None:
                raise SocksFailed("the socks5 listener requires a user name and password: "
                                  "add USER:PASSWORD@ to the --via URL", "UAEX", authentication=True)
            raise SocksFailed("the socks5 listener does not take a user name and password: "
                              "remove USER:PASSWORD@ from the --via URL", "UAEX", authentication=True)
        if answer[1] == NO_AUTHENTICATION and self._username is None:
            self._state = "reply"
            return self._request()
        if answer[1] == USERNAME_PASSWORD and self._username is not None:
            self._state = "auth"
            name, password = self._username.encode(), self._password.encode()
            return bytes((AUTH_VERSION, len(name))) + name + bytes((len(password),)) + password
        raise SocksFailed(f"the SOCKS5 server chose method {answer[1]:#04x}, which was not offered")

    def _auth(self) -> bytes | None:
        answer = self._take(2)
        if answer is None:
            return None
        if answer[1] != 0:
            raise SocksFailed("wrong user name or password for the socks5 listener "
                              "(the user's password, from the --via URL)", "UAEX", authentication=True)
        self._state = "reply"
        return self._request()

    def _reply(self) -> bytes | None:
        buffer = self._buffer
        if len(buffer) < 5:
            return None
        if buffer[0] != VERSION:
            raise SocksFailed(f"not a SOCKS5 reply (first byte {buffer[0]:#04x})")
        code = buffer[1]
        if code != SUCCEEDED:
            message = REPLY_MESSAGES.get(code, f"reply code {code:#04x}")
            raise SocksFailed(message, REPLY_FLAGS.get(code, "UF"), code)
        kind = buffer[3]
        if kind == IPV4:
            size = 4 + 4 + 2
        elif kind == IPV6:
            size = 4 + 16 + 2
        elif kind == DOMAIN_NAME:
            size = 4 + 1 + buffer[4] + 2
        else:
            raise SocksFailed(f"the SOCKS5 reply has unknown address type {kind}")
        if self._take(size) is None:
            return None
        self._state = "done"
        return b""
