"""The postgres mode's machine: its hooks, the splice, and saying no.

The conversation itself is split in two mixins, ``client_side.py`` (the
client's first packets) and ``upstream_side.py`` (the server's answers);
this class holds the state they share, and the package notes say how it
all fits.  Where it waits is a ``steps.Step``; what it does there with
each event is ``steps.TABLE`` (``receive`` looks it up, nothing else).
It is pure (``datapath/handshake.py``): every effect is an action it
emits, applied by the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from egressproxy.addresses import format_peer, peer_ip
from egressproxy.upstream.addrguard import FLAG as ADDRESS_FLAG
from egressproxy.datapath.driver import TLSUnavailable
from egressproxy.datapath.handshake import (
    Abort,
    ArmTimer,
    Close,
    CloseUpstream,
    Connected,
    Context,
    Count,
    Dial,
    DialFailed,
    DisarmTimer,
    Flag,
    Log,
    Refuse,
    Splice,
    UpstreamEOF,
    UpstreamLost,
    WriteClient,
)
from egressproxy.modes.base import Handshake
from egressproxy.modes.postgres import pgwire, tlshello
from egressproxy.modes.postgres.client_side import ClientSide
from egressproxy.modes.postgres.options import PostgresOptions
from egressproxy.modes.postgres.pgwire import ACCEPT, CancelKey, InitialPacket
from egressproxy.modes.postgres.problems import Problem
from egressproxy.modes.postgres.state import CancelTarget, Client, PostgresListenerState
from egressproxy.modes.postgres.steps import TABLE, Step
from egressproxy.modes.postgres.tlshello import ClientHello
from egressproxy.modes.postgres.upstream_side import UpstreamSide

__all__ = ["PostgresMachine"]

#: The namespace its log lines have always carried.
LOG_NAMESPACE = "egressproxy.modes.postgres.PostgresFront"
#: The machine's one timer.
TIMER = "postgres"


class PostgresMachine(ClientSide, UpstreamSide, Handshake):
    """The postgres mode machine; see the package notes."""

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.config = context.config
        options = self.config.options
        assert isinstance(options, PostgresOptions)
        #: The listener's TLS handling and routes, as configured when this session began.
        self.options = options
        state = context.state
        self.state = state if isinstance(state, PostgresListenerState) else PostgresListenerState()
        self._out: list[Any] = []
        #: Client bytes read and not yet consumed (forwarded at the splice);
        #: a bytearray, so that a client sending one byte at a time costs linear time.
        self._buffer = bytearray()
        #: Where the machine waits: what it does with each event (``steps.TABLE``).
        self._step = Step.READ_PACKET
        #: Where the client conversation is (how to say no to it).
        self._client = Client.PACKET
        self._ssl_seen = False
        self._gss_seen = False
        #: The client's TLS ends here (``client_tls``).
        self._client_tls = False
        self._packet: InitialPacket | None = None
        self._hello: ClientHello | None = None
        #: Set when refusing: answered as soon as the client is ready to hear it.
        self._problem: Problem | None = None
        #: Upstream bytes read and not yet consumed.
        self._up_buffer = b""
        #: The upstream is being closed on purpose: its loss needs no answer.
        self._dropping = False
        #: TLS to the upstream (originate, or a cancel to a TLS backend): set when asked for.
        self._up_tls: Any = None
        self._up_server_name: str | None = None
        self._scanner: pgwire.StartupAnswer | None = None
        #: The client's SASLInitialResponse is awaited and checked before it goes upstream.
        self._sasl_check = False
        self._sasl_checked = False
        #: This session is a live routed one, registered for cancels by source.
        self._routed_source: str | None = None
        self._key: CancelKey | None = None
        self._target: CancelTarget | None = None
        #: What the dial is for, for messages before any address is attempted.
        self._target_name = "-"
        #: The upstream as the access log names it, and the cluster and endpoint connected to.
        self._upstream = "-"
        self._cluster: Any = None
        self._address: Any = None
        #: The timer is armed (what its firing means depends on the step).
        self._armed = False

    # -- the machine ------------------------------------------------------------

    def start(self) -> list[Any]:
        """Admitted: read the client's first packet."""
        self._out = []
        self._begin()
        return self._out

    def refuse(self, flag: str, reason: str) -> list[Any]:
        """Refused at admission (``RBAC``, ``OM``): read the first packet, then say no in kind."""
        self._out = []
        peer = peer_ip(self.context.peer)
        if flag == "RBAC":
            problem = Problem(
                flag, pgwire.SQLSTATE_NOT_AUTHORIZED,
                f"connections from {peer} are not allowed on this listener",
                tlshello.ACCESS_DENIED,
            )
        elif reason == "too many connections from this source address":
            problem = Problem(
                flag, pgwire.SQLSTATE_TOO_MANY_CONNECTIONS,
                f"too many connections from {peer} to this listener",
                tlshello.INTERNAL_ERROR, hint="close idle connections, or raise the listener's max_connections_per_source",
            )
        else:
            problem = Problem(
                flag, pgwire.SQLSTATE_TOO_MANY_CONNECTIONS, "too many connections to this listener",
                tlshello.INTERNAL_ERROR, hint="retry later, or raise the listener's max_connections",
            )
        self._problem = problem
        self._begin()
        return self._out

    def receive(self, event: Any) -> list[Any]:
        self._out = []
        self._dispatch(event)
        return self._out

    def _dispatch(self, event: Any) -> None:
        """Do what ``steps.TABLE`` says this step does with ``event`` (nothing, if it has no row)."""
        handler = HANDLERS.get((self._step, type(event)))
        if handler is not None:
            handler(self, event)

    def emit(self, *actions: Any) -> None:
        self._out.extend(actions)

    def _connected(self, event: Connected) -> None:
        """Connected (in a ``DIAL_*`` step, whose handler then goes on): note where."""
        self._disarm()
        self._cluster, self._address = event.cluster, event.address
        self._upstream = str(event.address)
        self._up_buffer = b""

    def _upstream_eof(self, event: UpstreamEOF) -> None:
        self.emit(CloseUpstream(answered=False))  # its loss reaches the machine

    def _ignore(self, event: Any) -> None:
        pass

    def _dial_failed(self, event: DialFailed) -> None:
        """The dial failed (``UF``, ``UT``, ``UO``): answer the client in its terms."""
        flag, reason = event.flag, event.reason
        self._upstream = event.upstream
        target = event.upstream if event.upstream != "-" else self._target_name
        if flag == ADDRESS_FLAG:
            # Counted as rejected by the session; never names the address.
            self._fail(Problem(
                flag, pgwire.SQLSTATE_CANNOT_CONNECT, f"{target} {event.detail}: not allowed",
                tlshello.ACCESS_DENIED,
                hint="the proxy dials only public addresses for {sni} routes; list exceptions in allow_addresses",
            ))
            return
        if flag == "UO":
            problem = Problem(
                "UO", pgwire.SQLSTATE_TOO_MANY_CONNECTIONS,
                f"too many connections to {target} (circuit breaker open)", tlshello.INTERNAL_ERROR,
                hint="retry later, or raise the cluster's max_connections",
            )
        elif flag == "UT" or reason == "timeout":
            problem = Problem(
                flag, pgwire.SQLSTATE_CANNOT_CONNECT,
                f"could not connect to {target}: timed out: is this proxy's egress IP on the database's allowlist?",
                tlshello.INTERNAL_ERROR,
            )
        else:
            cause = {
                "refused": "connection refused",
                "dns": "the name does not resolve",
                "unreachable": "network unreachable",
            }.get(reason, "connection failed")
            hint = "is the database running and listening on that address and port?" if reason == "refused" else None
            problem = Problem(
                flag, pgwire.SQLSTATE_CANNOT_CONNECT, f"could not connect to {target}: {cause}",
                tlshello.INTERNAL_ERROR, hint=hint,
            )
        self._fail(problem)

    def _upstream_lost(self, event: UpstreamLost) -> None:
        """Lost before the splice: answer the client (no action: the session closes it)."""
        if self._dropping or self._client in (Client.DONE, Client.CANCEL, Client.RELAY):
            # RELAY: the server ended its startup answer (e.g. an authentication
            # failure, already relayed): close the client like the splice would.
            return
        self._disarm()
        self._fail(self._lost_problem(event.tls_failure))

    def _tls_unavailable(self, event: TLSUnavailable) -> None:
        """TLS options could not be built (unreadable files, bad PEM, an empty ca_file)."""
        if event.leg == "client":
            self.emit(Log(
                "error", "{listener}: cannot load client_tls certificate: {error}",
                (("listener", self.config.name), ("error", event.error)), LOG_NAMESPACE,
            ))
            self._client, self._step = Client.DONE, Step.DONE
            self._disarm()
            self._reject("DPE", "protocol", "client_tls certificate unusable")
            self.emit(Refuse(how="abort"))
            return
        self._up_tls = None
        self._up_server_name = None
        self._disarm()
        self._upstream_problem(Problem(
            "UF", pgwire.SQLSTATE_CANNOT_CONNECT, f"cannot use the cluster's ca_file: {event.error}",
            tlshello.INTERNAL_ERROR, reason="tls",
        ))

    def ended(self) -> list[Any]:
        """The session ended: forget this session's cancel key and source entry."""
        self._armed = False
        self._client, self._step = Client.DONE, Step.DONE
        if self._key is not None and self.state.backend_keys.get(self._key) is self._target:
            del self.state.backend_keys[self._key]
        if self._routed_source is not None:
            self.state.remove_routed(self._routed_source, self)
        return []

    # -- the splice --------------------------------------------------------------

    def _splice(self) -> None:
        """Hand both legs to the splice, leftovers first."""
        self._disarm()
        self._client, self._step = Client.SPLICED, Step.SPLICED
        rest, self._buffer = bytes(self._buffer), bytearray()
        up_rest, self._up_buffer = self._up_buffer, b""
        if self._hello is not None and self.options.routes and self._packet is None:
            # A routed session, TLS end to end: a cancel from its source may come here.
            self._routed_source = peer_ip(self.context.peer)
            self.state.add_routed(self._routed_source, self, CancelTarget(self._cluster, self._address))
        self.emit(Splice(client=rest, upstream=up_rest))

    # -- saying no -----------------------------------------------------------------

    def _fail(self, problem: Problem) -> None:
        """Record ``problem`` (flag, log, counters) and answer the client as soon as it can hear it."""
        self.emit(Flag(problem.flag))
        if problem.reason and problem.flag in ("NR", "DPE"):
            self.emit(Count("rejected", problem.reason))
        elif problem.reason:
            self.emit(Count("connect_failure", problem.reason))
        self.emit(Log("info", "{listener}: {peer} -> {upstream}: {message}", (
            ("listener", self.config.name), ("peer", format_peer(self.context.peer)),
            ("upstream", self._upstream), ("message", problem.message),
        ), LOG_NAMESPACE))
        self._problem = problem
        self._answer()

    def _answer(self) -> None:
        """Say no in the client's current terms (see the module notes)."""
        problem = self._problem
        assert problem is not None
        state = self._client
        if state is Client.SSL:
            self._write(ACCEPT)
            self._read_hello()  # _on_hello answers with the alert
        elif state is Client.HELLO:
            if self._hello is None:
                return  # still reading it: answered when complete
            self._write(tlshello.alert_record(problem.alert))
            self._close()
        elif state is Client.STARTUP:
            self._write(pgwire.error_response(
                problem.sqlstate, f"egressproxy: {problem.message}", problem.detail, problem.hint
            ))
            self._close()
        else:
            self._close()

    def _reject(self, flag: str, reason: str, why: str) -> None:
        self.emit(Flag(flag), Count("rejected", reason), Log("info", "{listener}: {peer}: {why}", (
            ("listener", self.config.name), ("peer", format_peer(self.context.peer)), ("why", why),
        ), LOG_NAMESPACE))

    def _upstream_problem(self, problem: Problem, abort: bool = False) -> None:
        """The upstream answered wrongly: drop it and tell the client."""
        self._drop_upstream(abort)
        self._fail(problem)

    def _drop_upstream(self, abort: bool = False) -> None:
        self._dropping = True
        self.emit(CloseUpstream(abort=abort))

    def _lost_problem(self, tls_failure: str | None) -> Problem:
        upstream = self._upstream
        if self._up_tls is not None and tls_failure is not None:
            return Problem(
                "UF", pgwire.SQLSTATE_CANNOT_CONNECT, f"TLS with {upstream} failed: {tls_failure}",
                tlshello.INTERNAL_ERROR, hint="check the cluster's tls.server_name and tls.ca_file", reason="tls",
            )
        return Problem(
            "UF", pgwire.SQLSTATE_CONNECTION_FAILURE,
            f"{upstream} closed the connection before answering: is this proxy's egress IP on the database's allowlist?",
            tlshello.INTERNAL_ERROR, reason="closed",
        )

    def _no_tls_problem(self, answer: bytes) -> Problem:
        return Problem(
            "UF", pgwire.SQLSTATE_CANNOT_CONNECT,
            f"{self._upstream} does not accept TLS (answered {answer!r} to the SSLRequest)",
            tlshello.INTERNAL_ERROR, hint="the proxy never falls back to plaintext", reason="tls",
        )

    def _protocol_problem(self, what: str) -> Problem:
        return Problem(
            "UF", pgwire.SQLSTATE_PROTOCOL_VIOLATION, f"{self._upstream} {what}",
            tlshello.INTERNAL_ERROR, reason="protocol",
        )

    # -- small helpers ---------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self.emit(WriteClient(data))

    def _close(self) -> None:
        self._client, self._step = Client.DONE, Step.DONE
        self._disarm()
        self.emit(Close())

    def _abort(self) -> None:
        self.emit(Abort())

    def _arm(self, seconds: float) -> None:
        """Arm the timer: what its firing does is the step's ``TimerFired`` row."""
        self._armed = True
        self.emit(ArmTimer(seconds, TIMER))

    def _disarm(self) -> None:
        if self._armed:
            self._armed = False
            self.emit(DisarmTimer(TIMER))

    def _fired(self) -> bool:
        """The timer fired: True if it was armed (it is not any more)."""
        armed, self._armed = self._armed, False
        return armed

    def _dial_for(self, step: Step, cluster: Any, endpoints: list[Any] | None = None, checked: bool = False) -> None:
        """Dial, waiting in ``step`` (a ``DIAL_*`` one) for the connection."""
        self._step = step
        self._disarm()
        self.emit(Dial(cluster, tuple(endpoints) if endpoints is not None else None, checked))


#: ``steps.TABLE`` with its names resolved: ``(step, event type) -> handler``.
HANDLERS: dict[tuple[Step, type], Callable[[PostgresMachine, Any], None]] = {
    key: getattr(PostgresMachine, name) for key, name in TABLE.items()
}
