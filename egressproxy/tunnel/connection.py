"""One local connection of the tunnel, from accept to its ``TUNNEL`` line.

A :class:`TunnelConnection` is the *session* the proxy's splice legs
(``egressproxy.datapath.splice``) report to: it holds the byte counters they
add to, hears ``downstream_connected`` and ``leg_lost``, and ends exactly
once, in :meth:`TunnelConnection.finish`, with one record.  The bytes path,
backpressure and half-close are the splice's, unchanged: the two legs are
each other's streaming producers, an EOF on one becomes a write-side
shutdown on the other, and both close once both directions have ended.

The life of one connection:

1. The app connects to the local listener; the client leg is paused at
   once, so the kernel holds whatever the app sends meanwhile.
2. :class:`~egressproxy.tunnel.failover.Attempts` tries the paths in order;
   each failure followed by another try is noted (``failed over``).
3. The first ready path's leg is joined to the client leg (``splice.join``),
   which resumes the client: from here on, no other path is ever tried.
4. No path: the client is closed, with the last path's flag; an allowlist
   refusal gets its own note naming the destination.
5. Either leg lost: the other is closed gracefully, and aborted if it has
   not gone within ``LINGER`` seconds; then the record.

The splice runs on Twisted's ordinary path (``fastpath.ORDINARY``, no
compiled relay): the tunnel carries one app's connections, not a proxy's
thousands, and stays free of the proxy's data-path switches.

:class:`TunnelSite` is what the connections of one destination share (its
listener's factory builds them); it also keeps the live connections, so the
process can drop them all when it ends.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionAborted, ConnectionLost
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from egressproxy.addresses import format_peer
from egressproxy.config import Keepalive
from egressproxy.datapath.sockopts import tune_tcp
from egressproxy.datapath.splice import LINGER, DownstreamLeg, Leg, join
from egressproxy.tunnel.dial import PathAttempt, PathFailed, PathLeg
from egressproxy.tunnel.failover import Attempts, PathOrder
from egressproxy.tunnel.logline import TunnelLog, TunnelRecord
from egressproxy.tunnel.parse import Destination, Path

#: Keepalive on the legs to the egress app: an idle pooled connection
#: whose path vanished is noticed within about two minutes.
KEEPALIVE = Keepalive()


class TunnelSite:
    """What every connection to one destination's listener shares."""

    def __init__(self, reactor: Any, destination: Destination, order: PathOrder, log: TunnelLog, timeout: float) -> None:
        self.reactor = reactor
        self.destination = destination
        self.order = order
        self.log = log
        self.timeout = timeout
        self.live: set[TunnelConnection] = set()

    def abort_all(self) -> None:
        """Drop every live connection now (the process is ending)."""
        for connection in list(self.live):
            connection.abort()


class TunnelConnection:
    """One local connection; see the module notes."""

    keepalive = KEEPALIVE

    def __init__(self, site: TunnelSite, peer: IAddress) -> None:
        self.site = site
        self.reactor = site.reactor
        self.start = self.reactor.seconds()
        self.peer = format_peer(peer)
        self.bytes_received = 0
        self.bytes_sent = 0
        self.flags: list[str] = []
        self.via = "-"
        self.down: DownstreamLeg | None = None
        self.up: PathLeg | None = None
        self.attempts: Attempts | None = None
        self.failures: list[PathFailed] = []
        self.finished = False
        self._timers: list[IDelayedCall] = []
        site.live.add(self)

    def flag(self, flag: str) -> None:
        if flag not in self.flags:
            self.flags.append(flag)

    # -- what the splice's legs call ---------------------------------------------------

    def downstream_connected(self, leg: DownstreamLeg) -> None:
        """The app connected: hold its bytes and try the paths."""
        self.down = leg
        tune_tcp(leg.transport, None)
        leg.transport.pauseProducing()
        site = self.site
        self.attempts = Attempts(
            site.order,
            lambda path: PathAttempt(self.reactor, path, site.destination, self, site.timeout),
            self._failing_over,
        )
        #: Each path that failed, in order (the Attempts' own list).
        self.failures = self.attempts.failures
        self.attempts.start().addCallbacks(self._ready, self._no_path)

    def leg_lost(self, leg: Leg, reason: Failure) -> None:
        """One leg is gone: close the other, finish once both are."""
        down, up = self.down, self.up
        if leg is down and self.attempts is not None:
            # The app left while the paths were being tried.
            self.attempts.cancel()
            self.attempts = None
        if reason.check(ConnectionLost) and not reason.check(ConnectionAborted) and self._ending_abruptly():
            self.flag("DC" if leg is down else "UC")
        other = up if leg is down else down
        if other is not None and not other.lost:
            other.close()
            self._timers.append(self.reactor.callLater(LINGER, other.abort))
            return
        self.finish()

    def refuse_overlong_preamble(self) -> None:
        """Cannot happen while the client leg is paused; if it does, drop the client."""
        if self.down is not None:
            self.down.abort()

    # -- paths ---------------------------------------------------------------------------

    def _failing_over(self, failed: PathFailed, next_path: Path) -> None:
        self.site.log.note(f"{self.site.destination}: {failed.path} failed ({failed.reason}); failing over to {next_path}")

    def _ready(self, up: PathLeg) -> None:
        self.attempts = None
        self.up = up
        self.via = str(up.path)
        down = self.down
        assert down is not None
        if down.lost:
            up.close()
            return
        join(down, up)

    def _no_path(self, failure: Failure) -> None:
        self.attempts = None
        if failure.check(defer.CancelledError):
            return
        failed = failure.value if failure.check(PathFailed) else PathFailed(self._first_path(), failure.getErrorMessage())
        self.flag(failed.flag)
        if failed.final:
            self.site.log.note(
                f"refused by the egress proxy's allowlist: {self.site.destination} (via {failed.path}); "
                "add it to the socks5 listener's allow_destinations to allow it"
            )
        else:
            self.site.log.note(f"{self.site.destination}: no path worked; the last, {failed.path}: {failed.reason}")
        if self.down is not None:
            self.down.close()

    def _first_path(self) -> Path:
        return self.site.order.paths[0]

    # -- the end -------------------------------------------------------------------------

    def _ending_abruptly(self) -> bool:
        """A reset is news only when nothing had started to close (as the proxy's session judges)."""
        legs = [leg for leg in (self.down, self.up) if leg is not None]
        return not any(leg.read_closed or leg.write_closed for leg in legs) and sum(leg.lost for leg in legs) <= 1

    def abort(self) -> None:
        """Drop both legs now and stop any try in progress."""
        if self.attempts is not None:
            self.attempts.cancel()
            self.attempts = None
        for leg in (self.down, self.up):
            if leg is not None:
                leg.abort()

    def finish(self) -> None:
        """End once: cancel timers, write the record."""
        if self.finished:
            return
        self.finished = True
        self.site.live.discard(self)
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []
        failed = tuple(f"{f.path}({f.flag})" for f in self.failures)
        self.site.log.record(TunnelRecord(
            start=self.start,
            peer=self.peer,
            destination=str(self.site.destination),
            bytes_received=self.bytes_received,
            bytes_sent=self.bytes_sent,
            duration_ms=max(0, int(round((self.reactor.seconds() - self.start) * 1000))),
            flags=tuple(self.flags),
            via=self.via,
            failed=failed,
        ))


class TunnelFactory(Factory):
    """Builds the client leg of each connection to one destination's listener."""

    def __init__(self, site: TunnelSite) -> None:
        self.site = site

    def buildProtocol(self, addr: IAddress) -> DownstreamLeg:
        return DownstreamLeg(TunnelConnection(self.site, addr))
