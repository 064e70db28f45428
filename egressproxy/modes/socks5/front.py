"""``mode: socks5``: a SOCKS5 proxy (RFC 1928) for CONNECT only.

The conversation, for one client connection (wire format in ``socks.py``):

1. Greeting: with ``users`` configured the client must offer
   username/password (RFC 1929) and pass it, else "no acceptable methods"
   or an authentication failure, then close (flag ``UAEX`` for wrong
   credentials).  Without ``users``, "no authentication" is the only
   method offered.  The whole handshake has ``HANDSHAKE_TIMEOUT`` seconds.
2. Request: ``CONNECT`` only; ``BIND`` and ``UDP ASSOCIATE`` get
   ``0x07 command not supported``, an unknown address type ``0x08`` (flag
   ``DPE``).
3. Destination: a domain name is resolved by the proxy, so the allowlist
   applies to the name (clients should use ``socks5h://``, or curl's
   ``--socks5-hostname``; with plain ``socks5://`` they resolve locally and
   send an address, which must then match an allowlisted CIDR).  A name
   that is not a valid host name gets ``0x04 host unreachable``; one
   outside ``allow_destinations`` (the user's own list if it has one, else
   the listener's) ``0x02 not allowed by ruleset`` (flag ``NR``), unless
   ``policy: report`` lets it through (flag ``RP``, see ``forward/front.py``).
   Nothing is dialled before these checks pass.
4. Dial through the listener's cluster.  Failures map to reply codes:
   refused ``0x05``, name not resolved or no route ``0x04``, connect
   timeout ``0x06 TTL expired`` (what microsocks answers for ETIMEDOUT),
   circuit breaker open or anything else ``0x01``.
5. Success: ``0x00`` with the address the proxy's upstream socket is bound
   to, then splice.
"""

from __future__ import annotations

from ipaddress import ip_address

from egressproxy.upstream.addrguard import FLAG as ADDRESS_FLAG
from egressproxy.datapath.handshake import Connected, DialFailed, HoldClient, Splice, WriteClient
from egressproxy.modes.forward.destinations import InvalidDestination, authenticate, destination
from egressproxy.modes.forward.front import ForwardHandshake
from egressproxy.modes.socks5.socks import (
    COMMAND_NOT_SUPPORTED,
    CONNECT,
    CONNECTION_REFUSED,
    GENERAL_FAILURE,
    HOST_UNREACHABLE,
    NOT_ALLOWED,
    SUCCEEDED,
    TTL_EXPIRED,
    Rejected,
    Request,
    Socks5Handshake,
    reply,
)

__all__ = ["HANDSHAKE_TIMEOUT", "Socks5Machine"]

#: Seconds a client has for its whole handshake (greeting to request).
HANDSHAKE_TIMEOUT = 10.0

#: Reply codes for failed connects, by the reason upstream.py classified.
_CONNECT_FAILURES = {
    "refused": CONNECTION_REFUSED,
    "dns": HOST_UNREACHABLE,
    "unreachable": HOST_UNREACHABLE,
    "timeout": TTL_EXPIRED,
}


class Socks5Machine(ForwardHandshake):
    """One client connection of a ``socks5`` listener; see the module docstring."""

    def start(self) -> list:
        users = self.options.users
        check = (lambda name, password: self.authenticated(authenticate(users, name, password))) if users else None
        self._handshake = Socks5Handshake(check)
        self._started = False
        return super().start()

    def handshake_timeout(self) -> float:
        return HANDSHAKE_TIMEOUT

    def handshake_started(self) -> bool:
        return self._started

    def handshake_received(self, data: bytes) -> None:
        self._started = self._started or bool(data)
        try:
            answer, request = self._handshake.feed(data)
        except Rejected as e:
            if e.authentication:
                self.refuse_credentials(e.answer, e.reason)
            else:
                self.refuse_request(e.answer, e.reason)
            return
        if answer:
            self.emit(WriteClient(answer))
        if request is not None:
            self.end_handshake()
            self._serve(request, self._handshake.rest)

    def _serve(self, request: Request, rest: bytes) -> None:
        if request.command != CONNECT:
            self.refuse_request(reply(COMMAND_NOT_SUPPORTED), f"SOCKS command {request.command} is not supported")
            return
        try:
            dest = destination(request.host, request.port)
        except InvalidDestination as e:
            self.refuse_request(reply(HOST_UNREACHABLE), f"bad destination: {e}")
            return
        self.set_upstream_name(str(dest))
        if not self.destination_allowed(dest, "SOCKS5 CONNECT"):
            self.refuse_destination(dest, reply(NOT_ALLOWED), "SOCKS5 CONNECT")
            return
        self.emit(HoldClient(rest))
        self.dial(dest)

    def connected(self, event: Connected) -> None:
        answer = reply(SUCCEEDED)
        if event.local is not None:
            try:
                answer = reply(SUCCEEDED, ip_address(event.local[0]), event.local[1])
            except ValueError:
                pass
        self.emit(WriteClient(answer), Splice())

    def dial_failed(self, event: DialFailed) -> None:
        if event.flag == ADDRESS_FLAG:
            self.note(f"destination {event.upstream} {event.detail}")
            self.answer_and_close(reply(NOT_ALLOWED))
            return
        code = GENERAL_FAILURE if event.flag == "UO" else _CONNECT_FAILURES.get(event.reason, GENERAL_FAILURE)
        self.answer_and_close(reply(code))
