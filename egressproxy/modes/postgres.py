"""``mode: postgres``: the conversation before the splice, in Postgres terms.

Design notes
------------

Everything here happens before the splice; once it is made, bytes flow
through ``splice.py`` untouched, with no per-chunk work of this module's.
The front is a small state machine over two sans-I/O parsers (``pgwire``
for the initial packets, ``tlshello`` for the ClientHello), with every
client read bounded in size (``CLIENT_BUFFER_LIMIT``) and time
(``HANDSHAKE_TIMEOUT``), so a slow or silent client cannot hold a slot.

A listener is one of three kinds:

**Routed** (``tls: passthrough`` with ``routes``).  To an SSLRequest the
proxy answers ``S`` itself and reads the ClientHello; a direct-TLS client
(PostgreSQL 17 ``sslnegotiation=direct``) sends the ClientHello at once.
The SNI picks the first matching route (exact name or ``*.suffix``); a name
no route matches is never dialled (flag ``NR``).  Upstream, the proxy sends
its own SSLRequest, requires ``S``, forwards the ClientHello as received and
splices: TLS stays end to end, the proxy never sees plaintext.

**Single cluster** (``tls: passthrough`` with ``cluster``).  The upstream is
dialled first and the client's SSLRequest (or StartupMessage) forwarded;
the server's answer is relayed.  Dialling before answering means that when
the upstream cannot be reached, the client can still be told why.

**Originate** (``tls: originate``).  Clients speak plaintext to the proxy
(``N`` to an SSLRequest), or TLS terminated here with ``client_tls``; the
proxy sends an SSLRequest upstream, requires ``S`` and starts TLS with full
verification (chain against the system store or ``ca_file``, name by
service-identity); there is no fallback to plaintext or unverified TLS.
The server's startup answer is relayed and scanned up to ReadyForQuery for
BackendKeyData, so a later CancelRequest reaches the right server.

**Saying no.**  A client in plaintext (having sent a StartupMessage) gets a
FATAL ErrorResponse naming egressproxy, the upstream and the likely cause,
which psql prints.  A client that asked for TLS gets no ErrorResponse,
because libpq 14+ does not show one sent in answer to an SSLRequest: it
gets ``S``, its ClientHello is read, and the answer is a fatal TLS alert
(``unrecognized_name`` for no route, ``access_denied`` for a refused source,
``internal_error`` for an unreachable upstream or an open breaker).  Clients
are never simply hung up on; the access log and metrics carry the detail.

**SCRAM in originate.**  Channel binding cannot cross a proxy that ends
one TLS session and starts another (see ``pgwire``).  To a plaintext client
the proxy relays the server's SASL mechanism list without
``SCRAM-SHA-256-PLUS``, so libpq picks ``SCRAM-SHA-256``; md5, cleartext and
trust pass unchanged.  To a client on ``client_tls`` the list goes as it
came: a client that then chooses ``-PLUS``, or sends the GS2 flag ``y``
(libpq's default ``channel_binding=prefer`` over TLS when ``-PLUS`` is
missing, which the server refuses as a downgrade), gets a FATAL
ErrorResponse from the proxy that says why and what to do, instead of the
server's "SCRAM channel binding check failed".  A plaintext client with
``channel_binding=require`` is stopped by libpq itself, before the proxy
can say anything ("channel binding is required, but server did not offer
an authentication method that supports channel binding").

**Login outcome.**  Wherever the proxy relays the startup answer
(originate, plaintext single cluster), a login the server refuses is
flagged ``LR:<SQLSTATE>`` (``LR:28P01`` wrong password, ``LR:28000`` no
pg_hba entry, ``LR:3D000`` no such database) and counted per SQLSTATE.

**Cancels.**  A CancelRequest is routed by its key where the proxy saw the
key (originate, and plaintext single-cluster sessions), else forwarded to
the listener's cluster.  On an SNI-routed listener a plaintext
CancelRequest names no server, and the key is hidden inside TLS; it is sent
to the upstream endpoints that the same client source (after any PROXY
header) has live sessions with on that listener, newest first, at most
``MAX_CANCEL_FANOUT`` of them, and never anywhere else.  A server ignores a
key it does not know, so the copies that miss do nothing.  A source with no
live session is refused (``NR``).  A cancel sent over TLS (libpq 17+
``PQcancelCreate``) carries the SNI and is routed like any connection.

Flags: ``NR`` no route (no or unknown SNI; a cancel from a source with no
live session on a routed listener), ``DPE`` a client protocol error, a
handshake timeout, a plaintext startup where TLS is required, or channel
binding asked for through ``originate``; ``LR:<SQLSTATE>`` the server
refused the login; ``UF``/``UT``/``UO`` as for any dial, ``UF`` also for an
upstream that closes before answering, refuses TLS or fails TLS
verification.

Rejected alternative: terminating TLS to read the startup packet in
passthrough mode.  It would put the proxy's certificate in front of every
database and end ``verify-full`` between client and server.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable

import attrs
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from egressproxy import pgwire, tlshello
from egressproxy.addrguard import FLAG as ADDRESS_FLAG
from egressproxy.addresses import format_peer, peer_ip
from egressproxy.config import Address, ClientTLS, PostgresRoute
from egressproxy.modes.base import Front
from egressproxy.pgwire import ACCEPT, DECLINE, SSL_REQUEST, CancelKey, InitialPacket, ProtocolError
from egressproxy.tlshello import ClientHello, HelloError

if TYPE_CHECKING:
    from egressproxy.listener import ListenerRuntime
    from egressproxy.session import Session
    from egressproxy.splice import Leg, UpstreamLeg
    from egressproxy.upstream import UpstreamCluster

try:  # service_identity is a hard dependency (twisted[tls]); its error type is what we map.
    from service_identity import VerificationError
except ImportError:  # pragma: no cover
    VerificationError = ()  # type: ignore[assignment,misc]

#: How long a client may take over each handshake step, and the server over
#: answering an SSLRequest or a StartupMessage.
HANDSHAKE_TIMEOUT = 10.0
#: How long the startup phase (authentication) may take once the server
#: has answered, in originate mode; PostgreSQL's authentication_timeout is 60s.
STARTUP_TIMEOUT = 120.0
#: Client bytes held before the splice: a ClientHello and a startup packet at most.
CLIENT_BUFFER_LIMIT = tlshello.MAX_CLIENT_HELLO + pgwire.MAX_STARTUP_PACKET
#: Server bytes held before the splice (an answer is one byte; more is refused).
UPSTREAM_BUFFER_LIMIT = 64 * 1024
#: How many upstream endpoints one unmatched plaintext cancel may reach on
#: an SNI-routed listener (the newest sessions of its source first).
MAX_CANCEL_FANOUT = 4
#: How long a sent CancelRequest's connection is kept open for the server to
#: close it, as libpq does.  Hanging up at once loses the cancel with some
#: servers (PgBouncer before 1.19.1 drops it, or exits, on an early EOF).
CANCEL_LINGER = 5.0

_HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


@attrs.frozen
class Problem:
    """Why a session cannot go on, in every form a client may need to hear it.

    ``message`` follows ``egressproxy: `` in the ErrorResponse; ``alert`` is
    the TLS alert for a client that asked for TLS; ``reason`` labels the
    listener's rejected counter or the cluster's connect-failure counter.
    """

    flag: str
    sqlstate: str
    message: str
    alert: int
    hint: str | None = None
    detail: str | None = None
    reason: str | None = None


@attrs.frozen
class CancelTarget:
    """Where the backend behind a cancel key lives, and how to reach it."""

    cluster: UpstreamCluster
    address: Address
    #: The server is reached over TLS (originate): SSLRequest, TLS, then the cancel.
    tls: bool = False


class PostgresListenerState:
    """Postgres mode's per-listener state (``ListenerRuntime.mode_state``).

    Cancel keys outlive reloads with the listener; TLS options are built
    once per certificate or trust setting, not per connection.
    """

    def __init__(self) -> None:
        #: BackendKeyData seen in live sessions -> where that backend is.
        self.backend_keys: dict[CancelKey, CancelTarget] = {}
        #: Live routed (TLS end to end) sessions by client source address,
        #: oldest first: where a plaintext cancel from that source may go.
        self.routed_by_source: dict[str, dict[object, CancelTarget]] = {}
        self._server_tls: tuple[ClientTLS, Any] | None = None
        self._client_tls: dict[tuple[str, str | None], Any] = {}

    @classmethod
    def of(cls, listener: ListenerRuntime) -> PostgresListenerState:
        state = listener.mode_state
        if not isinstance(state, cls):
            state = listener.mode_state = cls()
        return state

    def add_routed(self, source: str, session: object, target: CancelTarget) -> None:
        """Remember a live routed session of ``source`` (until :meth:`remove_routed`)."""
        self.routed_by_source.setdefault(source, {})[session] = target

    def remove_routed(self, source: str, session: object) -> None:
        sessions = self.routed_by_source.get(source)
        if sessions is not None:
            sessions.pop(session, None)
            if not sessions:
                del self.routed_by_source[source]

    def cancel_targets(self, source: str) -> list[CancelTarget]:
        """Distinct endpoints of ``source``'s live routed sessions, newest first, at most MAX_CANCEL_FANOUT."""
        targets: list[CancelTarget] = []
        for target in reversed(list(self.routed_by_source.get(source, {}).values())):
            if target not in targets:
                targets.append(target)
                if len(targets) == MAX_CANCEL_FANOUT:
                    break
        return targets

    def server_options(self, client_tls: ClientTLS) -> Any:
        """Server-side TLS options for ``client_tls`` (ALPN ``postgresql`` offered)."""
        if self._server_tls is None or self._server_tls[0] != client_tls:
            with open(client_tls.cert, "rb") as f:
                cert = f.read()
            with open(client_tls.key, "rb") as f:
                key = f.read()
            private = ssl.PrivateCertificate.loadPEM(cert + b"\n" + key)
            chain = [ssl.Certificate.loadPEM(c).original for c in _pem_blocks(cert)[1:]]
            options = ssl.CertificateOptions(
                privateKey=private.privateKey.original,
                certificate=private.original,
                extraCertChain=chain or None,
                acceptableProtocols=[tlshello.ALPN_POSTGRESQL],
            )
            self._server_tls = (client_tls, options)
        return self._server_tls[1]

    def client_options(self, server_name: str, ca_file: str | None) -> Any:
        """Client-side TLS options verifying ``server_name`` against ``ca_file`` or the system store."""
        key = (server_name, ca_file)
        options = self._client_tls.get(key)
        if options is None:
            if ca_file is None:
                trust = ssl.platformTrust()
            else:
                with open(ca_file, "rb") as f:
                    blocks = _pem_blocks(f.read())
                if not blocks:
                    raise ValueError(f"no PEM certificate in {ca_file}")
                certificates = [ssl.Certificate.loadPEM(b) for b in blocks]
                trust = ssl.trustRootFromCertificates(certificates)
            options = ssl.optionsForClientTLS(
                server_name, trustRoot=trust, acceptableProtocols=[tlshello.ALPN_POSTGRESQL]
            )
            self._client_tls[key] = options
        return options


