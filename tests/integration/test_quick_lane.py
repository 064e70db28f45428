"""The quick lane (``egressproxy/datapath/quicklane.py``) on real loopback sockets.

A plain ``mode: tcp`` listener's connections go from accept straight to the
compiled relay; these tests check that it takes them, that what it skips
(Twisted's transports, the mode's machine, the dial's Deferreds) changes
nothing a user sees (bytes, access lines, flags, failover, timeouts, drain,
the breaker), and that everything it may not handle takes the ordinary path.
They need the relay: without it they skip and say why.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import protocol, reactor
from twisted.internet._resolver import HostResolution
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from egressproxy.datapath import quickdial
from egressproxy.datapath.lanenames import NameCache
from egressproxy.datapath.quicklane import QuickLane, port_supported
from egressproxy.observe import statusdata
from tests.integration.proxy import InProcessProxy, inline, wait_until
from tests.relaykit import relay_module


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Client(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.closed = True


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class QuickLaneTests(TestCase):
    def setUp(self) -> None:
        relay_module()  # skips, saying why, when the relay cannot load

    def upstream(self) -> int:
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def unanswered(self) -> int:
        """A loopback port whose accept queue is full, so a connect to it hangs (no SYN-ACK)."""
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        self.addCleanup(server.close)
        port = server.getsockname()[1]
        for _ in range(4):  # bounded: fill the queue (1 entry with backlog 0) and then some
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            self.addCleanup(c.close)
        return port

    def proxy(self, endpoints: list[str], cluster: str = "", listener: str = "", top: str = "", fast_path: str = "relay", connect_timeout: str = "2s") -> InProcessProxy:
        listed = ", ".join(f'"{e}"' for e in endpoints)
        return InProcessProxy(self, f"""
