"""The compiled relay in one process: chosen at start-up, watched by the reactor.

``fast_path`` picks the data path spliced connections take:

- ``auto`` (the default; ``true`` means the same): the compiled relay
  (``egressproxy._relay``, built from ``egressproxy/_relay.c`` by
  ``pip install``) when it loads and the Twisted names the hand-off needs
  are there, else the Python fast path, with a warning saying why;
- ``relay``: the same, but a relay that cannot load is an error in the log
  (the proxy still serves, on the Python fast path);
- ``python``: the Python fast path only (:mod:`egressproxy.datapath.fastpath`);
- ``off`` (``false``): Twisted's ordinary path throughout.

With the relay on, the Python fast path is still installed: it carries
every handshake and the splices the relay declines (TLS on a leg, a splice
filter; see :mod:`egressproxy.datapath.relayjoin`).  An originated TLS
upstream (``tls: originate``) is relayed too when the relay could be given
pyOpenSSL's OpenSSL (:mod:`egressproxy.datapath.relaytls`); the start-up
line says whether, and why not.

:class:`RelayRuntime` owns one ``_relay.Relay`` (one thread, its own epoll
loop) per process: with ``workers: N`` each worker process starts its own.
It is a reader on the reactor for the relay's notification descriptor, and
hands each ended pair back to its session (``Relayed.relay_ended``), which
writes the access line.  A runtime replaced by a reload (or stopped with
the service) is *retired*: it takes no new pairs and stops its thread once
the pairs it carries have ended, so live connections keep their path.

Rejected: loading the extension at import time.  A missing or broken build
would then be an import error of the data path, not one logged line, and a
test could not hide it to check the fallback.
"""

from __future__ import annotations

import importlib
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from egressproxy.datapath import relayjoin, relaytls

#: The values ``fast_path`` takes (``true`` and ``false`` are read as ``auto`` and ``off``).
SETTINGS = ("auto", "relay", "python", "off")

#: The extension's import name.
MODULE = "egressproxy._relay"

#: How long a closing side may take to flush once its partner is gone (as ``splice.LINGER``).
LINGER = 30.0

#: Bytes per read, and so the most the relay holds per direction for a peer
#: that does not read (what the kernel did not take of one read).
BUFFER_SIZE = 64 * 1024

log = Logger()


def setting(value: bool | str) -> str:
    """A ``fast_path`` value as one of :data:`SETTINGS` (``True``: auto, ``False``: off)."""
    if value is True:
        return "auto"
    if value is False:
        return "off"
    if value not in SETTINGS:
        raise ValueError(f"fast_path: expected one of {', '.join(SETTINGS)}, true or false, got {value!r}")
    return value


def load() -> tuple[Any, str]:
    """The extension module, or None and why it cannot be used."""
    try:
        module = importlib.import_module(MODULE)
    except ImportError as e:
        return None, f"{MODULE} cannot be imported: {e}"
    if not callable(getattr(module, "Relay", None)):
        return None, f"{MODULE} has no Relay"
    return module, ""


@implementer(IReadDescriptor)
class RelayRuntime:
    """One relay thread and the reactor's view of it; see the module notes."""

    def __init__(self, reactor: Any, module: Any, linger: float = LINGER) -> None:
        self.reactor = reactor
        self.relay = module.Relay(buffer_size=BUFFER_SIZE, linger=linger)
        self._fd = self.relay.fileno()
        #: False once retired: no new pairs.
        self.accepting = True
        self.closed = False
        #: Why originated TLS upstreams are not relayed ("" when they are; ``relaytls.enable``).
        self.tls_unavailable = relaytls.enable(module)
        #: Sessions handed over with a TLS upstream leg (the tests' and the status's proof).
        self.tls_taken = 0
        reactor.addReader(self)

    def take(self, session: Any) -> bool:
        """Hand ``session``'s legs to the relay; False: the caller joins them in Python."""
        if not (self.accepting and relayjoin.hand_off(session, self.relay, not self.tls_unavailable)):
            return False
        if session.up.transport.relayed_tls:
            self.tls_taken += 1
        return True

    def live(self) -> int:
        """Pairs the relay carries (ended ones not yet delivered included)."""
        return len(self.relay)

    def retire(self) -> None:
        """Take no new pairs; stop the thread once the live ones have ended."""
        self.accepting = False
        if not self.live():
            self._close()

    # -- IReadDescriptor: the relay's "pairs have ended" descriptor ----------------

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> None:
        """Deliver every ended pair to its session."""
        self._deliver(self.relay.ended())
        if not self.accepting and not self.live():
            self._close()

    #: Called directly by the fast dispatch (``fastdispatch.DIRECT``).
    egress_event = doRead

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped us (it is stopping): nothing to clean beyond :meth:`retire`."""

    def logPrefix(self) -> str:
        return "relay"

    # -- internals ------------------------------------------------------------------

    def _deliver(self, ended: list[tuple[Any, int, int, str]]) -> None:
        for session, a_to_b, b_to_a, reason in ended:
            try:
                session.relay_ended(a_to_b, b_to_a, reason)
            except Exception:
                log.failure("relay: ending a session failed")

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.reactor.removeReader(self)
        self.relay.close()
        self._deliver(self.relay.ended())  # pairs still live were aborted ("stopped")


def choose(reactor: Any, value: bool | str) -> RelayRuntime | None:
    """Start the relay if ``fast_path`` asks for it and it can run; log which data path carries splices."""
    wanted = setting(value)
    if wanted in ("python", "off"):
        log.info(
            "data path: the compiled relay is not used (fast_path: {wanted}); spliced connections take {path}",
            wanted=wanted, path="the Python fast path" if wanted == "python" else "Twisted's ordinary path",
        )
        return None
    if not isinstance(reactor, PosixReactorBase):
        # The tests' memory reactors: no real sockets to hand over, so no thread to start.
        log.info(
            "data path: the compiled relay is not started: the reactor {reactor} has no real sockets",
            reactor=type(reactor).__qualname__,
        )
        return None
    module, why = load()
    if module is not None:
        missing = relayjoin.problems(reactor)
        if missing:
            why = "the hand-off needs " + "; ".join(missing)
        else:
            try:
                runtime = RelayRuntime(reactor, module)
            except (OSError, ValueError, MemoryError) as e:
                why = f"the relay could not start: {e}"
            else:
                tls = runtime.tls_unavailable
                log.info(
                    "data path: compiled relay ({module}, {size} KiB per direction, its own thread) for spliced "
                    "plain-TCP connections (fast_path: {wanted}); {tls}; client TLS and filtered splices take "
                    "the Python fast path",
                    module=MODULE, size=runtime.relay.buffer_size // 1024, wanted=wanted,
                    tls="originated TLS upstreams are relayed too (pyOpenSSL's OpenSSL)" if not tls
                    else f"originated TLS upstreams are not relayed ({tls})",
                )
                return runtime
    if wanted == "relay":
        log.error(
            "data path: fast_path: relay, but the compiled relay cannot be used ({why}); "
            "spliced connections take the Python fast path",
            why=why,
        )
    else:
        log.warn(
            "data path: the compiled relay cannot be used ({why}); spliced connections take the Python "
            "fast path (fast_path: auto)",
            why=why,
        )
    return None
