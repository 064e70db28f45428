"""What the two forward-proxy fronts (``http_connect``, ``socks5``) share.

Both read a handshake from the client before anything is dialled: a
request head, a SOCKS5 greeting and request.  This base class owns the
parts that do not depend on the protocol:

- **The handshake deadline.**  The client leg reads through
  ``read_preamble`` (splice note 6) until the handshake is complete or
  refused; the whole handshake must arrive within the mode's timeout,
  measured from admission and never extended by a byte, so a client that
  trickles one byte a second (slowloris) is answered and closed on time.
- **Policy before any dial.**  Credentials, then the destination against
  the allowlist that applies: the authenticated user's own
  ``allow_destinations`` if it has one (it replaces the listener's, it is
  not merged), else the listener's.  A refusal names the requested
  destination in the access log (``session.upstream_name``) and is flagged
  ``UAEX`` (credentials) or ``NR`` (destination).  Malformed, oversized or
  unsupported requests and handshake timeouts are flagged ``DPE``.
- **Report mode.**  With ``policy: report`` a destination outside the
  allowlist is dialled anyway: logged at warn level with what enforce would
  have done, flagged ``RP`` and counted in the listener's ``reported``
  (``egressproxy_policy_reported_total{reason="destination"}``).
  Credentials are never bypassed: report mode concerns the destination
  policy only.
- **Who and where.**  The access line of a forward listener carries the
  authenticated user (``session.user``) and the address the upstream
  socket connected to (``session.dialled``, set by the session).
- **The dial.**  The destination is dialled through the listener's
  cluster: its breaker, ``connect_timeout``, attempts and keepalive apply
  per listener (a listener without ``cluster:`` has its own dynamic one).
  The client leg is paused meanwhile, as in tcp mode.
- **Saying no.**  An answer is written, our write side is shut (FIN after
  the answer) and the client's further bytes are read and dropped for up to
  ``LINGER`` seconds or ``LINGER_BYTES`` bytes, then the connection is
  closed.  Closing at once while the client is still sending (a 1 MiB
  header) would make our kernel answer with a reset, which can destroy the
  answer before the client reads it.

Nothing here runs once the legs are spliced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IDelayedCall

from egressproxy.addresses import format_peer
from egressproxy.modes.base import Front
from egressproxy.modes.forward.destinations import Destination, allowed, rules_for
from egressproxy.modes.forward.options import ForwardOptions
from egressproxy.modes.forward.rules import User

if TYPE_CHECKING:
    from egressproxy.session import Session

#: What a listener reloaded into another mode allows: nothing.
_NONE = ForwardOptions()

#: How long a refused client may keep sending before it is closed.
LINGER = 2.0
#: How much a refused client may send meanwhile before it is closed.
LINGER_BYTES = 4 * 1024 * 1024


class ForwardFront(Front):
    """A front that reads a handshake, applies policy, dials, then splices."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self._timers: list[IDelayedCall] = []
        self._deadline: IDelayedCall | None = None
        #: The handshake is over (accepted, refused or timed out).
        self.handshake_over = False
        self._discarded = 0
        #: The user whose credentials the client gave (None: no users configured, or not yet).
        self.user: User | None = None
        # Forward listeners' access lines name the user and the address dialled.
        session.user = "-"
        session.dialled = "-"

    @property
    def options(self) -> ForwardOptions:
        """The listener's allowlist and users as configured now (a reload applies at once)."""
        options = self.session.listener.config.options
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

    # -- the Front interface ------------------------------------------------

    def start(self) -> None:
        """Admitted: read the handshake, under a deadline."""
        self._deadline = self.call_later(self.handshake_timeout(), self._timed_out)
        self.session.down.read_preamble(self.handshake_received, self._handshake_eof)  # type: ignore[union-attr]

    def finished(self) -> None:
        """The session ended (client gone, closed, aborted): no timer outlives it."""
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []

    # -- helpers ------------------------------------------------------------

    def call_later(self, delay: float, f) -> IDelayedCall:  # type: ignore[no-untyped-def]
        """Schedule ``f``; cancelled when the session finishes."""
        call = self.session.reactor.callLater(delay, f)
        self._timers = [timer for timer in self._timers if timer.active()]
        self._timers.append(call)
        return call

    def end_handshake(self) -> None:
        """The handshake is complete or refused: stop its deadline."""
        self.handshake_over = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.handshake_over:
            return
        self.end_handshake()
        self.session.flag("DPE")
        self.note(f"no complete handshake within {self.handshake_timeout():g}s", warn=True)
        self.handshake_timed_out()

    def _handshake_eof(self) -> None:
        """The client sent EOF before its handshake was complete: just close."""
        if self.handshake_over:
            return
        self.end_handshake()
        if self.handshake_started():
            self.session.flag("DPE")
            self.note("EOF before a complete handshake", warn=True)
        self.session.close_downstream()

    def authenticated(self, user: User | None) -> bool:
        """Remember who the credentials belong to (None: nobody); True when someone."""
        self.user = user
        self.session.user = "-" if user is None else user.name
        return user is not None

    def destination_allowed(self, dest: Destination, why: str) -> bool:
        """Whether to dial ``dest``: in the allowlist that applies, or let through by report mode.

        The allowlist is the user's own when it has one, else the listener's.
        Under ``policy: report`` a destination outside it is allowed, logged
        with what enforce would do, flagged ``RP`` and counted.
        """
        config = self.session.listener.config
        if allowed(rules_for(self.options.allow_destinations, self.user), dest):
            return True
        if config.policy != "report":
            return False
        whose = "the listener's" if self.user is None or self.user.allow_destinations is None else (
            f"user {self.user.name}'s"
        )
        self.session.upstream_name = str(dest)
        self.report_policy("destination", f"is not in {whose} allow_destinations ({why})")
        return True

    def report_policy(self, reason: str, what: str) -> None:
        """``policy: report`` let through what enforce would refuse: warn, flag RP, count ``reason``.

        The line has the shape of the session's report for address checks.
        """
        session = self.session
        session.flag("RP")
        session.listener.count_reported(reason)
        session.listener.log.warn(
            "{listener}: report mode: {peer} -> {upstream} {what}; enforce would refuse it",
            listener=session.listener.config.name,
            peer=format_peer(session.peer_address),
            upstream=session.upstream_name,
            what=what,
        )

    def refuse_destination(self, dest: Destination, answer: bytes, why: str) -> None:
        """The destination is outside ``allow_destinations``: never dialled, flag NR."""
        self.session.upstream_name = str(dest)
        self.session.flag("NR")
        self.note(f"destination {dest} not allowed ({why})")
        self.answer_and_close(answer)

    def refuse_credentials(self, answer: bytes, why: str) -> None:
        """Missing or wrong credentials: flag UAEX (the password is never logged)."""
        self.session.flag("UAEX")
        self.note(why)
        self.answer_and_close(answer)

    def refuse_request(self, answer: bytes, why: str) -> None:
        """A malformed, oversized or unsupported request: flag DPE."""
        self.session.flag("DPE")
        self.note(why, warn=True)
        self.answer_and_close(answer)

    def note(self, why: str, warn: bool = False) -> None:
        """Log a refusal, with the listener and peer (and never a credential)."""
        session = self.session
        log = session.listener.log
        (log.warn if warn else log.info)(
            "{listener}: refused {peer}: {reason}",
            listener=session.listener.config.name,
            peer=format_peer(session.peer_address),
            reason=why,
        )

    def dial(self, dest: Destination) -> None:
        """Hold the client's bytes and dial ``dest`` through the listener's cluster.

        Its addresses are checked (``addrguard``): a name's every answer, and
        an IP literal unless an IP/CIDR entry of the allowlist admitted it
        (the operator's explicit choice).
        """
        session = self.session
        session.down.transport.pauseProducing()  # type: ignore[union-attr]
        explicit = dest.ip is not None and allowed(rules_for(self.options.allow_destinations, self.user), dest)
        session.connect_upstream(session.listener.cluster, [dest.address], checked=not explicit)

    def answer_and_close(self, answer: bytes) -> None:
        """Write ``answer``, shut our side, drop what the client still sends, then close."""
        self.end_handshake()
        session = self.session
        down = session.down
        if down is None or down.lost:
            return
        if down.transport.disconnecting:  # type: ignore[union-attr]
            return  # already being dropped (preamble overflow, drain)
        if answer:
            session.write_downstream(answer)
        if down.read_closed:
            session.close_downstream()
            return
        down.read_preamble(self._discard, session.close_downstream)
        down.transport.resumeProducing()  # paused if a dial failed
        down.transport.loseWriteConnection()  # type: ignore[attr-defined]
        self.call_later(LINGER, session.close_downstream)

    def _discard(self, data: bytes) -> None:
        self._discarded += len(data)
        if self._discarded > LINGER_BYTES:
            self.session.close_downstream()
