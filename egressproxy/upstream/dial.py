"""One downstream connection's dial of its upstream: attempts, failover, deadlines, address checks.

An :class:`UpstreamDial` is made by its cluster (``upstream.py``), which owns
the rotation, the breaker and the counters; the dial reads the cluster's
settings and reports each outcome back to it.  It names the cluster through
:class:`DialingCluster` only, so this module sits below ``upstream.py``.

Each attempt dials one endpoint through ``HostnameEndpoint``, so names are
resolved per connection (a provider that moves its database to a new
address is followed without a restart) over IPv4 and IPv6.  A ``hosts:``
pin replaces the name by its address before the endpoint is built; the name
itself stays in logs.

Failover: up to ``max_connect_attempts`` attempts, each to the next endpoint
in round-robin order, each bounded by ``connect_timeout`` (DNS included).
There is no delay between attempts: a refused connect is cheap, and the
attempts are bounded in number.  This module does not know about TLS.

Address checks (``addrguard.py``): a dial for a client-chosen destination
carries a :class:`~egressproxy.upstream.addrguard.AddressPolicy`.  Its name is then
resolved here, once per dial, every answer is judged, and only the answers
that pass are connected to, by address (no second lookup).  Every dial,
guarded or not, is refused when the address it reaches is one of the
proxy's own listening sockets: checked before connecting where the address
is known, and in ``_OnceFactory`` (before any byte moves) where
``HostnameEndpoint`` resolved it.  Either refusal fails the dial at once,
without further attempts, with flag ``IA``.
"""

from __future__ import annotations

import ipaddress
import typing
from typing import Callable

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IProtocol, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from egressproxy.upstream import addrguard
from egressproxy.upstream.addrguard import AddressPolicy, AddressRefused, OwnSockets
from egressproxy.upstream.breaker import CircuitBreaker
from egressproxy.config import Address, ClusterConfig


class UpstreamConnectFailed(Exception):
    """Every attempt failed; ``flag`` and ``reason`` describe the last one."""

    def __init__(self, address: Address, reason: str, flag: str, detail: str) -> None:
        super().__init__(f"{address}: {reason}: {detail}")
        self.address = address
        self.reason = reason
        self.flag = flag
        self.detail = detail


