"""Active health checks against real loopback servers, on trial's reactor.

Three endpoints on 127.0.0.1: a closed port (refuses), a server that accepts
and closes without a byte (what a database that drops non-allowlisted peers
looks like), and a tiny fake Postgres that answers ``N`` to an SSLRequest.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from egressproxy.config import Address, HealthCheckConfig
from egressproxy.upstream.health import SSL_REQUEST, HealthChecker
from egressproxy.upstream.cluster import UpstreamCluster
from tests.helpers import cluster_config
from tests.integration.proxy import wait_until


class CountingFactory(Factory):
    """Counts accepted and still-open connections of its protocol."""

    noisy = False

    def __init__(self, protocol: type[Protocol]) -> None:
        self.protocol = protocol
        self.accepted = 0
        self.open = 0
        self.ssl_requests = 0


class ClosesAtOnce(Protocol):
    """Accepts, then closes without sending a byte."""

    factory: CountingFactory

    def connectionMade(self) -> None:
        self.factory.accepted += 1
        self.factory.open += 1
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.factory.open -= 1


class AnswersN(Protocol):
    """A fake Postgres without TLS: answers ``N`` to an SSLRequest, closes on anything else."""

    factory: CountingFactory

    def connectionMade(self) -> None:
        self.factory.accepted += 1
        self.factory.open += 1
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) < 8:
            return
        if self.received[:8] == SSL_REQUEST:
            self.factory.ssl_requests += 1
            self.transport.write(b"N")
            self.received = self.received[8:]  # a real server now waits for the startup packet
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.factory.open -= 1


class Leg(Protocol):
    """Stands in for a session's upstream leg."""

    made = False
    lost = False

    def connectionMade(self) -> None:
        self.made = True

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True


class HealthCheckTests(TestCase):
    async def listen(self, factory: CountingFactory) -> IListeningPort:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        # Runs before stopListening (cleanups are last in, first out).
        self.addCleanup(wait_until, lambda: factory.open == 0, 5)
        return port

    async def closed_port(self) -> int:
        """A loopback port number nothing listens on (bound, then released)."""
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
        number = port.getHost().port
        await port.stopListening()
        return number

    async def test_unhealthy_skipped_then_panic(self) -> None:
        """A refusing and a silently closing endpoint are marked unhealthy and skipped; with all unhealthy, dials still happen."""
        refusing = Address("127.0.0.1", await self.closed_port())
        closer = CountingFactory(ClosesAtOnce)
        closing = Address("127.0.0.1", (await self.listen(closer)).getHost().port)
        postgres = CountingFactory(AnswersN)
        good_port = await self.listen(postgres)
        good = Address("127.0.0.1", good_port.getHost().port)

        health = HealthCheckConfig(kind="postgres", interval=0.2, timeout=1.0,
                                   unhealthy_threshold=1, healthy_threshold=1)
        config = cluster_config(endpoints=(refusing, closing, good), max_connect_attempts=3,
                                connect_timeout=2.0, health_check=health)
        cluster = UpstreamCluster(config, reactor, {}.get)
        checker = HealthChecker(cluster, reactor)
        checker.start()
        self.addCleanup(checker.stop)
        states = cluster.endpoints

        await wait_until(lambda: checker.rounds >= 3 and all(s.healthy is not None for s in states.values()))
        self.assertIs(states[refusing].healthy, False)
        self.assertEqual(states[refusing].last_error, "connection refused")
        self.assertIs(states[closing].healthy, False)
        self.assertIn(states[closing].last_error, (
            "closed without answering the SSLRequest",
            "connection reset before answering the SSLRequest",  # our SSLRequest met its closed socket
        ))
        self.assertIs(states[good].healthy, True)
        self.assertIsNone(states[good].last_error)
        self.assertGreaterEqual(postgres.ssl_requests, 1)
        self.assertEqual(postgres.ssl_requests, postgres.accepted)
        self.assertGreaterEqual(closer.accepted, 1)

        self.assertFalse(cluster.panicking())
        self.assertEqual([cluster.endpoint_order() for _ in range(3)], [[good]] * 3)

        # The good server goes away: every endpoint is unhealthy, and all are tried anyway.
        await good_port.stopListening()
        await wait_until(lambda: states[good].healthy is False)
        # A probe in flight when the server stopped sees a reset; later ones a refusal.
        self.assertIn(
            states[good].last_error,
            ("connection refused", "connection reset before answering the SSLRequest"),
        )
        self.assertTrue(cluster.panicking())
        self.assertEqual(sorted(cluster.endpoint_order(), key=lambda a: a.port),
                         sorted([refusing, closing, good], key=lambda a: a.port))

        attempts: list[Address] = []
        leg = Leg()
        dial = cluster.dial(leg, attempts.append)
        assert dial is not None
        await dial.deferred
        self.assertEqual(cluster.panic_total, 1)
        self.assertTrue(leg.made)
        self.assertEqual(attempts[-1], closing)  # the only endpoint that still accepts
        await wait_until(lambda: leg.lost)