fast_path: {fast_path}
{top}
listeners:
  - name: direct
    listen: "127.0.0.1:0"
    cluster: up
{listener}
clusters:
  - name: up
    endpoints: [{listed}]
    connect_timeout: {connect_timeout}
{cluster}
""")

    def lane(self, proxy: InProcessProxy) -> QuickLane:
        return proxy.service.ports["direct"].factory.lane

    async def connect(self, proxy: InProcessProxy) -> Client:
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port("direct")), Client())
        self.addCleanup(lambda: client.transport.abortConnection() if not client.closed else None)
        return client

    @inline
    async def test_takes_plain_tcp_and_logs_as_before(self) -> None:
        """Bytes flow both ways through the relay; one access line with exact counts."""
        up = self.upstream()
        proxy = self.proxy([f"127.0.0.1:{up}"])
        client = await self.connect(proxy)
        client.transport.write(b"x" * 5000)
        await wait_until(lambda: len(client.received) == 5000)
        self.assertEqual(self.lane(proxy).taken, 1)
        [session] = proxy.service.listeners["direct"].sessions
        self.assertTrue(session.relayed)
        self.assertEqual(session.down.transport.getPeer().port, client.transport.getHost().port)
        self.assertEqual(session.up.transport.getPeer().port, up)
        client.transport.loseConnection()
        [line] = await proxy.wait_for_lines(1)
        self.assertIn(f" 127.0.0.1:{up} 5000 5000 ", line)
        self.assertTrue(line.endswith('"-"'), line)
        cluster = proxy.service.clusters["up"]
        self.assertEqual((cluster.connections_total, cluster.breaker.pending, cluster.breaker.active), (1, 0, 0))

    @inline
    async def test_connect_waited_for_by_the_reactor(self) -> None:
        """A connect that is still under way after the call (a distant upstream) completes through the reactor."""
        self.patch(quickdial, "_settled", lambda fd: False)
        proxy = self.proxy([f"127.0.0.1:{self.upstream()}"])
        client = await self.connect(proxy)
        client.transport.write(b"far")
        await wait_until(lambda: client.received == b"far")
        self.assertEqual(self.lane(proxy).taken, 1)
        client.transport.loseConnection()
        [line] = await proxy.wait_for_lines(1)
        self.assertIn(" 3 3 ", line)

    @inline
    async def test_python_data_path_leaves_it_alone(self) -> None:
        """Without the relay (fast_path: python) every connection takes the ordinary path."""
        proxy = self.proxy([f"127.0.0.1:{self.upstream()}"], fast_path="python")
        client = await self.connect(proxy)
        client.transport.write(b"ping")
        await wait_until(lambda: client.received == b"ping")
        self.assertEqual(self.lane(proxy).taken, 0)

    @inline
    async def test_fails_over_to_the_next_endpoint(self) -> None:
        """A refused first endpoint is counted, and the second one carries the connection."""
        dead, live = closed_port(), self.upstream()
        proxy = self.proxy([f"127.0.0.1:{dead}", f"127.0.0.1:{live}"], cluster="    max_connect_attempts: 2")
        client = await self.connect(proxy)
        client.transport.write(b"hello")
        await wait_until(lambda: client.received == b"hello")
        client.transport.loseConnection()
        [line] = await proxy.wait_for_lines(1)
        self.assertIn(f" 127.0.0.1:{live} 5 5 ", line)
        cluster = proxy.service.clusters["up"]
        self.assertEqual(cluster.connect_failures["refused"], 1)
        self.assertEqual(self.lane(proxy).taken, 1)

    @inline
    async def test_every_endpoint_refused_closes_with_UF(self) -> None:
        """The last failure closes the client, flags UF, logs why and frees the breaker slot."""
        proxy = self.proxy([f"127.0.0.1:{closed_port()}"], cluster="    max_connect_attempts: 3")
        errors: list[str] = []
        from twisted.logger import globalLogPublisher

        def watch(event: dict[str, Any]) -> None:
            text = event.get("log_format") or ""
            if "failed for" in text:
                errors.append(event["reason"])

        globalLogPublisher.addObserver(watch)
        self.addCleanup(globalLogPublisher.removeObserver, watch)
        client = await self.connect(proxy)
        await wait_until(lambda: client.closed)
        [line] = await proxy.wait_for_lines(1)
        self.assertTrue(line.endswith('"UF"'), line)
        self.assertEqual(client.received, b"")
        cluster = proxy.service.clusters["up"]
        self.assertEqual(cluster.connect_failures["refused"], 3)
        self.assertEqual((cluster.breaker.pending, cluster.breaker.active), (0, 0))
        self.assertEqual(len(errors), 1)
        self.assertIn("refused", errors[0].lower())

    @inline
    async def test_connect_timeout_flags_UT(self) -> None:
        """An endpoint that never answers the SYN times out at connect_timeout: flag UT."""
        proxy = self.proxy([f"127.0.0.1:{self.unanswered()}"], cluster="    max_connect_attempts: 1", connect_timeout="0.3s")
        client = await self.connect(proxy)
        await wait_until(lambda: client.closed, timeout=5)
        [line] = await proxy.wait_for_lines(1)
        self.assertTrue(line.endswith('"UT"'), line)
        cluster = proxy.service.clusters["up"]
        self.assertEqual(cluster.connect_failures["timeout"], 1)
        self.assertEqual(cluster.breaker.pending, 0)
        self.assertEqual(self.lane(proxy).taken, 1)

    @inline
    async def test_abort_while_dialling(self) -> None:
        """A drain's abort reaches a connection still dialling: both sockets go, DT, slot freed."""
        proxy = self.proxy([f"127.0.0.1:{self.unanswered()}"], connect_timeout="10s")
        client = await self.connect(proxy)
        listener = proxy.service.listeners["direct"]
        await wait_until(lambda: len(listener.sessions) == 1)
        cluster = proxy.service.clusters["up"]
        self.assertEqual(cluster.breaker.pending, 1)
        [session] = listener.sessions
        self.assertEqual(statusdata._stage(session, False), "dialling")  # as the status page shows it
        proxy.service.abort_sessions(flag="DT")
        await wait_until(lambda: client.closed, timeout=5)
        [line] = await proxy.wait_for_lines(1)
        self.assertIn("DT", line)
        self.assertEqual((cluster.breaker.pending, len(listener.sessions)), (0, 0))

    @inline
    async def test_refused_clients_take_the_ordinary_path(self) -> None:
        """allow_sources refusing the client: the ordinary path refuses it (RBAC), counted once."""
        proxy = self.proxy([f"127.0.0.1:{self.upstream()}"], listener="    allow_sources: [10.9.9.0/24]")
        client = await self.connect(proxy)
        await wait_until(lambda: client.closed)
        [line] = await proxy.wait_for_lines(1)
        self.assertTrue(line.endswith('"RBAC"'), line)
        listener = proxy.service.listeners["direct"]
        self.assertEqual((listener.rejected["source"], listener.connections_total), (1, 1))
        self.assertEqual(self.lane(proxy).taken, 0)

    @inline
    async def test_pinned_name_is_taken(self) -> None:
        """A name pinned by hosts: is dialled by its address; the access line keeps the name."""
        up = self.upstream()
        proxy = self.proxy([f"db.egress.test:{up}"], top='hosts: {"db.egress.test": "127.0.0.1"}')
        client = await self.connect(proxy)
        client.transport.write(b"abc")
        await wait_until(lambda: client.received == b"abc")
        client.transport.loseConnection()
        [line] = await proxy.wait_for_lines(1)
        self.assertIn(f" db.egress.test:{up} 3 3 ", line)
        self.assertEqual(self.lane(proxy).taken, 1)

    @inline
    async def test_idle_timeout_applies(self) -> None:
        """A lane connection idle for idle_timeout is closed with DI, as on the ordinary path."""
        proxy = self.proxy([f"127.0.0.1:{self.upstream()}"], cluster="    idle_timeout: 0.4s")
        client = await self.connect(proxy)
        client.transport.write(b"x")
        await wait_until(lambda: client.received == b"x")
        await wait_until(lambda: client.closed, timeout=5)
        [line] = await proxy.wait_for_lines(1)
        self.assertTrue(line.endswith('"DI"'), line)
        self.assertEqual(self.lane(proxy).taken, 1)

    @inline
    async def test_on_first_byte_and_proxy_protocol_take_the_ordinary_path(self) -> None:
        """Listener settings the lane does not implement leave it out."""
        up = self.upstream()
        proxy = self.proxy([f"127.0.0.1:{up}"], listener="    upstream_connect: on_first_byte")
        client = await self.connect(proxy)
        client.transport.write(b"abc")
        await wait_until(lambda: client.received == b"abc")
        self.assertEqual(self.lane(proxy).taken, 0)


