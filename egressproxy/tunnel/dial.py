"""One attempt to reach a destination over one path, ending in a leg ready to splice.

An attempt connects to the path's address (a name such as
``my-egress.internal`` through ``HostnameEndpoint``: every address, IPv6 and
IPv4, within the connect timeout; an IP literal directly, as the proxy's
own dials do) and, for a ``socks5`` path, runs the SOCKS5 CONNECT
handshake (``socks.py``) on that connection.  It then hands over a
:class:`PathLeg`: an ``UpstreamLeg`` of the proxy's own splice
(``egressproxy.datapath.splice``) that has carried none of the
destination's bytes yet, so the caller may still try another path when
this one fails.  A ``tcp`` path is ready as soon as TCP connects.

Failures are :class:`PathFailed`, with the flag the tunnel's log line gets
(``UF`` connect failure, ``UT`` timeout, ``NR`` refused by the egress app's
allowlist, ``UAEX`` credentials) and ``final`` set for an allowlist refusal,
which no other path would answer differently.

The leg tells its session nothing until it is ready: a connection lost
during the handshake is this attempt's failure, not the session's
business.  After :meth:`PathLeg.ready` it is an ordinary upstream leg.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, error
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from egressproxy.datapath.splice import UpstreamLeg
from egressproxy.tunnel.parse import Destination, Path
from egressproxy.tunnel.socks import Socks5Client, SocksFailed
from egressproxy.upstream.dial import classify_connect_failure, client_endpoint

#: A leg's session (``connection.TunnelConnection`` or the check's stand-in), not imported.
Session = Any


class PathFailed(Exception):
    """An attempt over one path ended before any of the destination's bytes moved."""

    def __init__(self, path: Path, reason: str, flag: str = "UF", final: bool = False, path_down: bool = True) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.flag = flag
        #: Do not try another path: the egress app refused the destination by rule.
        self.final = final
        #: The path itself failed (no connection, no answer, credentials), not
        #: the egress app's dial of this destination: try it last for a while.
        self.path_down = path_down


def describe_connect_failure(failure: Failure, timeout: float) -> tuple[str, str]:
    """(reason for the log, flag) for a failed TCP connect to a path."""
    _, flag = classify_connect_failure(failure)
    if flag == "UT":
        return f"no TCP connection within {timeout:g}s", flag
    if failure.check(error.ConnectionRefusedError):
        return "connection refused (nothing listens there)", flag
    if failure.check(error.DNSLookupError):
        return f"name not resolved: {failure.getErrorMessage()}", flag
    return f"connect failed: {failure.getErrorMessage()}", flag


class PathLeg(UpstreamLeg):
    """The upstream leg over one path; runs the SOCKS5 handshake first, when there is one."""

    #: Until ready: bytes go to the handshake and losses to the attempt.
    handshaking = True

    def __init__(self, session: Session, client: Socks5Client | None, report: Callable[[PathFailed | None], None],
                 path: Path, reactor: Any, timeout: float) -> None:
        super().__init__(session)
        self.client = client
        self.path = path
        self._report = report
        self._reactor = reactor
        self._timeout = timeout
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.client is None:
            self._ready(b"")
            return
        self._timer = self._reactor.callLater(self._timeout, self._timed_out)
        self.transport.write(self.client.greeting())

    def dataReceived(self, data: bytes) -> None:
        if not self.handshaking:
            UpstreamLeg.dataReceived(self, data)
            return
        assert self.client is not None
        try:
            out, rest = self.client.feed(data)
        except SocksFailed as e:
            self._failed(PathFailed(self.path, f"SOCKS5: {e.reason}", e.flag, final=e.refused_by_rule,
                                    path_down=e.code is None))
            return
        if out:
            self.transport.write(out)
        if rest is not None:
            self._ready(rest)

    def _ready(self, rest: bytes) -> None:
        self._stop_timer()
        self.handshaking = False
        if rest:
            # A server-first destination's first bytes: held for the splice.
            UpstreamLeg.dataReceived(self, rest)
        self._report(None)

    def _failed(self, failure: PathFailed) -> None:
        if not self.handshaking:
            return
        self._stop_timer()
        self.handshaking = False
        self.lost = True  # never joined: its loss is nobody's news
        self.transport.abortConnection()
        self._report(failure)

    def _timed_out(self) -> None:
        self._timer = None
        self._failed(PathFailed(self.path, f"no SOCKS5 answer within {self._timeout:g}s", "UT"))

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def abandon(self) -> None:
        """Drop the connection before it was ready (the client went away)."""
        if self.handshaking:
            self._stop_timer()
            self.handshaking = False
            self.lost = True
            self.transport.abortConnection()

    def readConnectionLost(self) -> None:
        if self.handshaking:
            self._failed(PathFailed(self.path, "the egress app closed the connection during the SOCKS5 handshake"))
            return
        super().readConnectionLost()

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # type: ignore[assignment]
        if self.handshaking:
            self._failed(PathFailed(self.path, f"connection lost during the SOCKS5 handshake: {reason.getErrorMessage()}"))
            return
        super().connectionLost(reason)


class PathAttempt:
    """One try over one path; :attr:`result` fires with the ready :class:`PathLeg` or fails with PathFailed."""

    def __init__(self, reactor: Any, path: Path, destination: Destination, session: Session, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.result: defer.Deferred[PathLeg] = defer.Deferred(lambda _: self.cancel())
        client = None
        if path.scheme == "socks5":
            client = Socks5Client(destination.host, destination.port, path.username, path.password)
        self.leg = PathLeg(session, client, self._leg_report, path, reactor, timeout)
        endpoint = client_endpoint(reactor, path.host, path.port, timeout)
        self._connecting: defer.Deferred[Any] | None = connectProtocol(endpoint, self.leg)
        self._connecting.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, _: object) -> None:
        self._connecting = None

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(defer.CancelledError, error.ConnectingCancelledError) or self.result.called:
            return
        reason, flag = describe_connect_failure(failure, self.timeout)
        self.result.errback(PathFailed(self.path, reason, flag))

    def _leg_report(self, failure: PathFailed | None) -> None:
        if self.result.called:
            return
        if failure is None:
            self.result.callback(self.leg)
        else:
            self.result.errback(failure)

    def cancel(self) -> None:
        """Stop this attempt: the connect in progress, or the handshake."""
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        elif self.leg.transport is not None:
            self.leg.abandon()