def _pem_blocks(data: bytes) -> list[bytes]:
    return re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data, re.S)


class _CancelCopy(Protocol):
    """Delivers one CancelRequest to an extra endpoint (no session, no log line).

    Like libpq, it waits for the server to hang up (at most ``CANCEL_LINGER``).
    """

    def __init__(self, packet: bytes, cluster: UpstreamCluster, address: Address) -> None:
        self.packet = packet
        self.cluster = cluster
        self.address = address
        self._linger: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.packet)
        self._linger = self.cluster.reactor.callLater(CANCEL_LINGER, self.transport.loseConnection)

    def dataReceived(self, data: bytes) -> None:
        """A server says nothing to a cancel; anything it does say is dropped."""

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self.cluster.released(self.address)


def send_cancel_copy(packet: bytes, target: CancelTarget) -> None:
    """Send ``packet`` to ``target`` under its cluster's limits; failures only count there."""
    dial = target.cluster.dial(_CancelCopy(packet, target.cluster, target.address), lambda address: None, [target.address])
    if dial is not None:
        dial.deferred.addErrback(lambda failure: None)


def valid_server_name(name: str) -> bool:
    """True for a DNS host name fit to route on (and dial): no IP literals, no trailing dot."""
    if not 0 < len(name) <= 253:
        return False
    labels = name.split(".")
    if all(label.isdigit() for label in labels):
        return False
    return all(_HOST_LABEL.match(label) for label in labels)


