"""EgressService: the root of the running proxy.

Design notes
------------

The service tree is built from one immutable :class:`Config`.  It owns the
runtime objects the config describes: one :class:`UpstreamCluster` per
cluster and one :class:`ListenerRuntime` plus bound port per listener.

Start-up binds every listener in ``privilegedStartService``, synchronously
and before the reactor runs.  If any bind fails, the ports already bound are
closed and start-up stops with :class:`SystemExit` carrying a one-line
message, so ``twistd`` exits 1 instead of running with a listener missing
(the failure mode of a bare ``StreamServerEndpointService``, which only logs).

Stopping closes the listening ports; connections still open are closed by
the reactor as it shuts down, each still getting its access-log line.
"""

from __future__ import annotations

import sys
from typing import IO

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort, IReactorCore
from twisted.logger import Logger

from egressproxy.accesslog import make_access_logger
from egressproxy.addresses import format_host_port
from egressproxy.config import Config
from egressproxy.listen import ListenError, listen
from egressproxy.listener import ListenerRuntime
from egressproxy.modes.tcp import TcpProxyFactory
from egressproxy.upstream import UpstreamCluster


def format_bound(port: IListeningPort) -> str:
    """The address a port really bound, e.g. ``[::]:5432`` or ``127.0.0.1:40123``."""
    host = port.getHost()
    if isinstance(host, (IPv4Address, IPv6Address)):
        return format_host_port(host.host, host.port)
    return str(getattr(host, "name", host))


class EgressService(MultiService):
    """Listeners, clusters and their lifecycle; see the module notes."""

    log = Logger()

    def __init__(self, config: Config, reactor: IReactorCore, access_stream: IO[str] | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.access_log = make_access_logger(
            access_stream if access_stream is not None else sys.stdout, config.access_log.format
        )
        self.clusters = {
            cluster.name: UpstreamCluster(cluster, reactor, config.pinned_address) for cluster in config.clusters
        }
        self.listeners = {
            listener.name: ListenerRuntime(listener, self.clusters[listener.cluster], reactor, self.access_log)
            for listener in config.listeners
        }
        self.ports: dict[str, IListeningPort] = {}

    def privilegedStartService(self) -> None:
        """Bind every listener now, or none: see the module notes."""
        for name, runtime in self.listeners.items():
            try:
                port = listen(self.reactor, runtime.config.listen, TcpProxyFactory(runtime))
            except ListenError as e:
                for bound in self.ports.values():
                    bound.stopListening()
                self.ports.clear()
                raise SystemExit(f"egressproxy: listener {name!r}: {e}") from None
            self.ports[name] = port
            self.log.info(
                "listener {name} ({mode}) listening on {address} -> cluster {cluster}",
                name=name,
                mode=runtime.config.mode,
                address=format_bound(port),
                cluster=runtime.cluster.name,
            )
        super().privilegedStartService()

    def startService(self) -> None:
        if not self.ports and self.listeners:
            # startService without privilegedStartService (e.g. in tests).
            self.privilegedStartService()
        super().startService()

    def abort_sessions(self) -> None:
        """Drop every live connection now (tests, and the end of a drain)."""
        for runtime in self.listeners.values():
            for session in list(runtime.sessions):
                session.abort()

    def stopService(self) -> defer.Deferred[None]:
        stopping = [defer.maybeDeferred(port.stopListening) for port in self.ports.values()]
        self.ports.clear()
        stopping.append(defer.maybeDeferred(super().stopService))
        return defer.gatherResults(stopping).addCallback(lambda _: None)
