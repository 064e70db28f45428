"""EgressService: the root of the running proxy and its lifecycle.

Design notes
------------

The service is built from one immutable :class:`Config` and owns the runtime
objects it describes: one :class:`UpstreamCluster` (plus health checker) per
cluster, one :class:`ListenerRuntime` plus bound port per listener, and the
two HTTP services (metrics, admin).

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
a bad file changes nothing (logged, counted, old config keeps serving).  New
ports are bound before anything else changes, so a taken port also leaves
the running config untouched.  Then: clusters and listeners that persist are
updated *in place* (their counters, and so Prometheus counters, continue;
live sessions keep the cluster they dialled); removed listeners stop
accepting while their live connections carry on undisturbed; added ones
start.  The admin and metrics addresses are fixed at start-up: a change to
them is reported and needs a restart.

**Workers** (``workers: N``, :mod:`egressproxy.workers`).  Each process runs
one of these services with its share of the limits (``_prepare``).  The main
worker (index 0) alone serves admin and metrics, starts the others once its
ports are bound, adds their counters to its scrapes, passes a successful
reload on, and stops them as its drain begins (its drain completes when they
have exited).  The others report their counters and drain when the main
worker goes away.

Rejected alternative: building a fresh service tree per reload and swapping
it in.  It would reset every counter and orphan live sessions' accounting.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import IO, Callable, Mapping

import attrs
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IListeningPort, IReactorCore
from twisted.internet.task import deferLater
from twisted.logger import Logger

from twisted.web.server import Site

from egressproxy.accesslog import make_access_logger
from egressproxy.addrguard import OwnSockets
from egressproxy.admin import ADMIN_TOKEN_ENV, admin_token, build_admin_site, build_metrics_site
from egressproxy.addresses import format_host_port, peer_ip
from egressproxy.config import ClusterConfig, Config, ConfigError, HealthCheckConfig, ListenerConfig, load_config
from egressproxy.fastpath import FastPath
from egressproxy.health import HealthChecker
from egressproxy.listen import ListenError, listen
from egressproxy.listener import ListenerFactory, ListenerRuntime
from egressproxy.metrics import make_registry
from egressproxy.snapshot import Snapshot
from egressproxy.upstream import UpstreamCluster
from egressproxy.workers import (
    STOP_GRACE,
    ParentWatch,
    SnapshotSender,
    WorkerPool,
    share_cluster_limits,
    share_limits,
    worker_argv,
)


def format_bound(port: IListeningPort) -> str:
    """The address a port really bound, e.g. ``[::]:5432`` or ``127.0.0.1:40123``."""
    host = port.getHost()
    if isinstance(host, (IPv4Address, IPv6Address)):
        return format_host_port(host.host, host.port)
    return str(getattr(host, "name", host))


class EgressService(MultiService):
    """Listeners, clusters, HTTP services and their lifecycle; see the module notes."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: IReactorCore,
        access_stream: IO[str] | None = None,
        reload_config: Callable[[], Config] | None = None,
        worker_index: int = 0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        #: Where ``EGRESSPROXY_ADMIN_TOKEN`` is read, at start and on each successful reload.
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        #: The bearer token ``POST /drain`` and ``/reload`` need (None: none needed); see admin.py.
        self.admin_token = admin_token(self.environ)
        #: 0 for the main worker (the only one with ``workers: 1``); see egressproxy.workers.
        self.worker_index = worker_index
        #: Fixed at start: a reload cannot change how many processes share the work.
        self.worker_count = config.workers
        config = self._prepare(config)
        self.config = config
        self.reactor = reactor
        self.access_stream = access_stream if access_stream is not None else sys.stdout
        self.access_log = make_access_logger(self.access_stream, config.access_log.format)
        self._reload_config = reload_config or (lambda: load_config(self.config.source, os.environ))
        #: Called once a drain requested over HTTP is complete (twistd: reactor.stop).
        self.exit_after_drain: Callable[[], None] | None = None
        #: Take over SIGTERM, SIGINT and SIGHUP once the reactor runs (twistd only).
        self.handle_signals = False
        #: Start the other workers of ``workers: N`` (twistd's main worker only).
        self.spawn_workers = False
        self.pool: WorkerPool | None = None
        self._snapshots: SnapshotSender | None = None
        #: Never dialled, by any mode (``addrguard``): read live from ``ports`` and ``http_ports``.
        self.own_sockets = OwnSockets(self._bound_sockets)
        self.clusters = {c.name: self._new_cluster(c) for c in config.clusters}
        #: The data path's shortcuts (``fast_path``): checked and installed at start, shared by every listener.
        self.fast_path = FastPath()
        #: Per listener without a ``cluster``: the limits for the destinations it picks.
        self.dynamic: dict[str, UpstreamCluster] = {}
        self.listeners = {
            l.name: ListenerRuntime(l, self._cluster_for(l, self.clusters), reactor, self.access_log)
            for l in config.listeners
        }
        for runtime in self.listeners.values():
            runtime.named_cluster = self.clusters_get
            runtime.fast_path = self.fast_path
        #: Listeners removed by a reload whose connections are still live.
        self.retired: list[ListenerRuntime] = []
        self.ports: dict[str, IListeningPort] = {}
        self.http_ports: dict[str, IListeningPort] = {}
        self.checkers: dict[str, object] = {}
        self.reloads = {"success": 0, "error": 0}
        self.draining = False
        self._bound = False
        self._drained: defer.Deferred[None] | None = None

    def _prepare(self, config: Config) -> Config:
        """The config as this worker runs it: its share of the limits; HTTP services on the main worker only."""
        if self.worker_index > 0:
            config = attrs.evolve(config, admin=None, metrics=None)
        return share_limits(config, self.worker_count)

    # -- state read by the HTTP services -----------------------------------

    @property
    def ready(self) -> bool:
        """Serving: every listener bound and no drain begun."""
        return self._bound and not self.draining

    def live_sessions(self) -> int:
        """Live connections, admitted or still awaiting a PROXY header."""
        runtimes = list(self.listeners.values()) + self.retired
        return sum(r.active + len(r.awaiting) for r in runtimes)

    def is_own_upstream(self, address: IAddress) -> bool:
        """Whether ``address`` is the local end of one of this worker's live upstream connections.

        The HTTP services refuse such peers: the request came through the
        proxy itself.  It costs one ``getsockname`` per live upstream
        connection, per HTTP request (as a scrape already sums every live
        session's bytes).  Other workers' connections are not seen
        (``workers: N``): the address guard on dials is the first line there.
        """
        ip = peer_ip(address)
        if ip is None:
            return False
        port = address.port  # type: ignore[attr-defined]
        for runtime in list(self.listeners.values()) + self.retired:
            for session in runtime.sessions:
                up = session.up
                transport = up.transport if up is not None and not up.lost else None
                if transport is None:
                    continue
                local = transport.getHost()
                if getattr(local, "port", None) == port and peer_ip(local) == ip:
                    return True
        return False

    def all_clusters(self) -> dict[str, UpstreamCluster]:
        """Configured and dynamic clusters, by the name metrics and admin show."""
        return {**self.clusters, **{c.name: c for c in self.dynamic.values()}}

    def worker_snapshots(self) -> list[Snapshot]:
        """The other workers' counters, for the metrics collector (main worker only)."""
        return self.pool.snapshots() if self.pool is not None else []

    def clusters_get(self, name: str) -> UpstreamCluster | None:
        """The configured cluster called ``name`` now (reloads included), else None."""
        return self.clusters.get(name)

    def _new_cluster(self, config, label: str | None = None) -> UpstreamCluster:  # type: ignore[no-untyped-def]
        # Pins are looked up in the current config, so a reload's hosts: apply.
        cluster = UpstreamCluster(config, self.reactor, lambda host: self.config.pinned_address(host), label)
        cluster.own = self.own_sockets
        return cluster

    def _bound_sockets(self) -> list[tuple[str, int]]:
        """(host, port) of every socket this process listens on now: listeners, admin, metrics."""
        bound = []
        for port in list(self.ports.values()) + list(self.http_ports.values()):
            address = port.getHost()
            host = getattr(address, "host", None)
            if host is not None:
                bound.append((host, address.port))
        return bound

    def _cluster_for(self, listener: ListenerConfig, clusters: dict[str, UpstreamCluster]) -> UpstreamCluster:
        """The listener's cluster, or its dynamic one (default limits, ``NAME.dynamic`` in metrics).

        A dynamic cluster has no endpoints of its own: its front dials the
        destinations it chose, under the cluster's breaker and timeouts,
        which therefore apply per listener.
        """
        if listener.cluster is not None:
            return clusters[listener.cluster]
        if listener.name not in self.dynamic:
            config = ClusterConfig(name=listener.name, endpoints=(), health_check=HealthCheckConfig(kind="none"))
            config = share_cluster_limits(config, self.worker_count)
            self.dynamic[listener.name] = self._new_cluster(config, f"{listener.name}.dynamic")
        return self.dynamic[listener.name]

    # -- start --------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind every port now, or none: see the module notes."""
        if self._bound:
            return
        try:
            for name, runtime in self.listeners.items():
                self.ports[name] = self._bind_listener(runtime)
            self._bind_http()
        except ListenError as e:
            for port in list(self.ports.values()) + list(self.http_ports.values()):
                port.stopListening()
            self.ports.clear()
            self.http_ports.clear()
            raise SystemExit(f"egressproxy: {e}") from None
        self._bound = True
        super().privilegedStartService()

    def _bind_listener(self, runtime: ListenerRuntime) -> IListeningPort:
        try:
            port = listen(
                self.reactor, runtime.config.listen, ListenerFactory(runtime), reuse_port=self.worker_count > 1
            )
        except ListenError as e:
            raise ListenError(f"listener {runtime.config.name!r}: {e}") from None
        self.log.info(
            "listener {name} ({mode}) listening on {address} -> cluster {cluster}",
            name=runtime.config.name,
            mode=runtime.config.mode,
            address=format_bound(port),
            cluster=runtime.cluster.name,
        )
        return port

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
        # The data path's shortcuts: each checked against the installed
        # Twisted and this reactor, each part that cannot run logged and left
        # on Twisted's path; ``fast_path: false`` turns all off (one log line).
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

    def _start_checkers(self, clusters: dict[str, UpstreamCluster]) -> None:
        for name, cluster in clusters.items():
            checker = HealthChecker(cluster, self.reactor)
            checker.start()
            self.checkers[name] = checker

    def _stop_checkers(self, names: list[str]) -> defer.Deferred[None]:
        """Stop these clusters' checkers; fires once their probe connections are closed."""
        stopping = []
        for name in names:
            checker = self.checkers.pop(name, None)
            if checker is not None:
                stopping.append(checker.stop())
        return defer.gatherResults(stopping).addCallback(lambda _: None)

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

    def abort_sessions(self, flag: str | None = None) -> None:
        """Drop every live connection now, marking each with ``flag`` if given."""
        for runtime in list(self.listeners.values()) + self.retired:
            for session in list(runtime.sessions) + list(runtime.awaiting):
                if flag:
                    session.flag(flag)
                session.abort()

    def stopService(self) -> defer.Deferred[None]:
        d = self.drain()
        d.addCallback(lambda _: self.fast_path.uninstall())
        d.addCallback(lambda _: super(EgressService, self).stopService())
        return d.addCallback(lambda _: None)

    # -- reload -------------------------------------------------------------

    def reload(self) -> tuple[bool, str]:
        """Re-read the config file and apply it; (True, summary) or (False, why not)."""
        if self.draining:
            return False, "draining: reload refused"
        try:
            loaded = self._reload_config()
            summary = self._apply(self._prepare(loaded))
        except (ConfigError, ListenError) as e:
            self.reloads["error"] += 1
            self.log.error("reload failed; the running config stays in force:\n{error}", error=str(e))
            return False, str(e)
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

    def _apply(self, new: Config) -> str:
        old = self.config
        old_listeners = {l.name: l for l in old.listeners}
        new_listeners = {l.name: l for l in new.listeners}
        added = [n for n in new_listeners if n not in old_listeners]
        removed = [n for n in old_listeners if n not in new_listeners]
        rebound = [
            n for n in new_listeners
            if n in old_listeners and new_listeners[n].listen != old_listeners[n].listen
        ]
        kept = [n for n in new_listeners if n in old_listeners]
        changed_clusters = []

        # 1. Clusters: new runtimes for new ones; persisting ones are
        #    reconfigured only after the binds below succeed.
        new_clusters = {c.name: c for c in new.clusters}
        fresh = {name: self._new_cluster(c) for name, c in new_clusters.items() if name not in self.clusters}
        cluster_of = {**self.clusters, **fresh}

        # 2. Bind every new address first: a failure leaves all as it was.
        bound: dict[str, IListeningPort] = {}
        runtimes: dict[str, ListenerRuntime] = {}
        try:
            for name in added:
                runtimes[name] = ListenerRuntime(
                    new_listeners[name], self._cluster_for(new_listeners[name], cluster_of), self.reactor,
                    self.access_log,
                )
                runtimes[name].named_cluster = self.clusters_get
                runtimes[name].fast_path = self.fast_path
                bound[name] = self._bind_listener(runtimes[name])
            for name in rebound:
                factory = ListenerFactory(self.listeners[name])
                try:
                    bound[name] = listen(self.reactor, new_listeners[name].listen, factory)
                except ListenError as e:
                    raise ListenError(f"listener {name!r}: {e}") from None
        except ListenError:
            for port in bound.values():
                port.stopListening()
            raise

        # 3. Commit.
        self.config = new
        if new.access_log != old.access_log:
            self.access_log = make_access_logger(self.access_stream, new.access_log.format)
        for name, cluster_config in new_clusters.items():
            runtime = cluster_of[name]
            if name in self.clusters and runtime.config != cluster_config:
                runtime.reconfigure(cluster_config)
                changed_clusters.append(name)
        gone_clusters = [name for name in self.clusters if name not in new_clusters]
        self._stop_checkers(gone_clusters + changed_clusters)
        self.clusters = {name: cluster_of[name] for name in new_clusters}
        for name in kept:
            runtime = self.listeners[name]
            runtime.config = new_listeners[name]
            runtime.cluster = self._cluster_for(new_listeners[name], self.clusters)
            runtime.access_log = self.access_log
        for name in rebound:
            old_port = self.ports.pop(name)
            old_port.stopListening()
            self.ports[name] = bound[name]
        for name in added:
            self.listeners[name] = runtimes[name]
            self.ports[name] = bound[name]
        for name in removed:
            self.dynamic.pop(name, None)
            runtime = self.listeners.pop(name)
            self.ports.pop(name).stopListening()
            if runtime.sessions or runtime.awaiting:
                self.retired.append(runtime)
        self.retired = [r for r in self.retired if r.sessions or r.awaiting]
        self._start_checkers({n: self.clusters[n] for n in list(fresh) + changed_clusters})
        if (new.admin, new.metrics) != (old.admin, old.metrics):
            self.log.warn("admin and metrics addresses changed: that takes a restart")
        if new.fast_path != old.fast_path and self.running:
            # Connections spliced from now on follow the new setting; live ones keep theirs.
            self.fast_path.install(self.reactor, new.fast_path)
        parts = [
            f"{len(added)} listener(s) added" if added else "",
            f"{len(removed)} removed" if removed else "",
            f"{len(rebound)} rebound" if rebound else "",
            f"{len(fresh)} cluster(s) added" if fresh else "",
            f"{len(changed_clusters)} cluster(s) changed" if changed_clusters else "",
            f"{len(gone_clusters)} cluster(s) removed" if gone_clusters else "",
        ]
        return ", ".join(p for p in parts if p) or "no changes"
