"""Unit tests of active health checks and of the endpoint choice that reads them."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.config import Address, HealthCheckConfig
from egressproxy.upstream.health import SSL_REQUEST, HealthChecker
from egressproxy.upstream.cluster import UpstreamCluster
from tests.helpers import HalfCloseTransport, LiteralResolver, cluster_config

A = Address("127.0.0.1", 5432)
B = Address("127.0.0.2", 5432)
C = Address("127.0.0.3", 5432)


class World:
    """A cluster of endpoints A, B (and C) on a MemoryReactorClock, with its checker and log events."""

    def __init__(self, endpoints: tuple[Address, ...] = (A, B), pins: dict[str, str] | None = None,
                 **health: Any) -> None:
        values: dict[str, Any] = dict(kind="tcp", interval=10.0, timeout=2.0,
                                      unhealthy_threshold=1, healthy_threshold=1)
        values.update(health)
        self.reactor = MemoryReactorClock()
        self.reactor.installNameResolver(LiteralResolver())
        config = cluster_config(endpoints=endpoints, health_check=HealthCheckConfig(**values))
        self.cluster = UpstreamCluster(config, self.reactor, (pins or {}).get)
        self.events: list[dict] = []
        self.checker = HealthChecker(self.cluster, self.reactor, log=Logger(observer=self.events.append))

    def dials(self, address: Address) -> list[int]:
        """Indexes into reactor.tcpClients of the dials made to ``address``."""
        return [i for i, (host, port, *_rest) in enumerate(self.reactor.tcpClients)
                if (host, port) == (address.host, address.port)]

    def accept(self, address: Address):  # type: ignore[no-untyped-def]
        """Answer the newest dial to ``address``; returns (probe protocol, its transport)."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[self.dials(address)[-1]]
        wrapper = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = HalfCloseTransport()
        wrapper.makeConnection(transport)
        transport.protocol = wrapper
        return wrapper._wrappedProtocol, transport

    def refuse(self, address: Address) -> None:
        """Fail the newest dial to ``address`` with ECONNREFUSED and let HostnameEndpoint report it."""
        index = self.dials(address)[-1]
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[index]
        factory.clientConnectionFailed(self.reactor.connectors[index], Failure(ConnectionRefusedError()))
        self.reactor.advance(0.3)

    def state(self, address: Address):  # type: ignore[no-untyped-def]
        return self.cluster.endpoints[address]

    def messages(self) -> list[str]:
        return [event["log_format"] for event in self.events]

    def texts(self) -> list[str]:
        """The log lines as an operator reads them."""
        return [formatEvent(event) for event in self.events]


def closed(protocol: Protocol, transport: HalfCloseTransport) -> None:
    """Deliver the connectionLost a real transport would after a close."""
    if transport.disconnecting:
        protocol.connectionLost(Failure(ConnectionDone()))


