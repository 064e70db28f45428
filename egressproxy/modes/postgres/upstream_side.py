"""The postgres front's upstream half: dialling, the server's answers, the startup relay, cancels.

A mixin of :class:`~egressproxy.modes.postgres.front.PostgresMachine`, which
holds the state these methods share (see its ``__init__``) and the ways of
saying no; the client half is ``client_side.py``.
"""

from __future__ import annotations

from egressproxy.addresses import format_peer
from egressproxy.config.model import Address
from egressproxy.modes.postgres import pgwire, tlshello
from egressproxy.modes.postgres.pgwire import ACCEPT, DECLINE, SSL_REQUEST, CancelKey, ProtocolError
from egressproxy.modes.postgres.problems import (
    CLIENT_BUFFER_LIMIT,
    HANDSHAKE_TIMEOUT,
    STARTUP_TIMEOUT,
    UPSTREAM_BUFFER_LIMIT,
    Problem,
)
from egressproxy.datapath.handshake import (
    Abort, Connected, Count, Flag, Log, StartUpstreamTLS, TimerFired, UpstreamBytes, WriteUpstream,
)
from egressproxy.modes.postgres.state import CANCEL_LINGER, CancelTarget, Client
from egressproxy.modes.postgres.steps import Step

__all__ = ["UpstreamSide"]


LOG_NAMESPACE = "egressproxy.modes.postgres.PostgresFront"