def match_route(routes: tuple[PostgresRoute, ...], name: str) -> PostgresRoute | None:
    """The first route whose ``sni`` matches ``name``: exact, or ``*.suffix`` for one or more labels."""
    for route in routes:
        pattern = route.sni.lower()
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
                return route
        elif name == pattern:
            return route
    return None


def route_address(template: str, name: str) -> Address:
    """The ``HOST:PORT`` a route's ``upstream`` template names for server name ``name``."""
    text = template.replace("{sni}", name)
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit():
        raise ValueError(f"upstream {template!r} gives {text!r}, not HOST:PORT")
    return Address(host, int(port))


def _tls_failure_text(failure: Failure, server_name: str | None) -> str:
    """A one-line reason for a TLS failure, as OpenSSL or service-identity put it."""
    error = failure.value
    if VerificationError and isinstance(error, VerificationError):
        return f"the server's certificate is not valid for {server_name!r}"
    if isinstance(error, SSL.Error):
        reasons = [part[2] for part in (error.args[0] if error.args else []) if isinstance(part, tuple) and len(part) == 3]
        return "; ".join(r for r in reasons if r) or str(error)
    return failure.getErrorMessage()


class PostgresFront(Front):
    """The postgres mode front; see the module notes."""

    log = Logger()

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.listener = session.listener
        self.config = session.listener.config
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

    # -- reading the client -----------------------------------------------------

    def _take_held(self, leg: Leg) -> bytes:
        """Bytes a leg held before this front read it (e.g. after a PROXY header)."""
        held = b"".join(leg.pending)
        leg.pending = []
        leg.pending_size = 0
        return held

    def _begin(self) -> None:
        """Take the client leg's bytes from here on (and any it already held)."""
        down = self.session.down
        assert down is not None
        self._buffer = bytearray(self._take_held(down))
        down.read_preamble(self._client_data, self._client_eof)
        self._read_packet()

    def _read_packet(self) -> None:
        self._client = "packet"
        self._expect(pgwire.read_initial_packet, self._on_packet)

    def _expect(self, parse: Callable[[bytes], Any], then: Callable[[Any], None]) -> None:
        """Parse the client's bytes with ``parse`` until it has a result, then call ``then``."""
        self._parse, self._then = parse, then
        if self._timer is None:
            self._arm(HANDSHAKE_TIMEOUT, self._client_timed_out)
        self._client_data(b"")

    def _client_data(self, data: bytes) -> None:
        """The client leg's ``forward`` before the splice (never called after it)."""
        if self._client == "relay":
            self._relay_client(data)
            return
        if self._client == "done":
            return
        self._buffer += data
        if len(self._buffer) > CLIENT_BUFFER_LIMIT:
            self._client_error(f"more than {CLIENT_BUFFER_LIMIT} bytes before the handshake completed")
            return
        parse = self._parse
        if parse is None:
            return  # waiting for the upstream: keep (bounded) what arrives
        try:
            result = parse(self._buffer)
        except (ProtocolError, HelloError) as e:
            self._client_error(str(e))
            return
        if result is None:
            return
        then = self._then
        self._parse = self._then = None
        self._disarm()
        assert then is not None
        then(result)

    def _client_eof(self) -> None:
        """The client sent EOF before the splice: it has given up; close."""
        if self._client == "done":
            return
        self._close()

    def _client_timed_out(self) -> None:
        self._timer = None
        if self._problem is None:
            self._reject("DPE", "protocol", f"client handshake not complete within {HANDSHAKE_TIMEOUT:g}s")
        self._close()

    def _client_error(self, why: str) -> None:
        """The client's bytes are not the protocol: an ErrorResponse if it speaks plaintext, then close."""
        self._parse = self._then = None
        self._disarm()
        if self._problem is None:
            self._reject("DPE", "protocol", f"protocol error: {why}")
        if self._client in ("packet", "startup"):
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
            self._client = "ssl"
            self._on_ssl_request(packet)
        elif kind == "cancel":
            self._client = "cancel"
            self._packet = packet
            self._on_cancel(packet)
        else:
            self._client = "startup"
            self._packet = packet
            self._on_startup(packet)

    def _on_ssl_request(self, packet: InitialPacket) -> None:
        if self._problem is not None:
            self._answer()
        elif self.config.tls == "originate":
            if self.config.client_tls is not None:
                self._write(ACCEPT)
                early, self._buffer = bytes(self._buffer), bytearray()
                self._start_client_tls(early)
            else:
                self._write(DECLINE)
                self._read_packet()
        elif self.config.routes:
            self._write(ACCEPT)
            self._read_hello()
        else:
            # Single cluster: ask the server, then relay its answer.
            self._on_connected = self._relay_ssl_request
            self._dial(self.listener.cluster)

    def _on_direct_tls(self) -> None:
        """A ClientHello instead of a packet: PostgreSQL 17's ``sslnegotiation=direct``."""
        if self._ssl_seen:
            self._client_error("TLS handshake after the SSLRequest was answered N")
            return
        self._ssl_seen = True
        if self.config.tls == "originate" and self._problem is None:
            if self.config.client_tls is None:
                self._read_hello(then=self._refuse_direct_tls)
                return
            held, self._buffer = bytes(self._buffer), bytearray()
            self._start_client_tls(held)
            return
        self._read_hello()

    def _refuse_direct_tls(self, hello: ClientHello) -> None:
        self._hello = hello
        self._client = "hello"
        self._fail(Problem(
            "DPE", pgwire.SQLSTATE_PROTOCOL_VIOLATION, "this listener does not accept TLS from clients",
            tlshello.HANDSHAKE_FAILURE, hint="connect with sslmode=disable (the proxy opens TLS to the server)",
            reason="protocol",
        ))

    def _read_hello(self, then: Callable[[ClientHello], None] | None = None) -> None:
        self._client = "hello"
        self._expect(tlshello.parse_client_hello, then or self._on_hello)

    def _on_hello(self, hello: ClientHello) -> None:
        self._hello = hello
        self._client = "hello"
        if self._problem is not None:
            self._answer()
            return
        if not self.config.routes:
            # Single cluster, direct TLS: the server must accept an SSLRequest first.
            self._on_connected = self._send_hello_after_ssl_request
            self._dial(self.listener.cluster)
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
        route = match_route(self.config.routes, name)
        if route is None:
            self._fail(Problem(
                "NR", pgwire.SQLSTATE_CANNOT_CONNECT, f"no route for server name {name}",
                tlshello.UNRECOGNIZED_NAME, reason="no_route",
            ))
            return
        self._on_connected = self._send_hello_after_ssl_request
        if route.cluster is not None:
            cluster = self.listener.named_cluster(route.cluster)
            if cluster is None:
                self._fail(Problem(
                    "NR", pgwire.SQLSTATE_CANNOT_CONNECT,
                    f"route for {name} names cluster {route.cluster!r}, which is not configured",
                    tlshello.INTERNAL_ERROR, reason="no_route",
                ))
                return
            self._target_name = f"cluster {cluster.name}"
            self._dial(cluster)
            return
        assert route.upstream is not None
        try:
            address = route_address(route.upstream, name)
        except ValueError as e:
            self._fail(Problem("NR", pgwire.SQLSTATE_CANNOT_CONNECT, str(e), tlshello.INTERNAL_ERROR, reason="no_route"))
            return
        self._target_name = str(address)
        # The name came from the client: its addresses are checked (addrguard).
        self._dial(self.listener.cluster, [address], checked=True)

    def _on_startup(self, packet: InitialPacket) -> None:
        if self._problem is not None:
            self._answer()
            return
        routed = self.config.tls == "passthrough" and bool(self.config.routes)
        if (self.config.require_tls or routed) and not self._client_tls:
            self._fail(Problem(
                "DPE", pgwire.SQLSTATE_CANNOT_CONNECT,
                "TLS required on this listener" + (" (it routes by TLS server name)" if routed else ""),
                tlshello.INTERNAL_ERROR,
                hint="connect with sslmode=verify-full (or require)"
                + (" and host=<the database's name>" if routed else ""),
                reason="tls_required",
            ))
            return
        self._target_name = f"cluster {self.listener.cluster.name}"
        if self.config.tls == "originate":
            self._on_connected = self._originate_ssl_request
        else:
            self._on_connected = self._send_startup
        self._dial(self.listener.cluster)

    def _on_cancel(self, packet: InitialPacket) -> None:
        assert packet.cancel is not None
        if self._problem is not None:
            self._answer()
            return
        target = self.state.backend_keys.get(packet.cancel)
        if target is not None:
            self._target_name = str(target.address)
            self._up_tls = True if target.tls else None
            self._on_connected = self._send_cancel
            self._dial(target.cluster, [target.address])
            return
        if self.config.cluster is None:
            # A routed listener: a plaintext cancel names no server; try the
            # endpoints this source has live sessions with (module notes).
            self._cancel_by_source(packet.data)
            return
        # A backend this process did not see (another proxy instance's, or
        # a session that ended): the cluster's server ignores unknown keys.
        cluster = self.listener.cluster
        self._target_name = f"cluster {cluster.name}"
        if self.config.tls == "originate":
            self._up_tls = True  # the options are made per endpoint once connected
        self._on_connected = self._send_cancel
        self._dial(cluster)

    def _cancel_by_source(self, packet: bytes) -> None:
        source = peer_ip(self.session.peer_address)
        targets = self.state.cancel_targets(source)
        if not targets:
            self._reject("NR", "no_route", "CancelRequest from a source with no live session: not routable by SNI")
            self._close()
            return
        first, *others = targets
        for target in others:
            send_cancel_copy(packet, target)
        self._target_name = str(first.address)
        self._on_connected = self._send_cancel
        self._dial(first.cluster, [first.address])

    # -- TLS from the client, terminated here (client_tls) ------------------------

    def _start_client_tls(self, hello: bytes) -> None:
        assert self.config.client_tls is not None
        try:
            options = self.state.server_options(self.config.client_tls)
        except Exception as e:  # unreadable files, bad PEM: the listener cannot speak TLS
            self.log.error(
                "{listener}: cannot load client_tls certificate: {error}", listener=self.config.name, error=e
            )
            self._client = "done"
            self._reject("DPE", "protocol", "client_tls certificate unusable")
            self.session.down.abort()  # type: ignore[union-attr]
            return
        down = self.session.down
        assert down is not None
        self._client_tls = True
        down.transport.startTLS(options)  # type: ignore[union-attr]
        self._read_packet()
        if hello:
            # The ClientHello already read goes to the new TLS layer first.
            down.transport.protocol.dataReceived(hello)  # type: ignore[union-attr]

    # -- dialling and the upstream's answers -----------------------------------------

    def _dial(self, cluster: UpstreamCluster, endpoints: list[Address] | None = None, checked: bool = False) -> None:
        self._disarm()
        self.session.connect_upstream(cluster, endpoints, checked)

    def _upstream_data(self, data: bytes) -> None:
        """The upstream leg's ``forward`` until the splice."""
        if self._client == "relay":
            self._relay_upstream(data)
            return
        self._up_buffer += data
        if len(self._up_buffer) > UPSTREAM_BUFFER_LIMIT:
            self._upstream_problem(self._protocol_problem("sent too much before the handshake completed"))
            return
        step = self._up_step
        if step is not None:
            self._up_step = None
            step()

    def _upstream_eof(self) -> None:
        up = self.session.up
        if up is not None:
            up.transport.loseConnection()  # its connectionLost reaches upstream_lost

    def _await_upstream(self, step: Callable[[], None], timeout: float = HANDSHAKE_TIMEOUT) -> None:
        """Run ``step`` once the upstream has sent a byte (or at once if it has)."""
        self._arm(timeout, self._upstream_timed_out)
        if self._up_buffer:
            step()
        else:
            self._up_step = step

    def _upstream_timed_out(self) -> None:
        self._timer = None
        self._upstream_problem(Problem(
            "UT", pgwire.SQLSTATE_CANNOT_CONNECT,
            f"{self.session.upstream_name} did not answer within {HANDSHAKE_TIMEOUT:g}s: "
            "is this proxy's egress IP on the database's allowlist?",
            tlshello.INTERNAL_ERROR, reason="no_answer",
        ), abort=True)

    def _consume_upstream(self, count: int) -> bytes:
        """Take bytes the proxy answers itself: they are not sent to the client."""
        taken, self._up_buffer = self._up_buffer[:count], self._up_buffer[count:]
        self.session.bytes_sent -= len(taken)
        return taken

    def _write_up(self, data: bytes) -> None:
        up = self.session.up
        assert up is not None
        up.transport.write(data)

    # Routed, or a direct-TLS client of a single cluster.

    def _send_hello_after_ssl_request(self) -> None:
        self._write_up(SSL_REQUEST)
        self._await_upstream(self._hello_answer)

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

    def _hello_answer(self) -> None:
        if self._tls_accepted():
            # The ClientHello (still in the buffer, as received) goes first.
            self._splice()

    # A single cluster, an SSLRequest from the client.

    def _relay_ssl_request(self) -> None:
        self._write_up(SSL_REQUEST)
        self._await_upstream(self._relay_ssl_answer)

    def _relay_ssl_answer(self) -> None:
        self._disarm()
        answer = self._up_buffer[:1]
        if answer == DECLINE and self.config.require_tls:
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

    def _send_startup(self) -> None:
        assert self._packet is not None
        self._write_up(self._packet.data)
        self._await_upstream(self._start_relay)

    # Originate.

    def _originate_ssl_request(self) -> None:
        self._write_up(SSL_REQUEST)
        self._await_upstream(self._originate_answer)

    def _originate_answer(self) -> None:
        if not self._tls_accepted():
            return
        if not self._start_upstream_tls():
            return
        assert self._packet is not None
        # Held by the TLS layer until the handshake completes; the server's
        # first answer therefore also proves the handshake and verification.
        self._write_up(self._packet.data)
        self._await_upstream(self._start_relay)

    def _start_upstream_tls(self) -> bool:
        """Start verified TLS on the upstream leg; False (client answered) if it cannot."""
        address: Address = self.session.upstream_address
        tls = self.session.cluster.config.tls
        server_name = (tls.server_name if tls else None) or address.host
        try:
            options = self.state.client_options(server_name, tls.ca_file if tls else None)
        except Exception as e:  # an unreadable or empty ca_file
            self._upstream_problem(Problem(
                "UF", pgwire.SQLSTATE_CANNOT_CONNECT, f"cannot use the cluster's ca_file: {e}",
                tlshello.INTERNAL_ERROR, reason="tls",
            ))
            return False
        self._up_tls = options
        self._up_server_name = server_name
        up = self.session.up
        assert up is not None
        up.transport.startTLS(options)  # type: ignore[attr-defined]
        return True

    # After the server's first answer (originate, or a plaintext single cluster).

    def _start_relay(self) -> None:
        """Relay the startup phase both ways, watching for BackendKeyData, until ReadyForQuery."""
        self._disarm()
        self._client = "relay"
        originate = self.config.tls == "originate"
        self._scanner = pgwire.StartupAnswer(strip_channel_binding=originate and not self._client_tls)
        self._arm(STARTUP_TIMEOUT, self._startup_timed_out)
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
        up = self.session.up
        if up is not None and not up.lost:
            up.transport.write(data)

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

    def _relay_upstream(self, data: bytes) -> None:
        scanner = self._scanner
        assert scanner is not None
        out = scanner.feed(data)
        # Counted as sent when the leg received it; a rewritten or held message changes that.
        self.session.bytes_sent += len(out) - len(data)
        if scanner.sasl and self.config.tls == "originate" and not self._sasl_checked:
            self._sasl_checked = self._sasl_check = True
        down = self.session.down
        assert down is not None
        if out:
            down.transport.write(out)
        if scanner.done:
            if scanner.error:
                self.log.warn(
                    "{listener}: stopped reading {upstream}'s startup answer: {error}",
                    listener=self.config.name, upstream=self.session.upstream_name, error=scanner.error,
                )
            if scanner.key is not None:
                self._register_key(scanner.key)
            if scanner.refused is not None:
                self._login_refused(*scanner.refused)
            self._scanner = None
            self._sasl_check = False
            self._splice()

    def _login_refused(self, sqlstate: str, message: str) -> None:
        """The server refused the login (relayed as it was): flag and count its SQLSTATE."""
        self.session.flag(f"LR:{sqlstate}")
        self.listener.count_login_refused(sqlstate)
        self.log.info(
            "{listener}: {peer} -> {upstream}: login refused by the server: {sqlstate} {message}",
            listener=self.config.name, peer=format_peer(self.session.peer_address),
            upstream=self.session.upstream_name, sqlstate=sqlstate, message=message,
        )

    def _startup_timed_out(self) -> None:
        self._timer = None
        self.session.flag("DI")
        self.session.abort()

    def _register_key(self, key: CancelKey) -> None:
        target = CancelTarget(self.session.cluster, self.session.upstream_address, self._up_tls is not None)
        self._key, self._target = key, target
        self.state.backend_keys[key] = target

    # Cancels.

    def _send_cancel(self) -> None:
        assert self._packet is not None
        if self._up_tls is not None:
            self._write_up(SSL_REQUEST)
            self._await_upstream(self._cancel_answer)
            return
        self._write_up(self._packet.data)
        self._await_cancel_close()

    def _await_cancel_close(self) -> None:
        """The cancel is sent: wait for the server to hang up (ending the session), as libpq does."""
        self._arm(CANCEL_LINGER, self._close)

    def _cancel_answer(self) -> None:
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
        if self._hello is not None and self.config.routes and self._packet is None:
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
                "UF", pgwire.SQLSTATE_CANNOT_CONNECT, f"TLS with {upstream} failed: {_tls_failure_text(reason, self._up_server_name)}",
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
