"""EgressService: the root of the running proxy and its lifecycle.

Design notes
------------

The service is built from one immutable :class:`Config`.  The runtime
objects it describes (one :class:`UpstreamCluster` plus health checker per
cluster, one :class:`ListenerRuntime` plus bound port per listener) are kept
by :class:`~egressproxy.app.runtimes.ServiceRuntimes`, which this class extends
with the lifecycle and the two HTTP services (metrics, admin).

**Start.**  Every port is bound in ``privilegedStartService``, synchronously
and before the reactor runs.  If any bind fails, the ports already bound are
closed and start-up stops with :class:`SystemExit` carrying a one-line
message, so ``twistd`` exits 1 instead of running with a listener missing
(a bare ``StreamServerEndpointService`` only logs).  ``/ready`` answers 200
from then on.

**Drain** (SIGTERM, SIGINT, ``POST /drain``).  All three call
:meth:`request_drain`, which runs the drain and then stops the reactor, so the
process exits 0.  Anything else that stops the reactor runs ``stopService``,
which waits for the same drain:

1. ``/ready`` turns 503 at once; listeners keep accepting for
   ``shutdown_delay``, so whatever routes here (Fly's proxy, which stops
   routing to a stopping Machine; a load balancer polling ``/ready``) moves
   away before anything is refused;
2. listeners stop accepting;
3. live connections get up to ``drain_timeout`` to finish on their own;
4. the rest are aborted (access-log flag ``DT``), health checks and the HTTP
   services stop last, so ``/ready`` keeps saying 503 throughout.

``MultiService.stopService`` of the application calls us again while the
reactor stops after a drain; the drain is idempotent.

**Reload** (SIGHUP, ``POST /reload``).  The file is read and validated whole;
a bad file changes nothing (logged, counted, old config keeps serving).  It
is then applied in place (``runtimes.py``), new ports bound first.  The
admin and metrics addresses are fixed at start-up: a change to them is
reported and needs a restart.

**Workers** (``workers: N``, :mod:`egressproxy.app.workers`).  Each process runs
one of these services with its share of the limits (``_prepare``).  The main
worker (index 0) alone serves admin and metrics, starts the others once its
ports are bound, adds their counters to its scrapes, passes a successful
reload on, and stops them as its drain begins (its drain completes when they
have exited).  The others report their counters and drain when the main
worker goes away.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import IO, Callable, Mapping

import attrs
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IReactorCore
from twisted.internet.task import deferLater
from twisted.web.server import Site

from egressproxy.upstream.addrguard import OwnSockets
from egressproxy.observe.egressip import EgressIpWatch
from egressproxy.app.egressgate import EgressGate
from egressproxy.observe.admin import ADMIN_TOKEN_ENV, admin_token, build_admin_site, build_metrics_site
from egressproxy.config import Config, ConfigError, load_config
from egressproxy.app.listen import ListenError, listen
from egressproxy.observe.metrics import make_registry
from egressproxy.observe.origin import Origin
from egressproxy.app.runtimes import ServiceRuntimes, format_bound
from egressproxy.observe.snapshot import Snapshot
from egressproxy.app.workers import STOP_GRACE, ParentWatch, SnapshotSender, WorkerPool, share_limits, worker_argv


class EgressService(ServiceRuntimes, MultiService):
    """Listeners, clusters, HTTP services and their lifecycle; see the module notes."""

    def __init__(
        self,
        config: Config,
        reactor: IReactorCore,
        access_stream: IO[str] | None = None,
        reload_config: Callable[[], Config] | None = None,
        worker_index: int = 0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        MultiService.__init__(self)
        #: Where ``EGRESSPROXY_ADMIN_TOKEN`` is read, at start and on each successful reload.
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        #: The bearer token ``POST /drain`` and ``/reload`` need (None: none needed); see admin.py.
        self.admin_token = admin_token(self.environ)
        #: 0 for the main worker (the only one with ``workers: 1``); see egressproxy.app.workers.
        self.worker_index = worker_index
        #: Fixed at start: a reload cannot change how many processes share the work.
        self.worker_count = config.workers
        self.http_ports: dict[str, IListeningPort] = {}
        self._bound_key: tuple[IListeningPort, ...] = ()
        self._bound_cache: list[tuple[str, int]] = []
        ServiceRuntimes.__init__(
            self,
            self._prepare(config),
            reactor,
            access_stream if access_stream is not None else sys.stdout,
            config.workers,
            # Never dialled, by any mode (``addrguard``): read live from ``ports`` and ``http_ports``.
            OwnSockets(self._bound_sockets),
            Origin.from_environ(self.environ),
        )
        self._reload_config = reload_config or (lambda: load_config(self.config.source, os.environ))
        #: Called once a drain requested over HTTP is complete (twistd: reactor.stop).
        self.exit_after_drain: Callable[[], None] | None = None
        #: Take over SIGTERM, SIGINT and SIGHUP once the reactor runs (twistd only).
        self.handle_signals = False
        #: Start the other workers of ``workers: N`` (twistd's main worker only).
        self.spawn_workers = False
        self.pool: WorkerPool | None = None
        self._snapshots: SnapshotSender | None = None
        self.reloads = {"success": 0, "error": 0}
        self.draining = False
        self._bound = False
        self._drained: defer.Deferred[None] | None = None
        #: The egress-address check (``expected_egress_ips``); None without it.
        self.egress: EgressIpWatch | None = None
        #: Closes the listeners while the egress address is unexpected (``when_unexpected: close_listeners``).
        self.gate: EgressGate | None = None

    def _prepare(self, config: Config) -> Config:
        """The config as this worker runs it: its share of the limits; HTTP services on the main worker only."""
        if self.worker_index > 0:
            config = attrs.evolve(config, admin=None, metrics=None)
        return share_limits(config, self.worker_count)

    # -- state read by the HTTP services -----------------------------------

    @property
    def ready(self) -> bool:
        """Serving: every listener bound, no drain begun, and egressing from an expected address."""
        return self._bound and not self.draining and (self.egress is None or self.egress.ready)

    def not_ready_reason(self) -> str:
        """What /ready says when it answers 503."""
        if self.draining:
            return "draining"
        if self.egress is not None and not self.egress.ready:
            return self.egress.reason()
        return "starting"

    def worker_snapshots(self) -> list[Snapshot]:
        """The other workers' counters, for the metrics collector (main worker only)."""
        return self.pool.snapshots() if self.pool is not None else []

    def _bound_sockets(self) -> list[tuple[str, int]]:
        """(host, port) of every socket this process listens on now: listeners, admin, metrics.

        Asked on every dial, so the answer is kept until the set of ports
        changes (a bound socket's address never does): no ``getsockname``
        per connection.
        """
        ports = (*self.ports.values(), *self.http_ports.values())
        if ports == self._bound_key:  # the same port objects (held here, so never a reused id)
            return self._bound_cache
        bound = []
        for port in ports:
            address = port.getHost()
            host = getattr(address, "host", None)
            if host is not None:
                bound.append((host, address.port))
        self._bound_key, self._bound_cache = ports, bound
        return bound

    # -- start --------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind every port now, or none: see the module notes."""
        if self._bound:
            return
        try:
            for name, runtime in self.listeners.items():
                self.ports[name] = self._bind_listener(runtime)
            self._tune_listening_sockets()
            self._bind_http()
        except ListenError as e:
            for port in list(self.ports.values()) + list(self.http_ports.values()):
                port.stopListening()
            self.ports.clear()
            self.http_ports.clear()
            raise SystemExit(f"egressproxy: {e}") from None
        self._bound = True
        super().privilegedStartService()

    def _bind_http(self) -> None:
        """Bind the metrics and admin HTTP services, if configured."""
        sites = self._http_sites()
        for name, service_config in (("metrics", self.config.metrics), ("admin", self.config.admin)):
            if service_config is None or name not in sites:
                continue
            try:
                port = listen(self.reactor, service_config.listen, sites[name])
            except ListenError as e:
                raise ListenError(f"{name}: {e}") from None
            self.http_ports[name] = port
            self.log.info("{name} HTTP service listening on {address}", name=name, address=format_bound(port))
            if name == "admin":
                self._log_admin_token()

    def _log_admin_token(self) -> None:
        if self.admin_token is not None:
            self.log.info("admin: POST /drain and /reload need the bearer token in {env}", env=ADMIN_TOKEN_ENV)
        else:
            self.log.warn(
                "admin: {env} is not set: anyone who reaches the admin address can drain and reload",
                env=ADMIN_TOKEN_ENV,
            )

    def _http_sites(self) -> dict[str, Site]:
        """The metrics and admin sites, sharing one registry (never the global one)."""
        registry = make_registry(self)
        return {"metrics": build_metrics_site(self, registry), "admin": build_admin_site(self, registry)}

    def startService(self) -> None:
        if not self._bound:
            # startService without privilegedStartService (e.g. in tests).
            self.privilegedStartService()
        self._start_checkers(self.clusters)
        self._start_egress_check()
        # The data path's shortcuts: each checked against the installed
        # Twisted and this reactor, each part that cannot run logged and left
        # on Twisted's path; ``fast_path: off`` turns all off (one log line).
        # ``auto`` also starts this process's compiled relay when it loads.
        self.fast_path.install(self.reactor, self.config.fast_path)
        if self.handle_signals:
            self.reactor.callWhenRunning(self._install_signal_handlers)
        if self.worker_index > 0:
            self._watch_main_worker()
        elif self.spawn_workers and self.worker_count > 1:
            self.pool = WorkerPool(
                self.reactor, self.worker_count, lambda index: worker_argv(self.config.source, index)
            )
            self.pool.start()
        super().startService()

    def _start_egress_check(self) -> None:
        """With ``expected_egress_ips``: learn the egress address by STUN, not ready until it is expected.

        With ``when_unexpected: close_listeners`` every worker checks, and its
        gate closes its own listening sockets while the address is unexpected
        (``egressgate.py``); otherwise only the main worker checks, for /ready.
        """
        config = self.config
        check = config.egress_ip_check
        if config.expected_egress_ips is None or check is None:
            return
        closes = check.when_unexpected == "close_listeners"
        if self.worker_index > 0 and not closes:
            return
        self.gate = EgressGate(self, check.interval) if closes else None
        self.egress = EgressIpWatch(
            self.reactor, [(a.host, a.port) for a in check.stun], frozenset(config.expected_egress_ips),
            check.interval, on_change=self.gate.changed if self.gate is not None else None,
        )
        self.egress.start()

    def _watch_main_worker(self) -> None:
        """A child worker: report counters to the main worker, drain when it is gone."""
        self._snapshots = SnapshotSender(self)
        self._snapshots.start()
        self.reactor.addReader(ParentWatch(self.reactor, self.request_drain))  # type: ignore[attr-defined]

    def _install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT drain, SIGHUP reloads.

        The reactor's own SIGTERM/SIGINT handlers (installed as it starts,
        hence ``callWhenRunning``) stop it at once and make twistd re-raise
        the signal on exit, so a drained process would not exit 0.  Ours run
        the drain and then stop the reactor themselves.  Handlers only hand
        work to the reactor thread.
        """
        def on(handler):  # type: ignore[no-untyped-def]
            return lambda *_: self.reactor.callFromThread(handler)

        signal.signal(signal.SIGTERM, on(self.request_drain))
        signal.signal(signal.SIGINT, on(self.request_drain))
        signal.signal(signal.SIGHUP, on(self.reload))

    # -- drain and stop -----------------------------------------------------

    def request_drain(self) -> None:
        """Begin the drain (SIGTERM, SIGINT, ``POST /drain``); the process exits once it is done."""
        drained = self.drain()
        if self.exit_after_drain is not None:
            exit_ = self.exit_after_drain
            self.exit_after_drain = None
            drained.addCallback(lambda _: exit_())

    def drain(self) -> defer.Deferred[None]:
        """Run the drain sequence once; every caller gets the same Deferred."""
        if self._drained is None:
            self._drained = defer.ensureDeferred(self._drain())
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.addBoth(lambda result: (d.callback(None), result)[1])
        return d

    async def _drain(self) -> None:
        config = self.config
        self.draining = True
        children: defer.Deferred[None] | None = None
        if self.pool is not None:
            children = self.pool.stop(config.shutdown_delay + config.drain_timeout + STOP_GRACE)
        self.log.info(
            "draining: /ready is 503; accepting for {delay}s more, then up to {timeout}s for {live} connections",
            delay=config.shutdown_delay,
            timeout=config.drain_timeout,
            live=self.live_sessions(),
        )
        if config.shutdown_delay > 0:
            await deferLater(self.reactor, config.shutdown_delay, lambda: None)
        await self._stop_listening(list(self.ports))
        await self._wait_for_sessions(config.drain_timeout)
        left = self.live_sessions()
        if left:
            self.log.info("drain timeout: cutting {left} connections", left=left)
            self.abort_sessions(flag="DT")
            await self._wait_for_sessions(5.0)
        else:
            self.log.info("drained: no connections left")
        await self._stop_checkers(list(self.checkers))
        if children is not None:
            await children
        if self._snapshots is not None:
            self._snapshots.stop()  # the final counts
        stopping = [defer.maybeDeferred(port.stopListening) for port in self.http_ports.values()]
        self.http_ports.clear()
        await defer.gatherResults(stopping)

    async def _stop_listening(self, names: list[str]) -> None:
        stopping = [defer.maybeDeferred(self.ports.pop(name).stopListening) for name in names]
        await defer.gatherResults(stopping)

    async def _wait_for_sessions(self, timeout: float) -> None:
        """Wait until no connection is live, or ``timeout`` seconds (checked 10 times a second)."""
        step = 0.1
        for _ in range(int(timeout / step) + 1):
            if not self.live_sessions():
                return
            await deferLater(self.reactor, step, lambda: None)

    def stopService(self) -> defer.Deferred[None]:
        if self.egress is not None:
            self.egress.stop()
        d = self.drain()
        d.addCallback(lambda _: self.fast_path.uninstall())
        d.addCallback(lambda _: super(EgressService, self).stopService())
        return d.addCallback(lambda _: None)

    # -- reload -------------------------------------------------------------

    def reload(self) -> tuple[bool, str]:
        """Re-read the config file and apply it; (True, summary) or (False, why not)."""
        if self.draining:
            return False, "draining: reload refused"
        old = self.config
        try:
            loaded = self._reload_config()
            summary = self._apply(self._prepare(loaded))
            if self.gate is not None:
                self.gate.enforce()
        except (ConfigError, ListenError) as e:
            self.reloads["error"] += 1
            self.log.error("reload failed; the running config stays in force:\n{error}", error=str(e))
            return False, str(e)
        new = self.config
        if (new.admin, new.metrics) != (old.admin, old.metrics):
            self.log.warn("admin and metrics addresses changed: that takes a restart")
        if new.fast_path != old.fast_path and self.running:
            # Connections spliced from now on follow the new setting; live ones keep theirs.
            self.fast_path.install(self.reactor, new.fast_path)
        self.reloads["success"] += 1
        token = admin_token(self.environ)
        if token != self.admin_token:
            self.admin_token = token
            if self.http_ports.get("admin") is not None:
                self._log_admin_token()
        if loaded.workers != self.worker_count:
            summary += f"; workers stays {self.worker_count} until a restart"
        self.log.info("config reloaded: {summary}", summary=summary)
        if self.pool is not None:
            self.pool.signal(signal.SIGHUP)
        return True, summary