def client_endpoint(reactor: IReactorTime, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """An endpoint for one dial: an IP literal directly, a name through ``HostnameEndpoint``.

    ``HostnameEndpoint`` resolves even a literal through the reactor's
    threaded resolver: a thread round trip on every new connection.  Pinned
    and literal addresses skip it; names are still resolved per connection
    (the quick lane's own name cache is ``datapath/lanenames.py``).
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if ip.version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


#: Reasons a connect fails, as metrics label them (see classify_connect_failure).
CONNECT_FAILURE_REASONS = ("timeout", "refused", "dns", "unreachable", "error")


def classify_connect_failure(failure: Failure) -> tuple[str, str]:
    """(metric reason, access-log flag) for a failed connect."""
    if failure.check(defer.TimeoutError, error.TimeoutError):
        return "timeout", "UT"
    if failure.check(error.ConnectionRefusedError):
        return "refused", "UF"
    if failure.check(error.DNSLookupError):
        return "dns", "UF"
    if failure.check(error.NoRouteError):
        return "unreachable", "UF"
    return "error", "UF"


class DialingCluster(typing.Protocol):
    """What a dial reads of its cluster and reports to it (``upstream.UpstreamCluster``)."""

    config: ClusterConfig
    reactor: IReactorTime
    #: A ``hosts:`` pin's address for a name, else None.
    pinned: Callable[[str], str | None]
    #: The proxy's own listening sockets, never dialled.
    own: OwnSockets
    breaker: CircuitBreaker

    def endpoint_order(self) -> list[Address]:
        """The endpoints to try, in this dial's order."""

    def connected(self, address: Address, seconds: float) -> None:
        """An attempt reached ``address`` after ``seconds``."""

    def attempt_failed(self, address: Address, reason: str) -> None:
        """An attempt to reach ``address`` failed for ``reason`` (one of ``CONNECT_FAILURE_REASONS``)."""


class _Addresses:
    """Collects one resolution's addresses (an ``IResolutionReceiver``) into a Deferred."""

    def __init__(self) -> None:
        self.deferred: defer.Deferred[list[addrguard.IPAddress]] = defer.Deferred()
        self.ips: list[addrguard.IPAddress] = []

    def resolutionBegan(self, resolution: object) -> None:
        pass

    def addressResolved(self, address: object) -> None:
        if isinstance(address, (IPv4Address, IPv6Address)):
            try:
                self.ips.append(ipaddress.ip_address(address.host.split("%", 1)[0]))
            except ValueError:
                pass

    def resolutionComplete(self) -> None:
        if not self.deferred.called:
            self.deferred.callback(self.ips)


def resolve(reactor: object, host: str) -> defer.Deferred[list[addrguard.IPAddress]]:
    """Every address ``host`` resolves to (A and AAAA), through the reactor's resolver."""
    receiver = _Addresses()
    reactor.nameResolver.resolveHostName(receiver, host, 0)  # type: ignore[attr-defined]
    return receiver.deferred


class _OnceFactory(Factory):
    """Hands out the one protocol instance once, then refuses (closes) any second connection.

    HostnameEndpoint may race connections to several addresses; only the
    first to connect may own the leg.  A connection that reached one of the
    proxy's own listening sockets is refused too, before any byte moves.
    """

    noisy = False  # one per connection: no "Starting factory" log lines

    def __init__(self, protocol: Protocol, own: OwnSockets = addrguard.NO_SOCKETS) -> None:
        self._protocol: Protocol | None = protocol
        self._own = own
        #: Set when a connection was refused for reaching the proxy itself.
        self.reached_own = False

    def buildProtocol(self, addr: object) -> Protocol | None:
        if isinstance(addr, (IPv4Address, IPv6Address)):
            try:
                ip = ipaddress.ip_address(addr.host.split("%", 1)[0])
            except ValueError:
                ip = None
            if ip is not None and self._own.includes(ip, addr.port):
                self.reached_own = True
                return None
        protocol, self._protocol = self._protocol, None
        return protocol


class UpstreamDial:
    """One downstream connection's attempts to reach its cluster.

    ``deferred`` fires with the connected protocol, or fails with
    :class:`UpstreamConnectFailed`; after :meth:`cancel` it never fires.
    """

    def __init__(
        self,
        cluster: DialingCluster,
        protocol: Protocol,
        on_attempt: Callable[[Address], None],
        endpoints: list[Address] | None = None,
        policy: AddressPolicy | None = None,
    ) -> None:
        self.cluster = cluster
        self.protocol = protocol
        self.on_attempt = on_attempt
        self.policy = policy
        self.deferred: defer.Deferred[IProtocol] = defer.Deferred()
        self._order = endpoints if endpoints else cluster.endpoint_order()
        self._attempts_left = cluster.config.max_connect_attempts
        self._tried = 0
        self._attempt: defer.Deferred[IProtocol] | None = None
        self._done = False
        #: A checked name's passing addresses, resolved once per dial.
        self._checked: dict[Address, list[addrguard.IPAddress]] = {}
        self._factory: _OnceFactory | None = None
        #: Report mode: what the policy would have refused, though dialled.
        self.reported: AddressRefused | None = None

    def start(self) -> None:
        self._attempt_next()

    def _attempt_next(self) -> None:
        cluster = self.cluster
        address = self._order[self._tried % len(self._order)]
        self._tried += 1
        self._attempts_left -= 1
        self.address = address
        self.on_attempt(address)
        timeout = cluster.config.connect_timeout
        self._timed_out = False
        self._started = cluster.reactor.seconds()
        # One deadline for the whole attempt, name resolution included
        # (HostnameEndpoint's own timeout covers only each TCP connect).
        self._deadline = cluster.reactor.callLater(timeout, self._attempt_timed_out)
        pinned = cluster.pinned(address.host)
        host = pinned or address.host
        try:
            literal: addrguard.IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        guard = addrguard.DialGuard(None if pinned else self.policy, cluster.own)
        if literal is not None:
            refused = guard.check(literal, address.port)
            self.reported = self.reported or guard.reported
            if refused is not None:
                self._refuse(refused)
                return
        elif self.policy is not None and not pinned:
            self._resolve_then_connect(address, guard)
            return
        self._connect(client_endpoint(cluster.reactor, host, address.port, timeout))

    def _connect(self, endpoint: IStreamClientEndpoint) -> None:
        self._factory = _OnceFactory(self.protocol, self.cluster.own)
        attempt = endpoint.connect(self._factory)
        self._attempt = attempt
        attempt.addCallbacks(self._connected, self._failed)

    def _resolve_then_connect(self, address: Address, guard: addrguard.DialGuard) -> None:
        """Resolve a client-chosen name once, keep the answers that pass, connect to one by address."""
        checked = self._checked.get(address)
        if checked is not None:
            self._connect_checked(address, checked)
            return
        resolving: defer.Deferred[list[addrguard.IPAddress]] = resolve(self.cluster.reactor, address.host)
        self._attempt = resolving  # type: ignore[assignment]

        def resolved(ips: list[addrguard.IPAddress]) -> None:
            self._attempt = None
            if self._done:
                return
            if not ips:
                self._failed(Failure(error.DNSLookupError(f"{address.host} has no address")))
                return
            passed, refused = guard.filter(ips, address.port)
            self.reported = self.reported or guard.reported
            if not passed:
                assert refused is not None
                self._refuse(refused)
                return
            self._checked[address] = passed
            self._connect_checked(address, passed)

        def failed(failure: Failure) -> None:
            self._attempt = None
            self._failed(failure)

        resolving.addCallbacks(resolved, failed)

    def _connect_checked(self, address: Address, ips: list[addrguard.IPAddress]) -> None:
        """Connect to one of a name's checked addresses: the next one at each attempt."""
        ip = ips[(self._tried - 1) % len(ips)]
        self._connect(client_endpoint(self.cluster.reactor, str(ip), address.port, self.cluster.config.connect_timeout))

    def _refuse(self, refused: AddressRefused) -> None:
        """The destination may not be dialled: fail the whole dial now (no more attempts)."""
        self._attempts_left = 0
        self._failed(Failure(refused))

    def _attempt_timed_out(self) -> None:
        self._timed_out = True
        if self._attempt is not None:
            self._attempt.cancel()

    def _settled(self) -> None:
        self._attempt = None
        if self._deadline.active():
            self._deadline.cancel()

    def _connected(self, protocol: IProtocol) -> None:
        self._settled()
        if self._done:
            return
        self._done = True
        self.cluster.connected(self.address, self.cluster.reactor.seconds() - self._started)
        self.deferred.callback(protocol)

    def _failed(self, failure: Failure) -> None:
        self._settled()
        if self._done:
            return
        if self._factory is not None and self._factory.reached_own and failure.check(error.NoProtocol):
            failure = Failure(AddressRefused(addrguard.REASON_OWN, "is one of this proxy's own listening sockets"))
            self._attempts_left = 0
        if self._timed_out:
            failure = Failure(error.TimeoutError(f"no connection within {self.cluster.config.connect_timeout:g}s"))
        refused = failure.check(AddressRefused)
        if refused:
            self._attempts_left = 0
            self._done = True
            self.cluster.breaker.connect_failed()
            self.deferred.errback(UpstreamConnectFailed(
                self.address, failure.value.reason, addrguard.FLAG, failure.value.what
            ))
            return
        reason, flag = classify_connect_failure(failure)
        self.cluster.attempt_failed(self.address, reason)
        if self._attempts_left > 0:
            self._attempt_next()
            return
        self._done = True
        self.cluster.breaker.connect_failed()
        detail = failure.getErrorMessage()
        self.deferred.errback(UpstreamConnectFailed(self.address, reason, flag, detail))

    def cancel(self) -> None:
        """Give up (the client left): free the breaker slot, stop the attempt in flight."""
        if self._done:
            return
        self._done = True
        self.cluster.breaker.connect_failed()
        if self._attempt is not None:
            self._attempt.cancel()  # fires _failed, which settles the deadline
