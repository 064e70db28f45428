"""Active health checks: one :class:`HealthChecker` per cluster probes its endpoints.

Why probe at all, when a failed connect already fails over to the next
endpoint?  Two reasons:

- **Egress-IP allowlists.**  Managed databases (Neon, Supabase, RDS, ClickHouse
  Cloud) that admit only allowlisted source addresses often *accept* the TCP
  connection and then drop it, or never answer, when the peer is not on the
  list.  A plain connect succeeds; the client only sees a reset in the middle
  of its startup.  The ``postgres`` probe sends an SSLRequest (int32 length 8,
  int32 code 80877103) and expects the one-byte ``S`` or ``N`` a Postgres
  server sends before anything else; it proves a Postgres is there *and* that
  it talks to this proxy's egress address.  This is the most common way a
  static-egress deployment breaks (a new Machine, an IP not yet allowlisted),
  and ``last_error`` plus the ``egressproxy_upstream_healthy`` gauge name it.
- **Fewer failed first attempts.**  An endpoint known to be down is skipped
  instead of costing every new client a connect timeout.

Panic mode: :meth:`UpstreamCluster.endpoint_order` skips endpoints marked
unhealthy only while at least one other endpoint is not; when *every*
endpoint is unhealthy it tries all of them, as Envoy does below its panic
threshold.  A broken checker (a firewall that drops only the probes, a wrong
``kind``) therefore degrades to "no health checks", never to an outage.

Rules:

- Every ``interval`` seconds (the first round at :meth:`HealthChecker.start`)
  each endpoint is probed, unless its previous probe is still running: probes
  of one endpoint never overlap, a round is skipped for it instead.
- Each probe dials like a connection does (``dial.client_endpoint``: the ``hosts:`` pin first,
  like real connections) and has one deadline of ``timeout`` seconds, name
  resolution included.
- ``unhealthy_threshold`` consecutive failures mark the endpoint unhealthy,
  ``healthy_threshold`` consecutive successes healthy; from "not checked yet"
  (``healthy is None``, treated as healthy) whichever comes first decides.
- Logged: each endpoint's *first* probe result, one line per endpoint, so a
  healthy start says what it found (``cluster pg endpoint db:5432: healthy
  (TCP connect 12 ms)``); then only transitions (to unhealthy, back to
  healthy, and the cluster entering or leaving panic), never individual
  probes.  A first result that is itself a transition (a failure with
  ``unhealthy_threshold: 1``) is logged once, as the first-result line; one
  below a threshold says so.  A cluster with ``kind: none`` logs one line at
  start: not probed.

Limits: the postgres probe closes right after the first answer byte.  After
``N`` the server ends the session silently; after ``S`` it expects a TLS
handshake, so a server with ``ssl = on`` logs "could not accept SSL
connection: EOF detected" once per probe (checked on PostgreSQL 15; a full
TLS handshake ended with close_notify would be silent, but is not done here).
Choose ``interval`` with the database's log in mind.  This module does not
touch connections that clients use, and probes count in none of the cluster's
connection counters or its breaker.
"""

from __future__ import annotations

import struct
from typing import Callable

from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from egressproxy.config import Address
from egressproxy.upstream.dial import client_endpoint
from egressproxy.upstream.cluster import UpstreamCluster

#: int32 message length 8, int32 SSLRequest code 1234 << 16 | 5679.
SSL_REQUEST = struct.pack("!ii", 8, 80877103)

#: A probe reports None for success, or a short human reason for failure.
ProbeResult = Callable[["Probe", "str | None"], None]


def describe_connect_failure(failure: Failure, timeout: float) -> str:
    """A short human reason for a failed connect ("connection refused")."""
    if failure.check(error.ConnectionRefusedError):
        return "connection refused"
    if failure.check(error.TimeoutError, defer.TimeoutError):
        return f"timed out after {timeout:g}s"
    if failure.check(error.DNSLookupError):
        return "DNS lookup failed"
    if failure.check(error.NoRouteError):
        return "no route to host"
    return f"connect failed: {failure.getErrorMessage()}"


class _ProbeFactory(Factory):
    """Hands out its one probe; quiet, so probes leave no "Starting factory" lines."""

    noisy = False

    def __init__(self, probe: Probe) -> None:
        self.probe: Probe | None = probe

    def buildProtocol(self, addr: object) -> Probe | None:
        probe, self.probe = self.probe, None  # a second racing connection is refused
        return probe


