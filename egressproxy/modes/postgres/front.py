"""The postgres mode's machine: its hooks, the splice, and saying no.

The conversation itself is split in two mixins, ``client_side.py`` (the
client's first packets) and ``upstream_side.py`` (the server's answers);
this class holds the state they share, and the package notes say how it
all fits.  It is pure (``datapath/handshake.py``): every effect is an
action it emits, applied by the driver.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from egressproxy.addresses import format_peer, peer_ip
from egressproxy.upstream.addrguard import FLAG as ADDRESS_FLAG
from egressproxy.datapath.driver import TLSUnavailable
from egressproxy.datapath.handshake import (
    Abort,
    ArmTimer,
    ClientBytes,
    ClientEOF,
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
    TimerFired,
    UpstreamBytes,
    UpstreamEOF,
    UpstreamLost,
    WriteClient,
    WriteUpstream,
)
from egressproxy.modes.base import Handshake
from egressproxy.modes.postgres import pgwire, tlshello
from egressproxy.modes.postgres.client_side import ClientSide
from egressproxy.modes.postgres.options import PostgresOptions
from egressproxy.modes.postgres.pgwire import ACCEPT, CancelKey, InitialPacket
from egressproxy.modes.postgres.problems import Problem
from egressproxy.modes.postgres.state import CancelTarget, Client, PostgresListenerState
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
        #: The client read in progress: a parser of ``_buffer`` and what to do with its result.
        self._parse: Callable[[bytes], Any] | None = None
        self._then: Callable[[Any], None] | None = None
        #: Where the client conversation is.
        self._client = Client.PACKET
        self._ssl_seen = False
        self._gss_seen = False
        #: The client's TLS ends here (``client_tls``).
        self._client_tls = False
        self._packet: InitialPacket | None = None
        self._hello: ClientHello | None = None
        #: Set when refusing: answered as soon as the client is ready to hear it.
        self._problem: Problem | None = None
        #: Upstream bytes read and not yet consumed, and what to do with them.
        self._up_buffer = b""
        self._up_step: Callable[[], None] | None = None
        #: What to do once the upstream is connected.
        self._on_connected: Callable[[], None] | None = None
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
        #: What the timer does when it fires (None: not armed).
        self._timer: Callable[[], None] | None = None

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
        if isinstance(event, ClientBytes):
            self._client_data(event.data)
        elif isinstance(event, ClientEOF):
            self._client_eof()
        elif isinstance(event, UpstreamBytes):
            self._upstream_data(event.data)
        elif isinstance(event, UpstreamEOF):
            self.emit(CloseUpstream(answered=False))  # its loss reaches the machine
        elif isinstance(event, Connected):
            self._connected(event)
        elif isinstance(event, DialFailed):
            self._dial_failed(event)
        elif isinstance(event, UpstreamLost):
            self._upstream_lost(event)
        elif isinstance(event, TimerFired):
            callback, self._timer = self._timer, None
            if callback is not None:
                callback()
        elif isinstance(event, TLSUnavailable):
            self._tls_unavailable(event)
        return self._out

    def emit(self, *actions: Any) -> None:
        self._out.extend(actions)

    def _connected(self, event: Connected) -> None:
        """Connected: run the plan chosen when dialling (an SSLRequest, the startup, a cancel)."""
        if self._client is Client.DONE:
            return  # the session is closing the client; it closes this leg too
        self._disarm()
        self._cluster, self._address = event.cluster, event.address
        self._upstream = str(event.address)
        self._up_buffer = b""
        on_connected, self._on_connected = self._on_connected, None
        assert on_connected is not None
        on_connected()

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
            self._client = Client.DONE
            self._parse = self._then = None
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
        self._timer = None
        self._client = Client.DONE
        if self._key is not None and self.state.backend_keys.get(self._key) is self._target:
            del self.state.backend_keys[self._key]
        if self._routed_source is not None:
            self.state.remove_routed(self._routed_source, self)
        return []

    # -- the splice --------------------------------------------------------------

    def _splice(self) -> None:
        """Hand both legs to the splice, leftovers first."""
        self._disarm()
        self._client = Client.SPLICED
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
        self._up_step = None
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
        self._client = Client.DONE
        self._parse = self._then = None
        self._disarm()
        self.emit(Close())

    def _abort(self) -> None:
        self.emit(Abort())

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._timer = callback
        self.emit(ArmTimer(seconds, TIMER))

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer = None
            self.emit(DisarmTimer(TIMER))

    def _dial(self, cluster: Any, endpoints: list[Any] | None = None, checked: bool = False) -> None:
        self._disarm()
        self.emit(Dial(cluster, tuple(endpoints) if endpoints is not None else None, checked))
