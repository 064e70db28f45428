"""The fast path: one owner for the data path's three shortcuts through Twisted.

Once two legs are spliced, the proxy takes three shortcuts past Twisted's
per-chunk code (see the README's Performance section for what each saves):

- **read** (:mod:`egressproxy.datapath.fastread`): a spliced plain-TCP transport gets
  a ``doRead`` of ours that reads 256 KiB and hands the chunk straight to
  its leg, skipping ``Connection._dataReceived`` and, for an upstream leg,
  the endpoint's ``_WrappingProtocol``;
- **write** (:mod:`egressproxy.datapath.fastwrite`): a leg forwards through a
  ``write`` that sends at once when the other transport has nothing queued
  (it reads ``dataBuffer`` and ``_tempDataLen`` to know that);
- **dispatch** (:mod:`egressproxy.datapath.fastdispatch`): the epoll reactor's poll
  step is replaced by one that calls a spliced socket's reader directly,
  skipping ``log.callWithLogger`` and ``_doReadOrWrite``.  It only serves
  the direct reads, so it is on only when *read* is.

Each leans on names Twisted does not promise to keep.  :class:`FastPath`
owns all three: :meth:`FastPath.check` looks at every private name and shape
they rely on, against the Twisted that is installed and the reactor that
runs; :meth:`FastPath.install` turns on each part whose names all check out
and leaves the others on Twisted's ordinary path (``dataReceived`` through
Twisted's read chain, ``transport.write``, the reactor's own ``doPoll``),
logging one warning per missing name::

    fast path: twisted.internet.abstract.FileDescriptor._tempDataLen: missing,
    or not an int on a TCP transport (Twisted 27.1.0); Twisted's ordinary path
    is used for writes (transport.write)

A part falls back alone (a missing ``_tempDataLen`` costs the direct writes
only); a reactor other than Twisted's epoll reactor (macOS, the tests'
memory reactors) is no missing name, and says so at info level.  With
``fast_path: off`` (or ``false``) in the config nothing is checked or
patched: one line at start-up says Twisted's ordinary path is used
throughout.  The ordinary path keeps every guarantee of the splice
(backpressure, half-close, exact byte counts, idle timeout, flushing on
close); only the bound on what one read holds is Twisted's 64 KiB rather
than 256 KiB.  With ``auto`` or ``relay`` (``true``), :meth:`FastPath.install`
also starts the compiled relay when it can run (:attr:`FastPath.relay`, see
:mod:`egressproxy.datapath.relay`), which then carries plain-TCP splices;
these shortcuts still serve every handshake and the splices it declines.

The parts act per reactor (dispatch) and per splice (read, write):
``install`` patches the reactor's poll step (counted, so two services on one
reactor share it) and makes :meth:`reader` and :meth:`writer` hand out the
shortcuts to splices made from then on; ``uninstall`` gives the reactor its
own poll step back and makes later splices ordinary.  Connections already
spliced keep what they were given: their reader and writer stay correct
under either dispatch.

Rejected: probing lazily, per connection (as the shortcuts first did).  A
name Twisted renamed would then show up as an ``AttributeError`` in the data
path, or as a shortcut silently not taken, with nothing at start-up to say
which.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

import twisted
from twisted.internet import endpoints, error, main, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, ITransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python import log as legacy_log

from egressproxy.datapath import fastdispatch, fastread, fastwrite, relay

#: The parts, in the order log lines name them.
PARTS = ("read", "write", "dispatch")

#: How log lines name each part's ordinary path.
_ORDINARY = {
    "read": "reads (Twisted's doRead -> dataReceived)",
    "write": "writes (transport.write)",
    "dispatch": "event dispatch (the reactor's own doPoll)",
}


class Problem:
    """One thing a part needs that is missing or changed."""

    def __init__(self, name: str, detail: str, parts: tuple[str, ...], missing_name: bool = True) -> None:
        #: The private name, e.g. ``twisted.internet.endpoints._WrappingProtocol``.
        self.name = name
        #: What about it is wrong ("missing", "not a class", ...).
        self.detail = detail
        #: The parts that cannot run without it.
        self.parts = parts
        #: False for a reactor the dispatch shortcut does not know (info, not a warning).
        self.missing_name = missing_name

    def __str__(self) -> str:
        return f"{'/'.join(self.parts)}: {self.name}: {self.detail}"


def _probe_transport(reactor: Any, sock: socket.socket) -> tcp.Connection:
    """A TCP transport on an unconnected socket, to look at its instance attributes (only its constructor runs)."""
    return tcp.Connection(sock, Protocol(), reactor)


def _transport_problems(reactor: Any) -> list[Problem]:
    """What the read and write parts need of Twisted's TCP transports."""
    problems: list[Problem] = []
    both = ("read", "write", "dispatch")
    for cls in ("Server", "Client"):
        found = getattr(tcp, cls, None)
        if not (isinstance(found, type) and issubclass(found, getattr(tcp, "Connection", ()))):
            problems.append(Problem(f"twisted.internet.tcp.{cls}", "missing, or not a tcp.Connection", both))
    if problems:
        return problems
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            probe = _probe_transport(reactor, sock)
        except Exception as e:  # a changed constructor
            return [Problem("twisted.internet.tcp.Connection(socket, protocol, reactor)", f"fails: {e!r}", both)]
        handle = getattr(probe, "socket", None)
        if not (callable(getattr(handle, "recv", None)) and callable(getattr(handle, "send", None))):
            problems.append(Problem("twisted.internet.tcp.Connection.socket", "missing (the connection's socket)", both))
        if getattr(probe, "TLS", None) is not False:
            problems.append(Problem("twisted.internet.tcp.Connection.TLS", "missing, or not False on a plain connection", both))
        if getattr(probe, "protocol", None) is None:
            problems.append(Problem("twisted.internet.tcp.Connection.protocol", "missing", ("read", "dispatch")))
        if not callable(getattr(type(probe), "doRead", None)):
            problems.append(Problem("twisted.internet.tcp.Connection.doRead", "missing", ("read", "dispatch")))
        else:
            try:
                probe.doRead = probe.doRead  # type: ignore[method-assign]
            except (AttributeError, TypeError):
                problems.append(Problem("twisted.internet.tcp.Connection.doRead", "cannot be set per connection", ("read", "dispatch")))
        if not isinstance(getattr(probe, "dataBuffer", None), bytes):
            problems.append(Problem("twisted.internet.abstract.FileDescriptor.dataBuffer", "missing, or not bytes", ("write",)))
        if type(getattr(probe, "_tempDataLen", None)) is not int:
            problems.append(Problem(
                "twisted.internet.abstract.FileDescriptor._tempDataLen", "missing, or not an int on a TCP transport", ("write",)
            ))
        for flag in ("connected", "disconnecting"):
            if not isinstance(getattr(probe, flag, None), (bool, int)):
                problems.append(Problem(f"twisted.internet.abstract.FileDescriptor.{flag}", "missing", ("write",)))
    finally:
        sock.close()
    return problems


