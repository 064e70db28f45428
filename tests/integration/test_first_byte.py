"""Health checks that never reach the database: ``upstream_connect: on_first_byte`` on real sockets.

Fly's ``tcp_checks`` connect to each published port every 15 s and hang up
without a byte.  These tests run the bundled config's own listeners
(``egressproxy.example.yaml``, every key as shipped but the addresses) in
an ``InProcessProxy`` in front of a TCP server on loopback that counts the
connections it accepts, and show that 100 such probes cost the upstream
nothing, each logged once with flag ``NB``, while a client that sends
bytes is served as before (on the fast path).  Then psql, over verify-full
TLS and SCRAM, through an ``on_first_byte`` listener to a real PostgreSQL,
whose own log (``log_connections``) shows that probes never reached it and
that an ``immediate`` listener's probe does.
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from egressproxy.datapath.fastread import ATTRIBUTE
from tests.integration.pgserver import _read_from, _size, shared_server
from tests.integration.proxy import InProcessProxy, inline, wait_until
from tests.integration.test_postgres import SSL_IN_USE, cluster, listener, parse_access, proxy_config, psql

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLED_CONFIG = os.path.join(ROOT, "egressproxy.example.yaml")
PROBES = 100
#: Probes in flight at once (Fly's checks are a few per Machine; this only paces the test).
BATCH = 10
NO_BYTES = "NB"


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class CountingEcho(protocol.Factory):
    """The upstream: counts every connection it accepts, and echoes."""

    noisy = False
    protocol = Echo

    def __init__(self) -> None:
        self.accepted = 0

    def buildProtocol(self, addr: object) -> protocol.Protocol:
        self.accepted += 1
        return super().buildProtocol(addr)


class Probe(protocol.Protocol):
    """What a TCP health check does: connect, send nothing, hang up."""

    def __init__(self, header: bytes = b"") -> None:
        self.header = header
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        if self.header:
            self.transport.write(self.header)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(None)


class Collector(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True


async def probe(port: int, header: bytes = b"") -> None:
    """One health-check connection to 127.0.0.1:``port``, until the client side has closed."""
    p = Probe(header)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), p)
    d = p.done
    d.addTimeout(5, reactor)
    await d


def bundled_on_loopback(upstream_port: int) -> tuple[str, list[dict[str, Any]]]:
    """The bundled config with its listeners on loopback and its clusters at ``upstream_port``.

    Listener keys stay as shipped (mode, upstream_connect, allow_sources,
    proxy_protocol ...); the HTTP services, the drain timings and the
    clusters' active health checks (which would connect to the counted
    upstream) are left out.  Returns the YAML text and the listeners.
    """
    with open(BUNDLED_CONFIG, encoding="utf-8") as f:
        shipped = yaml.safe_load(f)
    listeners = shipped["listeners"]
    for entry in listeners:
        entry["listen"] = "127.0.0.1:0"
        if entry.get("proxy_protocol_trusted"):
            entry["proxy_protocol_trusted"] = list(entry["proxy_protocol_trusted"]) + ["127.0.0.1/32"]
    clusters = shipped["clusters"]
    for entry in clusters:
        entry["endpoints"] = [f"127.0.0.1:{upstream_port}"]
        entry.pop("health_check", None)
    text = yaml.safe_dump({"listeners": listeners, "clusters": clusters}, sort_keys=False)
    return text, listeners


def header_for(entry: dict[str, Any], port: int) -> bytes:
    """The PROXY header a probe sends first on a ``proxy_protocol`` listener (none otherwise)."""
    if not entry.get("proxy_protocol"):
        return b""
    return f"PROXY TCP4 127.0.0.1 127.0.0.1 40000 {port}\r\n".encode()


class BundledListenerProbeTests(TestCase):
    """The bundled listeners in front of a counting upstream."""

    def setUp(self) -> None:
        self.upstream = CountingEcho()
        port = reactor.listenTCP(0, self.upstream, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.upstream_port = port.getHost().port
        text, self.listeners = bundled_on_loopback(self.upstream_port)
        self.proxy = InProcessProxy(self, text)

    @inline
    async def test_probes_never_reach_upstream_and_data_does(self) -> None:
        """100 connect-and-close probes: 0 upstream connections, 100 lines flagged NB; then an echo works."""
        names = [entry["name"] for entry in self.listeners]
        targets = [(self.proxy.port(entry["name"]), entry) for entry in self.listeners]
        # What each listener's probes send: nothing, or a PROXY header alone.
        sent = {entry.get("log_prefix", entry["name"].upper()): len(header_for(entry, port)) for port, entry in targets}
        for start in range(0, PROBES, BATCH):
            await defer.gatherResults([
                defer.ensureDeferred(probe(port, header_for(entry, port)))
                for port, entry in (targets[i % len(targets)] for i in range(start, start + BATCH))
            ], consumeErrors=True)
        lines = [parse_access(line) for line in await self.proxy.wait_for_lines(PROBES)]
        await wait_until(lambda: self.proxy.live_sessions() == 0)
        self.assertEqual(self.upstream.accepted, 0)
        self.assertEqual(len(lines), PROBES, self.proxy.access_lines()[:5])
        for line in lines:
            self.assertIn(line.prefix, sent)
            self.assertEqual((line.upstream, line.received, line.sent, line.flags), ("-", sent[line.prefix], 0, NO_BYTES), line)
        self.assertEqual(
            sorted({line.prefix for line in lines}), sorted(sent), "every bundled listener was probed"
        )
        for name in names:
            cluster = self.proxy.service.listeners[name].cluster
            self.assertEqual(sum(cluster.connect_failures.values()), 0, name)
            self.assertEqual(cluster.connections_total, 0, name)

        # A client that speaks is served: its bytes go first, the echo comes back.
        entry = self.listeners[0]
        port = self.proxy.port(entry["name"])
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Collector())
        self.addCleanup(client.transport.abortConnection)
        payload = header_for(entry, port) + b"ping" * 1000
        client.transport.write(payload)
        await wait_until(lambda: len(client.received) >= 4000)
        self.assertEqual(client.received, b"ping" * 1000)
        self.assertEqual(self.upstream.accepted, 1)
        runtime = self.proxy.service.listeners[entry["name"]]
        [session] = list(runtime.sessions)
        if "read" in runtime.fast_path.active and not getattr(session, "relayed", False):  # the relay reads for itself
            for leg in (session.down, session.up):
                self.assertTrue(hasattr(leg.transport, ATTRIBUTE), f"{type(leg).__name__} is off the fast path")
        client.transport.loseConnection()
        await wait_until(lambda: client.closed)
        [last] = [parse_access(line) for line in (await self.proxy.wait_for_lines(PROBES + 1))[PROBES:]]
        self.assertEqual((last.received, last.sent, last.flags), (len(payload), 4000, "-"))
        self.assertEqual(last.upstream, f"127.0.0.1:{self.upstream_port}")

    def test_fast_path_is_on(self) -> None:
        """The check above on the legs' reads is not skipped here: the read shortcut is on."""
        runtime = self.proxy.service.listeners[self.listeners[0]["name"]]
        self.assertIn("read", runtime.fast_path.active)


