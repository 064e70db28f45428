"""Several worker processes sharing the listeners (``workers: N``).

Why
---
One CPython process relays on one core at a time.  With many busy clients
its event loop becomes a queue every message waits in, so relaying in
several processes, as HAProxy and Envoy do with one worker per core, raises
throughput: measured with pgbench at 32 clients on 2 cores, two workers
relayed about 20% more transactions per second than one (see the README's
Performance section).

Shape
-----
The process ``twistd`` starts is worker 0, the *main* worker.  It binds every
port first (so a taken port still fails start-up at once), serves admin and
metrics, owns the signals, and then starts workers 1..N-1 as child processes
(:class:`WorkerPool`) running ``twistd egressproxy`` on the same config file
with ``--worker I``.  Every worker binds each listener's address itself with
``SO_REUSEPORT`` and the kernel spreads new connections over their accept
queues.  Nothing is passed between processes but signals and counters, so a
reload binds new ports in each worker the way a single worker does.

- **Limits** (a listener's or a cluster's ``max_connections``, a listener's
  ``max_connections_per_source``, a cluster's ``max_pending``, also those of a forward proxy's per-listener dynamic
  cluster) are split: each worker enforces ``limit // N`` (at least 1),
  so the proxy as a whole never exceeds the configured number (for limits of
  at least N).  The cost: one worker can refuse while another has room.
- **Metrics**: each child sends a :mod:`~egressproxy.observe.snapshot` of its
  counters as one JSON line on its descriptor 3 every second and as it
  stops; the main worker adds the latest of each to its own at scrape time.
  A child that exits keeps contributing its counters (not its gauges), so
  totals never go backwards; at most its last second of counts is missed.
  ``process_*`` metrics, health and reload counts are the main worker's.
- **Signals**: SIGHUP reloads the main worker and, once that succeeded, is
  passed on; a drain (SIGTERM, SIGINT, ``POST /drain``) is passed on as
  SIGTERM, and the main worker exits once its children have.  A child whose
  main worker is gone (its standard input, a pipe from the main worker,
  reads end-of-file) drains and exits.
- **Restarts**: a child that exits while the main worker is not draining is
  started again a second later, and the exit is logged.

Each worker runs its own health checks, as HAProxy's processes did.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from typing import Any, Callable, Protocol

import attrs
from twisted.internet import defer, error, main
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from egressproxy.observe import snapshot
from egressproxy.config import ClusterConfig, Config
from egressproxy.observe.snapshot import Snapshot, SnapshotSource

#: The descriptor a child writes its snapshots to.
SNAPSHOT_FD = 3
#: How often a child sends its counters.
SNAPSHOT_INTERVAL = 1.0
#: How long after a child's unexpected exit it is started again.
RESTART_DELAY = 1.0
#: A snapshot line longer than this is a broken child: its data is dropped.
MAX_SNAPSHOT_LINE = 4 * 1024 * 1024
#: After the drain's own time, how long children get before SIGKILL.
STOP_GRACE = 5.0

log = Logger()


def _share(limit: int, workers: int) -> int:
    return max(1, limit // workers)


def share_cluster_limits(cluster: ClusterConfig, workers: int) -> ClusterConfig:
    """One cluster's breaker limits divided between ``workers`` processes."""
    if workers <= 1:
        return cluster
    return attrs.evolve(
        cluster,
        max_connections=_share(cluster.max_connections, workers),
        max_pending=_share(cluster.max_pending, workers),
    )


def share_limits(config: Config, workers: int) -> Config:
    """``config`` with every connection limit divided between ``workers`` processes."""
    if workers <= 1:
        return config
    return attrs.evolve(
        config,
        listeners=tuple(
            attrs.evolve(
                l,
                max_connections=_share(l.max_connections, workers),
                max_connections_per_source=_share(l.max_connections_per_source, workers),
            )
            for l in config.listeners
        ),
        clusters=tuple(share_cluster_limits(c, workers) for c in config.clusters),
    )


def worker_argv(config_path: str, index: int) -> list[str]:
    """The command that runs worker ``index`` on ``config_path`` with this Python."""
    return [
        sys.executable,
        "-c",
        "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
        "-n",
        "--pidfile=",
        "egressproxy",
        "--config",
        os.path.abspath(config_path),
        "--worker",
        str(index),
    ]


# -- the main worker's side ----------------------------------------------------