@implementer(IHostnameResolver)
class FakeResolver:
    """The test's own name resolver (no lookup leaves the process): name → addresses."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0, addressTypes: Any = None,
                        transportSemantics: str = "TCP") -> Any:
        self.asked.append(hostName)
        receiver.resolutionBegan(HostResolution(hostName))
        for ip in self.answers.get(hostName, []):
            receiver.addressResolved((IPv6Address if ":" in ip else IPv4Address)("TCP", ip, portNumber))
        receiver.resolutionComplete()
        return HostResolution(hostName)


class NamedUpstreamTests(TestCase):
    """Names the lane may dial: one address, looked up in the background (lanenames.py)."""

    def setUp(self) -> None:
        relay_module()
        self.resolver = FakeResolver({"db.egress.test": ["127.0.0.1"], "pool.egress.test": ["127.0.0.1", "127.0.0.2"]})
        previous = reactor.installNameResolver(self.resolver)
        self.addCleanup(reactor.installNameResolver, previous)

    def proxy(self, name: str) -> tuple[InProcessProxy, int]:
        up = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(up.stopListening)
        port = up.getHost().port
        return InProcessProxy(self, f"""
fast_path: relay
listeners:
  - name: direct
    listen: "127.0.0.1:0"
    cluster: up
clusters:
  - name: up
    endpoints: ["{name}:{port}"]
    connect_timeout: 2s