class PsqlThroughFirstByteTests(TestCase):
    """psql through an on_first_byte listener to a real PostgreSQL, and what the server saw."""

    def setUp(self) -> None:
        self.server = shared_server()
        # Every connection the postmaster accepts gets a "connection received" line.
        self.server.superuser_sql("alter system set log_connections = on")
        self.server.superuser_sql("select pg_reload_conf()")
        self.addCleanup(self.server.superuser_sql, "select pg_reload_conf()")
        self.addCleanup(self.server.superuser_sql, "alter system reset log_connections")
        self.upstream = f"db.egress.test:{self.server.port}"
        self.proxy = InProcessProxy(self, proxy_config(
            listener("lazy", "pg", extra="log_prefix: LAZY\nupstream_connect: on_first_byte")
            + listener("eager", "pg", extra="log_prefix: EAGER"),
            cluster("pg", self.upstream),
        ))

    def received(self, offset: int) -> int:
        return _read_from(self.server.logfile, offset).count("connection received: host=127.0.0.1")

    @inline
    async def test_psql_works_and_probes_never_reach_the_server(self) -> None:
        offset = _size(self.server.logfile)
        lazy = self.proxy.port("lazy")
        for _ in range(20):
            await probe(lazy)
        out, err, code = await psql(self.server.dsn(port=lazy), "select 1", SSL_IN_USE)
        self.assertEqual((code, out.split()), (0, ["1", "t"]), err)
        lines = [parse_access(line) for line in await self.proxy.wait_for_lines(21)]
        self.assertEqual([line.flags for line in lines[:20]], [NO_BYTES] * 20)
        session = lines[20]
        self.assertEqual(session.upstream, self.upstream)
        self.assertGreater(session.received, 0)
        self.assertGreater(session.sent, 0)
        if session.flags != "-":
            # The benign end-of-TLS resets (see test_postgres.assertEndedNormally).
            self.assertLessEqual(set(session.flags.split(",")), {"DC", "UC"}, session)
        # The server saw psql's connection and none of the probes'.
        await wait_until(lambda: self.received(offset) >= 1)
        self.assertEqual(self.received(offset), 1)

        # Control: a probe through an immediate listener does reach the server.
        await probe(self.proxy.port("eager"))
        await wait_until(lambda: self.received(offset) >= 2)
        [eager] = [parse_access(line) for line in (await self.proxy.wait_for_lines(22))[21:]]
        self.assertEqual((eager.prefix, eager.upstream), ("EAGER", self.upstream))
        self.assertNotIn(NO_BYTES, eager.flags)
