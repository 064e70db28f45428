"""Tests for egressproxy.app.service, egressproxy.app.tap and the twistd plugin."""

from __future__ import annotations

import io

import attrs
import os
import socket

from twisted.application.service import IServiceMaker
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, _FakePort
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.app import tap
from egressproxy.config import Config, HealthCheckConfig, parse_config
from egressproxy.datapath.listener import ListenerFactory
from egressproxy.app.service import EgressService

TWO_LISTENERS = """\
listeners:
  - name: all
    listen: ":0"
    cluster: pg
  - name: local
    listen: "127.0.0.1:0"
    cluster: pg
clusters:
  - name: pg
    endpoints: ["db.example.test:5432"]
"""

BAD_CLUSTER = """\
listeners:
  - name: all
    listen: ":0"
    cluster: nope
clusters:
  - name: pg
    endpoints: ["db.example.test:5432"]
"""


class RecordingPort(_FakePort):
    """MemoryReactor's listening port, also recording ``stopListening``."""

    stopped = False

    def stopListening(self) -> None:
        self.stopped = True


class RecordingReactor(MemoryReactorClock):
    """A MemoryReactorClock whose adopted ports record being stopped."""

    def __init__(self) -> None:
        super().__init__()
        self.listening: list[RecordingPort] = []

    def adoptStreamPort(self, fileno, addressFamily, factory):  # type: ignore[no-untyped-def]
        port = RecordingPort(super().adoptStreamPort(fileno, addressFamily, factory).getHost())
        self.listening.append(port)
        return port


def without_probes(config: Config) -> Config:
    """``config`` with health checks off: they would add dials and timers to these tests."""
    return attrs.evolve(config, clusters=tuple(
        attrs.evolve(c, health_check=HealthCheckConfig(kind="none")) for c in config.clusters
    ))


def make_service(text: str = TWO_LISTENERS, reactor: MemoryReactorClock | None = None) -> EgressService:
    # The HTTP services are covered by test_admin; here they would bind real ports.
    return EgressService(
        without_probes(attrs.evolve(parse_config(text, "t.yaml", {}), admin=None, metrics=None)),
        reactor if reactor is not None else MemoryReactorClock(),
        access_stream=io.StringIO(),
    )


def taken_port(test: SynchronousTestCase) -> int:
    """A loopback port some other socket is listening on for the rest of the test."""
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    test.addCleanup(blocker.close)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    return blocker.getsockname()[1]


class StartTests(SynchronousTestCase):
    """EgressService start-up: every listener bound, or none."""

    def test_privileged_start_binds_each_listener(self) -> None:
        """privilegedStartService adopts one bound socket per listener, in config order."""
        reactor = MemoryReactorClock()
        service = make_service(reactor=reactor)
        service.privilegedStartService()
        self.assertEqual(
            [(family, factory.listener.config.name) for _fd, family, factory in reactor.adoptedPorts],
            [(socket.AF_INET6, "all"), (socket.AF_INET, "local")],
        )

    def test_factories_are_tcp_proxy_factories(self) -> None:
        """Each adopted port serves a ListenerFactory for its own listener runtime."""
        reactor = MemoryReactorClock()
        service = make_service(reactor=reactor)
        service.privilegedStartService()
        factories = [factory for _fd, _family, factory in reactor.adoptedPorts]
        self.assertEqual([type(f) for f in factories], [ListenerFactory, ListenerFactory])
        self.assertEqual([f.listener for f in factories], [service.listeners["all"], service.listeners["local"]])

    def test_ports_recorded_by_name(self) -> None:
        """The bound ports are kept under their listener names."""
        service = make_service()
        service.privilegedStartService()
        self.assertEqual(sorted(service.ports), ["all", "local"])

    def test_start_service_binds_without_privileged_start(self) -> None:
        """startService alone binds the listeners and marks the service running."""
        reactor = MemoryReactorClock()
        service = make_service(reactor=reactor)
        service.startService()
        self.assertEqual((len(reactor.adoptedPorts), service.running), (2, 1))

    def test_start_after_privileged_start_binds_once(self) -> None:
        """startService after privilegedStartService does not bind the listeners again."""
        reactor = MemoryReactorClock()
        service = make_service(reactor=reactor)
        service.privilegedStartService()
        service.startService()
        self.assertEqual(len(reactor.adoptedPorts), 2)

    def test_no_delayed_calls(self) -> None:
        """Starting schedules nothing on the reactor."""
        reactor = MemoryReactorClock()
        make_service(reactor=reactor).startService()
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_taken_port_exits_with_message(self) -> None:
        """A listener whose port is taken stops start-up with SystemExit naming it and the reason."""
        port = taken_port(self)
        text = TWO_LISTENERS.replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"')
        service = make_service(text)
        exc = self.assertRaises(SystemExit, service.privilegedStartService)
        self.assertIn(f"listener 'local': cannot listen on 127.0.0.1:{port}: Address already in use", str(exc))

    def test_taken_port_stops_ports_bound_before(self) -> None:
        """When a later listener cannot bind, the ports bound before it are stopped and forgotten."""
        port = taken_port(self)
        text = TWO_LISTENERS.replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"')
        reactor = RecordingReactor()
        service = make_service(text, reactor)
        self.assertRaises(SystemExit, service.privilegedStartService)
        self.assertEqual(
            ([p.stopped for p in reactor.listening], service.ports), ([True], {})
        )


