"""
PostgreSQL through the proxy: real psql and pgbench, real TLS, real sockets.

The proxy runs in trial's reactor (``InProcessProxy``) in front of the shared
fixture server (``shared_server()``), whose certificate names
``db.egress.test``; clients connect with ``sslmode=verify-full`` and
``hostaddr`` set to a loopback address, so a pass means the TLS conversation
crossed the proxy byte for byte. Client programs run through ``run_process``
(never ``subprocess.run`` once a proxy exists: the proxy shares the reactor and
would freeze). Blocking setup (tables, a second server) happens before the
proxy starts.

Each test reads the access log the proxy writes, in Envoy's TCP shape::

    [start] PREFIX peer upstream-host:port received sent duration-ms "FLAGS"
"""

from __future__ import annotations

import hashlib
import re
import socket
import struct
from typing import NamedTuple

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from tests.integration.pgserver import PostgresServer, shared_server
from tests.integration.proxy import InProcessProxy, inline, require_tool, run_process, wait_until

SSL_IN_USE = "select ssl from pg_stat_ssl where pid = pg_backend_pid()"


#: libpq's SSLRequest: length 8, then the magic code 80877103.
SSL_REQUEST = struct.pack("!ii", 8, 80877103)

#: Rows in the COPY table: each is ~240 bytes of COPY text, ~60 MB in all.
BIG_ROWS = 250_000
BIG_MINIMUM = 50_000_000

ACCESS_LINE = re.compile(
    r"^\[(?P<start>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)\] (?P<prefix>\S+) (?P<peer>\S+) "
    r'(?P<upstream>\S+) (?P<received>\d+) (?P<sent>\d+) (?P<duration>\d+) "(?P<flags>[^"]*)"$'
)


class AccessLine(NamedTuple):
    prefix: str
    peer: str
    upstream: str
    received: int
    sent: int
    duration_ms: int
    flags: str


def parse_access(line: str) -> AccessLine:
    """One access-log line as fields; fails the test on a malformed line."""
    match = ACCESS_LINE.match(line)
    if match is None:
        raise AssertionError(f"not an access-log line: {line!r}")
    return AccessLine(
        prefix=match["prefix"],
        peer=match["peer"],
        upstream=match["upstream"],
        received=int(match["received"]),
        sent=int(match["sent"]),
        duration_ms=int(match["duration"]),
        flags=match["flags"],
    )


#: The shared coroutine-test decorator, under this module's older name.
deferred_test = inline


def proxy_config(listeners: str, clusters: str, hosts: str = "db.egress.test: 127.0.0.1") -> str:
    """A proxy config from indented YAML list items for listeners and clusters."""
    return f"listeners:\n{listeners}\nclusters:\n{clusters}\nhosts:\n  {hosts}\n"


def listener(name: str, cluster: str, listen: str = "127.0.0.1:0", extra: str = "") -> str:
    text = f'  - name: {name}\n    listen: "{listen}"\n    cluster: {cluster}\n'
    return text + "".join(f"    {line}\n" for line in extra.splitlines() if line)


def cluster(name: str, endpoint: str, extra: str = "") -> str:
    text = (
        f"  - name: {name}\n"
        f'    endpoints: ["{endpoint}"]\n'
        "    connect_timeout: 2s\n"
        "    max_connect_attempts: 1\n"
        "    idle_timeout: 0\n"
    )
    return text + "".join(f"    {line}\n" for line in extra.splitlines() if line)


def closed_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


