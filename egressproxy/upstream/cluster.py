"""Upstream clusters: their runtime state and which endpoint a dial tries next.

A cluster owns its runtime state: endpoint rotation, circuit breaker,
connect counters and connect-time histogram, and each endpoint's health and
counts.  :meth:`UpstreamCluster.dial` starts one downstream connection's
attempt to reach it, an :class:`~egressproxy.upstream.dial.UpstreamDial` (``dial.py``:
failover, deadlines, name resolution and address checks), which reports
each outcome back here.  A reload reconfigures a cluster in place, so its
counters carry on.

Health: endpoints that the cluster's health checker (``health.py``) marked
unhealthy are left out of the rotation while at least one endpoint is not;
when all of them are unhealthy, all are tried anyway (panic mode, counted in
``panic_total``), so a broken checker can never cause an outage by itself.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol

from egressproxy.upstream import addrguard
from egressproxy.upstream.addrguard import AddressPolicy, OwnSockets
from egressproxy.upstream.breaker import CircuitBreaker
from egressproxy.config import Address, ClusterConfig
from egressproxy.upstream.dial import CONNECT_FAILURE_REASONS, UpstreamConnectFailed, UpstreamDial
from egressproxy.observe.histogram import Histogram

#: ``UpstreamConnectFailed`` lives in ``dial.py``; it is named here too for
#: ``session.py``, which imports it from this module.
__all__ = ["EndpointState", "UpstreamCluster", "UpstreamConnectFailed", "UpstreamDial"]


class EndpointState:
    """What the proxy knows of one endpoint: health and connection counts."""

    def __init__(self, address: Address) -> None:
        self.address = address
        #: None until a health check has run: treated as healthy.
        self.healthy: bool | None = None
        self.last_error: str | None = None
        self.active = 0
        self.connections_total = 0
        self.connect_failures = 0


class UpstreamCluster:
    """Runtime state of one configured cluster."""

    def __init__(
        self,
        config: ClusterConfig,
        reactor: IReactorTime,
        pinned: Callable[[str], str | None],
        label: str | None = None,
    ) -> None:
        self.config = config
        #: The name metrics and admin show: the cluster's, or e.g. ``direct.dynamic``.
        self.label = label or config.name
        self.reactor = reactor
        self.pinned = pinned
        self.breaker = CircuitBreaker(config.max_connections, config.max_pending)
        self.connections_total = 0
        self.connect_failures: dict[str, int] = dict.fromkeys(CONNECT_FAILURE_REASONS, 0)
        self.connect_seconds = Histogram()
        self.endpoints: dict[Address, EndpointState] = {a: EndpointState(a) for a in config.endpoints}
        #: The proxy's own listening sockets, never dialled (set by the service).
        self.own: OwnSockets = addrguard.NO_SOCKETS
        self._next_endpoint = 0
        #: Dials started while every endpoint was unhealthy (panic mode).
        self.panic_total = 0

    def connected(self, address: Address, seconds: float) -> None:
        """An upstream connection to ``address`` was established after ``seconds``."""
        self.breaker.connected()
        self.connections_total += 1
        self.connect_seconds.observe(seconds)
        state = self.endpoints.get(address)
        if state is not None:
            state.active += 1
            state.connections_total += 1

    def attempt_failed(self, address: Address, reason: str) -> None:
        """One attempt to reach ``address`` failed for ``reason`` (a ``CONNECT_FAILURE_REASONS`` label)."""
        self.connect_failures[reason] = self.connect_failures.get(reason, 0) + 1
        state = self.endpoints.get(address)
        if state is not None:
            state.connect_failures += 1

    def released(self, address: Address) -> None:
        """An upstream connection to ``address`` closed."""
        self.breaker.released()
        state = self.endpoints.get(address)
        if state is not None:
            state.active -= 1

    def reconfigure(self, config: ClusterConfig) -> None:
        """Adopt a reloaded config in place: counters and live accounting carry on.

        Endpoints that persist keep their state (health, counts); new ones
        start unknown; removed ones are dropped (their live connections still
        release through the breaker, which is shared).
        """
        self.config = config
        self.breaker.max_connections = config.max_connections
        self.breaker.max_pending = config.max_pending
        self.endpoints = {a: self.endpoints.get(a) or EndpointState(a) for a in config.endpoints}

    @property
    def name(self) -> str:
        return self.label

    def _unhealthy(self, address: Address) -> bool:
        state = self.endpoints.get(address)
        return state is not None and state.healthy is False

    def panicking(self) -> bool:
        """True when every endpoint is marked unhealthy, so all of them are tried anyway."""
        return all(self._unhealthy(address) for address in self.config.endpoints)

    def endpoint_order(self) -> list[Address]:
        """The endpoints to try, starting one further along at each call (round robin).

        Endpoints marked unhealthy are left out (not yet checked counts as
        healthy); when every endpoint is unhealthy, all of them are returned
        (panic mode).
        """
        endpoints = [a for a in self.config.endpoints if not self._unhealthy(a)] or list(self.config.endpoints)
        start = self._next_endpoint % len(endpoints)
        self._next_endpoint = start + 1
        return endpoints[start:] + endpoints[:start]

    def dial(
        self,
        protocol: Protocol,
        on_attempt: Callable[[Address], None],
        endpoints: list[Address] | None = None,
        policy: AddressPolicy | None = None,
    ) -> UpstreamDial | None:
        """Start connecting ``protocol``; None when the breaker is open.

        ``endpoints`` overrides the cluster's own (a destination a front
        chose: a routed server name, a CONNECT target); the cluster's
        limits, timeouts and counters still apply.  With ``policy`` (a
        client-chosen destination), names are resolved and checked by the
        dial (``dial.py``); a ``hosts:`` pin is the operator's and is not.
        """
        if not self.breaker.try_acquire_pending():
            return None
        if endpoints is None and self.panicking():
            self.panic_total += 1
        attempt = UpstreamDial(self, protocol, on_attempt, endpoints, policy)
        attempt.start()
        return attempt