class StopTests(SynchronousTestCase):
    """EgressService.stopService."""

    def test_stop_stops_listening(self) -> None:
        """stopService stops every listening port and forgets them."""
        reactor = RecordingReactor()
        service = make_service(reactor=reactor)
        service.startService()
        service.stopService()
        self.assertEqual(([p.stopped for p in reactor.listening], service.ports), ([True, True], {}))

    def test_stop_fires_and_marks_stopped(self) -> None:
        """stopService returns a Deferred that has fired with None, and the service is not running."""
        reactor = MemoryReactorClock()
        service = make_service(reactor=reactor)
        service.startService()
        self.assertIsNone(self.successResultOf(service.stopService()))
        self.assertEqual((service.running, reactor.getDelayedCalls()), (0, []))


class OptionsTests(SynchronousTestCase):
    """egressproxy.app.tap.Options: --config, $EGRESSPROXY_CONFIG, and errors."""

    def write(self, text: str) -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "egressproxy.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_config_option_loads(self) -> None:
        """--config FILE loads and validates the file into options.loaded."""
        options = tap.Options()
        options.parseOptions(["--config", self.write(TWO_LISTENERS)])
        self.assertIsInstance(options.loaded, Config)
        self.assertEqual([l.name for l in options.loaded.listeners], ["all", "local"])

    def test_invalid_file_names_key_path(self) -> None:
        """An invalid file raises UsageError whose text has the file, line and key path."""
        path = self.write(BAD_CLUSTER)
        exc = self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["--config", path])
        self.assertIn(f"{path}:4: listeners[0].cluster: unknown cluster 'nope'", str(exc))

    def test_missing_file(self) -> None:
        """A missing file raises UsageError naming it and EGRESSPROXY_CONFIG."""
        path = os.path.join(os.path.abspath(self.mktemp()), "absent.yaml")
        exc = self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["--config", path])
        self.assertIn(path, str(exc))
        self.assertIn("EGRESSPROXY_CONFIG", str(exc))

    def test_environment_variable(self) -> None:
        """Without --config the file named by $EGRESSPROXY_CONFIG is loaded."""
        path = self.write(TWO_LISTENERS)
        self.patch(os, "environ", {"EGRESSPROXY_CONFIG": path})
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual((options["config"], type(options.loaded)), (path, Config))

    def test_option_wins_over_environment(self) -> None:
        """--config is used even when $EGRESSPROXY_CONFIG is set."""
        path = self.write(TWO_LISTENERS)
        self.patch(os, "environ", {"EGRESSPROXY_CONFIG": path + ".absent"})
        options = tap.Options()
        options.parseOptions(["--config", path])
        self.assertEqual(options["config"], path)

    def test_default_file(self) -> None:
        """Without --config or $EGRESSPROXY_CONFIG the file is ./egressproxy.yaml."""
        self.patch(os, "environ", {})
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(directory)
        exc = self.assertRaises(usage.UsageError, tap.Options().parseOptions, [])
        self.assertIn("'egressproxy.yaml' not found", str(exc))

    def test_environment_used_for_interpolation(self) -> None:
        """${VAR} in the file is read from the process environment."""
        path = self.write(TWO_LISTENERS.replace("db.example.test", "${PG_HOST}"))
        self.patch(os, "environ", {"PG_HOST": "db.from-env.test"})
        options = tap.Options()
        options.parseOptions(["--config", path])
        self.assertEqual(options.loaded.clusters[0].endpoints[0].host, "db.from-env.test")


