"""The base of every mode's handshake machine, and ``mode: tcp`` itself.

A mode's *machine* is what happens between admission and the splice: read
a handshake from the client (Postgres SSLRequest and ClientHello, an HTTP
CONNECT request, a SOCKS5 greeting), decide where to go, dial, perhaps
speak to the upstream first (an SSLRequest, TLS origination), answer the
client, and finally ask for the splice.  It also decides how to say *no*
in its protocol: a Postgres ErrorResponse or TLS alert, an HTTP status, a
SOCKS reply code.

A machine is pure (``datapath/handshake.py``): ``start()``, ``refuse(flag,
reason)`` and ``receive(event)`` return lists of actions, and
``datapath/driver.py`` applies them to the session's legs, transports,
counters and timers.  No module under ``modes/`` touches those itself
(``tests/test_fronts_sealed.py``).  Nothing here runs per chunk once the
splice is made.

The base class is ``mode: tcp`` as it dials by default
(``upstream_connect: immediate``): hold the client, dial the listener's
cluster, splice, and say no by closing.  ``modes/tcp/front.py`` adds
``on_first_byte``.
"""

from __future__ import annotations

from typing import Any

from egressproxy.datapath.handshake import Close, Connected, Context, Dial, DialFailed, HoldClient, Splice

__all__ = ["Handshake"]


class Handshake:
    """``mode: tcp``, and the hooks every mode's machine may override."""

    #: The access line names the user and the address dialled (forward modes).
    names_user = False

    def __init__(self, context: Context) -> None:
        self.context = context

    def start(self) -> list[Any]:
        """The client is admitted: tcp mode holds its bytes and dials the cluster at once."""
        return [HoldClient(), Dial(hold_client=True)]

    def refuse(self, flag: str, reason: str) -> list[Any]:
        """Admission refused (``RBAC``, ``OM``): say no, then close.  TCP can only close."""
        return [Close()]

    def receive(self, event: Any) -> list[Any]:
        """Connected: splice; the dial failed: close; anything else needs nothing."""
        if isinstance(event, Connected):
            return [Splice()]
        if isinstance(event, DialFailed):
            return [Close()]
        return []

    def ended(self) -> list[Any]:
        """The session has ended: forget any per-session registration (actions: usually none)."""
        return []