def _read_problems() -> tuple[list[Problem], type | None]:
    """What the read part needs besides the transport: its results, the endpoint wrapper."""
    problems: list[Problem] = []
    read = ("read", "dispatch")
    if not isinstance(getattr(main, "CONNECTION_DONE", None), error.ConnectionDone):
        problems.append(Problem("twisted.internet.main.CONNECTION_DONE", "missing, or not a ConnectionDone", read))
    if not isinstance(getattr(main, "CONNECTION_LOST", None), error.ConnectionLost):
        problems.append(Problem("twisted.internet.main.CONNECTION_LOST", "missing, or not a ConnectionLost", read))
    wrapper = getattr(endpoints, "_WrappingProtocol", None)
    factory = getattr(endpoints, "_WrappingFactory", None)
    if not isinstance(wrapper, type):
        problems.append(Problem("twisted.internet.endpoints._WrappingProtocol", "missing (the client endpoints' wrapper)", read))
        return problems, None
    if getattr(factory, "protocol", None) is not wrapper:
        problems.append(Problem(
            "twisted.internet.endpoints._WrappingFactory.protocol", "is no longer _WrappingProtocol", read
        ))
    try:
        wrapped = Protocol()
        if getattr(wrapper(Deferred(), wrapped), "_wrappedProtocol", None) is not wrapped:
            raise AttributeError("_wrappedProtocol")
    except Exception:
        problems.append(Problem(
            "twisted.internet.endpoints._WrappingProtocol._wrappedProtocol", "missing (the wrapped protocol)", read
        ))
    return problems, (wrapper if not problems else None)


def _dispatch_problems(reactor: Any) -> list[Problem]:
    """What the dispatch part needs of the reactor: Twisted's own epoll reactor and its insides."""
    epoll = fastdispatch.EPollReactor
    if epoll is None or not isinstance(reactor, epoll):
        return [Problem(
            f"reactor {type(reactor).__module__}.{type(reactor).__qualname__}",
            "is not Twisted's EPollReactor", ("dispatch",), missing_name=False,
        )]
    problems: list[Problem] = []
    if not getattr(reactor, fastdispatch.MARK, 0):  # not already ours (another service's)
        own_step = getattr(epoll, "doPoll", None)
        if own_step is None or getattr(type(reactor), "doIteration", None) is not own_step or "doIteration" in vars(reactor):
            problems.append(Problem(
                "twisted.internet.epollreactor.EPollReactor.doIteration", "not EPollReactor.doPoll", ("dispatch",)
            ))
    poller = getattr(reactor, "_poller", None)
    if not callable(getattr(poller, "poll", None)):
        problems.append(Problem("twisted.internet.epollreactor.EPollReactor._poller", "missing (the epoll object)", ("dispatch",)))
    if not isinstance(getattr(reactor, "_selectables", None), dict):
        problems.append(Problem("twisted.internet.epollreactor.EPollReactor._selectables", "missing, or not a dict", ("dispatch",)))
    for name in ("_doReadOrWrite", "_disconnectSelectable"):
        if not callable(getattr(reactor, name, None)):
            problems.append(Problem(f"twisted.internet.epollreactor.EPollReactor.{name}", "missing", ("dispatch",)))
    if type(getattr(reactor, "_POLL_IN", None)) is not int:
        problems.append(Problem("twisted.internet.epollreactor.EPollReactor._POLL_IN", "missing, or not an int", ("dispatch",)))
    if not callable(getattr(legacy_log, "callWithLogger", None)):
        problems.append(Problem("twisted.python.log.callWithLogger", "missing", ("dispatch",)))
    return problems