class UpstreamSide:
    """Talking to the upstream until the splice (see the package notes)."""

    # -- dialling and the upstream's answers -----------------------------------------

    def _hold_upstream_bytes(self, event: UpstreamBytes) -> bool:
        """Keep the upstream's bytes (bounded) until a step reads them; False if too many (then dropped)."""
        self._up_buffer += event.data
        if len(self._up_buffer) > UPSTREAM_BUFFER_LIMIT:
            self._upstream_problem(self._protocol_problem("sent too much before the handshake completed"))
            return False
        return True

    def _await_upstream(self, step: Step, timeout: float = HANDSHAKE_TIMEOUT) -> None:
        """Wait in ``step`` (an ``AWAIT_*`` one) for the upstream's answer (handled at once if it has sent one)."""
        self._step = step
        self._arm(timeout)
        if self._up_buffer:
            self._dispatch(UpstreamBytes(b""))

    def _upstream_timed_out(self, event: TimerFired) -> None:
        if not self._fired():
            return
        self._upstream_problem(Problem(
            "UT", pgwire.SQLSTATE_CANNOT_CONNECT,
            f"{self._upstream} did not answer within {HANDSHAKE_TIMEOUT:g}s: "
            "is this proxy's egress IP on the database's allowlist?",
            tlshello.INTERNAL_ERROR, reason="no_answer",
        ), abort=True)

    def _consume_upstream(self, count: int) -> bytes:
        """Take bytes the proxy answers itself: they are not sent to the client."""
        taken, self._up_buffer = self._up_buffer[:count], self._up_buffer[count:]
        return taken

    def _write_up(self, data: bytes) -> None:
        self.emit(WriteUpstream(data))

    # Routed, or a direct-TLS client of a single cluster.

    def _send_hello_after_ssl_request(self, event: Connected) -> None:
        self._connected(event)
        self._write_up(SSL_REQUEST)
        self._await_upstream(Step.AWAIT_TLS_ACCEPT_FOR_HELLO)

    def _tls_accepted(self) -> bool:
        """The upstream answered our SSLRequest with ``S`` and nothing more; else say why."""
        self._disarm()
        answer = self._consume_upstream(1)
        if answer != ACCEPT:
            self._upstream_problem(self._no_tls_problem(answer))
            return False
        if self._up_buffer:
            self._upstream_problem(self._protocol_problem("sent bytes after accepting TLS"))
            return False
        return True

    def _hello_answer(self, event: UpstreamBytes) -> None:
        if self._hold_upstream_bytes(event) and self._tls_accepted():
            # The ClientHello (still in the buffer, as received) goes first.
            self._splice()

    # A single cluster, an SSLRequest from the client.

    def _relay_ssl_request(self, event: Connected) -> None:
        self._connected(event)
        self._write_up(SSL_REQUEST)
        self._await_upstream(Step.AWAIT_SSL_ANSWER)

    def _relay_ssl_answer(self, event: UpstreamBytes) -> None:
        if not self._hold_upstream_bytes(event):
            return
        self._disarm()
        answer = self._up_buffer[:1]
        if answer == DECLINE and self.options.require_tls:
            # This listener requires TLS and the server offers none: say N
            # ourselves and refuse the plaintext startup that follows.
            self._consume_upstream(len(self._up_buffer))
            self._drop_upstream()
            self._write(DECLINE)
            self._read_packet()
            return
        if answer == ACCEPT and len(self._up_buffer) > 1:
            self._upstream_problem(self._protocol_problem("sent bytes after accepting TLS"))
            return
        # S (TLS from here on, end to end), N or an old server's error: relayed as they are.
        self._splice()

    # A single cluster, a plaintext StartupMessage.

    def _send_startup(self, event: Connected) -> None:
        self._connected(event)
        assert self._packet is not None
        self._write_up(self._packet.data)
        self._await_upstream(Step.AWAIT_STARTUP_ANSWER)

    # Originate.

    def _originate_ssl_request(self, event: Connected) -> None:
        self._connected(event)
        self._write_up(SSL_REQUEST)
        self._await_upstream(Step.ORIGINATE_AWAIT_S)

    def _originate_answer(self, event: UpstreamBytes) -> None:
        if not self._hold_upstream_bytes(event) or not self._tls_accepted():
            return
        if not self._start_upstream_tls():
            return
        assert self._packet is not None
        # Held by the TLS layer until the handshake completes; the server's
        # first answer therefore also proves the handshake and verification.
        self._write_up(self._packet.data)
        self._await_upstream(Step.AWAIT_STARTUP_ANSWER)

    def _start_upstream_tls(self) -> bool:
        """Ask for verified TLS on the upstream leg (a ca_file that cannot be used comes back as TLSUnavailable)."""
        address: Address = self._address
        tls = self._cluster.config.tls
        server_name = (tls.server_name if tls else None) or address.host
        self._up_tls = True
        self._up_server_name = server_name
        self.emit(StartUpstreamTLS(server_name, tls.ca_file if tls else None))
        return True

    # After the server's first answer (originate, or a plaintext single cluster).

    def _start_relay(self, event: UpstreamBytes) -> None:
        """Relay the startup phase both ways, watching for BackendKeyData, until ReadyForQuery."""
        if not self._hold_upstream_bytes(event):
            return
        self._disarm()
        self._client, self._step = Client.RELAY, Step.RELAY
        originate = self.options.tls == "originate"
        self._scanner = pgwire.StartupAnswer(strip_channel_binding=originate and not self._client_tls)
        self._arm(STARTUP_TIMEOUT)
        early, self._buffer = bytes(self._buffer), bytearray()
        if early:
            self._relay_client(early)
        answer, self._up_buffer = self._up_buffer, b""
        self._relay_upstream(answer)

    def _relay_client(self, data: bytes) -> None:
        if self._sasl_check:
            data = self._check_sasl_choice(data)
            if not data:
                return
        self.emit(WriteUpstream(data))

    def _check_sasl_choice(self, data: bytes) -> bytes:
        """Hold the client's bytes until its SASLInitialResponse is whole; return what may go upstream."""
        self._buffer += data
        try:
            choice = pgwire.read_sasl_initial_response(self._buffer)
        except ProtocolError:
            choice = None  # not ours to judge: the server answers it
        else:
            if choice is None and len(self._buffer) <= CLIENT_BUFFER_LIMIT:
                return b""
        self._sasl_check = False
        held, self._buffer = bytes(self._buffer), bytearray()
        if choice is not None and (choice.mechanism == pgwire.SCRAM_SHA_256_PLUS or choice.binding_flag in ("p", "y")):
            self._refuse_channel_binding(choice)
            return b""
        return held

    def _refuse_channel_binding(self, choice: pgwire.SaslInitialResponse) -> None:
        """The client wants SCRAM channel binding, which cannot cross this listener: say so, end both legs."""
        asked = "chose SCRAM-SHA-256-PLUS" if choice.mechanism == pgwire.SCRAM_SHA_256_PLUS else (
            f"sent the channel-binding flag {choice.binding_flag!r}"
        )
        self._reject("DPE", "channel_binding", f"client {asked}: channel binding cannot cross tls: originate")
        self._write(pgwire.error_response(
            pgwire.SQLSTATE_PROTOCOL_VIOLATION,
            "egressproxy: SCRAM channel binding cannot pass through this listener: it ends the client's TLS "
            "and opens its own to the database (tls: originate)",
            detail=f"The client {asked}; its login would be bound to the proxy's certificate, "
            "which the database would refuse.",
            hint="connect with channel_binding=disable (libpq, psycopg) or channelBinding=disable (pgjdbc), "
            "or use a tls: passthrough listener (host + hostaddr, or SNI routes) to keep channel binding "
            "end to end",
        ))
        self._drop_upstream()
        self._close()

    def _relay_upstream_bytes(self, event: UpstreamBytes) -> None:
        self._relay_upstream(event.data)

    def _relay_upstream(self, data: bytes) -> None:
        scanner = self._scanner
        assert scanner is not None
        out = scanner.feed(data)
        if scanner.sasl and self.options.tls == "originate" and not self._sasl_checked:
            self._sasl_checked = self._sasl_check = True
        if out:
            self._write(out)
        if scanner.done:
            if scanner.error:
                self.emit(Log("warn", "{listener}: stopped reading {upstream}'s startup answer: {error}", (
                    ("listener", self.config.name), ("upstream", self._upstream), ("error", scanner.error),
                ), LOG_NAMESPACE))
            if scanner.key is not None:
                self._register_key(scanner.key)
            if scanner.refused is not None:
                self._login_refused(*scanner.refused)
            self._scanner = None
            self._sasl_check = False
            self._splice()

    def _login_refused(self, sqlstate: str, message: str) -> None:
        """The server refused the login (relayed as it was): flag and count its SQLSTATE."""
        self.emit(
            Flag(f"LR:{sqlstate}"),
            Count("login_refused", sqlstate),
            Log("info", "{listener}: {peer} -> {upstream}: login refused by the server: {sqlstate} {message}", (
                ("listener", self.config.name), ("peer", format_peer(self.context.peer)),
                ("upstream", self._upstream), ("sqlstate", sqlstate), ("message", message),
            ), LOG_NAMESPACE),
        )

    def _startup_timed_out(self, event: TimerFired) -> None:
        if self._fired():
            self.emit(Flag("DI"), Abort())

    def _register_key(self, key: CancelKey) -> None:
        target = CancelTarget(self._cluster, self._address, self._up_tls is not None)
        self._key, self._target = key, target
        self.state.backend_keys[key] = target

    # Cancels.

    def _send_cancel(self, event: Connected) -> None:
        self._connected(event)
        assert self._packet is not None
        if self._up_tls is not None:
            self._write_up(SSL_REQUEST)
            self._await_upstream(Step.CANCEL_AWAIT_S)
            return
        self._write_up(self._packet.data)
        self._await_cancel_close()

    def _await_cancel_close(self) -> None:
        """The cancel is sent: wait for the server to hang up (ending the session), as libpq does."""
        self._step = Step.CANCEL_SENT
        self._arm(CANCEL_LINGER)

    def _cancel_linger_over(self, event: TimerFired) -> None:
        if self._fired():
            self._close()

    def _cancel_answer(self, event: UpstreamBytes) -> None:
        if not self._hold_upstream_bytes(event):
            return
        self._disarm()
        answer = self._consume_upstream(1)
        if answer != ACCEPT or self._up_buffer:
            self._upstream_problem(self._no_tls_problem(answer))
            return
        if not self._start_upstream_tls():
            return
        assert self._packet is not None
        self._write_up(self._packet.data)  # flushed after the handshake
        self._await_cancel_close()

