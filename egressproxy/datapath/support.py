"""What the driver needs beside the machine's actions: TLS failure text, one-shot deliveries."""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

try:  # service_identity is a hard dependency (twisted[tls]); its error type is what we map.
    from service_identity import VerificationError
except ImportError:  # pragma: no cover
    VerificationError = ()  # type: ignore[assignment,misc]

__all__ = ["OneShot", "tls_failure_text"]


def tls_failure_text(failure: Failure, server_name: str | None) -> str:
    """A one-line reason for a TLS failure, as OpenSSL or service-identity put it."""
    error = failure.value
    if VerificationError and isinstance(error, VerificationError):
        return f"the server's certificate is not valid for {server_name!r}"
    if isinstance(error, SSL.Error):
        reasons = [part[2] for part in (error.args[0] if error.args else []) if isinstance(part, tuple) and len(part) == 3]
        return "; ".join(r for r in reasons if r) or str(error)
    return failure.getErrorMessage()


class OneShot(Protocol):
    """Delivers one message to an endpoint (``SendCopy``: no session, no log line).

    Like libpq with a cancel, it waits for the server to hang up (at most ``linger`` seconds).
    """

    def __init__(self, data: bytes, cluster: Any, address: Any, linger: float) -> None:
        self.data = data
        self.cluster = cluster
        self.address = address
        self.linger = linger
        self._linger: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.data)
        self._linger = self.cluster.reactor.callLater(self.linger, self.transport.loseConnection)

    def dataReceived(self, data: bytes) -> None:
        """A server says nothing to a cancel; anything it does say is dropped."""

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self.cluster.released(self.address)
