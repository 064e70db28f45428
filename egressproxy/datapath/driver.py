"""The driver: the one code that applies a machine's actions to a session.

A session (``session.py``) owns the counters, flags, access record and
dial; a mode's machine (``handshake.py``) decides what to say and where to
go.  Between them, this driver:

- runs the **PROXY stage** first on a ``proxy_protocol`` listener (the
  header, parsed by ``proxyprotocol.py``, read before admission; see
  ``proxystage.py`` for the rules and flags);
- admits the client, makes the mode's machine and turns the legs'
  happenings (bytes, EOF, connect, dial failure, loss, timers) into events;
- applies each action the machine returns, in order: writes, dials, TLS on
  either leg (options built and cached by the mode's per-listener state,
  ``server_options``/``client_options``), timers, flags, counters, log
  lines, refusals and finally the splice.

Byte counting: ``bytes_sent`` is what the client was written.  Upstream
bytes the machine reads before the splice are taken off the count when
read and counted again when the machine writes them (or leaves them to
the splice).

Nothing here runs per chunk once the splice is made.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from egressproxy.upstream.addrguard import FLAG as ADDRESS_FLAG
from egressproxy.datapath import handshake as h
from egressproxy.modes import registry
from egressproxy.datapath.proxystage import ProxyStage
from egressproxy.datapath.support import OneShot, tls_failure_text


#: The legs (``splice.DownstreamLeg``, ``UpstreamLeg``) are not imported: splice imports the session, which imports this.
DownstreamLeg = UpstreamLeg = Leg = Any

__all__ = ["LINGER", "LINGER_BYTES", "Driver", "TLSUnavailable", "tls_failure_text"]

#: How long a client refused with ``Refuse(how="linger")`` may keep sending before it is closed.
LINGER = 2.0
#: How much such a client may send meanwhile before it is closed.
LINGER_BYTES = 4 * 1024 * 1024

#: What a machine tells a client refused at admission, by the listener's reason.
_REFUSALS = {
    "source": "source address not allowed",
    "max_connections": "too many connections",
    "max_connections_per_source": "too many connections from this source address",
}


class TLSUnavailable:
    """An event: TLS could not start on ``leg`` (``client``/``upstream``): its options cannot be built."""

    __slots__ = ("error", "leg")

    def __init__(self, leg: str, error: str) -> None:
        self.leg = leg
        self.error = error

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TLSUnavailable) and (self.leg, self.error) == (other.leg, other.error)

    def __repr__(self) -> str:
        return f"TLSUnavailable(leg={self.leg!r}, error={self.error!r})"


class Driver(ProxyStage):
    """Runs one session's machine; see the module docstring."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.listener = session.listener
        self._factory = registry.spec(self.listener.config.mode).handshake
        if getattr(self._factory, "names_user", False):
            # Forward listeners' access lines name the user and the address dialled.
            session.user = "-"
            session.dialled = "-"
        self.machine: Any = None
        #: Client bytes go to the machine (else they are held for the splice, or dropped).
        self._reading = False
        #: Bytes held by the client leg before the machine read it (after a PROXY header).
        self._unfed = b""
        self._discarded = 0
        self._discarding = False
        self._spliced = False
        #: The upstream was closed on purpose: its loss needs no answer.
        self._dropping = False
        self._timers: dict[str, IDelayedCall] = {}
        self._other_timers: list[IDelayedCall] = []

    # -- the session's hooks ---------------------------------------------------

    def client_connected(self, leg: DownstreamLeg) -> None:
        """A client connected: its PROXY header first (on such listeners), then admission."""
        if self.listener.config.proxy_protocol:
            if not self._proxy_header_sender_trusted():
                self._refuse_untrusted_sender(leg)
                return
            self._await_proxy_header(leg)
            return
        self._admit()

    def upstream_connected(self, up: UpstreamLeg) -> None:
        session = self.session
        if self.machine is None:
            return
        try:
            bound = up.transport.getHost()  # type: ignore[union-attr]
            local = (bound.host, bound.port)
        except AttributeError:
            local = None
        held = self._take_pending(up)
        session.bytes_sent -= len(held)
        up.read_preamble(self._upstream_bytes, self._upstream_eof)
        self._feed(h.Connected(
            address=getattr(session, "upstream_address", None), peer=session.dialled, local=local,
            cluster=getattr(session, "cluster", None),
        ))
        if held and not self._spliced and session.up is up and not up.lost:
            self._feed(h.UpstreamBytes(held))

    def upstream_failed(self, flag: str, reason: str) -> None:
        detail = self.session.refused_address if flag == ADDRESS_FLAG else None
        self._feed(h.DialFailed(flag, reason, detail, self.session.upstream_name))

    def upstream_lost(self, reason: Failure) -> bool:
        """The upstream leg was lost before the splice; True when the machine answers the client itself."""
        if self._dropping:
            return True
        if self.machine is None or self._spliced:
            return False
        text = None
        if not reason.check(ConnectionDone, ConnectionLost):
            text = tls_failure_text(reason, self._server_name)
        actions = self.machine.receive(h.UpstreamLost(text))
        if not actions:
            return False
        self._apply(actions)
        return True

    def finished(self) -> None:
        """The session has ended: no timer outlives it; the machine forgets its registrations."""
        for timer in list(self._timers.values()) + self._other_timers:
            if timer.active():
                timer.cancel()
        self._timers = {}
        self._other_timers = []
        ended = getattr(self.machine, "ended", None)
        if ended is not None:
            self._apply(ended())

    # -- admission ----------------------------------------------------------------

    def _admit(self) -> None:
        session = self.session
        listener = self.listener
        self.machine = self._factory(h.Context(
            listener=lambda: listener.config, peer=session.peer_address, cluster=listener.cluster,
            named_cluster=listener.named_cluster, state=listener.state(),
        ))
        down = session.down
        assert down is not None
        self._unfed = self._take_pending(down)
        self._reading = True
        down.read_preamble(self._client_bytes, self._client_eof)
        refusal = listener.admit(session)
        if refusal is not None:
            session.flag(refusal)
            reason = _REFUSALS.get(listener.last_refusal, "too many connections")
            self._apply(self.machine.refuse(refusal, reason))
        else:
            self._apply(self.machine.start())
        if self._unfed and self._reading:
            data, self._unfed = self._unfed, b""
            self._feed(h.ClientBytes(data))

    # -- events -----------------------------------------------------------------------

    def _feed(self, event: Any) -> None:
        if self.session.finished or self.machine is None:
            return
        self._apply(self.machine.receive(event))

    def _client_bytes(self, data: bytes) -> None:
        if self._discarding:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self.session.close_downstream()
            return
        if self._reading:
            self._feed(h.ClientBytes(data))

    def _client_eof(self) -> None:
        if self._discarding:
            self.session.close_downstream()
            return
        if self._reading:
            self._feed(h.ClientEOF())

    def _upstream_bytes(self, data: bytes) -> None:
        self.session.bytes_sent -= len(data)  # counted when written to the client
        self._feed(h.UpstreamBytes(data))

    def _upstream_eof(self) -> None:
        self._feed(h.UpstreamEOF())

    def _fire(self, name: str) -> None:
        self._timers.pop(name, None)
        self._feed(h.TimerFired(name))

    # -- actions --------------------------------------------------------------------

    _server_name: str | None = None

    def _apply(self, actions: list[Any]) -> None:
        for action in actions:
            handler = getattr(self, "_do_" + type(action).__name__)
            if handler(action) is False:
                return  # the machine was told why and answered with its own actions

    def _do_WriteClient(self, action: h.WriteClient) -> None:
        down = self.session.down
        if down is not None and not down.lost and action.data:
            self.session.bytes_sent += len(action.data)
            down.transport.write(action.data)  # type: ignore[union-attr]

    def _do_WriteUpstream(self, action: h.WriteUpstream) -> None:
        up = self.session.up
        if up is not None and not up.lost:
            up.transport.write(action.data)  # type: ignore[union-attr]

    def _do_HoldClient(self, action: h.HoldClient) -> None:
        down = self.session.down
        assert down is not None
        self._reading = False
        rest, self._unfed = self._unfed + action.rest, b""
        down.end_preamble(rest)

    def _do_Dial(self, action: h.Dial) -> None:
        session = self.session
        if action.hold_client:
            session.down.transport.pauseProducing()  # type: ignore[union-attr]
        cluster = action.cluster if action.cluster is not None else self.listener.cluster
        endpoints = list(action.endpoints) if action.endpoints is not None else None
        session.connect_upstream(cluster, endpoints, action.checked)

    def _do_StartClientTLS(self, action: h.StartClientTLS) -> bool:
        session = self.session
        try:
            options = self.listener.state().server_options(action.tls)  # type: ignore[union-attr]
        except Exception as e:  # unreadable files, bad PEM: the listener cannot speak TLS
            self._feed(TLSUnavailable("client", str(e)))
            return False
        down = session.down
        assert down is not None
        down.transport.startTLS(options)  # type: ignore[union-attr]
        if action.replay:
            # Bytes already read go to the new TLS layer first.
            down.transport.protocol.dataReceived(action.replay)  # type: ignore[union-attr]
        return True

    def _do_StartUpstreamTLS(self, action: h.StartUpstreamTLS) -> bool:
        try:
            options = self.listener.state().client_options(action.server_name, action.ca_file)  # type: ignore[union-attr]
        except Exception as e:  # an unreadable or empty ca_file
            self._feed(TLSUnavailable("upstream", str(e)))
            return False
        self._server_name = action.server_name
        up = self.session.up
        assert up is not None
        up.transport.startTLS(options)  # type: ignore[union-attr]
        return True

    def _do_ArmTimer(self, action: h.ArmTimer) -> None:
        self._cancel(action.name)
        self._timers[action.name] = self.session.reactor.callLater(action.seconds, self._fire, action.name)

    def _do_DisarmTimer(self, action: h.DisarmTimer) -> None:
        for name in [action.name] if action.name is not None else list(self._timers):
            self._cancel(name)

    def _cancel(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _do_SetUpstreamName(self, action: h.SetUpstreamName) -> None:
        self.session.upstream_name = action.name

    def _do_SetUser(self, action: h.SetUser) -> None:
        self.session.user = action.name

    def _do_Flag(self, action: h.Flag) -> None:
        self.session.flag(action.flag)

    def _do_Count(self, action: h.Count) -> None:
        listener = self.listener
        if action.what == "rejected":
            listener.count_rejected(action.label)
        elif action.what == "login_refused":
            listener.count_login_refused(action.label)
        elif action.what == "reported":
            listener.count_reported(action.label)
        elif action.what == "connect_failure":
            failures = self.session.cluster.connect_failures
            failures[action.label] = failures.get(action.label, 0) + 1
        else:
            raise ValueError(f"unknown count {action.what!r}")

    def _do_Log(self, action: h.Log) -> None:
        log = self.listener.log if action.namespace is None else Logger(action.namespace, self.machine)
        getattr(log, action.level)(action.format, **dict(action.fields))

    def _do_Refuse(self, action: h.Refuse) -> None:
        session = self.session
        if action.flag is not None:
            session.flag(action.flag)
        self._reading = False
        down = session.down
        if action.how == "abort":
            if down is not None:
                down.abort()
            return
        if action.how == "close":
            self._do_WriteClient(h.WriteClient(action.answer))
            session.close_downstream()
            return
        # linger: the answer, our FIN, then what the client still sends is dropped for a while.
        if down is None or down.lost or down.transport.disconnecting:  # type: ignore[union-attr]
            return  # already being dropped (preamble overflow, drain)
        self._do_WriteClient(h.WriteClient(action.answer))
        if down.read_closed:
            session.close_downstream()
            return
        self._discarding = True
        down.read_preamble(self._client_bytes, self._client_eof)
        down.transport.resumeProducing()  # type: ignore[union-attr]  # paused if a dial failed
        down.transport.loseWriteConnection()  # type: ignore[union-attr]
        self._other_timers = [t for t in self._other_timers if t.active()]
        self._other_timers.append(session.reactor.callLater(LINGER, session.close_downstream))

    def _do_CloseUpstream(self, action: h.CloseUpstream) -> None:
        up = self.session.up
        if up is None or up.lost:
            return
        if not action.answered:
            up.transport.loseConnection()  # type: ignore[union-attr]  # its loss reaches the machine
            return
        self._dropping = True
        if action.abort:
            up.abort()
        else:
            up.close()

    def _do_Splice(self, action: h.Splice) -> None:
        session = self.session
        down, up = session.down, session.up
        assert down is not None and up is not None
        self._spliced = True
        self._reading = False
        self._do_DisarmTimer(h.DisarmTimer())
        down.end_preamble(self._unfed + action.client)
        self._unfed = b""
        session.bytes_sent += len(action.upstream)  # written to the client at the join
        up.end_preamble(action.upstream)
        if action.client_filter is not None:
            down.set_filter(action.client_filter)
        session.splice()

    def _do_SendCopy(self, action: h.SendCopy) -> None:
        cluster = action.cluster
        copy = OneShot(action.data, cluster, action.address, action.linger)
        dial = cluster.dial(copy, lambda address: None, [action.address])
        if dial is not None:
            dial.deferred.addErrback(lambda failure: None)

    def _do_Close(self, action: h.Close) -> None:
        self._reading = False
        self.session.close_downstream()

    def _do_Abort(self, action: h.Abort) -> None:
        self.session.abort()

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _take_pending(leg: Leg) -> bytes:
        """Bytes a leg held before the machine read it (e.g. after a PROXY header)."""
        held = b"".join(leg.pending)
        leg.pending = []
        leg.pending_size = 0
        return held