class ProbeTests(SynchronousTestCase):
    def test_first_round_is_immediate(self) -> None:
        """start() probes every endpoint at once."""
        w = World()
        w.checker.start()
        self.assertEqual([(c[0], c[1]) for c in w.reactor.tcpClients], [("127.0.0.1", 5432), ("127.0.0.2", 5432)])

    def test_rounds_repeat_every_interval(self) -> None:
        """After the first round, each endpoint is probed again every interval."""
        w = World(endpoints=(A,), interval=10.0)
        w.checker.start()
        w.accept(A)
        w.reactor.advance(9.9)
        self.assertEqual(len(w.dials(A)), 1)
        w.reactor.advance(0.1)
        self.assertEqual(len(w.dials(A)), 2)

    def test_pinned_host_is_probed(self) -> None:
        """A hosts: pin replaces the endpoint's name in the probe's dial."""
        w = World(endpoints=(Address("db.egress.test", 5432),), pins={"db.egress.test": "127.0.0.9"})
        w.checker.start()
        self.assertEqual(w.reactor.tcpClients[-1][:2], ("127.0.0.9", 5432))

    def test_tcp_connect_is_success(self) -> None:
        """A tcp probe succeeds once connected, and closes its connection without writing."""
        w = World(endpoints=(A,))
        w.checker.start()
        _probe, transport = w.accept(A)
        self.assertIs(w.state(A).healthy, True)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_refused_is_failure(self) -> None:
        """A refused connect fails the probe with 'connection refused'."""
        w = World(endpoints=(A,))
        w.checker.start()
        w.refuse(A)
        self.assertIs(w.state(A).healthy, False)
        self.assertEqual(w.state(A).last_error, "connection refused")

    def test_connect_timeout_is_failure(self) -> None:
        """A connect that does not land within timeout fails the probe and leaves no timer."""
        w = World(endpoints=(A,), timeout=2.0, interval=10.0)
        w.checker.start()
        w.reactor.advance(2.0)
        self.assertEqual(w.state(A).last_error, "timed out after 2s")
        self.assertIs(w.state(A).healthy, False)
        self.assertEqual(len(w.reactor.getDelayedCalls()), 1)  # only the next round

    def test_dns_failure_is_failure(self) -> None:
        """A name that resolves to nothing fails the probe with 'DNS lookup failed'."""
        named = Address("db.egress.test", 5432)  # literals skip the resolver
        w = World(endpoints=(named,))

        class NoAddresses(LiteralResolver):
            def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None,  # type: ignore[no-untyped-def]
                                transportSemantics="TCP"):
                receiver.resolutionBegan(None)
                receiver.resolutionComplete()

        w.reactor.installNameResolver(NoAddresses())
        w.checker.start()
        self.assertEqual(w.state(named).last_error, "DNS lookup failed")

    def test_postgres_sends_ssl_request(self) -> None:
        """A postgres probe writes exactly the 8-byte SSLRequest once connected."""
        w = World(endpoints=(A,), kind="postgres")
        w.checker.start()
        _probe, transport = w.accept(A)
        self.assertEqual(transport.value(), b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
        self.assertEqual(SSL_REQUEST, b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
        self.assertIsNone(w.state(A).healthy)

    def test_postgres_s_is_success(self) -> None:
        """A postgres probe answered 'S' succeeds and closes the connection."""
        w = World(endpoints=(A,), kind="postgres")
        w.checker.start()
        probe, transport = w.accept(A)
        probe.dataReceived(b"S")
        self.assertIs(w.state(A).healthy, True)
        self.assertTrue(transport.disconnecting)

    def test_postgres_n_is_success(self) -> None:
        """A postgres probe answered 'N' succeeds."""
        w = World(endpoints=(A,), kind="postgres")
        w.checker.start()
        probe, _transport = w.accept(A)
        probe.dataReceived(b"N")
        self.assertIs(w.state(A).healthy, True)

    def test_postgres_eof_is_failure(self) -> None:
        """A peer that accepts and closes without a byte fails the postgres probe."""
        w = World(endpoints=(A,), kind="postgres")
        w.checker.start()
        probe, _transport = w.accept(A)
        probe.connectionLost(Failure(ConnectionDone()))
        self.assertIs(w.state(A).healthy, False)
        self.assertEqual(w.state(A).last_error, "closed without answering the SSLRequest")

    def test_postgres_reset_is_failure(self) -> None:
        """A peer that resets the connection before answering fails the postgres probe."""
        w = World(endpoints=(A,), kind="postgres")
        w.checker.start()
        probe, _transport = w.accept(A)
        probe.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(w.state(A).last_error, "connection reset before answering the SSLRequest")

    def test_postgres_garbage_is_failure(self) -> None:
        """Any first byte other than 'S' or 'N' fails the postgres probe and closes."""
        w = World(endpoints=(A,), kind="postgres")
        w.checker.start()
        probe, transport = w.accept(A)
        probe.dataReceived(b"E\x00\x00\x00\x10SFATAL")
        self.assertIs(w.state(A).healthy, False)
        self.assertEqual(w.state(A).last_error, "unexpected answer b'E'")
        self.assertTrue(transport.disconnecting)

    def test_postgres_silence_is_failure(self) -> None:
        """A postgres probe with no answer within timeout fails and aborts its connection."""
        w = World(endpoints=(A,), kind="postgres", timeout=2.0)
        w.checker.start()
        _probe, transport = w.accept(A)
        w.reactor.advance(1.9)
        self.assertIsNone(w.state(A).healthy)
        w.reactor.advance(0.1)
        self.assertEqual(w.state(A).last_error, "timed out after 2s")
        self.assertTrue(transport.disconnected)  # aborted, not a graceful close

    def test_probes_leave_no_log_lines(self) -> None:
        """Probes, successful or not, write nothing to the global log (no "Starting factory")."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        w = World(endpoints=(A, B), unhealthy_threshold=5)
        w.checker.start()
        closed(*w.accept(A))
        w.refuse(B)
        self.assertEqual(events, [])

    def test_tcp_probe_does_not_count_as_traffic(self) -> None:
        """Probes do not touch the cluster's connection counters or breaker."""
        w = World(endpoints=(A,))
        w.checker.start()
        w.accept(A)
        self.assertEqual((w.cluster.connections_total, w.state(A).connections_total), (0, 0))
        self.assertEqual((w.cluster.breaker.pending, w.cluster.breaker.active), (0, 0))


class ThresholdTests(SynchronousTestCase):
    def run_rounds(self, w: World, outcomes: str, others: tuple[Address, ...] = ()) -> None:
        """One round per character: A's probe succeeds ('o') or is refused ('x'); ``others`` succeed.

        The first character stands for the round already started ('_' to skip it).
        """
        for i, outcome in enumerate(outcomes):
            if i:
                w.reactor.advance(w.cluster.config.health_check.interval)
            if outcome == "_":
                continue
            for other in others:
                closed(*w.accept(other))
            if outcome == "o":
                probe, transport = w.accept(A)
                closed(probe, transport)
            else:
                w.refuse(A)

    def test_unhealthy_after_threshold_failures(self) -> None:
        """unhealthy_threshold consecutive failures mark the endpoint unhealthy, not fewer."""
        w = World(endpoints=(A,), unhealthy_threshold=3)
        w.checker.start()
        self.run_rounds(w, "xx")
        self.assertIsNone(w.state(A).healthy)
        self.assertEqual(w.state(A).last_error, "connection refused")
        self.run_rounds(w, "_x")
        self.assertIs(w.state(A).healthy, False)

    def test_failures_must_be_consecutive(self) -> None:
        """A success between failures restarts the failure count."""
        w = World(endpoints=(A,), unhealthy_threshold=2, healthy_threshold=5)
        w.checker.start()
        self.run_rounds(w, "xoxox")
        self.assertIsNone(w.state(A).healthy)

    def test_healthy_after_threshold_successes(self) -> None:
        """An unhealthy endpoint is healthy again after healthy_threshold consecutive successes."""
        w = World(endpoints=(A,), unhealthy_threshold=1, healthy_threshold=2)
        w.checker.start()
        self.run_rounds(w, "xo")
        self.assertIs(w.state(A).healthy, False)
        self.run_rounds(w, "_o")
        self.assertIs(w.state(A).healthy, True)

    def test_first_threshold_decides_from_unknown(self) -> None:
        """From 'not checked yet', whichever threshold is reached first decides."""
        w = World(endpoints=(A,), unhealthy_threshold=3, healthy_threshold=1)
        w.checker.start()
        self.run_rounds(w, "xxo")
        self.assertIs(w.state(A).healthy, True)

    def test_unhealthy_endpoint_keeps_being_probed(self) -> None:
        """An unhealthy endpoint is still probed every round, so it can recover."""
        w = World(endpoints=(A,))
        w.checker.start()
        self.run_rounds(w, "xxx")
        self.assertEqual(len(w.dials(A)), 3)

    def test_last_error_outlives_recovery(self) -> None:
        """last_error keeps the latest failure after the endpoint is healthy again."""
        w = World(endpoints=(A,))
        w.checker.start()
        self.run_rounds(w, "xo")
        self.assertEqual((w.state(A).healthy, w.state(A).last_error), (True, "connection refused"))

    def test_logs_transitions_only(self) -> None:
        """After each endpoint's first result, only changes of health are logged, not each probe."""
        w = World(endpoints=(A, B), unhealthy_threshold=2)
        w.checker.start()
        self.run_rounds(w, "xxxx", others=(B,))
        # The first results (one line each), then A's transition at the second failure.
        self.assertEqual(w.messages(), [
            "cluster {cluster} endpoint {endpoint}: healthy ({detail})",
            "cluster {cluster} endpoint {endpoint}: first probe failed: {reason} "
            "(unhealthy after {threshold} consecutive failures)",
            "cluster {cluster} endpoint {endpoint} is unhealthy: {reason}",
        ])
        self.assertEqual((w.events[2]["cluster"], w.events[2]["endpoint"], w.events[2]["reason"]),
                         ("pg", "127.0.0.1:5432", "connection refused"))
        self.run_rounds(w, "_oo", others=(B,))
        self.assertEqual(w.messages()[3:], ["cluster {cluster} endpoint {endpoint} is healthy again"])

    def test_logs_panic(self) -> None:
        """The cluster entering and leaving panic mode is logged once each."""
        w = World(endpoints=(A,))
        w.checker.start()
        self.run_rounds(w, "xxo")
        # unhealthy_threshold 1: the first result is the transition, logged once as the first-result line.
        self.assertEqual(w.messages(), [
            "cluster {cluster} endpoint {endpoint}: unhealthy: {reason}",
            "cluster {cluster} has no healthy endpoint: trying all of them (panic mode)",
            "cluster {cluster} endpoint {endpoint} is healthy again",
            "cluster {cluster} has a healthy endpoint again",
        ])


class FirstResultTests(SynchronousTestCase):
    """One line per endpoint after its first probe result, so a healthy start is visible in the log."""

    def test_healthy_tcp_line_names_connect_time(self) -> None:
        """A first successful tcp probe logs one line with the connect time; later successes log nothing."""
        w = World(endpoints=(A,))
        w.checker.start()
        w.reactor.advance(0.012)
        closed(*w.accept(A))
        self.assertEqual(w.texts(), ["cluster pg endpoint 127.0.0.1:5432: healthy (TCP connect 12 ms)"])
        w.reactor.advance(10.0)
        closed(*w.accept(A))
        self.assertEqual(len(w.events), 1)
        self.assertEqual(w.events[0]["log_level"].name, "info")

    def test_healthy_postgres_line_names_the_answer(self) -> None:
        """A first successful postgres probe names the SSLRequest answer and its time."""
        w = World(endpoints=(A, B), kind="postgres")
        w.checker.start()
        w.reactor.advance(0.005)
        probe, _transport = w.accept(A)
        probe.dataReceived(b"N")
        probe, _transport = w.accept(B)
        probe.dataReceived(b"S")
        self.assertEqual(w.texts(), [
            "cluster pg endpoint 127.0.0.1:5432: healthy (SSLRequest answered N in 5 ms)",
            "cluster pg endpoint 127.0.0.2:5432: healthy (SSLRequest answered S in 5 ms)",
        ])

    def test_first_failure_that_marks_unhealthy_is_logged_once(self) -> None:
        """With unhealthy_threshold 1 the first failure is one line (not also the transition line)."""
        w = World(endpoints=(A, B), unhealthy_threshold=1)
        w.checker.start()
        w.refuse(A)
        closed(*w.accept(B))
        self.assertEqual(w.texts(), [
            "cluster pg endpoint 127.0.0.1:5432: unhealthy: connection refused",
            "cluster pg endpoint 127.0.0.2:5432: healthy (TCP connect 300 ms)",
        ])
        self.assertEqual(w.events[0]["log_level"].name, "warn")
        self.assertIs(w.state(A).healthy, False)

    def test_first_failure_below_threshold_says_so(self) -> None:
        """A first failure that does not yet mark the endpoint says how many it takes; the mark is logged later."""
        w = World(endpoints=(A,), unhealthy_threshold=2, timeout=2.0)
        w.checker.start()
        w.reactor.advance(2.0)
        self.assertEqual(w.texts(), [
            "cluster pg endpoint 127.0.0.1:5432: first probe failed: timed out after 2s "
            "(unhealthy after 2 consecutive failures)",
        ])
        w.reactor.advance(8.0)
        w.refuse(A)
        self.assertEqual(w.texts()[1:], [
            "cluster pg endpoint 127.0.0.1:5432 is unhealthy: connection refused",
            "cluster pg has no healthy endpoint: trying all of them (panic mode)",
        ])

    def test_kind_none_logs_not_probed(self) -> None:
        """A cluster with kind none logs one line at start saying its endpoints are not probed."""
        w = World(kind="none")
        w.checker.start()
        w.checker.start()  # a second start changes nothing
        self.assertEqual(w.texts(), ["cluster pg: health_check none: endpoints are not probed"])

    def test_stopped_before_first_result_logs_nothing(self) -> None:
        """A probe cancelled by stop() (a reload, a drain) leaves no first-result line."""
        w = World(endpoints=(A,))
        w.checker.start()
        self.successResultOf(w.checker.stop())
        self.assertEqual(w.events, [])

    def test_restarted_checker_logs_first_results_again(self) -> None:
        """A new checker on the same cluster (a reload that changed it) logs each endpoint's first result again.

        An endpoint still marked unhealthy by the old checker says it is not yet
        recovered instead of "healthy", and its recovery is that one line.
        """
        w = World(endpoints=(A, B), unhealthy_threshold=1, healthy_threshold=2)
        w.checker.start()
        w.refuse(A)
        closed(*w.accept(B))
        self.successResultOf(w.checker.stop())
        before = len(w.events)
        w.checker = HealthChecker(w.cluster, w.reactor, log=Logger(observer=w.events.append))
        w.checker.start()
        closed(*w.accept(A))
        closed(*w.accept(B))
        self.assertEqual(w.texts()[before:], [
            "cluster pg endpoint 127.0.0.1:5432: first probe succeeded (TCP connect 0 ms), "
            "still unhealthy until 2 consecutive successes",
            "cluster pg endpoint 127.0.0.2:5432: healthy (TCP connect 0 ms)",
        ])
        w.reactor.advance(10.0)
        closed(*w.accept(A))
        self.assertIs(w.state(A).healthy, True)
        self.assertEqual(w.texts()[before + 2:], ["cluster pg endpoint 127.0.0.1:5432 is healthy again"])


class OverlapAndStopTests(SynchronousTestCase):
    def test_no_overlapping_probes(self) -> None:
        """While an endpoint's probe is still running, later rounds skip that endpoint."""
        w = World(endpoints=(A, B), interval=1.0, timeout=5.0)
        w.checker.start()
        closed(*w.accept(B))
        w.reactor.advance(1.0)
        closed(*w.accept(B))
        w.reactor.advance(1.0)
        self.assertEqual((len(w.dials(A)), len(w.dials(B))), (1, 3))
        w.accept(A)
        w.reactor.advance(1.0)
        self.assertEqual(len(w.dials(A)), 2)

    def test_stop_leaves_no_delayed_calls(self) -> None:
        """stop() cancels the timer and every probe in flight: no delayed call is left."""
        w = World(endpoints=(A, B, C), kind="postgres")
        w.checker.start()
        w.accept(A)  # connected, waiting for the answer; B and C still connecting
        w.checker.stop()
        self.assertEqual(w.reactor.getDelayedCalls(), [])

    def test_stop_aborts_open_probe_and_waits_for_it(self) -> None:
        """stop() aborts a connected probe; its Deferred fires once that connection is gone."""
        w = World(endpoints=(A, B), kind="postgres")
        w.checker.start()
        probe, transport = w.accept(A)
        done = w.checker.stop()
        self.assertTrue(transport.disconnected)
        self.assertNoResult(done)
        probe.connectionLost(Failure(ConnectionLost()))
        self.successResultOf(done)
        self.assertEqual((w.state(A).healthy, w.state(B).healthy), (None, None))

    def test_stop_without_probes_is_immediate(self) -> None:
        """stop() with nothing in flight returns a Deferred that has fired."""
        w = World(endpoints=(A,))
        w.checker.start()
        probe, transport = w.accept(A)
        closed(probe, transport)
        self.successResultOf(w.checker.stop())
        self.assertEqual(w.reactor.getDelayedCalls(), [])

    def test_no_rounds_after_stop(self) -> None:
        """After stop(), time passing starts no probe."""
        w = World(endpoints=(A,))
        w.checker.start()
        w.refuse(A)
        w.checker.stop()
        w.reactor.advance(100)
        self.assertEqual(len(w.dials(A)), 1)

    def test_kind_none_starts_nothing(self) -> None:
        """With kind none, start() dials nothing and schedules nothing."""
        w = World(kind="none")
        w.checker.start()
        self.assertEqual(w.reactor.tcpClients, [])
        self.assertEqual(w.reactor.getDelayedCalls(), [])
        self.successResultOf(w.checker.stop())

    def test_kind_none_forgets_old_health(self) -> None:
        """With kind none, health left by an earlier checker is forgotten, so nothing is skipped."""
        w = World(kind="none")
        w.state(A).healthy = False
        w.checker.start()
        self.assertIsNone(w.state(A).healthy)


class EndpointChoiceTests(SynchronousTestCase):
    def cluster(self, *health: bool | None) -> UpstreamCluster:
        endpoints = (A, B, C)[:len(health)]
        cluster = UpstreamCluster(cluster_config(endpoints=endpoints), MemoryReactorClock(), {}.get)
        for address, healthy in zip(endpoints, health):
            cluster.endpoints[address].healthy = healthy
        return cluster

    def test_round_robin_over_all_when_unchecked(self) -> None:
        """With no health known, the order rotates over every endpoint."""
        cluster = self.cluster(None, None, None)
        self.assertEqual([cluster.endpoint_order()[0] for _ in range(4)], [A, B, C, A])

    def test_unhealthy_endpoint_is_skipped(self) -> None:
        """An endpoint marked unhealthy is left out while others are healthy or unchecked."""
        cluster = self.cluster(True, False, None)
        orders = [cluster.endpoint_order() for _ in range(3)]
        self.assertEqual(orders, [[A, C], [C, A], [A, C]])

    def test_all_unhealthy_tries_all(self) -> None:
        """When every endpoint is unhealthy, all of them are tried (panic mode)."""
        cluster = self.cluster(False, False, False)
        self.assertTrue(cluster.panicking())
        self.assertEqual([cluster.endpoint_order() for _ in range(2)], [[A, B, C], [B, C, A]])

    def test_dial_in_panic_is_counted(self) -> None:
        """A dial started while every endpoint is unhealthy counts in panic_total, and still dials."""
        reactor = MemoryReactorClock()
        reactor.installNameResolver(LiteralResolver())
        cluster = UpstreamCluster(cluster_config(endpoints=(A, B)), reactor, {}.get)
        cluster.endpoints[A].healthy = False
        cluster.dial(Protocol(), lambda address: None)
        self.assertEqual(cluster.panic_total, 0)
        cluster.endpoints[B].healthy = False
        attempts: list[Address] = []
        cluster.dial(Protocol(), attempts.append)
        self.assertEqual(cluster.panic_total, 1)
        self.assertEqual(len(attempts), 1)
        self.assertEqual(reactor.tcpClients[-1][:2], (attempts[0].host, attempts[0].port))

    def test_checker_marks_and_choice_skips(self) -> None:
        """An endpoint that refuses and one that accepts then closes silently are skipped after checks."""
        w = World(endpoints=(A, B, C), kind="postgres")
        w.checker.start()
        w.refuse(A)
        probe, _transport = w.accept(B)
        probe.connectionLost(Failure(ConnectionDone()))
        probe, transport = w.accept(C)
        probe.dataReceived(b"N")
        self.assertEqual([w.state(a).healthy for a in (A, B, C)], [False, False, True])
        self.assertEqual(w.cluster.endpoint_order(), [C])
        self.assertFalse(w.cluster.panicking())
