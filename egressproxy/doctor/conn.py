"""One probe connection: connect with a deadline, awaitable reads, TLS on the same socket.

The steps after TCP (SSLRequest, TLS, login) are a conversation over one
connection, written as ``async`` code: ``await conn.read(1, timeout)``.
:class:`ProbeConnection` is the Twisted protocol under it: it buffers what
arrives, wakes the one pending reader, remembers how the peer closed and
how many bytes it ever sent (a close with 0 bytes right after accept is the
allowlist symptom), and starts TLS with ``ITLSTransport.startTLS``,
reporting the end of the handshake through ``IHandshakeListener``.

Every wait has a timeout from the caller; nothing here waits unbounded.
It knows no protocol: what to send and what an answer means is the steps'.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer


class Closed(Exception):
    """The peer closed (or reset) the connection before the bytes awaited arrived."""

    def __init__(self, received: int, reason: str) -> None:
        super().__init__(reason)
        #: Bytes the peer sent over the whole connection before closing.
        self.received = received
        self.reason = reason


class TimedOut(Exception):
    """Nothing (or not enough) arrived within the step's timeout."""


@implementer(IHandshakeListener)
class ProbeConnection(Protocol):
    """A client connection the doctor's steps read from and write to; see the module notes."""

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self.buffer = b""
        #: Every byte received, before and after TLS (TLS records count as received plaintext only).
        self.received = 0
        self.lost: Failure | None = None
        self._waiter: defer.Deferred[None] | None = None
        self._handshake: defer.Deferred[None] | None = None

    # -- IProtocol / IHandshakeListener ---------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self.received += len(data)
        self._wake()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason
        self._wake()
        if self._handshake is not None:
            handshake, self._handshake = self._handshake, None
            handshake.errback(reason)

    def handshakeCompleted(self) -> None:
        if self._handshake is not None:
            handshake, self._handshake = self._handshake, None
            handshake.callback(None)

    # -- what the steps call ----------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.lost is None and self.transport is not None:
            self.transport.write(data)

    async def read(self, count: int, timeout: float) -> bytes:
        """Exactly ``count`` bytes; :class:`Closed` or :class:`TimedOut` otherwise."""
        deadline = self.reactor.seconds() + timeout
        while len(self.buffer) < count:
            if self.lost is not None:
                raise Closed(self.received, describe_loss(self.lost))
            left = deadline - self.reactor.seconds()
            if left <= 0:
                raise TimedOut(f"no answer within {timeout:g}s")
            await self._wait(left)
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    async def wait_closed(self, seconds: float) -> bool:
        """Whether the peer closes within ``seconds`` (data arriving meanwhile is kept)."""
        deadline = self.reactor.seconds() + seconds
        while self.lost is None:
            left = deadline - self.reactor.seconds()
            if left <= 0:
                return False
            await self._wait(left)
        return True

    async def start_tls(self, creator: Any, timeout: float) -> None:
        """Start TLS as the client and wait for the handshake; the failure as raised by Twisted."""
        if self.lost is not None:
            raise Closed(self.received, describe_loss(self.lost))
        self._handshake = defer.Deferred()
        handshake = self._handshake
        self.transport.startTLS(creator)  # type: ignore[union-attr]
        handshake.addTimeout(timeout, self.reactor)
        try:
            await handshake
        except defer.TimeoutError:
            self._handshake = None
            raise TimedOut(f"TLS handshake not done within {timeout:g}s") from None

    def tls_handle(self) -> Any:
        """The pyOpenSSL ``Connection`` once TLS started (``ISSLTransport.getHandle``)."""
        return self.transport.getHandle()  # type: ignore[union-attr]

    def close(self, graceful: bool = False) -> None:
        """Abort (a probe of an upstream: nothing to say to it), or end with a FIN when ``graceful``.

        A graceful end is for probing a listener of the running proxy: its
        access log then shows a clean close, not a reset (``DC``).
        """
        if self.lost is None and self.transport is not None:
            if graceful:
                self.transport.loseConnection()  # type: ignore[union-attr]
            else:
                self.transport.abortConnection()  # type: ignore[union-attr]

    # -- internals ---------------------------------------------------------------

    def _wait(self, seconds: float) -> defer.Deferred[None]:
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiter = waiter
        call = self.reactor.callLater(seconds, self._wake)

        def disarm(result: object) -> object:
            if call.active():
                call.cancel()
            return result

        return waiter.addBoth(disarm)

    def _wake(self) -> None:
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.callback(None)


def describe_loss(reason: Failure) -> str:
    if reason.check(error.ConnectionDone):
        return "closed by the server"
    if reason.check(error.ConnectionLost, error.ConnectionAborted):
        return "reset by the server"
    return reason.getErrorMessage()


class ConnectFailed(Exception):
    """The TCP connect failed; ``kind`` is ``refused``, ``timeout``, ``unreachable`` or ``error``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def classify(failure: Failure, timeout: float) -> ConnectFailed:
    if failure.check(error.ConnectionRefusedError):
        return ConnectFailed("refused", "connection refused (nothing listens there, or a firewall rejects)")
    if failure.check(defer.TimeoutError, error.TimeoutError):
        return ConnectFailed("timeout", f"timed out after {timeout:g}s (packets dropped on the way)")
    if failure.check(error.NoRouteError):
        return ConnectFailed("unreachable", f"no route to host ({failure.getErrorMessage()})")
    return ConnectFailed("error", failure.getErrorMessage())


async def connect(reactor: Any, address: str, port: int, timeout: float) -> ProbeConnection:
    """A connected :class:`ProbeConnection` to an IP literal, or :class:`ConnectFailed`."""
    if ipaddress.ip_address(address).version == 6:
        endpoint: Any = TCP6ClientEndpoint(reactor, address, port, timeout=timeout)
    else:
        endpoint = TCP4ClientEndpoint(reactor, address, port, timeout=timeout)
    protocol = ProbeConnection(reactor)
    attempt = connectProtocol(endpoint, protocol)
    attempt.addTimeout(timeout + 1, reactor)  # the endpoint's own timeout normally fires first
    try:
        await attempt
    except Exception:
        raise classify(Failure(), timeout) from None
    return protocol
