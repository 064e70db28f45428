"""The postgres front's client half: its first packets, and TLS from it (``client_tls``).

A mixin of :class:`~egressproxy.modes.postgres.front.PostgresMachine`, which
holds the state these methods share (see its ``__init__``) and the ways of
saying no; the upstream half is ``upstream_side.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from egressproxy.addresses import peer_ip
from egressproxy.modes.postgres import pgwire, tlshello
from egressproxy.modes.postgres.pgwire import ACCEPT, DECLINE, InitialPacket, ProtocolError
from egressproxy.modes.postgres.problems import CLIENT_BUFFER_LIMIT, HANDSHAKE_TIMEOUT, Problem
from egressproxy.modes.postgres.routing import match_route, route_address, valid_server_name
from egressproxy.datapath.handshake import ClientBytes, ClientEOF, SendCopy, StartClientTLS, TimerFired
from egressproxy.modes.postgres.state import CANCEL_LINGER, Client
from egressproxy.modes.postgres.steps import Step
from egressproxy.modes.postgres.tlshello import ClientHello, HelloError

__all__ = ["ClientSide"]


class ClientSide:
    """Reading the client until its first packets say where to go (see the package notes)."""

    # -- reading the client -----------------------------------------------------

    def _begin(self) -> None:
        """Read the client's bytes from here on (the driver feeds any it already held)."""
        self._read_packet()

    def _read_packet(self) -> None:
        self._client = Client.PACKET
        self._expect(Step.READ_PACKET)

    def _expect(self, step: Step) -> None:
        """Wait in ``step`` for the client's next packet (parsing what is already buffered)."""
        self._step = step
        if not self._armed:
            self._arm(HANDSHAKE_TIMEOUT)
        self._dispatch(ClientBytes(b""))

    def _hold_client_bytes(self, event: ClientBytes) -> bool:
        """Keep the client's bytes (bounded) until a step reads them; False if too many (then closed)."""
        self._buffer += event.data
        if len(self._buffer) > CLIENT_BUFFER_LIMIT:
            self._client_error(f"more than {CLIENT_BUFFER_LIMIT} bytes before the handshake completed")
            return False
        return True

    def _parsed(self, event: ClientBytes, parse: Callable[[bytearray], Any]) -> Any:
        """Buffer ``event``'s bytes and parse them: the result once whole, else None (or closed on an error)."""
        if not self._hold_client_bytes(event):
            return None
        try:
            result = parse(self._buffer)
        except (ProtocolError, HelloError) as e:
            self._client_error(str(e))
            return None
        if result is not None:
            self._disarm()
        return result

    def _packet_bytes(self, event: ClientBytes) -> None:
        result = self._parsed(event, pgwire.read_initial_packet)
        if result is not None:
            self._on_packet(result)

    def _hello_bytes(self, event: ClientBytes) -> None:
        hello = self._parsed(event, tlshello.parse_client_hello)
        if hello is not None:
            self._on_hello(hello)

    def _refused_hello_bytes(self, event: ClientBytes) -> None:
        hello = self._parsed(event, tlshello.parse_client_hello)
        if hello is not None:
            self._refuse_direct_tls(hello)

    def _relay_client_bytes(self, event: ClientBytes) -> None:
        self._relay_client(event.data)

    def _client_eof(self, event: ClientEOF) -> None:
        """The client sent EOF before the splice: it has given up; close."""
        self._close()

    def _client_timed_out(self, event: TimerFired) -> None:
        if not self._fired():
            return
        if self._problem is None:
            self._reject("DPE", "protocol", f"client handshake not complete within {HANDSHAKE_TIMEOUT:g}s")
        self._close()

    def _client_error(self, why: str) -> None:
        """The client's bytes are not the protocol: an ErrorResponse if it speaks plaintext, then close."""
        self._disarm()
        if self._problem is None:
            self._reject("DPE", "protocol", f"protocol error: {why}")
        if self._client in (Client.PACKET, Client.STARTUP):
            self._write(pgwire.error_response(
                pgwire.SQLSTATE_PROTOCOL_VIOLATION, f"egressproxy: invalid startup packet: {why}"
            ))
        self._close()

    # -- the client's first packets ---------------------------------------------

    def _on_packet(self, result: tuple[InitialPacket, bytes]) -> None:
        packet, rest = result
        kind = packet.kind
        if kind == "tls":
            self._on_direct_tls()
            return
        self._buffer = bytearray(rest)
        if kind == "gssenc":
            if self._gss_seen or self._ssl_seen:
                self._client_error("GSSENCRequest out of order")
                return
            self._gss_seen = True
            self._write(DECLINE)
            self._read_packet()
        elif kind == "ssl":
            if self._ssl_seen:
                self._client_error("second SSLRequest")
                return
            self._ssl_seen = True
            self._client = Client.SSL
            self._on_ssl_request(packet)
        elif kind == "cancel":
            self._client = Client.CANCEL
            self._packet = packet
            self._on_cancel(packet)
        else:
            self._client = Client.STARTUP
            self._packet = packet
            self._on_startup(packet)

    def _on_ssl_request(self, packet: InitialPacket) -> None:
        if self._problem is not None:
            self._answer()
        elif self.options.tls == "originate":
            if self.options.client_tls is not None:
                self._write(ACCEPT)
                early, self._buffer = bytes(self._buffer), bytearray()
                self._start_client_tls(early)
            else:
                self._write(DECLINE)
                self._read_packet()
        elif self.options.routes:
            self._write(ACCEPT)
            self._read_hello()
        else:
            # Single cluster: ask the server, then relay its answer.
            self._dial_for(Step.DIAL_FOR_SSL_RELAY, self.context.cluster)

    def _on_direct_tls(self) -> None:
        """A ClientHello instead of a packet: PostgreSQL 17's ``sslnegotiation=direct``."""
        if self._ssl_seen:
            self._client_error("TLS handshake after the SSLRequest was answered N")
            return
        self._ssl_seen = True
        if self.options.tls == "originate" and self._problem is None:
            if self.options.client_tls is None:
                self._read_hello(refuse=True)
                return
            held, self._buffer = bytes(self._buffer), bytearray()
            self._start_client_tls(held)
            return
        self._read_hello()

    def _refuse_direct_tls(self, hello: ClientHello) -> None:
        self._hello = hello
        self._client = Client.HELLO
        self._fail(Problem(
            "DPE", pgwire.SQLSTATE_PROTOCOL_VIOLATION, "this listener does not accept TLS from clients",
            tlshello.HANDSHAKE_FAILURE, hint="connect with sslmode=disable (the proxy opens TLS to the server)",
            reason="protocol",
        ))

    def _read_hello(self, refuse: bool = False) -> None:
        self._client = Client.HELLO
        self._expect(Step.READ_HELLO_TO_REFUSE if refuse else Step.READ_HELLO)

    def _on_hello(self, hello: ClientHello) -> None:
        self._hello = hello
        self._client = Client.HELLO
        if self._problem is not None:
            self._answer()
            return
        if not self.options.routes:
            # Single cluster, direct TLS: the server must accept an SSLRequest first.
            self._dial_for(Step.DIAL_FOR_HELLO, self.context.cluster)
            return
        name = hello.server_name
        if name is None or not valid_server_name(name):
            shown = "no server name (SNI)" if name is None else f"invalid server name {name!r}"
            self._fail(Problem(
                "NR", pgwire.SQLSTATE_CANNOT_CONNECT, f"{shown} in the TLS ClientHello: cannot route",
                tlshello.UNRECOGNIZED_NAME,
                hint="connect with host=<the database's name> (not an IP address; use hostaddr for the "
                "proxy's address) and sslsni=1",
                reason="no_route",
            ))
            return
        route = match_route(self.options.routes, name)
        if route is None:
            self._fail(Problem(
                "NR", pgwire.SQLSTATE_CANNOT_CONNECT, f"no route for server name {name}",
                tlshello.UNRECOGNIZED_NAME, reason="no_route",
            ))
            return
        if route.cluster is not None:
            cluster = self.context.named_cluster(route.cluster)
            if cluster is None:
                self._fail(Problem(
                    "NR", pgwire.SQLSTATE_CANNOT_CONNECT,
                    f"route for {name} names cluster {route.cluster!r}, which is not configured",
                    tlshello.INTERNAL_ERROR, reason="no_route",
                ))
                return
            self._target_name = f"cluster {cluster.name}"
            self._dial_for(Step.DIAL_FOR_HELLO, cluster)
            return
        assert route.upstream is not None
        try:
            address = route_address(route.upstream, name)
        except ValueError as e:
            self._fail(Problem("NR", pgwire.SQLSTATE_CANNOT_CONNECT, str(e), tlshello.INTERNAL_ERROR, reason="no_route"))
            return
        self._target_name = str(address)
        # The name came from the client: its addresses are checked (addrguard).
        self._dial_for(Step.DIAL_FOR_HELLO, self.context.cluster, [address], checked=True)

    def _on_startup(self, packet: InitialPacket) -> None:
        if self._problem is not None:
            self._answer()
            return
        routed = self.options.tls == "passthrough" and bool(self.options.routes)
        if (self.options.require_tls or routed) and not self._client_tls:
            self._fail(Problem(
                "DPE", pgwire.SQLSTATE_CANNOT_CONNECT,
                "TLS required on this listener" + (" (it routes by TLS server name)" if routed else ""),
                tlshello.INTERNAL_ERROR,
                hint="connect with sslmode=verify-full (or require)"
                + (" and host=<the database's name>" if routed else ""),
                reason="tls_required",
            ))
            return
        self._target_name = f"cluster {self.context.cluster.name}"
        originate = self.options.tls == "originate"
        self._dial_for(Step.DIAL_TO_ORIGINATE if originate else Step.DIAL_FOR_STARTUP, self.context.cluster)

    def _on_cancel(self, packet: InitialPacket) -> None:
        assert packet.cancel is not None
        if self._problem is not None:
            self._answer()
            return
        target = self.state.backend_keys.get(packet.cancel)
        if target is not None:
            self._target_name = str(target.address)
            self._up_tls = True if target.tls else None
            self._dial_for(Step.DIAL_FOR_CANCEL, target.cluster, [target.address])
            return
        if self.config.cluster is None:
            # A routed listener: a plaintext cancel names no server; try the
            # endpoints this source has live sessions with (module notes).
            self._cancel_by_source(packet.data)
            return
        # A backend this process did not see (another proxy instance's, or
        # a session that ended): the cluster's server ignores unknown keys.
        cluster = self.context.cluster
        self._target_name = f"cluster {cluster.name}"
        if self.options.tls == "originate":
            self._up_tls = True  # the options are made per endpoint once connected
        self._dial_for(Step.DIAL_FOR_CANCEL, cluster)

    def _cancel_by_source(self, packet: bytes) -> None:
        source = peer_ip(self.context.peer)
        targets = self.state.cancel_targets(source)
        if not targets:
            self._reject("NR", "no_route", "CancelRequest from a source with no live session: not routable by SNI")
            self._close()
            return
        first, *others = targets
        for target in others:
            self.emit(SendCopy(target.cluster, target.address, packet, CANCEL_LINGER))
        self._target_name = str(first.address)
        self._dial_for(Step.DIAL_FOR_CANCEL, first.cluster, [first.address])

    # -- TLS from the client, terminated here (client_tls) ------------------------

    def _start_client_tls(self, hello: bytes) -> None:
        """End the client's TLS here; the ClientHello already read goes to the new TLS layer first."""
        assert self.options.client_tls is not None
        self._client_tls = True
        self._read_packet()
        self.emit(StartClientTLS(self.options.client_tls, hello))
