"""The ``tcp`` mode's machine: dial at once, or once the client has spoken.

``upstream_connect: immediate`` is :class:`~egressproxy.modes.base.Handshake`
unchanged: hold the client and dial when it is admitted.

``upstream_connect: on_first_byte`` (Envoy's ``ON_DOWNSTREAM_DATA``) waits
for the client's first bytes before dialling, because a load balancer's TCP
health check (Fly's ``tcp_checks``) connects and hangs up without a byte, and
dialling the database for each of those leaves a half-opened connection in
the provider's logs every few seconds.  So:

- admitted: read the client, under ``FIRST_BYTE_TIMEOUT``;
- its first bytes: stop reading it (the kernel holds what follows, as in
  every mode's handshake), keep those bytes for the splice, which writes
  them upstream first and in order, then dial;
- EOF, a reset or the end of the session before any byte: nothing was
  dialled, the access line has flag ``NB`` ("no bytes").  It is no failure:
  no upstream connect failure is counted, no breaker or health state moves;
- no byte within ``FIRST_BYTE_TIMEOUT``: flag ``NB``, one warning (a
  server-first protocol waits for the server to speak first, which this
  setting never lets it do), and close.

Rejected: a configurable wait.  Client-first protocols send at once (libpq
sends its SSLRequest or startup packet in the same breath as the connect),
so the bound is only there to free the descriptor; it is the same 10 s as
the postgres mode's handshake timeout.
"""

from __future__ import annotations

from typing import Any

from egressproxy.addresses import format_peer
from egressproxy.datapath.handshake import (
    ArmTimer, ClientBytes, ClientEOF, Close, Context, Dial, DisarmTimer, Flag, HoldClient, Log, TimerFired,
)
from egressproxy.modes.base import Handshake
from egressproxy.modes.tcp.options import ON_FIRST_BYTE, TcpOptions

__all__ = ["FIRST_BYTE_TIMEOUT", "NO_BYTES", "TIMER", "TcpMachine"]

#: Seconds an ``on_first_byte`` client has to send its first byte.
FIRST_BYTE_TIMEOUT = 10.0
#: The access-log flag of a client that sent nothing, so nothing was dialled.
NO_BYTES = "NB"
#: The machine's one timer.
TIMER = "first_byte"


class TcpMachine(Handshake):
    """``mode: tcp``; see the module docstring."""

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        #: Admitted under ``on_first_byte`` and no byte seen yet: nothing dialled.
        self._waiting = False

    def start(self) -> list[Any]:
        """Admitted: dial now, or (``on_first_byte``) read the client under a deadline."""
        options = self.context.config.options
        if not (isinstance(options, TcpOptions) and options.upstream_connect == ON_FIRST_BYTE):
            return super().start()
        self._waiting = True
        return [ArmTimer(FIRST_BYTE_TIMEOUT, TIMER)]

    def receive(self, event: Any) -> list[Any]:
        if not self._waiting:
            return super().receive(event)
        if isinstance(event, ClientBytes):
            if not event.data:
                return []
            self._waiting = False
            # The first bytes go to the splice, which writes them upstream first.
            return [DisarmTimer(TIMER), HoldClient(event.data), Dial(hold_client=True)]
        if isinstance(event, ClientEOF):
            self._waiting = False
            return [DisarmTimer(TIMER), Flag(NO_BYTES), Close()]
        if isinstance(event, TimerFired) and event.name == TIMER:
            self._waiting = False
            config = self.context.config
            return [
                Flag(NO_BYTES),
                Log("warn", "{listener}: closed {peer}: no byte within {seconds:g}s (upstream_connect: "
                    "on_first_byte; a server-first protocol needs upstream_connect: immediate)", (
                        ("listener", config.name), ("peer", format_peer(self.context.peer)),
                        ("seconds", FIRST_BYTE_TIMEOUT),
                    )),
                Close(),
            ]
        return []

    def ended(self) -> list[Any]:
        """Gone before any byte (a reset, a drain): flag ``NB`` all the same."""
        if self._waiting:
            self._waiting = False
            return [Flag(NO_BYTES)]
        return []
