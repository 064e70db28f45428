"""Failover across paths: the order they are tried in, and one connection's attempts.

``--via`` lists paths in order of preference (the egress app's flycast
address, then its ``.internal`` name, ...).  Each new connection tries them
in that order (:class:`Attempts`); a failure before any of the
destination's bytes moved tries the next, and the first path that is ready
carries the connection for its whole life: nothing is retried once bytes
have flowed, since the app may have sent a query that must not run twice.

Two failures end the attempts early:

- a SOCKS5 refusal by rule (reply code 2): the egress app's allowlist does
  not admit the destination, and every path leads to the same allowlist;
- the last path failing: the connection fails with that path's reason
  (each earlier failure was logged as it happened).

:class:`PathOrder` keeps the order and a short memory: a path that could
not be reached at all (no TCP connection, no SOCKS answer, credentials
refused) is tried after the others for ``HOLDOFF`` seconds, so during an
outage of the first path every connection does not wait out its connect
timeout first.  When every path is held off, the configured order stands.
A SOCKS answer about the destination (host unreachable, refused) says
nothing about the path, and does not hold it off.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from egressproxy.tunnel.dial import PathAttempt, PathFailed, PathLeg
from egressproxy.tunnel.parse import Path

#: Seconds a path that could not be reached is tried after the others.
HOLDOFF = 10.0


class PathOrder:
    """The configured paths and which of them failed to answer lately; see the module notes."""

    def __init__(self, paths: tuple[Path, ...], clock: IReactorTime, holdoff: float = HOLDOFF) -> None:
        self.paths = paths
        self.clock = clock
        self.holdoff = holdoff
        self._down_since: dict[Path, float] = {}

    def order(self) -> list[Path]:
        """Paths to try now: the configured order, recently unreachable ones last."""
        now = self.clock.seconds()
        held = {path for path, since in self._down_since.items() if now - since < self.holdoff}
        return [p for p in self.paths if p not in held] + [p for p in self.paths if p in held]

    def failed(self, path: Path) -> None:
        self._down_since[path] = self.clock.seconds()

    def worked(self, path: Path) -> None:
        self._down_since.pop(path, None)


class Attempts:
    """One connection's tries across the paths; :meth:`start` gives a Deferred of the ready leg.

    ``attempt(path)`` starts one try (a :class:`~egressproxy.tunnel.dial.PathAttempt`);
    ``failing_over(failure, next_path)`` hears each failure that is followed
    by another try.  The Deferred fails with the last :class:`PathFailed`;
    every failure is in :attr:`failures`, in order.
    """

    def __init__(self, order: PathOrder, attempt: Callable[[Path], PathAttempt],
                 failing_over: Callable[[PathFailed, Path], None]) -> None:
        self._order = order
        self._attempt = attempt
        self._failing_over = failing_over
        self._paths: list[Path] = []
        self._current: PathAttempt | None = None
        self.failures: list[PathFailed] = []
        self.result: defer.Deferred[PathLeg] = defer.Deferred(lambda _: self.cancel())

    def start(self) -> defer.Deferred[PathLeg]:
        self._paths = self._order.order()
        self._next()
        return self.result

    def _next(self) -> None:
        path = self._paths[len(self.failures)]
        self._current = current = self._attempt(path)
        current.result.addCallbacks(self._ready, self._failed)

    def _ready(self, leg: PathLeg) -> None:
        self._current = None
        self._order.worked(leg.path)
        if not self.result.called:
            self.result.callback(leg)

    def _failed(self, failure: Failure) -> Any:
        self._current = None
        if failure.check(defer.CancelledError) or self.result.called:
            return None
        if not failure.check(PathFailed):
            return failure  # a bug: let it be logged as one
        failed: PathFailed = failure.value
        self.failures.append(failed)
        if failed.path_down:
            self._order.failed(failed.path)
        if failed.final or len(self.failures) == len(self._paths):
            self.result.errback(failed)
            return None
        self._failing_over(failed, self._paths[len(self.failures)])
        self._next()
        return None

    def cancel(self) -> None:
        """Stop the try in progress (the client went away)."""
        current, self._current = self._current, None
        if current is not None:
            current.cancel()
