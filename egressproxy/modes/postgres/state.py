"""Postgres mode's per-listener state: cancel keys, routed sessions, TLS options.

Made once per listener by the mode's spec (``ListenerRuntime.mode_state``)
and kept across reloads, so a cancel still finds its backend.
"""

from __future__ import annotations

import enum
import re
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import ssl

from egressproxy.config.model import Address
from egressproxy.modes.postgres import tlshello
from egressproxy.modes.postgres.options import ClientTLS
from egressproxy.modes.postgres.pgwire import CancelKey

if TYPE_CHECKING:
    from egressproxy.datapath.listener import ListenerRuntime
    from egressproxy.upstream.cluster import UpstreamCluster

__all__ = ["CANCEL_LINGER", "MAX_CANCEL_FANOUT", "CancelTarget", "Client", "PostgresListenerState"]

#: How many upstream endpoints one unmatched plaintext cancel may reach on
#: an SNI-routed listener (the newest sessions of its source first).
MAX_CANCEL_FANOUT = 4
#: How long a sent CancelRequest's connection is kept open for the server to
#: close it, as libpq does.  Hanging up at once loses the cancel with some
#: servers (PgBouncer before 1.19.1 drops it, or exits, on an early EOF).
CANCEL_LINGER = 5.0


class Client(enum.Enum):
    """Where a postgres session's client conversation is."""

    #: Reading an initial packet (SSLRequest, GSSENCRequest, startup, cancel, or a direct ClientHello).
    PACKET = "packet"
    #: An SSLRequest was read: answering it (and, refusing, reading the ClientHello for the alert).
    SSL = "ssl"
    #: Reading (or having read) the ClientHello.
    HELLO = "hello"
    #: A plaintext StartupMessage was read: dialling and sending it.
    STARTUP = "startup"
    #: A CancelRequest was read: delivering it.
    CANCEL = "cancel"
    #: Relaying the startup phase both ways until ReadyForQuery.
    RELAY = "relay"
    #: Handed to the splice.
    SPLICED = "spliced"
    #: Closing: nothing more is read.
    DONE = "done"


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
        """The listener's state (made by the mode's spec; anew if another mode's is there)."""
        state = listener.state()
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
