"""The service's lifecycle on a clock: drain (SIGTERM, POST /drain) and reload (SIGHUP)."""

from __future__ import annotations

import io
import os

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.config import load_config
from egressproxy.app.service import EgressService
from tests.helpers import HalfCloseTransport, LiteralResolver
from tests.test_service import RecordingReactor, without_probes

CONFIG = """\
listeners:
  - name: direct
    listen: "127.0.0.1:0"
    cluster: pg
clusters:
  - name: pg
    endpoints: ["127.0.0.1:5432"]
drain_timeout: {drain}
shutdown_delay: {delay}
"""


class Lifecycle:
    """A service on a RecordingReactor, its config file, and ways to connect clients."""

    def __init__(self, test: SynchronousTestCase, text: str) -> None:
        self.path = test.mktemp()
        self.write(text)
        self.reactor = RecordingReactor()
        self.reactor.installNameResolver(LiteralResolver())
        self.access = io.StringIO()
        self.service = EgressService(
            self.load(), self.reactor, access_stream=self.access, reload_config=self.load
        )
        self.service.startService()

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def load(self):  # type: ignore[no-untyped-def]
        # The HTTP services are tested elsewhere; here they would bind real ports.
        return without_probes(attrs.evolve(load_config(self.path, os.environ), admin=None, metrics=None))

    def port(self, listener: str):  # type: ignore[no-untyped-def]
        return self.service.ports[listener]

    def factory(self, listener: str):  # type: ignore[no-untyped-def]
        for _fileno, _family, factory in self.reactor.adoptedPorts:
            if factory.listener is self.service.listeners[listener]:
                return factory
        raise KeyError(listener)

    def connect(self, listener: str = "direct"):  # type: ignore[no-untyped-def]
        """A client with its upstream connected: (client leg, client transport, upstream leg)."""
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        client = self.factory(listener).buildProtocol(peer)
        transport = HalfCloseTransport(peerAddress=peer)
        client.makeConnection(transport)
        host, port, factory, _t, _b = self.reactor.tcpClients[-1]
        wrapper = factory.buildProtocol(IPv4Address("TCP", host, port))
        wrapper.makeConnection(HalfCloseTransport())
        return client, transport, wrapper._wrappedProtocol

    def tick(self, seconds: float, step: float = 0.1) -> None:
        for _ in range(int(round(seconds / step))):
            self.reactor.advance(step)


def lost(*legs) -> None:  # type: ignore[no-untyped-def]
    for leg in legs:
        leg.connectionLost(Failure(ConnectionDone()))


class DrainTests(SynchronousTestCase):
    def test_ready_turns_false_at_once(self) -> None:
        """A drain makes the service unready before anything else happens."""
        life = Lifecycle(self, CONFIG.format(drain="10s", delay="5s"))
        self.assertTrue(life.service.ready)
        life.service.drain()
        self.assertFalse(life.service.ready)
        self.assertTrue(life.service.draining)

    def test_keeps_accepting_for_shutdown_delay(self) -> None:
        """Listeners keep accepting for shutdown_delay, then stop."""
        life = Lifecycle(self, CONFIG.format(drain="10s", delay="5s"))
        port = life.port("direct")
        life.service.drain()
        life.tick(4.9)
        self.assertFalse(port.stopped)
        life.tick(0.2)
        self.assertTrue(port.stopped)

    def test_live_session_may_finish(self) -> None:
        """A connection that ends within drain_timeout is not cut, and the drain then completes."""
        life = Lifecycle(self, CONFIG.format(drain="10s", delay="0s"))
        client, transport, upstream = life.connect()
        done = life.service.drain()
        life.tick(3)
        self.assertNoResult(done)
        self.assertFalse(transport.disconnected)
        lost(client, upstream)
        life.tick(0.2)
        self.successResultOf(done)
        self.assertNotIn('"DT"', life.access.getvalue())

    def test_session_cut_at_drain_timeout(self) -> None:
        """A connection still live at drain_timeout is aborted and logged with flag DT."""
        life = Lifecycle(self, CONFIG.format(drain="2s", delay="0s"))
        client, transport, upstream = life.connect()
        done = life.service.drain()
        life.tick(1.8)
        self.assertFalse(transport.disconnected)
        life.tick(0.4)
        self.assertTrue(transport.disconnected)
        lost(client, upstream)
        life.tick(0.2)
        self.successResultOf(done)
        self.assertIn('"DT"', life.access.getvalue())
        self.assertEqual(life.reactor.getDelayedCalls(), [])

    def test_request_drain_exits_once_drained(self) -> None:
        """POST /drain's request_drain calls the exit hook once the drain is over."""
        life = Lifecycle(self, CONFIG.format(drain="1s", delay="0s"))
        client, _transport, upstream = life.connect()
        exits: list[None] = []
        life.service.exit_after_drain = lambda: exits.append(None)
        life.service.request_drain()
        life.service.request_drain()
        self.assertEqual(exits, [])
        lost(client, upstream)
        life.tick(0.3)
        self.assertEqual(exits, [None])

    def test_stop_service_runs_the_drain(self) -> None:
        """stopService (what SIGTERM triggers) waits for the drain and is idempotent."""
        life = Lifecycle(self, CONFIG.format(drain="1s", delay="0s"))
        client, _transport, upstream = life.connect()
        first = life.service.stopService()
        second = life.service.stopService()
        self.assertNoResult(first)
        lost(client, upstream)
        life.tick(0.2)
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))