class Probe(Protocol):
    """One health probe of one endpoint: dial, (for postgres) ask, close.

    ``report(probe, reason)`` is called exactly once, with None on success,
    unless :meth:`cancel` comes first.  ``closed`` fires once the probe holds
    no connection and no connect attempt any more.
    """

    def __init__(
        self, reactor: IReactorTime, address: Address, host: str, kind: str, timeout: float, report: ProbeResult
    ) -> None:
        self.reactor = reactor
        self.address = address
        self.host = host
        self.kind = kind
        self.timeout = timeout
        self.report = report
        self.finished = False
        self.closed: defer.Deferred[None] = defer.Deferred()
        self._connecting: defer.Deferred[IProtocol] | None = None
        self._deadline: IDelayedCall | None = None
        self._connected = False
        #: When :meth:`start` dialled, and the byte a postgres server answered (for the log).
        self.started_at = 0.0
        self.answer = b""

    def describe_success(self) -> str:
        """How a successful probe went, for the first-result line ("TCP connect 12 ms")."""
        took = f"{(self.reactor.seconds() - self.started_at) * 1000:.0f} ms"
        if self.kind == "postgres":
            return f"SSLRequest answered {self.answer.decode('ascii')} in {took}"
        return f"TCP connect {took}"

    def start(self) -> None:
        self.started_at = self.reactor.seconds()
        endpoint = client_endpoint(self.reactor, self.host, self.address.port, self.timeout)
        # One deadline for the whole probe, name resolution and the answer
        # included (HostnameEndpoint's timeout covers only each TCP connect).
        self._deadline = self.reactor.callLater(self.timeout, self._timed_out)
        connecting = self._connecting = endpoint.connect(_ProbeFactory(self))
        # (connectionMade or _connect_failed clears _connecting, even synchronously.)
        connecting.addErrback(self._connect_failed)

    def cancel(self) -> None:
        """Stop the probe without a report: cancel the connect or abort the connection."""
        self._finish(None, report=False, abort=True)

    # IProtocol

    def connectionMade(self) -> None:
        self._connecting = None
        self._connected = True
        if self.finished:  # cancelled while the connect was landing
            self.transport.abortConnection()
            return
        if self.kind == "postgres":
            self.transport.write(SSL_REQUEST)
        else:
            self._finish(None)

    def dataReceived(self, data: bytes) -> None:
        if self.finished:
            return
        answer = data[:1]
        if answer in (b"S", b"N"):
            self.answer = answer
            self._finish(None)
        else:
            self._finish(f"unexpected answer {answer!r}")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connected = False
        if not self.finished:
            if reason.check(error.ConnectionDone):
                self._finish("closed without answering the SSLRequest")
            else:
                self._finish("connection reset before answering the SSLRequest")
        self._fire_closed()

    # internals

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        self._finish(describe_connect_failure(failure, self.timeout))
        self._fire_closed()

    def _timed_out(self) -> None:
        self._deadline = None
        self._finish(f"timed out after {self.timeout:g}s", abort=True)

    def _finish(self, reason: str | None, report: bool = True, abort: bool = False) -> None:
        """Settle the probe once: stop the deadline, let go of the connection, report."""
        if self.finished:
            return
        self.finished = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()  # errbacks into _connect_failed, which is now a no-op but for closed
        if self._connected:
            # An answered probe leaves politely; a timeout or a cancel does not wait.
            if abort:
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()
        if report:
            self.report(self, reason)

    def _fire_closed(self) -> None:
        if not self.closed.called:
            self.closed.callback(None)


