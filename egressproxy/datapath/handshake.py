"""The handshake vocabulary: what a mode's machine hears, and what it asks for.

A mode's front is a *machine*: an object with ``start()``, ``refuse(flag,
reason)`` and ``receive(event)``, each returning a list of actions.  It is
pure: it never sees a reactor, a transport, a leg or a session, only the
events below and a :class:`Context` (the listener's configuration, the
client's address, the mode's per-listener state).  The driver
(``driver.py``) turns the session's happenings into events and applies the
actions, in order, to legs, transports, counters and timers.

Everything here is a small frozen attrs class, so a test of a machine is
bytes in, actions out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs

__all__ = [
    "Abort", "Action", "ArmTimer", "ClientBytes", "ClientEOF", "Close", "CloseUpstream", "Connected", "Context", "Count",
    "Dial", "DialFailed", "DisarmTimer", "Event", "Flag", "HoldClient", "Log", "Machine", "Refuse", "SendCopy", "SetUpstreamName", "SetUser",
    "Splice", "StartClientTLS", "StartUpstreamTLS", "TimerFired", "UpstreamBytes", "UpstreamEOF",
    "UpstreamLost", "WriteClient", "WriteUpstream",
]


# -- events -------------------------------------------------------------------


@attrs.frozen
class ClientBytes:
    """Bytes from the client, before the splice."""

    data: bytes


@attrs.frozen
class ClientEOF:
    """The client sent EOF before the splice."""


@attrs.frozen
class Connected:
    """The upstream is connected.

    ``address``: the endpoint dialled (an ``Address``); ``peer``: the
    ``ip:port`` the socket reached; ``local``: ``(host, port)`` it is bound
    to, None when unknown; ``cluster``: the cluster dialled (an opaque
    handle for the machine, e.g. for a Postgres cancel key).
    """

    address: Any = None
    peer: str | None = None
    local: tuple[str, int] | None = None
    cluster: Any = None


@attrs.frozen
class DialFailed:
    """The dial failed: flag ``UF``/``UT``/``UO``/``IA``, upstream.py's reason, the address checks' detail.

    ``upstream``: the upstream as the access log names it (the address last
    attempted, or the machine's own name for it; ``-`` if none).
    """

    flag: str
    reason: str
    detail: str | None = None
    upstream: str = "-"


@attrs.frozen
class UpstreamBytes:
    """Bytes from the upstream, before the splice (read by the machine, not yet sent to the client)."""

    data: bytes


@attrs.frozen
class UpstreamEOF:
    """The upstream sent EOF before the splice."""


@attrs.frozen
class UpstreamLost:
    """The upstream leg is gone before the splice, the client still connected.

    ``tls_failure``: why TLS failed, when TLS was started on that leg and the
    loss was a TLS error rather than a close.  A machine that returns no
    action lets the session close the client as it would any connection.
    """

    tls_failure: str | None = None


@attrs.frozen
class TimerFired:
    """A timer armed with :class:`ArmTimer` fired."""

    name: str


Event = ClientBytes | ClientEOF | Connected | DialFailed | UpstreamBytes | UpstreamEOF | UpstreamLost | TimerFired


# -- actions --------------------------------------------------------------------


@attrs.frozen
class WriteClient:
    """Write to the client (counted as bytes sent)."""

    data: bytes


@attrs.frozen
class WriteUpstream:
    """Write to the upstream."""

    data: bytes


@attrs.frozen
class Dial:
    """Dial ``cluster`` (None: the listener's), its own endpoints or ``endpoints``.

    ``checked``: the destination is the client's choice, so its addresses go
    through the listener's address checks.  ``hold_client``: stop reading
    the client while dialling (its bytes wait in the kernel).
    """

    cluster: Any = None
    endpoints: tuple[Any, ...] | None = None
    checked: bool = False
    hold_client: bool = False


@attrs.frozen
class StartClientTLS:
    """End the client's TLS here with ``tls`` (e.g. ``ClientTLS``), then feed it ``replay`` (bytes already read)."""

    tls: Any
    replay: bytes = b""


@attrs.frozen
class StartUpstreamTLS:
    """Start verified TLS on the upstream leg for ``server_name``, trusting ``ca_file`` (None: the system store)."""

    server_name: str
    ca_file: str | None = None


@attrs.frozen
class ArmTimer:
    """(Re)arm the machine's timer ``name``: :class:`TimerFired` after ``seconds``."""

    seconds: float
    name: str


@attrs.frozen
class DisarmTimer:
    """Stop timer ``name`` (None: every timer of the machine)."""

    name: str | None = None


@attrs.frozen
class SetUpstreamName:
    """The upstream as the access log names it (until a dial attempts an address)."""

    name: str


@attrs.frozen
class SetUser:
    """The user the access log names (forward modes)."""

    name: str


@attrs.frozen
class Flag:
    """Record an outcome flag on the session."""

    flag: str


@attrs.frozen
class Count:
    """Count an event: ``what`` is ``rejected``, ``login_refused``, ``reported`` or ``connect_failure``."""

    what: str
    label: str


@attrs.frozen
class Log:
    """One line in the listener's log (``namespace`` None: the listener's logger)."""

    level: str
    format: str
    fields: tuple[tuple[str, Any], ...] = ()
    namespace: str | None = None


@attrs.frozen
class Refuse:
    """Say no: flag, write ``answer``, then close the client ``how``.

    ``linger``: shut our side after the answer and drop what the client
    still sends for a while (forward modes); ``close``: close gracefully;
    ``abort``: drop the connection now.
    """

    flag: str | None = None
    answer: bytes = b""
    how: str = "close"


@attrs.frozen
class CloseUpstream:
    """Close the upstream leg; ``abort``: drop it now.

    ``answered``: closed on purpose, so its loss needs no answer; False
    (an EOF seen before the splice) lets the loss reach the machine.
    """

    abort: bool = False
    answered: bool = True


@attrs.frozen
class HoldClient:
    """The handshake with the client is over: stop reading it, keep ``rest`` and what follows for the splice."""

    rest: bytes = b""


@attrs.frozen
class SendCopy:
    """Deliver ``data`` once to ``address`` of ``cluster`` (under its limits), outside this session.

    No log line, no session: the connection waits up to ``linger`` seconds
    for the server to hang up; a failure only counts in the cluster.
    """

    cluster: Any
    address: Any
    data: bytes
    linger: float


@attrs.frozen
class Abort:
    """Drop both legs now and stop any dial in progress."""


@attrs.frozen
class Splice:
    """Join the legs: ``client``/``upstream`` leftovers go first, ``client_filter`` filters the client leg."""

    client: bytes = b""
    upstream: bytes = b""
    client_filter: Callable[[bytes], bytes] | None = None


@attrs.frozen
class Close:
    """Close the client gracefully (flushing any answer); the session ends when both legs are gone."""


Action = (
    WriteClient | WriteUpstream | Dial | StartClientTLS | StartUpstreamTLS | ArmTimer | DisarmTimer
    | SetUpstreamName | SetUser | Flag | Count | Log | Refuse | CloseUpstream | HoldClient | SendCopy | Splice | Close | Abort
)


# -- the machine's view ----------------------------------------------------------


@attrs.frozen
class Context:
    """What a machine may know of its session: no reactor, transport or session.

    ``listener`` is a callable giving the listener's config as it is now (a
    reload applies at once); ``cluster`` the listener's cluster (a handle
    with ``name`` and ``config``); ``named_cluster`` looks a configured
    cluster up by name; ``state`` is the mode's per-listener state.
    """

    listener: Callable[[], Any]
    peer: Any
    cluster: Any = None
    named_cluster: Callable[[str], Any] = lambda name: None
    state: Any = None

    @property
    def config(self) -> Any:
        return self.listener()


class Machine(Protocol):
    """A mode's handshake: pure, driven by ``driver.Driver``."""

    def start(self) -> list[Any]: ...

    def refuse(self, flag: str, reason: str) -> list[Any]: ...

    def receive(self, event: Any) -> list[Any]: ...
