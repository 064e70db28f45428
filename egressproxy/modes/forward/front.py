"""What the two forward-proxy fronts (``http_connect``, ``socks5``) share.

Both read a handshake from the client before anything is dialled: a
request head, a SOCKS5 greeting and request.  This base class owns the
parts that do not depend on the protocol:

- **The handshake deadline.**  The machine reads the client's bytes
  (``ClientBytes``) until the handshake is complete or refused; the whole
  handshake must arrive within the mode's timeout (timer ``handshake``),
  measured from admission and never extended by a byte, so a client that
  trickles one byte a second (slowloris) is answered and closed on time.
- **Policy before any dial.**  Credentials, then the destination against
  the allowlist that applies: the authenticated user's own
  ``allow_destinations`` if it has one (it replaces the listener's, it is
  not merged), else the listener's.  A refusal names the requested
  destination in the access log (``SetUpstreamName``) and is flagged
  ``UAEX`` (credentials) or ``NR`` (destination).  Malformed, oversized or
  unsupported requests and handshake timeouts are flagged ``DPE``.
- **Report mode.**  With ``policy: report`` a destination outside the
  allowlist is dialled anyway: logged at warn level with what enforce would
  have done, flagged ``RP`` and counted in the listener's ``reported``
  (``egressproxy_policy_reported_total{reason="destination"}``).
  Credentials are never bypassed: report mode concerns the destination
  policy only.
- **Who and where.**  The access line of a forward listener carries the
  authenticated user (``SetUser``) and the address the upstream socket
  connected to (set by the session).
- **The dial.**  The destination is dialled through the listener's
  cluster: its breaker, ``connect_timeout``, attempts and keepalive apply
  per listener (a listener without ``cluster:`` has its own dynamic one).
  The client leg is paused meanwhile, as in tcp mode.
- **Saying no.**  ``Refuse(how="linger")``: the driver writes the answer,
  shuts our write side (FIN after the answer) and reads and drops the
  client's further bytes for up to ``LINGER`` seconds or ``LINGER_BYTES``
  bytes, then closes the connection.  Closing at once while the client is still sending (a 1 MiB
  header) would make our kernel answer with a reset, which can destroy the
  answer before the client reads it.

The machine is pure (``datapath/handshake.py``); nothing here runs once
the legs are spliced.
"""

from __future__ import annotations

import enum
from typing import Any

from egressproxy.addresses import format_peer
from egressproxy.datapath.driver import LINGER, LINGER_BYTES
from egressproxy.datapath.handshake import (
    ArmTimer,
    ClientBytes,
    ClientEOF,
    Close,
    Connected,
    Context,
    Count,
    Dial,
    DialFailed,
    DisarmTimer,
    Flag,
    Log,
    Refuse,
    SetUpstreamName,
    SetUser,
    TimerFired,
)
from egressproxy.modes.base import Handshake
from egressproxy.modes.forward.destinations import Destination, allowed, rules_for
from egressproxy.modes.forward.options import ForwardOptions
from egressproxy.modes.forward.rules import User

__all__ = ["LINGER", "LINGER_BYTES", "ForwardHandshake", "Phase"]

#: What a listener reloaded into another mode allows: nothing.
_NONE = ForwardOptions()

#: The handshake deadline's timer.
DEADLINE = "handshake"


class Phase(enum.Enum):
    """Where a forward session is."""

    #: Reading the client's handshake, under the deadline.
    HANDSHAKE = "handshake"
    #: The destination is dialled.
    DIALLING = "dialling"
    #: Answered no (or the client gave up): nothing more is read.
    OVER = "over"
    #: Handed to the splice.
    SPLICED = "spliced"


