"""Session: one downstream connection, from accept to its access-log line.

A session owns the connection's counters (plain integers the data path adds
to), its outcome flags, its timers and its upstream dial; it ends exactly
once, in :meth:`Session.finish`, which emits the access record and updates
the listener's totals.  The byte path itself lives in ``splice.py``.

The conversation before the splice (a PROXY header on ``proxy_protocol``
listeners, admission, then the mode's handshake) is run by the session's
:class:`~egressproxy.datapath.driver.Driver`, which applies the mode's
machine's actions to this session's legs, counters and flags.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionAborted, ConnectionLost
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.python.failure import Failure

from egressproxy.observe.accesslog import AccessRecord
from egressproxy.upstream.addrguard import FLAG as ADDRESS_FLAG
from egressproxy.addresses import IPAddress, format_peer
from egressproxy.config import Address
from egressproxy.datapath.driver import Driver
from egressproxy.datapath.sockopts import tune_tcp
from egressproxy.datapath.splice import LINGER, DownstreamLeg, Leg, UpstreamLeg, join
from egressproxy.upstream.cluster import UpstreamCluster, UpstreamConnectFailed, UpstreamDial

#: The session's listener (``listener.ListenerRuntime``), not imported: the listener makes sessions.
ListenerRuntime = Any


class _Undriven:
    """The driver of a session with nothing to say before its splice (the quick lane's).

    Such a session is admitted, dialled and handed to the relay without a
    mode's machine (``quicklane.py``), so it needs no
    :class:`~egressproxy.datapath.driver.Driver`; this stands in for the
    three things a finished or lost session asks of one.  One shared
    instance: an idle relayed connection then carries no driver of its own.
    """

    awaiting_header = False

    def finished(self) -> None:
        """Nothing was started, so nothing is left to stop."""

    def upstream_lost(self, reason: Failure) -> bool:
        """No machine answers the client: the loss ends the session as usual."""
        return False


UNDRIVEN = _Undriven()


class Session:
    """State of one downstream connection; see the module docstring."""

    #: The source address the listener counted this session under at
    #: admission (``max_connections_per_source``); None when not counted.
    counted_source: IPAddress | None = None

    def __init__(self, listener: ListenerRuntime, peer: IAddress, driven: bool = True) -> None:
        self.listener = listener
        self.reactor = listener.reactor
        self.start = self.reactor.seconds()
        self.peer_address = peer
        self.bytes_received = 0
        self.bytes_sent = 0
        self.upstream_name = "-"
        #: Why the address checks refused the destination ("resolves to a private address"), if they did.
        self.refused_address: str | None = None
        #: Forward listeners set these to "-" (their access lines carry them):
        #: the authenticated user's name, and the ``ip:port`` the upstream
        #: socket is connected to.  None elsewhere (not logged).
        self.user: str | None = None
        self.dialled: str | None = None
        self.flags: list[str] = []
        self.keepalive = listener.cluster.config.keepalive
        self.down: DownstreamLeg | None = None
        self.up: UpstreamLeg | None = None
        self.finished = False
        self._dial: UpstreamDial | None = None
        self._timers: list[IDelayedCall] = []
        self._idle_seen = 0
        self._idle_since = 0.0
        #: Runs the conversation before the splice (PROXY header, admission, the mode's machine).
        self.driver = Driver(self) if driven else UNDRIVEN
        # Set when the compiled relay takes the pair (relayjoin.Relayed); made
        # here so that the hand-off adds no attribute (each would cost the
        # session its shared attribute table).
        self.relayed_local: IAddress | None = None
        self._relay: object | None = None
        self._handle: int | None = None
        self._base_received = 0
        self._base_sent = 0

    # -- outcome -----------------------------------------------------------

    def flag(self, flag: str) -> None:
        """Record an outcome flag (each at most once, in order of occurrence)."""
        if flag not in self.flags:
            self.flags.append(flag)

    def finish(self) -> None:
        """End the session: cancel timers, emit its one access record."""
        if self.finished:
            return
        self.finished = True
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []
        self.driver.finished()
        end = self.reactor.seconds()
        record = AccessRecord(
            start=self.start,
            listener=self.listener.config.name,
            prefix=self.listener.config.log_prefix,
            downstream=format_peer(self.peer_address),
            upstream=self.upstream_name,
            bytes_received=self.bytes_received,
            bytes_sent=self.bytes_sent,
            duration_ms=max(0, int(round((end - self.start) * 1000))),
            flags=tuple(self.flags),
            user=self.user,
            upstream_address=self.dialled,
        )
        self.listener.session_finished(self, record)

    # -- lifecycle -----------------------------------------------------------

    def downstream_connected(self, leg: DownstreamLeg) -> None:
        """A client connected: the driver reads any PROXY header, admits it and starts the mode."""
        self.down = leg
        if self.listener.socket_options != self.keepalive:  # else inherited from the listening socket
            tune_tcp(leg.transport, self.keepalive)
        self.driver.client_connected(leg)

    def connect_upstream(
        self, cluster: UpstreamCluster, endpoints: list[Address] | None = None, checked: bool = False
    ) -> None:
        """Dial ``cluster`` (its own endpoints, or ``endpoints``), unless its breaker is open.

        ``checked``: the destination is the client's choice, so its addresses
        are checked against the listener's ``allow_addresses``/``deny_addresses``
        and the built-in internal ranges (``addrguard``).  The driver hears the
        outcome: ``upstream_connected`` or ``upstream_failed`` (flag ``IA``
        for a refused address).
        """
        up = UpstreamLeg(self)
        # Kept for the release: a reload may give the listener another cluster.
        self.cluster = cluster
        policy = self.listener.address_policy() if checked else None
        dial = cluster.dial(up, self._attempting, endpoints, policy)
        if dial is None:
            self.flag("UO")
            self.driver.upstream_failed("UO", "too many connections (circuit breaker open)")
            return
        self.up = up
        self._dial = dial
        dial.deferred.addCallbacks(self._upstream_connected, self._upstream_failed)

    def splice(self) -> None:
        """Join the two legs: from here on bytes flow untouched until the end.

        With the compiled relay running (``fast_path: auto``), the legs are
        handed to it when it can keep the splice's rules (``relayjoin.py``);
        otherwise, or without it, they are joined in Python.
        """
        relay = self.listener.fast_path.relay
        if relay is None or not relay.take(self):
            join(self.down, self.up, self.listener.fast_path)  # type: ignore[arg-type]
        self._start_idle_timer()

    def close_downstream(self) -> None:
        """Close the client's connection gracefully (flushing any answer)."""
        if self.down is not None:
            self.down.close()

    def _attempting(self, address: Address) -> None:
        self.upstream_address = address
        self.upstream_name = str(address)

    def _upstream_connected(self, up: UpstreamLeg) -> None:
        dial, self._dial = self._dial, None
        if dial is not None and dial.reported is not None:
            # policy: report: dialled, though enforce would have refused it.
            self.flag("RP")
            self.listener.count_reported(dial.reported.reason)
            self.listener.log.warn(
                "{listener}: report mode: {peer} -> {upstream} {what}; enforce would refuse it",
                listener=self.listener.config.name, peer=format_peer(self.peer_address),
                upstream=self.upstream_name, what=dial.reported.what,
            )
        if self.dialled is not None:
            self.dialled = format_peer(up.transport.getPeer())  # type: ignore[union-attr]
        self.driver.upstream_connected(up)

    def _upstream_failed(self, failure: Failure) -> None:
        self._dial = None
        self.up = None
        error = failure.check(UpstreamConnectFailed)
        flag = failure.value.flag if error else "UF"
        reason = failure.value.reason if error else "error"
        self.flag(flag)
        if flag == ADDRESS_FLAG:
            # Refused by the address checks: the machine names the class, never the address.
            self.refused_address = failure.value.detail
            self.listener.count_rejected(reason)
        self.listener.log.info(
            "{listener}: upstream {upstream} failed for {peer}: {reason}",
            listener=self.listener.config.name,
            upstream=self.upstream_name,
            peer=format_peer(self.peer_address),
            reason=failure.getErrorMessage(),
        )
        self.driver.upstream_failed(flag, reason)

    def leg_lost(self, leg: Leg, reason: Failure) -> None:
        """One leg's connection is gone: close the other, finish when both are."""
        down, up = self.down, self.up
        if self.driver.awaiting_header:
            # Gone before its PROXY header: never admitted, but still a connection.
            self.driver.stop_reading_header()
            self.listener.count_unadmitted(None)
        if leg is up and up.peer is None and down is not None and not down.lost and self.driver.upstream_lost(reason):
            # Before the splice, a machine may answer the client itself (a
            # Postgres ErrorResponse, a TLS alert) rather than close it.
            self.cluster.released(self.upstream_address)
            self.up = None
            return
        if reason.check(ConnectionLost) and not reason.check(ConnectionAborted) and self._ending_abruptly():
            # A reset, not a FIN; our own aborts (idle, linger) carry their own flag.
            self.flag("DC" if leg is down else "UC")
        if leg is up:
            self.cluster.released(self.upstream_address)
        elif self._dial is not None:
            self._dial.cancel()
            self._dial = None
            self.up = up = None
        other = up if leg is down else down
        if other is not None and not other.lost:
            other.close()
            self._after(LINGER, other.abort)
            return
        self.finish()

    def abort(self) -> None:
        """Drop both legs now and stop any dial in progress."""
        if self._dial is not None:
            self._dial.cancel()
            self._dial = None
            self.up = None
        for leg in (self.down, self.up):
            if leg is not None:
                leg.abort()

    def _ending_abruptly(self) -> bool:
        """True when a reset is the first sign that this session is ending.

        Once either side has sent EOF, or one leg is already gone, the session
        is closing normally, and a reset then is how many peers finish: a
        PostgreSQL backend exits after a client's Terminate without reading
        the TLS close_notify that follows, so its kernel answers with RST.
        Flagging those would mark every TLS session as broken.
        """
        legs = [leg for leg in (self.down, self.up) if leg is not None]
        return not any(leg.read_closed or leg.write_closed for leg in legs) and sum(leg.lost for leg in legs) <= 1

    def refuse_overlong_preamble(self) -> None:
        """A client delivered more than a splice holds before connecting: drop it."""
        if self.down is not None:
            self.down.abort()

    # -- timers --------------------------------------------------------------

    def _after(self, delay: float, f) -> None:  # type: ignore[no-untyped-def]
        self._timers.append(self.reactor.callLater(delay, f))

    def _start_idle_timer(self) -> None:
        timeout = self.cluster.config.idle_timeout
        if not timeout:
            return
        self._idle_seen = self.bytes_received + self.bytes_sent
        self._idle_since = self.reactor.seconds()
        self._after(timeout / 4, self._check_idle)

    def _check_idle(self) -> None:
        """Close the session once no byte has moved for ``idle_timeout`` (flag DI).

        Runs every quarter of the timeout and compares the byte counters, so
        the data path never touches a timer (see splice.py's notes).
        """
        timeout = self.cluster.config.idle_timeout
        assert timeout
        now = self.reactor.seconds()
        seen = self.bytes_received + self.bytes_sent
        if seen != self._idle_seen:
            self._idle_seen = seen
            self._idle_since = now
        elif now - self._idle_since >= timeout:
            self.flag("DI")
            self.abort()  # both legs (or the relay's pair), at once
            return
        self._after(timeout / 4, self._check_idle)