class WorkerProcess(ProcessProtocol):
    """One child worker, seen from the main worker: its exit and its snapshots."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.pid: int | None = None
        self.snapshot: Snapshot = snapshot.empty()
        self._partial = b""
        self.exited: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != SNAPSHOT_FD:
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_SNAPSHOT_LINE:
            self._partial = b""
        for line in reversed(lines):
            try:
                value = snapshot.clean(json.loads(line))
            except (ValueError, RecursionError):
                continue
            if value is not None:
                self.snapshot = value
                break

    def processEnded(self, reason: Failure) -> None:
        self.pool.ended(self, reason)
        self.exited.callback(None)

    def signal(self, signum: int) -> None:
        try:
            self.transport.signalProcess(signum)  # type: ignore[union-attr]
        except error.ProcessExitedAlready:
            pass


class WorkerPool:
    """Starts, restarts, signals and stops workers 1..N-1 for the main worker."""

    def __init__(
        self,
        reactor: Any,
        count: int,
        argv: Callable[[int], list[str]],
        env: dict[str, str] | None = None,
    ) -> None:
        self.reactor = reactor
        self.count = count
        self.argv = argv
        self.env = dict(os.environ if env is None else env)
        self.live: dict[int, WorkerProcess] = {}
        #: Counters of children that have exited (gauges dropped).
        self.retired: Snapshot = snapshot.empty()
        self.stopping = False
        self.restarts = 0

    def start(self) -> None:
        for index in range(1, self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        if self.stopping or index in self.live:
            return
        worker = WorkerProcess(self, index)
        argv = self.argv(index)
        self.reactor.spawnProcess(
            worker,
            argv[0],
            argv,
            env=self.env,
            # 0: a pipe from us (EOF tells the child we are gone); 1, 2: ours;
            # 3: the child's snapshots to us.
            childFDs={0: "w", 1: 1, 2: 2, SNAPSHOT_FD: "r"},
        )
        self.live[index] = worker
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def ended(self, worker: WorkerProcess, reason: Failure) -> None:
        if self.live.get(worker.index) is worker:
            del self.live[worker.index]
        snapshot.add(self.retired, snapshot.retire(worker.snapshot))
        status = reason.value
        if self.stopping:
            log.info("worker {index} exited: {status}", index=worker.index, status=status)
            return
        self.restarts += 1
        log.error(
            "worker {index} (pid {pid}) exited unexpectedly: {status}; starting it again in {delay}s",
            index=worker.index, pid=worker.pid, status=status, delay=RESTART_DELAY,
        )
        self.reactor.callLater(RESTART_DELAY, self._spawn, worker.index)

    def snapshots(self) -> list[Snapshot]:
        """The counters of every child, exited ones included."""
        return [self.retired] + [worker.snapshot for worker in self.live.values()]

    def signal(self, signum: int) -> None:
        for worker in list(self.live.values()):
            worker.signal(signum)

    def stop(self, timeout: float) -> defer.Deferred[None]:
        """SIGTERM every child (each drains); SIGKILL what is left after ``timeout``; fires once all exited."""
        self.stopping = True
        workers = list(self.live.values())
        if not workers:
            return defer.succeed(None)
        for worker in workers:
            worker.signal(signal.SIGTERM)
        killer = self.reactor.callLater(timeout, self._kill, workers)
        done = defer.gatherResults([w.exited for w in workers])

        def finished(_: object) -> None:
            if killer.active():
                killer.cancel()

        return done.addCallback(finished)

    def _kill(self, workers: list[WorkerProcess]) -> None:
        for worker in workers:
            if worker.index in self.live:
                log.error("worker {index} did not stop in time: killed", index=worker.index)
                worker.signal(signal.SIGKILL)


# -- a child worker's side -----------------------------------------------------


class CountedService(SnapshotSource, Protocol):
    """What a child's :class:`SnapshotSender` needs of its service: the counters and a clock.

    ``EgressService`` provides it; naming it here keeps this module below the
    service (which imports it) rather than beside it in an import cycle.
    """

    reactor: IReactorTime


class SnapshotSender:
    """Writes the service's counters to the main worker once a second, never blocking.

    The pipe is non-blocking: a line the pipe cannot take now is finished
    before the next one starts, and a snapshot due while one is still
    pending is skipped (the next supersedes it anyway).
    """

    def __init__(self, service: CountedService, fd: int = SNAPSHOT_FD) -> None:
        self.service = service
        self.fd = fd
        self.pending = b""
        self.broken = False
        os.set_blocking(fd, False)
        self._loop = LoopingCall(self.send)
        self._loop.clock = service.reactor

    def start(self) -> None:
        self._loop.start(SNAPSHOT_INTERVAL, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        self.send()

    def send(self) -> None:
        if self.broken:
            return
        if not self.pending:
            self.pending = json.dumps(snapshot.take(self.service), separators=(",", ":")).encode() + b"\n"
        while self.pending:
            try:
                written = os.write(self.fd, self.pending)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno != errno.EINTR:
                    self.broken = True  # the main worker is gone; stdin EOF ends us
                    return
                continue
            self.pending = self.pending[written:]


class ParentWatch(FileDescriptor):
    """Reads the child's standard input, a pipe from the main worker; EOF means it is gone."""

    def __init__(self, reactor: Any, on_gone: Callable[[], None], fd: int = 0) -> None:
        super().__init__(reactor=reactor)
        self.fd = fd
        self.on_gone = on_gone
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self.fd

    #: The pipe ended: the main worker closed it or exited.
    gone = False

    def doRead(self) -> object:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            self.gone = True
            return main.CONNECTION_LOST
        if data:
            return None  # nothing is ever sent on it; ignore
        self.gone = True
        return main.CONNECTION_DONE

    def connectionLost(self, reason: Failure) -> None:
        # Also called when this worker's own reactor shuts down: only an
        # ended pipe means the main worker is gone.
        self.reactor.removeReader(self)
        if self.gone:
            log.info("the main worker is gone: draining")
            self.on_gone()