async def psql(dsn: str, *commands: str, timeout: float = 60.0) -> tuple[str, str, int]:
    """Run psql (unaligned tuples, no psqlrc, stop at the first error) on ``dsn``."""
    argv = [require_tool("psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", dsn]
    for command in commands:
        argv += ["-c", command]
    return await run_process(argv, timeout=timeout)


class HeldClient(Protocol):
    """A raw client that sends an SSLRequest and then holds its connection open."""

    def __init__(self) -> None:
        self.received = b""
        self.closed = False

    def connectionMade(self) -> None:
        self.transport.write(SSL_REQUEST)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True

    async def close(self) -> None:
        if not self.closed:
            self.transport.loseConnection()
        await wait_until(lambda: self.closed, timeout=5)


class HangUp(Protocol):
    def connectionMade(self) -> None:
        self.transport.loseConnection()


class CountingFactory(Factory):
    """A TCP server that counts the connections it accepts and hangs up on each."""

    noisy = False
    protocol = HangUp

    def __init__(self) -> None:
        self.connections = 0

    def buildProtocol(self, addr: object) -> Protocol:
        self.connections += 1
        return super().buildProtocol(addr)


class PostgresThroughProxyTests(TestCase):
    def setUp(self) -> None:
        self.server = shared_server()
        self.pg_upstream = f"db.egress.test:{self.server.port}"

    def assertEndedNormally(self, line: AccessLine) -> None:
        """``line`` has no flag but, at most, the benign resets that end TLS sessions.

        psql and pgbench send Terminate and close at once.  The server's TLS
        close_notify, relayed by the proxy, may then reach a client that has
        already closed, and the client's kernel resets (DC).  Or the client's
        close_notify, relayed the other way, may reach a backend that has
        already exited, and the server's kernel resets (UC).  Either reset can
        reach the proxy a reactor turn before the FIN that preceded it.  No
        other flag may appear on a session that ended normally.
        """
        if line.flags != "-":
            self.assertLessEqual(set(line.flags.split(",")), {"DC", "UC"}, line)

    def direct_proxy(self, listen: str = "127.0.0.1:0", cluster_extra: str = "") -> InProcessProxy:
        """A proxy with one listener ``direct`` (prefix DIRECT) to the shared server."""
        return InProcessProxy(
            self,
            proxy_config(
                listener("direct", "pg", listen, "log_prefix: DIRECT"),
                cluster("pg", self.pg_upstream, cluster_extra),
            ),
        )

    @deferred_test
    async def test_psql_verify_full_over_ipv4(self) -> None:
        """psql with verify-full through the proxy reaches the server over TLS and is logged once."""
        proxy = self.direct_proxy()
        out, err, code = await psql(
            self.server.dsn(port=proxy.port("direct")), "select 1", SSL_IN_USE
        )
        self.assertEqual((code, out.split()), (0, ["1", "t"]), err)

        await proxy.wait_for_lines(1)
        await wait_until(lambda: proxy.live_sessions() == 0)
        lines = [parse_access(line) for line in proxy.access_lines()]
        self.assertEqual(len(lines), 1, proxy.access_lines())
        [line] = lines
        self.assertEqual(line.prefix, "DIRECT")
        self.assertRegex(line.peer, r"^127\.0\.0\.1:\d+$")
        self.assertEqual(line.upstream, self.pg_upstream)
        self.assertGreater(line.received, 0)
        self.assertGreater(line.sent, 0)
        self.assertEndedNormally(line)

    @deferred_test
    async def test_plaintext_session_end_has_no_flags(self) -> None:
        """A plaintext session the server refuses (hostssl only) ends normally: flag '-' on a tcp listener."""
        proxy = self.direct_proxy()
        out, err, code = await psql(
            self.server.dsn(port=proxy.port("direct"), sslmode="disable"), SSL_IN_USE
        )
        self.assertNotEqual(code, 0, out)
        self.assertIn("no pg_hba.conf entry", err)
        self.assertIn("no encryption", err)
        [line] = [parse_access(line) for line in await proxy.wait_for_lines(1)]
        self.assertEqual((line.upstream, line.flags), (self.pg_upstream, "-"))

    @deferred_test
    async def test_tls_session_end_has_no_flags(self) -> None:
        """A psql session over TLS that ends normally carries no flag but the benign end-of-TLS resets."""
        proxy = self.direct_proxy()
        _, err, code = await psql(self.server.dsn(port=proxy.port("direct")), "select 1")
        self.assertEqual(code, 0, err)
        [line] = [parse_access(line) for line in await proxy.wait_for_lines(1)]
        self.assertEqual(line.upstream, self.pg_upstream)
        self.assertEndedNormally(line)

    @deferred_test
    async def test_dual_stack_listener_serves_ipv6_and_ipv4(self) -> None:
        """A ':0' listener serves psql on both ::1 and 127.0.0.1 and logs each peer unmapped."""
        if not self.server.has_ipv6:
            raise SkipTest("::1 cannot be bound on this machine, so there is no IPv6 loopback to test")
        proxy = self.direct_proxy(listen=":0")
        port = proxy.port("direct")
        for hostaddr in ("::1", "127.0.0.1"):
            out, err, code = await psql(self.server.dsn(port=port, hostaddr=hostaddr), SSL_IN_USE)
            self.assertEqual((code, out.strip()), (0, "t"), f"via {hostaddr}: {err}")

        lines = [parse_access(line) for line in await proxy.wait_for_lines(2)]
        self.assertEqual(len(lines), 2, proxy.access_lines())
        self.assertRegex(lines[0].peer, r"^\[::1\]:\d+$")
        self.assertRegex(lines[1].peer, r"^127\.0\.0\.1:\d+$")
        for line in lines:
            self.assertEqual(line.upstream, self.pg_upstream)
            self.assertEndedNormally(line)

    @deferred_test
    async def test_pgbench_runs_without_failures(self) -> None:
        """pgbench with four clients through the proxy processes every transaction without failures."""
        pgbench = require_tool("pgbench")
        database = "egress_pgbench"
        exists = self.server.superuser_sql(
            f"select 1 from pg_database where datname = '{database}'"
        )
        if not exists.stdout.strip():
            self.server.superuser_sql(f"create database {database}")
        _, err, code = await run_process(
            [pgbench, "-i", "-s", "1", "-q", self.server.superuser_dsn(database)]
        )
        self.assertEqual(code, 0, err)

        proxy = self.direct_proxy()
        clients, per_client = 4, 200
        out, err, code = await run_process(
            [
                pgbench, "-c", str(clients), "-j", "2", "-t", str(per_client),
                self.server.dsn(port=proxy.port("direct"), dbname=database),
            ]
        )
        self.assertEqual(code, 0, f"{out}\n{err}")
        processed = re.search(r"number of transactions actually processed: (\d+)/(\d+)", out)
        failed = re.search(r"number of failed transactions: (\d+)", out)
        self.assertIsNotNone(processed, out)
        self.assertIsNotNone(failed, out)
        assert processed is not None and failed is not None
        self.assertEqual(int(failed[1]), 0, out)
        self.assertGreater(int(processed[1]), 0, out)
        self.assertEqual(int(processed[1]), clients * per_client, out)

        await wait_until(lambda: proxy.live_sessions() == 0)
        lines = [parse_access(line) for line in proxy.access_lines()]
        self.assertGreaterEqual(len(lines), clients)
        self.assertEqual({line.upstream for line in lines}, {self.pg_upstream})
        for line in lines:
            self.assertEndedNormally(line)

    @deferred_test
    async def test_large_copy_is_byte_identical(self) -> None:
        """A COPY of over 50 MB through the proxy matches the direct COPY's checksum."""
        self.server.superuser_sql(
            "drop table if exists egress_copy_big; "
            "create table egress_copy_big as select g, md5(g::text) || repeat('x', 200) as t "
            f"from generate_series(1, {BIG_ROWS}) g",
            timeout=120,
        )
        copy = r"\copy (select * from egress_copy_big order by g) to '{}'"
        direct_path, proxied_path = self.mktemp(), self.mktemp()

        proxy = self.direct_proxy()
        _, err, code = await psql(self.server.dsn(), copy.format(direct_path), timeout=120)
        self.assertEqual(code, 0, err)
        _, err, code = await psql(
            self.server.dsn(port=proxy.port("direct")), copy.format(proxied_path), timeout=120
        )
        self.assertEqual(code, 0, err)

        with open(direct_path, "rb") as f:
            size = f.seek(0, 2)
        self.assertGreaterEqual(size, BIG_MINIMUM)
        self.assertEqual(sha256_of(proxied_path), sha256_of(direct_path))

        [line] = [parse_access(line) for line in await proxy.wait_for_lines(1)]
        self.assertEqual(line.upstream, self.pg_upstream)
        self.assertEndedNormally(line)
        self.assertGreaterEqual(line.sent, BIG_MINIMUM)

    @deferred_test
    async def test_refused_upstream_closes_client_within_connect_timeout(self) -> None:
        """A refused upstream closes the client before the connect timeout and is logged UF."""
        refused = f"db.egress.test:{closed_loopback_port()}"
        proxy = InProcessProxy(
            self, proxy_config(listener("direct", "pg"), cluster("pg", refused))
        )
        connect_timeout = proxy.config.cluster("pg").connect_timeout
        started = reactor.seconds()
        _, err, code = await psql(self.server.dsn(port=proxy.port("direct")), "select 1")
        elapsed = reactor.seconds() - started

        self.assertNotEqual(code, 0)
        self.assertLess(elapsed, connect_timeout)
        [line] = [parse_access(line) for line in await proxy.wait_for_lines(1)]
        self.assertEqual((line.upstream, line.sent, line.flags), (refused, 0, "UF"))

    @deferred_test
    async def test_breaker_overflow_refuses_second_client(self) -> None:
        """With max_connections 1 and one session open, a second psql is refused and logged UO."""
        proxy = self.direct_proxy(cluster_extra="max_connections: 1")
        port = proxy.port("direct")
        held = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), HeldClient())
        self.addCleanup(held.close)
        # 'S' is the server's answer to the SSLRequest: the upstream leg is live.
        await wait_until(lambda: held.received == b"S")

        _, err, code = await psql(self.server.dsn(port=port), "select 1")
        self.assertNotEqual(code, 0)
        [refused] = [parse_access(line) for line in await proxy.wait_for_lines(1)]
        self.assertEqual((refused.upstream, refused.sent, refused.flags), ("-", 0, "UO"))

        await held.close()
        lines = [parse_access(line) for line in await proxy.wait_for_lines(2)]
        self.assertEqual(
            (lines[1].upstream, lines[1].received, lines[1].sent), (self.pg_upstream, len(SSL_REQUEST), 1)
        )

    @deferred_test
    async def test_disallowed_source_never_reaches_upstream(self) -> None:
        """A client outside allow_sources is refused, logged RBAC, and no upstream connection is made."""
        upstream = CountingFactory()
        listening = reactor.listenTCP(0, upstream, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        counted = f"db.egress.test:{listening.getHost().port}"
        proxy = InProcessProxy(
            self,
            proxy_config(
                listener("closed", "counted", extra='allow_sources: ["10.0.0.0/8"]')
                + listener("open", "counted"),
                cluster("counted", counted),
            ),
        )

        _, err, code = await psql(self.server.dsn(port=proxy.port("closed")), "select 1")
        self.assertNotEqual(code, 0)
        [line] = [parse_access(line) for line in await proxy.wait_for_lines(1)]
        self.assertEqual((line.prefix, line.upstream, line.flags), ("CLOSED", "-", "RBAC"))
        self.assertEqual(upstream.connections, 0)

        # The counter works: the same cluster through the open listener is reached.
        await psql(self.server.dsn(port=proxy.port("open")), "select 1")
        await wait_until(lambda: upstream.connections == 1)

    @deferred_test
    async def test_two_listeners_to_two_servers_concurrently(self) -> None:
        """Concurrent psql runs on two listeners reach each listener's own server and log its prefix."""
        pooler = PostgresServer.start(names=("pooler.egress.test",))
        self.addCleanup(pooler.stop)
        proxy = InProcessProxy(
            self,
            proxy_config(
                listener("direct", "pg", extra="log_prefix: DIRECT")
                + listener("pooled", "pooler", extra="log_prefix: POOLED"),
                cluster("pg", self.pg_upstream)
                + cluster("pooler", f"pooler.egress.test:{pooler.port}"),
                hosts="db.egress.test: 127.0.0.1\n  pooler.egress.test: 127.0.0.1",
            ),
        )
        query = "select inet_server_port() from pg_sleep(0.3)"
        runs = 3
        dsns = [self.server.dsn(port=proxy.port("direct"))] * runs
        dsns += [pooler.dsn(port=proxy.port("pooled"))] * runs
        results = await defer.gatherResults(
            [defer.ensureDeferred(psql(dsn, query)) for dsn in dsns]
        )

        answered = [(code, out.strip()) for out, _err, code in results]
        self.assertNotEqual(self.server.port, pooler.port)
        self.assertEqual(
            answered,
            [(0, str(self.server.port))] * runs + [(0, str(pooler.port))] * runs,
            [err for _out, err, _code in results],
        )
        lines = [parse_access(line) for line in await proxy.wait_for_lines(2 * runs)]
        by_prefix = sorted((line.prefix, line.upstream) for line in lines)
        self.assertEqual(
            by_prefix,
            [("DIRECT", self.pg_upstream)] * runs
            + [("POOLED", f"pooler.egress.test:{pooler.port}")] * runs,
        )
        for line in lines:
            self.assertEndedNormally(line)