"""), port

    async def echo(self, proxy: InProcessProxy) -> None:
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port("direct")), Client())
        client.transport.write(b"ping")
        await wait_until(lambda: client.received == b"ping")
        client.transport.loseConnection()
        await wait_until(lambda: client.closed)

    @inline
    async def test_single_address_name_taken_after_its_lookup(self) -> None:
        """The first connection takes the ordinary path while the name is looked up; later ones the lane."""
        proxy, port = self.proxy("db.egress.test")
        lane = proxy.service.ports["direct"].factory.lane
        await self.echo(proxy)
        self.assertEqual(lane.taken, 0)
        await self.echo(proxy)
        await self.echo(proxy)
        self.assertEqual(lane.taken, 2)
        lines = await proxy.wait_for_lines(3)
        self.assertTrue(all(f" db.egress.test:{port} 4 4 " in line for line in lines), lines)

    @inline
    async def test_several_addresses_stay_on_the_ordinary_path(self) -> None:
        """A name with two addresses is raced by HostnameEndpoint, never dialled by the lane."""
        proxy, _ = self.proxy("pool.egress.test")
        lane = proxy.service.ports["direct"].factory.lane
        for _ in range(3):
            await self.echo(proxy)
        self.assertEqual(lane.taken, 0)


class NameCacheTests(TestCase):
    """The lane's answers: fresh, stale while refreshed, too stale, forgotten."""

    def cache(self, answers: dict[str, list[str]]) -> tuple[NameCache, Clock, FakeResolver]:
        clock = Clock()
        resolver = FakeResolver(answers)
        clock.nameResolver = resolver  # type: ignore[attr-defined]
        return NameCache(clock, ttl=5.0, stale_limit=30.0), clock, resolver

    def test_first_ask_looks_up_and_later_asks_reuse(self) -> None:
        cache, clock, resolver = self.cache({"a.test": ["192.0.2.1"]})
        self.assertIsNone(cache.address("a.test"))  # the first connection: ordinary path
        self.assertEqual(str(cache.address("a.test")), "192.0.2.1")
        clock.advance(4.9)
        cache.address("a.test")
        self.assertEqual(resolver.asked, ["a.test"])

    def test_stale_answer_used_while_refreshed_then_dropped(self) -> None:
        cache, clock, resolver = self.cache({"a.test": ["192.0.2.1"]})
        cache.address("a.test")
        clock.advance(6)
        resolver.answers["a.test"] = ["192.0.2.9"]
        self.assertEqual(str(cache.address("a.test")), "192.0.2.1")  # served while the lookup ran (synchronous here)
        self.assertEqual(str(cache.address("a.test")), "192.0.2.9")
        resolver.answers["a.test"] = []
        clock.advance(6)
        cache.address("a.test")
        self.assertIsNone(cache.address("a.test"))  # found nothing: forgotten

    def test_several_addresses_give_none(self) -> None:
        cache, _, _ = self.cache({"pool.test": ["192.0.2.1", "192.0.2.2"]})
        cache.address("pool.test")
        self.assertIsNone(cache.address("pool.test"))

    def test_too_stale_is_not_used(self) -> None:
        cache, clock, resolver = self.cache({"a.test": ["192.0.2.1"]})
        cache.address("a.test")
        hung: list[Any] = []
        resolver.resolveHostName = lambda receiver, *a, **k: hung.append(receiver)  # type: ignore[method-assign]
        clock.advance(31)
        self.assertIsNone(cache.address("a.test"))  # the lookup hangs: older than the limit is not used
        self.assertEqual(len(hung), 1)


class PortSupportTests(TestCase):
    def test_this_twisted_is_supported(self) -> None:
        """The Twisted the tests run on makes transports through Port.transport (checked from its source)."""
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertTrue(port_supported(port))

    def test_other_ports_are_not(self) -> None:
        self.assertFalse(port_supported(object()))


class TargetsTests(TestCase):
    """Which clusters the lane can dial without resolving a name."""

    def cluster(self, endpoints: list[tuple[str, int]], pins: dict[str, str]) -> Any:
        from egressproxy.config import Address

        class Config:
            pass

        class Cluster:
            pass

        config = Config()
        config.endpoints = [Address(h, p) for h, p in endpoints]  # type: ignore[attr-defined]
        cluster = Cluster()
        cluster.config = config  # type: ignore[attr-defined]
        cluster.pinned = pins.get  # type: ignore[attr-defined]
        return cluster

    def test_names_wait_for_their_lookup(self) -> None:
        clock = Clock()
        clock.nameResolver = FakeResolver({"db.example.com": ["192.0.2.3"]})  # type: ignore[attr-defined]
        lane = QuickLane(listener=None, reactor=clock)
        cluster = self.cluster([("192.0.2.1", 5432), ("db.example.com", 5432)], {})
        self.assertIsNone(lane.targets(cluster))
        targets = lane.targets(cluster)
        assert targets is not None
        self.assertEqual(sorted(t.sockaddr[:2] for t in targets.values()), [("192.0.2.1", 5432), ("192.0.2.3", 5432)])

    def test_literals_and_pins(self) -> None:
        lane = QuickLane(listener=None, reactor=None)
        targets = lane.targets(self.cluster([("192.0.2.1", 5432), ("db.example.com", 6432), ("::1", 1)], {"db.example.com": "192.0.2.2"}))
        assert targets is not None
        self.assertEqual(sorted(t.sockaddr[:2] for t in targets.values()), [("192.0.2.1", 5432), ("192.0.2.2", 6432), ("::1", 1)])
        self.assertEqual({t.family for t in targets.values()}, {socket.AF_INET, socket.AF_INET6})