TWO = """\
listeners:
  - name: direct
    listen: "127.0.0.1:0"
    cluster: pg
  - name: pooled
    listen: "127.0.0.1:0"
    cluster: bouncer
clusters:
  - name: pg
    endpoints: ["127.0.0.1:5432"]
    max_connections: 10
  - name: bouncer
    endpoints: ["127.0.0.1:6432"]
"""

CHANGED = """\
listeners:
  - name: direct
    listen: "127.0.0.1:0"
    cluster: pg
    log_prefix: DIRECT2
  - name: replica
    listen: "127.0.0.1:0"
    cluster: replica
clusters:
  - name: pg
    endpoints: ["127.0.0.1:5433"]
    max_connections: 20
  - name: replica
    endpoints: ["127.0.0.1:7432"]
"""


class ReloadTests(SynchronousTestCase):
    def test_adds_removes_and_changes(self) -> None:
        """A valid file adds, removes and changes listeners and clusters."""
        life = Lifecycle(self, TWO)
        pooled_port = life.port("pooled")
        life.write(CHANGED)
        ok, summary = life.service.reload()
        self.assertTrue(ok, summary)
        self.assertEqual(summary, "listeners added: replica; removed: pooled; changed: direct (log_prefix); "
                                  "clusters added: replica; changed: pg (endpoints, max_connections); removed: bouncer")
        self.assertEqual(sorted(life.service.listeners), ["direct", "replica"])
        self.assertEqual(sorted(life.service.clusters), ["pg", "replica"])
        self.assertTrue(pooled_port.stopped)
        self.assertIn("replica", life.service.ports)
        self.assertEqual(life.service.listeners["direct"].config.log_prefix, "DIRECT2")
        self.assertEqual(life.service.clusters["pg"].breaker.max_connections, 20)
        self.assertEqual(life.service.reloads, {"success": 1, "error": 0})

    def test_unchanged_file_logs_no_changes(self) -> None:
        """Reloading the same file succeeds, says 'no changes', and logs that one line."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        life = Lifecycle(self, TWO)
        self.assertEqual(life.service.reload(), (True, "no changes"))
        self.assertIn("config reloaded: no changes", [formatEvent(e) for e in events])

    def test_counters_carry_over(self) -> None:
        """A persisting listener keeps its runtime object, so its counters continue."""
        life = Lifecycle(self, TWO)
        runtime = life.service.listeners["direct"]
        client, _t, upstream = life.connect()
        client.dataReceived(b"12345")
        life.write(CHANGED)
        life.service.reload()
        self.assertIs(life.service.listeners["direct"], runtime)
        self.assertEqual(runtime.connections_total, 1)
        self.assertEqual(runtime.bytes_received, 5)

    def test_new_connections_use_new_endpoints(self) -> None:
        """After a reload, a new connection on a kept listener dials the cluster's new endpoint."""
        life = Lifecycle(self, TWO)
        life.write(CHANGED)
        life.service.reload()
        life.connect("direct")
        self.assertEqual(life.reactor.tcpClients[-1][:2], ("127.0.0.1", 5433))

    def test_live_connections_untouched(self) -> None:
        """Live connections keep flowing through a reload, on kept and removed listeners alike."""
        life = Lifecycle(self, TWO)
        client, transport, upstream = life.connect("direct")
        pooled, pooled_transport, pooled_up = life.connect("pooled")
        life.write(CHANGED)
        life.service.reload()
        upstream.dataReceived(b"still here")
        pooled_up.dataReceived(b"me too")
        self.assertEqual(transport.value(), b"still here")
        self.assertEqual(pooled_transport.value(), b"me too")
        self.assertFalse(transport.disconnecting or pooled_transport.disconnecting)
        self.assertEqual(life.service.live_sessions(), 2)
        lost(client, upstream, pooled, pooled_up)
        self.assertEqual(life.service.live_sessions(), 0)
        self.assertEqual(life.service.clusters["pg"].breaker.active, 0)

    def test_bad_file_changes_nothing(self) -> None:
        """An invalid file is refused with its errors, counted, and the old config keeps serving."""
        life = Lifecycle(self, TWO)
        before = life.service.config
        life.write(TWO.replace("cluster: bouncer", "cluster: nowhere"))
        ok, message = life.service.reload()
        self.assertFalse(ok)
        self.assertIn("listeners[1].cluster: unknown cluster 'nowhere'", message)
        self.assertIs(life.service.config, before)
        self.assertEqual(life.service.reloads, {"success": 0, "error": 1})
        self.assertFalse(life.port("pooled").stopped)

    def test_reload_refused_while_draining(self) -> None:
        """A reload during a drain is refused."""
        life = Lifecycle(self, TWO)
        life.service.drain()
        ok, message = life.service.reload()
        self.assertFalse(ok)
        self.assertIn("draining", message)