class HealthChecker:
    """Probes every endpoint of one cluster on a timer and marks them healthy or not.

    Writes ``healthy`` and ``last_error`` on the cluster's
    :class:`~egressproxy.upstream.cluster.EndpointState` objects; the cluster's
    endpoint choice, metrics and ``/clusters`` read them from there.  One
    checker per cluster and per config generation: stop the old one on reload.
    ``last_error`` keeps the latest failure even after recovery.

    Each endpoint's first result is logged once per checker.  A reload that
    changes a cluster starts a new checker, so the first-result lines repeat
    for that cluster, on purpose: they then say what the new config found,
    which is what an operator checking a reload wants to read.
    """

    log = Logger()

    def __init__(self, cluster: UpstreamCluster, reactor: IReactorTime, log: Logger | None = None) -> None:
        self.cluster = cluster
        self.reactor = reactor
        self.config = cluster.config.health_check
        if log is not None:
            self.log = log
        self.running = False
        #: Probes that have not reported yet, by endpoint (at most one each).
        self.in_flight: dict[Address, Probe] = {}
        #: Probes whose connection may still be open (reported or not).
        self._open: set[Probe] = set()
        self._successes: dict[Address, int] = {}
        self._failures: dict[Address, int] = {}
        #: Endpoints whose first result this checker has logged.
        self._first_logged: set[Address] = set()
        self._loop: LoopingCall | None = None
        self.rounds = 0
        self.probes_total = 0

    def start(self) -> None:
        """Start probing: one round now, then one every ``interval`` seconds.

        With ``kind: none`` nothing is started, and any health left on the
        cluster by an earlier checker is forgotten (every endpoint is "not
        checked", so none is skipped); one line says they are not probed.
        """
        if self.running:
            return
        self.running = True
        if self.config.kind == "none":
            for state in self.cluster.endpoints.values():
                state.healthy = None
            self.log.info("cluster {cluster}: health_check none: endpoints are not probed", cluster=self.cluster.name)
            return
        loop = LoopingCall(self._round)
        loop.clock = self.reactor
        self._loop = loop
        loop.start(self.config.interval, now=True).addErrback(self._loop_failed)

    def stop(self) -> defer.Deferred[None]:
        """Stop the timer and cancel every probe in flight.

        Leaves no delayed call behind.  The Deferred fires once every probe
        connection is gone (at once if there is none); waiting for it is only
        needed where leftover sockets matter (shutdown, tests).
        """
        self.running = False
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for probe in list(self.in_flight.values()):
            probe.cancel()
        self.in_flight.clear()
        waits = [probe.closed for probe in self._open]
        return defer.gatherResults(waits).addCallback(lambda _: None)

    def _loop_failed(self, failure: Failure) -> None:
        self.log.failure("health check loop of cluster {cluster} failed", failure, cluster=self.cluster.name)

    def _round(self) -> None:
        self.rounds += 1
        for address in list(self.cluster.endpoints):
            if address in self.in_flight:
                continue  # the previous probe is still running: skip this round
            self._probe(address)

    def _probe(self, address: Address) -> None:
        host = self.cluster.pinned(address.host) or address.host
        probe = Probe(self.reactor, address, host, self.config.kind, self.config.timeout, self._reported)
        self.in_flight[address] = probe
        self._open.add(probe)
        probe.closed.addCallback(lambda _: self._open.discard(probe))
        self.probes_total += 1
        probe.start()

    def _reported(self, probe: Probe, reason: str | None) -> None:
        address = probe.address
        if self.in_flight.get(address) is probe:
            del self.in_flight[address]
        state = self.cluster.endpoints.get(address)
        if state is None or not self.running:
            return  # the endpoint left the config, or we were stopped meanwhile
        was_panicking = self.cluster.panicking()
        first = address not in self._first_logged
        self._first_logged.add(address)
        if reason is None:
            self._failures[address] = 0
            successes = self._successes[address] = self._successes.get(address, 0) + 1
            if state.healthy is not True and successes >= self.config.healthy_threshold:
                if state.healthy is False and not first:  # else the first-result line below says it
                    self.log.info(
                        "cluster {cluster} endpoint {endpoint} is healthy again",
                        cluster=self.cluster.name, endpoint=str(address),
                    )
                state.healthy = True
        else:
            self._successes[address] = 0
            failures = self._failures[address] = self._failures.get(address, 0) + 1
            state.last_error = reason
            if state.healthy is not False and failures >= self.config.unhealthy_threshold:
                state.healthy = False
                if not first:  # else the first-result line below says it
                    self.log.info(
                        "cluster {cluster} endpoint {endpoint} is unhealthy: {reason}",
                        cluster=self.cluster.name, endpoint=str(address), reason=reason,
                    )
        if first:
            self._log_first(probe, reason, state.healthy)
        panicking = self.cluster.panicking()
        if panicking and not was_panicking:
            self.log.warn(
                "cluster {cluster} has no healthy endpoint: trying all of them (panic mode)",
                cluster=self.cluster.name,
            )
        elif was_panicking and not panicking:
            self.log.info("cluster {cluster} has a healthy endpoint again", cluster=self.cluster.name)

    def _log_first(self, probe: Probe, reason: str | None, healthy: bool | None) -> None:
        """The one line about an endpoint's first result: healthy, unhealthy, or failed once so far."""
        fields = dict(cluster=self.cluster.name, endpoint=str(probe.address))
        if reason is None and healthy is False:  # marked by an earlier checker, not yet recovered
            self.log.info(
                "cluster {cluster} endpoint {endpoint}: first probe succeeded ({detail}), still unhealthy "
                "until {threshold} consecutive successes",
                detail=probe.describe_success(), threshold=self.config.healthy_threshold, **fields,
            )
        elif reason is None:
            self.log.info("cluster {cluster} endpoint {endpoint}: healthy ({detail})",
                          detail=probe.describe_success(), **fields)
        elif healthy is False:
            self.log.warn("cluster {cluster} endpoint {endpoint}: unhealthy: {reason}", reason=reason, **fields)
        else:
            self.log.warn(
                "cluster {cluster} endpoint {endpoint}: first probe failed: {reason} "
                "(unhealthy after {threshold} consecutive failures)",
                reason=reason, threshold=self.config.unhealthy_threshold, **fields,
            )
