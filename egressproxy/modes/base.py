"""The interface between a session and its listener's mode.

A *front* is what a mode does between admission and the splice: read a
handshake from the client (Postgres SSLRequest and ClientHello, an HTTP
CONNECT request, a SOCKS5 greeting), decide where to go, dial, perhaps speak
to the upstream first (an SSLRequest, TLS origination), answer the client,
and finally hand both legs to the splice.  It also decides how to say *no*
in its protocol: a Postgres ErrorResponse or TLS alert, an HTTP status, a
SOCKS reply code.  The session owns counters, timers and the access record;
the front owns the protocol conversation.

The base class is ``mode: tcp``: pause the client, dial the listener's
cluster, splice, and say no by closing.  A front reads client bytes with
``session.down.read_preamble(reader, eof)`` and stops with
``session.down.end_preamble(rest)`` (leftover bytes are delivered upstream
first); upstream bytes during an upstream handshake the same way on
``session.up``.  Nothing here runs per chunk once the splice is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from egressproxy.session import Session
    from egressproxy.splice import UpstreamLeg


class Front:
    """``mode: tcp``, and the hooks every mode may override."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def start(self) -> None:
        """The client is admitted: tcp mode holds its bytes and dials the cluster at once."""
        session = self.session
        session.down.transport.pauseProducing()  # type: ignore[union-attr]
        session.connect_upstream(session.listener.cluster)

    def refuse(self, flag: str, reason: str) -> None:
        """Admission refused (``RBAC``, ``OM``): say no, then close.  TCP can only close."""
        self.session.close_downstream()

    def upstream_connected(self, up: UpstreamLeg) -> None:
        """The upstream is connected: finish any upstream handshake, then splice."""
        self.session.splice()

    def upstream_failed(self, flag: str, reason: str) -> None:
        """No upstream (``UF``, ``UT``, ``UO``): say why if the protocol can, then close."""
        self.session.close_downstream()

    def upstream_lost(self, reason: Failure) -> bool:
        """The upstream leg was lost before the splice, the client still connected.

        Return True to keep the client and answer it (the session then
        forgets that leg); False lets the session close the client.
        """
        return False

    def finished(self) -> None:
        """The session has ended: drop any per-session state (timers, registrations)."""