class FastPath:
    """Owns the read, write and dispatch shortcuts; see the module notes."""

    log = Logger()

    def __init__(self) -> None:
        #: The reactor installed on, while installed.
        self.reactor: Any = None
        #: The parts now on (each False: Twisted's ordinary path).
        self.read = False
        self.write = False
        self.dispatch = False
        #: The client endpoints' wrapper class, as checked (read part).
        self._wrapper: type | None = None
        #: The compiled relay spliced connections are handed to (``fast_path: auto``
        #: or ``relay`` when it runs; see :mod:`egressproxy.datapath.relay`), else None.
        self.relay: relay.RelayRuntime | None = None

    # -- the check -----------------------------------------------------------------

    def problems(self, reactor: Any) -> list[Problem]:
        """Every missing or changed name the parts rely on, for ``reactor``."""
        read_problems, _ = _read_problems()
        return _transport_problems(reactor) + read_problems + _dispatch_problems(reactor)

    def check(self, reactor: Any) -> list[str]:
        """What is missing for ``reactor`` and the installed Twisted, one line each ([] if nothing)."""
        return [str(p) for p in self.problems(reactor)]

    # -- install -------------------------------------------------------------------

    def install(self, reactor: Any, enabled: bool | str = True) -> tuple[str, ...]:
        """Check, then turn on every part that can run; the parts now on.

        ``enabled`` is the ``fast_path`` setting: ``off`` (``False``) turns
        none on and says so once; ``auto``/``relay`` (``True``) also start
        the compiled relay when it can run (:func:`relay.choose`, which logs
        the data path spliced connections take); ``python`` does not.
        """
        if self.reactor is not None:
            self.uninstall()
        self.reactor = reactor
        wanted = relay.setting(enabled)
        if wanted == "off":
            self.log.info(
                "fast path: off (fast_path: off): Twisted's ordinary path is used for reads, writes and dispatch"
            )
            return ()
        version = getattr(twisted, "__version__", "?")
        read_problems, wrapper = _read_problems()
        problems = _transport_problems(reactor) + read_problems + _dispatch_problems(reactor)
        off: set[str] = set()
        for p in problems:
            off.update(p.parts)
            ordinary = ", ".join(_ORDINARY[part] for part in PARTS if part in p.parts)
            if p.missing_name:
                self.log.warn(
                    "fast path: {name}: {detail} (Twisted {version}); Twisted's ordinary path is used for {ordinary}",
                    name=p.name, detail=p.detail, version=version, ordinary=ordinary,
                )
            else:
                self.log.info(
                    "fast path: the {name} {detail}: the reactor's own dispatch is used",
                    name=p.name, detail=p.detail,
                )
        self.read = "read" not in off
        self.write = "write" not in off
        self.dispatch = "dispatch" not in off
        self._wrapper = wrapper if self.read else None
        if self.dispatch:
            fastdispatch.install(reactor)
        on = self.active
        self.log.info(
            "fast path: {on} (Twisted {version})",
            on=", ".join(f"direct {part}s" if part != "dispatch" else "dispatch shortcut" for part in on) + " on"
            if on else "nothing on: Twisted's ordinary path throughout",
            version=version,
        )
        self.relay = relay.choose(reactor, wanted)
        return on

    def uninstall(self) -> None:
        """Give the reactor its own poll step back; later splices take the ordinary path."""
        if self.dispatch:
            fastdispatch.uninstall(self.reactor)
        if self.relay is not None:
            self.relay.retire()  # its live pairs keep their path to the end
            self.relay = None
        self.read = self.write = self.dispatch = False
        self._wrapper = None
        self.reactor = None

    @property
    def active(self) -> tuple[str, ...]:
        """The parts now on, in :data:`PARTS` order."""
        return tuple(part for part in PARTS if getattr(self, part))

    # -- what a splice asks for ----------------------------------------------------------

    def reader(self, transport: ITransport, protocol: IProtocol, deliver: Callable[[bytes], None]) -> bool:
        """Have ``transport`` hand its reads to ``deliver`` (read part); False: Twisted's ``dataReceived``."""
        if not self.read:
            return False
        return fastread.direct_reader(transport, protocol, deliver, self._wrapper)

    def writer(self, transport: ITransport) -> Callable[[bytes], None]:
        """A ``write`` for ``transport``: the direct one (write part), else ``transport.write``."""
        if not self.write:
            return transport.write
        return fastwrite.direct_writer(transport)


#: Never installed: what a splice made outside a service uses (Twisted's path).
ORDINARY = FastPath()
