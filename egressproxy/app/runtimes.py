"""The running objects one config describes, and how a reloaded config is applied to them in place.

:class:`ServiceRuntimes` holds one :class:`UpstreamCluster` (and its health
checker) per cluster, a dynamic cluster per listener without one (the limits
for the destinations its front picks), and one :class:`ListenerRuntime` plus
its bound port per listener, with the listeners a reload removed while their
connections are still live.  ``EgressService`` (``service.py``) is built on
it and adds the lifecycle: binding at start, the HTTP services, signals,
workers, the drain.

**Reload** (:meth:`ServiceRuntimes._apply`).  New ports are bound before
anything else changes, so a taken port leaves the running config untouched.
Then: clusters and listeners that persist are updated *in place* (their
counters, and so Prometheus counters, continue; live sessions keep the
cluster they dialled); removed listeners stop accepting while their live
connections carry on undisturbed; added ones start.

Rejected alternative: building a fresh service tree per reload and swapping
it in.  It would reset every counter and orphan live sessions' accounting.
"""

from __future__ import annotations

from typing import IO

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IListeningPort, IReactorCore
from twisted.logger import Logger

from egressproxy.observe.accesslog import make_access_logger
from egressproxy.observe.origin import NO_ORIGIN, Origin
from egressproxy.upstream.addrguard import OwnSockets
from egressproxy.addresses import format_host_port, peer_ip
from egressproxy.config import ClusterConfig, Config, HealthCheckConfig, ListenAddress, ListenerConfig
from egressproxy.datapath.fastpath import FastPath
from egressproxy.datapath.sockopts import NOT_TUNED, tune_listening_socket
from egressproxy.upstream.health import HealthChecker
from egressproxy.app.configdiff import describe_changes
from egressproxy.app.listen import ListenError, listen
from egressproxy.datapath.listener import ListenerFactory, ListenerRuntime
from egressproxy.datapath.quicklane import QuickLane, port_supported
from egressproxy.upstream.cluster import UpstreamCluster
from egressproxy.app.workers import share_cluster_limits


def format_bound(port: IListeningPort) -> str:
    """The address a port really bound, e.g. ``[::]:5432`` or ``127.0.0.1:40123``."""
    host = port.getHost()
    if isinstance(host, (IPv4Address, IPv6Address)):
        return format_host_port(host.host, host.port)
    return str(getattr(host, "name", host))


class ServiceRuntimes:
    """Clusters, listeners, their ports and health checkers for the config in force; see the module notes."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: IReactorCore,
        access_stream: IO[str],
        worker_count: int,
        own_sockets: OwnSockets,
        origin: Origin = NO_ORIGIN,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.access_stream = access_stream
        #: This Machine's region and ID (on Fly), written on every access line.
        self.origin = origin
        self.access_log = make_access_logger(access_stream, config.access_log.format, origin)
        #: How many processes share the limits (``workers: N``); see egressproxy.app.workers.
        self.worker_count = worker_count
        #: Never dialled, by any mode (``addrguard``).
        self.own_sockets = own_sockets
        self.clusters = {c.name: self._new_cluster(c) for c in config.clusters}
        #: The data path's shortcuts (``fast_path``): checked and installed at start, shared by every listener.
        self.fast_path = FastPath()
        #: Per listener without a ``cluster``: the limits for the destinations it picks.
        self.dynamic: dict[str, UpstreamCluster] = {}
        self.listeners = {l.name: self._new_listener(l, self.clusters) for l in config.listeners}
        #: Listeners removed by a reload whose connections are still live.
        self.retired: list[ListenerRuntime] = []
        self.ports: dict[str, IListeningPort] = {}
        self.checkers: dict[str, object] = {}

    # -- state read by the HTTP services -----------------------------------

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
                # A relayed pair's socket is the relay's: its address was kept at the hand-off.
                local = session.relayed_local or transport.getHost()
                if getattr(local, "port", None) == port and peer_ip(local) == ip:
                    return True
        return False

    def all_clusters(self) -> dict[str, UpstreamCluster]:
        """Configured and dynamic clusters, by the name metrics and admin show."""
        return {**self.clusters, **{c.name: c for c in self.dynamic.values()}}

    def clusters_get(self, name: str) -> UpstreamCluster | None:
        """The configured cluster called ``name`` now (reloads included), else None."""
        return self.clusters.get(name)

    def abort_sessions(self, flag: str | None = None) -> None:
        """Drop every live connection now, marking each with ``flag`` if given."""
        for runtime in list(self.listeners.values()) + self.retired:
            for session in list(runtime.sessions) + list(runtime.awaiting):
                if flag:
                    session.flag(flag)
                session.abort()

    # -- making runtimes ----------------------------------------------------

    def _new_cluster(self, config, label: str | None = None) -> UpstreamCluster:  # type: ignore[no-untyped-def]
        # Pins are looked up in the current config, so a reload's hosts: apply.
        cluster = UpstreamCluster(config, self.reactor, lambda host: self.config.pinned_address(host), label)
        cluster.own = self.own_sockets
        return cluster

    def _new_listener(self, config: ListenerConfig, clusters: dict[str, UpstreamCluster]) -> ListenerRuntime:
        runtime = ListenerRuntime(config, self._cluster_for(config, clusters), self.reactor, self.access_log)
        runtime.named_cluster = self.clusters_get
        runtime.fast_path = self.fast_path
        return runtime

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

    def _bind_listener(self, runtime: ListenerRuntime, address: ListenAddress | None = None) -> IListeningPort:
        """Bind ``runtime``'s listen address (or ``address``: the egress gate reopening the port it had)."""
        factory = ListenerFactory(runtime)
        try:
            port = listen(self.reactor, address or runtime.config.listen, factory, reuse_port=self.worker_count > 1)
        except ListenError as e:
            raise ListenError(f"listener {runtime.config.name!r}: {e}") from None
        if port_supported(port):
            # The quick lane takes accepted sockets the ordinary path would
            # give a Twisted transport (quicklane.py), when it may.
            factory.lane = lane = QuickLane(runtime, self.reactor)
            lane.ordinary = port.transport
            port.transport = lane.transport
        self.log.info(
            "listener {name} ({mode}) listening on {address} -> cluster {cluster}",
            name=runtime.config.name,
            mode=runtime.config.mode,
            address=format_bound(port),
            cluster=runtime.cluster.name,
        )
        return port

    # -- health checkers ----------------------------------------------------

    def _start_checkers(self, clusters: dict[str, UpstreamCluster]) -> None:
        # A new checker per start: a reload that changed a cluster logs its
        # endpoints' first probe results again, saying what the new config found.
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

    # -- reload -------------------------------------------------------------

    def _apply(self, new: Config) -> str:
        """Make ``new`` the config in force (see the module notes); a one-line summary naming the changes.

        Raises :class:`ListenError`, having changed nothing, when a new
        address cannot be bound.
        """
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
                runtimes[name] = self._new_listener(new_listeners[name], cluster_of)
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
            self.access_log = make_access_logger(self.access_stream, new.access_log.format, self.origin)
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
            self.listeners[name].socket_options = NOT_TUNED  # a new socket
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
        self._tune_listening_sockets()
        return describe_changes(old, new)

    def _tune_listening_sockets(self) -> None:
        """Give each listening socket the options its accepted sockets inherit (see sockopts.py)."""
        for name, port in self.ports.items():
            runtime = self.listeners[name]
            wanted = runtime.cluster.config.keepalive
            if runtime.socket_options is NOT_TUNED or runtime.socket_options != wanted:
                runtime.socket_options = tune_listening_socket(port, wanted)
