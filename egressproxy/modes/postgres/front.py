"""The postgres mode's front: the session's hooks, the splice, and saying no.

The conversation itself is split in two mixins, ``client_side.py`` (the
client's first packets) and ``upstream_side.py`` (the server's answers);
this class holds the state they share, and the package notes say how it
all fits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from egressproxy.addresses import format_peer, peer_ip
from egressproxy.addrguard import FLAG as ADDRESS_FLAG
from egressproxy.modes.base import Front
from egressproxy.modes.postgres import pgwire, tlshello
from egressproxy.modes.postgres.client_side import ClientSide
from egressproxy.modes.postgres.options import PostgresOptions
from egressproxy.modes.postgres.pgwire import ACCEPT, CancelKey, InitialPacket
from egressproxy.modes.postgres.problems import Problem, tls_failure_text
from egressproxy.modes.postgres.state import CancelTarget, PostgresListenerState
from egressproxy.modes.postgres.tlshello import ClientHello
from egressproxy.modes.postgres.upstream_side import UpstreamSide

if TYPE_CHECKING:
    from egressproxy.session import Session
    from egressproxy.splice import UpstreamLeg

__all__ = ["PostgresFront"]


class _Log:
    """The front's logger, under the namespace its lines have always carried.

    (A plain ``Logger()`` class attribute names the class's module, which
    moved into this package.)
    """

    namespace = "egressproxy.modes.postgres.PostgresFront"

    def __get__(self, instance: object, owner: type | None = None) -> Logger:
        return Logger(self.namespace, instance if instance is not None else owner)


class PostgresFront(ClientSide, UpstreamSide, Front):
    """The postgres mode front; see the package notes."""

    log = _Log()

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.listener = session.listener
        self.config = session.listener.config
        options = self.config.options
        assert isinstance(options, PostgresOptions)
        #: The listener's TLS handling and routes, as configured when this session began.
        self.options = options
        self.state = PostgresListenerState.of(session.listener)
        #: Client bytes read and not yet consumed (forwarded at the splice);
        #: a bytearray, so that a client sending one byte at a time costs linear time.
        self._buffer = bytearray()
        #: The client read in progress: a parser of ``_buffer`` and what to do with its result.
        self._parse: Callable[[bytes], Any] | None = None
        self._then: Callable[[Any], None] | None = None
        #: Where the client conversation is: packet, ssl, hello, startup, cancel, relay, done.
        self._client = "packet"
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
        #: The upstream's TLS options (originate), for the cancel registry.
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
        self._timer: IDelayedCall | None = None

    # -- hooks from the session -----------------------------------------------

    def start(self) -> None:
        """Admitted: read the client's first packet."""
        self._begin()

    def refuse(self, flag: str, reason: str) -> None:
        """Refused at admission (``RBAC``, ``OM``): read the first packet, then say no in kind."""
        if flag == "RBAC":
            problem = Problem(
                flag, pgwire.SQLSTATE_NOT_AUTHORIZED,
                f"connections from {peer_ip(self.session.peer_address)} are not allowed on this listener",
                tlshello.ACCESS_DENIED,
            )
        elif reason == "too many connections from this source address":
            problem = Problem(
                flag, pgwire.SQLSTATE_TOO_MANY_CONNECTIONS,
                f"too many connections from {peer_ip(self.session.peer_address)} to this listener",
                tlshello.INTERNAL_ERROR, hint="close idle connections, or raise the listener's max_connections_per_source",
            )
        else:
            problem = Problem(
                flag, pgwire.SQLSTATE_TOO_MANY_CONNECTIONS, "too many connections to this listener",
                tlshello.INTERNAL_ERROR, hint="retry later, or raise the listener's max_connections",
            )
        self._problem = problem
        self._begin()

    def upstream_connected(self, up: UpstreamLeg) -> None:
        """Connected: run the plan chosen when dialling (an SSLRequest, the startup, a cancel)."""
        if self._client == "done":
            return  # the session is closing the client; it closes this leg too
        self._disarm()
        self._up_buffer = self._take_held(up)
        up.read_preamble(self._upstream_data, self._upstream_eof)
        on_connected, self._on_connected = self._on_connected, None
        assert on_connected is not None
        on_connected()

    def upstream_failed(self, flag: str, reason: str) -> None:
        """The dial failed (``UF``, ``UT``, ``UO``): answer the client in its terms."""
        target = self.session.upstream_name if self.session.upstream_name != "-" else self._target_name
        if flag == ADDRESS_FLAG:
            # Counted as rejected by the session; never names the address.
            self._fail(Problem(
                flag, pgwire.SQLSTATE_CANNOT_CONNECT, f"{target} {self.session.refused_address}: not allowed",
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

    def upstream_lost(self, reason: Failure) -> bool:
        """Lost before the splice: answer the client, unless this front closed the leg itself."""
        if self._dropping:
            return True
        if self._client in ("done", "cancel"):
            return False
        if self._client == "relay":
            # The server ended its startup answer (e.g. an authentication
            # failure, already relayed): close the client like the splice would.
            return False
        self._disarm()
        self._fail(self._lost_problem(reason))
        return True

    def finished(self) -> None:
        """The session ended: stop the timer, forget this session's cancel key and source entry."""
        self._disarm()
        self._client = "done"
        if self._key is not None and self.state.backend_keys.get(self._key) is self._target:
            del self.state.backend_keys[self._key]
        if self._routed_source is not None:
            self.state.remove_routed(self._routed_source, self.session)

    # -- the splice --------------------------------------------------------------

    def _splice(self) -> None:
        """Hand both legs to the splice, leftovers first."""
        self._disarm()
        self._client = "spliced"
        down, up = self.session.down, self.session.up
        assert down is not None and up is not None
        rest, self._buffer = bytes(self._buffer), bytearray()
        down.end_preamble(rest)
        up_rest, self._up_buffer = self._up_buffer, b""
        up.end_preamble(up_rest)
        if self._hello is not None and self.options.routes and self._packet is None:
            # A routed session, TLS end to end: a cancel from its source may come here.
            self._routed_source = peer_ip(self.session.peer_address)
            target = CancelTarget(self.session.cluster, self.session.upstream_address)
            self.state.add_routed(self._routed_source, self.session, target)
        self.session.splice()

    # -- saying no -----------------------------------------------------------------

    def _fail(self, problem: Problem) -> None:
        """Record ``problem`` (flag, log, counters) and answer the client as soon as it can hear it."""
        self.session.flag(problem.flag)
        if problem.reason and problem.flag in ("NR", "DPE"):
            self.listener.count_rejected(problem.reason)
        elif problem.reason:
            failures = self.session.cluster.connect_failures
            failures[problem.reason] = failures.get(problem.reason, 0) + 1
        self.log.info(
            "{listener}: {peer} -> {upstream}: {message}",
            listener=self.config.name, peer=format_peer(self.session.peer_address),
            upstream=self.session.upstream_name, message=problem.message,
        )
        self._problem = problem
        self._answer()

    def _answer(self) -> None:
        """Say no in the client's current terms (see the module notes)."""
        problem = self._problem
        assert problem is not None
        state = self._client
        if state == "ssl":
            self._write(ACCEPT)
            self._read_hello()  # _on_hello answers with the alert
        elif state == "hello":
            if self._hello is None:
                return  # still reading it: answered when complete
            self._write(tlshello.alert_record(problem.alert))
            self._close()
        elif state == "startup":
            self._write(pgwire.error_response(
                problem.sqlstate, f"egressproxy: {problem.message}", problem.detail, problem.hint
            ))
            self._close()
        else:
            self._close()

    def _reject(self, flag: str, reason: str, why: str) -> None:
        self.session.flag(flag)
        self.listener.count_rejected(reason)
        self.log.info(
            "{listener}: {peer}: {why}", listener=self.config.name, peer=format_peer(self.session.peer_address), why=why
        )

    def _upstream_problem(self, problem: Problem, abort: bool = False) -> None:
        """The upstream answered wrongly: drop it and tell the client."""
        self._drop_upstream(abort)
        self._fail(problem)

    def _drop_upstream(self, abort: bool = False) -> None:
        self._up_step = None
        up = self.session.up
        if up is not None and not up.lost:
            self._dropping = True
            if abort:
                up.abort()
            else:
                up.close()

    def _lost_problem(self, reason: Failure) -> Problem:
        upstream = self.session.upstream_name
        if self._up_tls is not None and not reason.check(ConnectionDone, ConnectionLost):
            return Problem(
                "UF", pgwire.SQLSTATE_CANNOT_CONNECT, f"TLS with {upstream} failed: {tls_failure_text(reason, self._up_server_name)}",
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
            f"{self.session.upstream_name} does not accept TLS (answered {answer!r} to the SSLRequest)",
            tlshello.INTERNAL_ERROR, hint="the proxy never falls back to plaintext", reason="tls",
        )

    def _protocol_problem(self, what: str) -> Problem:
        return Problem(
            "UF", pgwire.SQLSTATE_PROTOCOL_VIOLATION, f"{self.session.upstream_name} {what}",
            tlshello.INTERNAL_ERROR, reason="protocol",
        )

    # -- small helpers ---------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        down = self.session.down
        if down is not None and not down.lost:
            self.session.write_downstream(data)

    def _close(self) -> None:
        self._client = "done"
        self._parse = self._then = None
        self._disarm()
        self.session.close_downstream()

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.session.reactor.callLater(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