class MakeServiceTests(SynchronousTestCase):
    """egressproxy.app.tap.makeService."""

    def test_returns_egress_service(self) -> None:
        """makeService builds an EgressService for the loaded config on the given reactor."""
        options = tap.Options()
        options.loaded = parse_config(TWO_LISTENERS, "t.yaml", {})
        reactor = MemoryReactorClock()
        service = tap.makeService(options, reactor=reactor)
        self.assertIsInstance(service, EgressService)
        self.assertEqual((service.config, service.reactor), (options.loaded, reactor))

    def test_service_starts(self) -> None:
        """The service makeService builds binds its listeners when started."""
        options = tap.Options()
        options.loaded = without_probes(parse_config(TWO_LISTENERS + "admin: false\nmetrics: false\n", "t.yaml", {}))
        reactor = MemoryReactorClock()
        service = tap.makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(
            [factory.listener.config.name for _fd, _family, factory in reactor.adoptedPorts], ["all", "local"]
        )


class PluginTests(SynchronousTestCase):
    """The twistd plugin in twisted/plugins."""

    def test_plugin_found(self) -> None:
        """getPlugins(IServiceMaker) finds exactly one plugin with tapname egressproxy."""
        makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "egressproxy"]
        self.assertEqual(len(makers), 1)

    def test_plugin_points_at_tap(self) -> None:
        """The plugin's options and makeService are those of egressproxy.app.tap."""
        (maker,) = [p for p in getPlugins(IServiceMaker) if p.tapname == "egressproxy"]
        self.assertEqual((maker.options, maker.makeService), (tap.Options, tap.makeService))


class AdminTokenTests(SynchronousTestCase):
    """EGRESSPROXY_ADMIN_TOKEN is read at start-up and on each successful reload."""

    def service(self, environ: dict[str, str], reload_config=None) -> EgressService:  # type: ignore[no-untyped-def]
        config = without_probes(attrs.evolve(parse_config(TWO_LISTENERS, "t.yaml", {}), admin=None, metrics=None))
        return EgressService(
            config, MemoryReactorClock(), access_stream=io.StringIO(),
            reload_config=reload_config or (lambda: config), environ=environ,
        )

    def test_read_at_start(self) -> None:
        """The token comes from the environment given (os.environ by default); unset means none."""
        self.assertEqual(self.service({"EGRESSPROXY_ADMIN_TOKEN": "abc"}).admin_token, "abc")
        self.assertIsNone(self.service({}).admin_token)
        self.assertIs(make_service().environ, os.environ)

    def test_read_again_on_reload(self) -> None:
        """A successful reload picks up a new, changed or removed token."""
        environ = {"EGRESSPROXY_ADMIN_TOKEN": "one"}
        service = self.service(environ)
        environ["EGRESSPROXY_ADMIN_TOKEN"] = "two"
        self.assertEqual(service.admin_token, "one")
        self.assertTrue(service.reload()[0])
        self.assertEqual(service.admin_token, "two")
        del environ["EGRESSPROXY_ADMIN_TOKEN"]
        self.assertTrue(service.reload()[0])
        self.assertIsNone(service.admin_token)

    def test_failed_reload_keeps_token(self) -> None:
        """A refused reload changes nothing, the token included."""
        def broken() -> Config:
            return parse_config(BAD_CLUSTER, "t.yaml", {})

        environ = {"EGRESSPROXY_ADMIN_TOKEN": "one"}
        service = self.service(environ, broken)
        environ["EGRESSPROXY_ADMIN_TOKEN"] = "two"
        self.assertFalse(service.reload()[0])
        self.assertEqual(service.admin_token, "one")


class OwnUpstreamTests(SynchronousTestCase):
    """is_own_upstream: the local ends of live upstream connections, across listeners."""

    def test_local_end_of_live_upstream(self) -> None:
        from twisted.internet.address import IPv4Address, IPv6Address
        from twisted.internet.testing import StringTransport

        from tests.helpers import HalfCloseTransport

        service = make_service()
        runtime = service.listeners["local"]
        factory = ListenerFactory(runtime)
        client = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        client.makeConnection(HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000)))
        own = IPv4Address("TCP", "127.0.0.1", 41000)
        self.assertFalse(service.is_own_upstream(own))  # dialling: no local end yet
        host, port, upstream_factory, _t, _b = service.reactor.tcpClients[-1]  # type: ignore[attr-defined]
        wrapper = upstream_factory.buildProtocol(IPv4Address("TCP", host, port))
        wrapper.makeConnection(StringTransport(hostAddress=own))
        self.assertTrue(service.is_own_upstream(own))
        self.assertTrue(service.is_own_upstream(IPv6Address("TCP", "::ffff:127.0.0.1", 41000)))
        self.assertFalse(service.is_own_upstream(IPv4Address("TCP", "127.0.0.1", 41001)))
        self.assertFalse(service.is_own_upstream(IPv4Address("TCP", "127.0.0.2", 41000)))
        wrapper._wrappedProtocol.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(service.is_own_upstream(own))