class ForwardHandshake(Handshake):
    """A machine that reads a handshake, applies policy, dials, then splices."""

    names_user = True

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.phase = Phase.HANDSHAKE
        #: The user whose credentials the client gave (None: no users configured, or not yet).
        self.user: User | None = None
        #: The upstream as the access log names it.
        self.upstream_name = "-"
        self._out: list[Any] = []

    @property
    def options(self) -> ForwardOptions:
        """The listener's allowlist and users as configured now (a reload applies at once)."""
        options = self.context.config.options
        return options if isinstance(options, ForwardOptions) else _NONE

    # -- hooks for the modes ----------------------------------------------

    def handshake_timeout(self) -> float:
        """Seconds the client has for its whole handshake."""
        raise NotImplementedError

    def handshake_received(self, data: bytes) -> None:
        """Client bytes during the handshake."""
        raise NotImplementedError

    def handshake_timed_out(self) -> None:
        """The deadline passed: answer (if the protocol can) and close."""
        self.answer_and_close(b"")

    def handshake_started(self) -> bool:
        """Whether the client has sent any byte of its handshake yet."""
        raise NotImplementedError

    def client_while_dialling(self, data: bytes) -> None:
        """Client bytes read while dialling (only if the mode kept reading the client)."""

    def connected(self, event: Connected) -> None:
        """The upstream is connected: answer, then splice."""
        raise NotImplementedError

    def dial_failed(self, event: DialFailed) -> None:
        """The dial failed: answer in the protocol's terms, then close."""
        raise NotImplementedError

    # -- the machine --------------------------------------------------------

    def start(self) -> list[Any]:
        """Admitted: read the handshake, under a deadline."""
        return [ArmTimer(self.handshake_timeout(), DEADLINE)]

    def receive(self, event: Any) -> list[Any]:
        self._out = out = []
        phase = self.phase
        if isinstance(event, ClientBytes):
            if phase is Phase.HANDSHAKE:
                self.handshake_received(event.data)
            elif phase is Phase.DIALLING:
                self.client_while_dialling(event.data)
        elif isinstance(event, ClientEOF):
            if phase is Phase.HANDSHAKE:
                self._handshake_eof()
            # While dialling, the splice replays the EOF once joined (splice note 5).
        elif isinstance(event, TimerFired):
            if event.name == DEADLINE and phase is Phase.HANDSHAKE:
                self._timed_out()
        elif isinstance(event, Connected):
            if phase is Phase.DIALLING:
                self.phase = Phase.SPLICED
                self.connected(event)
        elif isinstance(event, DialFailed):
            if phase is Phase.DIALLING:
                self.upstream_name = event.upstream
                self.dial_failed(event)
        return out

    def emit(self, *actions: Any) -> None:
        self._out.extend(actions)

    # -- helpers ------------------------------------------------------------

    def end_handshake(self, phase: Phase = Phase.OVER) -> None:
        """The handshake is complete or refused: stop its deadline."""
        if self.phase is Phase.HANDSHAKE:
            self.emit(DisarmTimer(DEADLINE))
        self.phase = phase

    def _timed_out(self) -> None:
        self.end_handshake()
        self.emit(Flag("DPE"))
        self.note(f"no complete handshake within {self.handshake_timeout():g}s", warn=True)
        self.handshake_timed_out()

    def _handshake_eof(self) -> None:
        """The client sent EOF before its handshake was complete: just close."""
        self.end_handshake()
        if self.handshake_started():
            self.emit(Flag("DPE"))
            self.note("EOF before a complete handshake", warn=True)
        self.emit(Close())

    def set_upstream_name(self, name: str) -> None:
        self.upstream_name = name
        self.emit(SetUpstreamName(name))

    def authenticated(self, user: User | None) -> bool:
        """Remember who the credentials belong to (None: nobody); True when someone."""
        self.user = user
        self.emit(SetUser("-" if user is None else user.name))
        return user is not None

    def destination_allowed(self, dest: Destination, why: str) -> bool:
        """Whether to dial ``dest``: in the allowlist that applies, or let through by report mode.

        The allowlist is the user's own when it has one, else the listener's.
        Under ``policy: report`` a destination outside it is allowed, logged
        with what enforce would do, flagged ``RP`` and counted.
        """
        config = self.context.config
        if allowed(rules_for(self.options.allow_destinations, self.user), dest):
            return True
        if config.policy != "report":
            return False
        whose = "the listener's" if self.user is None or self.user.allow_destinations is None else (
            f"user {self.user.name}'s"
        )
        self.set_upstream_name(str(dest))
        self.report_policy("destination", f"is not in {whose} allow_destinations ({why})")
        return True

    def report_policy(self, reason: str, what: str) -> None:
        """``policy: report`` let through what enforce would refuse: warn, flag RP, count ``reason``.

        The line has the shape of the session's report for address checks.
        """
        self.emit(
            Flag("RP"),
            Count("reported", reason),
            Log("warn", "{listener}: report mode: {peer} -> {upstream} {what}; enforce would refuse it", (
                ("listener", self.context.config.name), ("peer", format_peer(self.context.peer)),
                ("upstream", self.upstream_name), ("what", what),
            )),
        )

    def refuse_destination(self, dest: Destination, answer: bytes, why: str) -> None:
        """The destination is outside ``allow_destinations``: never dialled, flag NR."""
        self.set_upstream_name(str(dest))
        self.emit(Flag("NR"))
        self.note(f"destination {dest} not allowed ({why})")
        self.answer_and_close(answer)

    def refuse_credentials(self, answer: bytes, why: str) -> None:
        """Missing or wrong credentials: flag UAEX (the password is never logged)."""
        self.emit(Flag("UAEX"))
        self.note(why)
        self.answer_and_close(answer)

    def refuse_request(self, answer: bytes, why: str) -> None:
        """A malformed, oversized or unsupported request: flag DPE."""
        self.emit(Flag("DPE"))
        self.note(why, warn=True)
        self.answer_and_close(answer)

    def note(self, why: str, warn: bool = False) -> None:
        """Log a refusal, with the listener and peer (and never a credential)."""
        self.emit(Log("warn" if warn else "info", "{listener}: refused {peer}: {reason}", (
            ("listener", self.context.config.name), ("peer", format_peer(self.context.peer)), ("reason", why),
        )))

    def dial(self, dest: Destination) -> None:
        """Hold the client's bytes and dial ``dest`` through the listener's cluster.

        Its addresses are checked (``addrguard``): a name's every answer, and
        an IP literal unless an IP/CIDR entry of the allowlist admitted it
        (the operator's explicit choice).
        """
        explicit = dest.ip is not None and allowed(rules_for(self.options.allow_destinations, self.user), dest)
        self.phase = Phase.DIALLING
        self.emit(Dial(endpoints=(dest.address,), checked=not explicit, hold_client=True))

    def answer_and_close(self, answer: bytes) -> None:
        """Write ``answer``, shut our side, drop what the client still sends, then close."""
        self.end_handshake()
        self.emit(Refuse(answer=answer, how="linger"))
