"""
``mode: postgres`` end to end: real PostgreSQL servers, real psql and libpq.

Two servers, with certificates for ``a.db.egress.test`` and
``b.db.egress.test`` from one test CA, sit behind one proxy port that routes
by the TLS server name: ``a.db.egress.test`` to cluster ``a`` (exact name,
first match) and ``*.db.egress.test`` to ``{sni}:PORT_B`` (a template, with
``hosts:`` pinning the names to 127.0.0.1).  Clients keep
``sslmode=verify-full``: a pass proves TLS went end to end.  Other tests use
single-cluster and ``tls: originate`` listeners in front of server ``a``.

Every error case asserts what psql (or libpq through psycopg) prints, so the
messages operators will see are pinned here.  Client programs run as
subprocesses (``run_process``) or, for psycopg, in a thread: the proxy shares
the test's reactor.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import SkipTest, TestCase

from tests.integration.pgserver import SUPERUSER_PASSWORD, PostgresServer
from tests.integration.proxy import InProcessProxy, inline, require_tool, run_process, wait_until
from tests.integration.test_postgres import (
    SSL_IN_USE,
    CountingFactory,
    HeldClient,
    closed_loopback_port,
    parse_access,
    psql,
)
from tests.tlsfixtures import TestCA

try:
    import psycopg
except ImportError:  # pragma: no cover - psycopg is in the test extra
    psycopg = None

A = "a.db.egress.test"
B = "b.db.egress.test"

_servers: dict[str, PostgresServer] = {}


def servers() -> tuple[PostgresServer, PostgresServer]:
    """The two servers of this module, started on first use (stopped at exit)."""
    if "a" not in _servers or _servers["a"].stopped:
        a = PostgresServer.start(names=(A,))
        _servers["a"] = a
        _servers["b"] = PostgresServer.start(names=(B,), ca=a.ca)
    return _servers["a"], _servers["b"]


def need_psycopg(version: int = 0) -> Any:
    if psycopg is None:
        raise SkipTest("psycopg is not installed (pip install '.[test]')")
    if psycopg.pq.version() < version:
        raise SkipTest(f"libpq {psycopg.pq.version()} is older than {version}")
    return psycopg


def yaml_listener(name: str, body: str) -> str:
    text = f'  - name: {name}\n    listen: "127.0.0.1:0"\n    mode: postgres\n'
    return text + "".join(f"    {line}\n" for line in body.strip().splitlines())


def yaml_cluster(name: str, endpoint: str, extra: str = "") -> str:
    text = (
        f"  - name: {name}\n"
        f'    endpoints: ["{endpoint}"]\n'
        "    connect_timeout: 2s\n"
        "    max_connect_attempts: 1\n"
    )
    return text + "".join(f"    {line}\n" for line in extra.strip().splitlines())


def config(listeners: list[str], clusters: list[str]) -> str:
    hosts = "".join(f"  {name}: 127.0.0.1\n" for name in (A, B, "c.db.egress.test"))
    return "listeners:\n" + "".join(listeners) + "clusters:\n" + "".join(clusters) + "hosts:\n" + hosts


async def psycopg_connect(dsn: str, **kwargs: Any) -> Any:
    """psycopg.connect in a thread (it blocks)."""
    pg = need_psycopg()
    return await threads.deferToThread(pg.connect, dsn, **kwargs)


async def psycopg_query(conn: Any, sql: str) -> Any:
    def run() -> Any:
        with conn.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchone()[0]

    return await threads.deferToThread(run)


class RunningPsql(protocol.ProcessProtocol):
    """A psql process the test can signal; ``ended`` fires with (stdout, stderr, code)."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred[tuple[str, str, int]] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        code = reason.value.exitCode
        self.ended.callback((self.out.decode(), self.err.decode(), code if code is not None else -1))


def spawn_psql(dsn: str, sql: str) -> tuple[RunningPsql, Any]:
    argv = [require_tool("psql"), "-X", "-A", "-t", "-d", dsn, "-c", sql]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({"LC_ALL": "C.UTF-8", "PGCLIENTENCODING": "UTF8"})
    running = RunningPsql()
    transport = reactor.spawnProcess(running, argv[0], argv, env=env)
    return running, transport


class PostgresModeTests(TestCase):
    def setUp(self) -> None:
        self.a, self.b = servers()

    # -- helpers -------------------------------------------------------------

    def routed_proxy(self) -> InProcessProxy:
        """One port routing a.db.egress.test to cluster a, *.db.egress.test to {sni}:PORT_B."""
        routes = (
            "routes:\n"
            f'  - {{sni: "{A}", cluster: a}}\n'
            f'  - {{sni: "*.db.egress.test", upstream: "{{sni}}:{self.b.port}"}}\n'
            "log_prefix: ROUTED"
        )
        return InProcessProxy(
            self, config([yaml_listener("routed", routes)], [yaml_cluster("a", f"{A}:{self.a.port}")])
        )

    def single_proxy(self, endpoint: str | None = None, extra: str = "") -> InProcessProxy:
        endpoint = endpoint or f"{A}:{self.a.port}"
        return InProcessProxy(
            self, config([yaml_listener("single", "cluster: a\n" + extra)], [yaml_cluster("a", endpoint)])
        )

    def originate_proxy(self, cluster_tls: str | None = None, endpoint: str | None = None) -> InProcessProxy:
        endpoint = endpoint or f"{A}:{self.a.port}"
        tls = cluster_tls if cluster_tls is not None else f"tls: {{ca_file: {self.a.ca_path}}}"
        return InProcessProxy(
            self,
            config(
                [yaml_listener("orig", "tls: originate\ncluster: a")],
                [yaml_cluster("a", endpoint, tls)],
            ),
        )

    def dsn(self, server: PostgresServer, port: int, host: str | None = None, sslmode: str = "verify-full",
            **extra: object) -> str:
        return server.dsn(port=port, host=host, sslmode=sslmode, **extra)

    async def lines(self, proxy: InProcessProxy, count: int = 1) -> list[Any]:
        return [parse_access(line) for line in await proxy.wait_for_lines(count)]

    # -- routing by server name ------------------------------------------------

    @inline
    async def test_routes_each_name_to_its_server(self) -> None:
        """Through one port, verify-full reaches a and b by their own names, TLS end to end."""
        proxy = self.routed_proxy()
        port = proxy.port("routed")
        out_a, err_a, code_a = await psql(self.dsn(self.a, port), "select inet_server_port()", SSL_IN_USE)
        out_b, err_b, code_b = await psql(self.dsn(self.b, port), "select inet_server_port()", SSL_IN_USE)
        self.assertEqual((code_a, out_a.split()), (0, [str(self.a.port), "t"]), err_a)
        self.assertEqual((code_b, out_b.split()), (0, [str(self.b.port), "t"]), err_b)
        lines = await self.lines(proxy, 2)
        self.assertEqual(
            sorted((line.prefix, line.upstream) for line in lines),
            [("ROUTED", f"{A}:{self.a.port}"), ("ROUTED", f"{B}:{self.b.port}")],
        )
        for line in lines:
            self.assertLessEqual(set(line.flags.split(",")) - {"-"}, {"DC", "UC"}, line)

    @inline
    async def test_unknown_name_gets_unrecognized_name_alert(self) -> None:
        """A name outside the routes: psql prints the TLS alert, the log says NR, nothing is dialled."""
        proxy = self.routed_proxy()
        _, err, code = await psql(self.dsn(self.a, proxy.port("routed"), host="x.other.test", sslmode="require"),
                                  "select 1")
        self.assertNotEqual(code, 0)
        self.assertIn("SSL error: tlsv1 unrecognized name", err)
        self.assertNotIn("server closed the connection unexpectedly", err)
        [line] = await self.lines(proxy)
        self.assertEqual((line.upstream, line.flags), ("-", "NR"))
        self.assertEqual([c.connections_total for c in proxy.service.all_clusters().values()], [0, 0])
        self.assertEqual(proxy.service.listeners["routed"].rejected["no_route"], 1)
        printed("unknown name, sslmode=require", err)

    @inline
    async def test_plaintext_on_routed_listener(self) -> None:
        """sslmode=disable on an SNI-routed port gets the ErrorResponse saying TLS is required."""
        proxy = self.routed_proxy()
        _, err, code = await psql(self.dsn(self.a, proxy.port("routed"), sslmode="disable"), "select 1")
        self.assertNotEqual(code, 0)
        self.assertIn("FATAL:  egressproxy: TLS required on this listener (it routes by TLS server name)", err)
        [line] = await self.lines(proxy)
        self.assertEqual((line.upstream, line.flags), ("-", "DPE"))
        printed("routed listener, sslmode=disable", err)



    # -- direct TLS (libpq 17+ sslnegotiation=direct) ----------------------------

    def client_tls_files(self) -> tuple[str, str]:
        """A certificate for a.db.egress.test from a's CA, for the proxy to show clients."""
        return self.a.ca.issue([A], self.mktemp(), "proxy")

    def originate_client_tls_proxy(self) -> InProcessProxy:
        cert, key = self.client_tls_files()
        return InProcessProxy(
            self,
            config(
                [yaml_listener("orig", f"tls: originate\ncluster: a\nclient_tls: {{cert: {cert}, key: {key}}}")],
                [yaml_cluster("a", f"{A}:{self.a.port}", f"tls: {{ca_file: {self.a.ca_path}}}")],
            ),
        )

    @inline
    async def test_direct_tls_to_originating_listener(self) -> None:
        """A libpq 17+ client with sslnegotiation=direct reaches PostgreSQL 15 through client_tls + originate."""
        need_psycopg(170000)
        proxy = self.originate_client_tls_proxy()
        conn = await psycopg_connect(
            self.dsn(self.a, proxy.port("orig"), sslnegotiation="direct", channel_binding="disable")
        )
        try:
            self.assertEqual(await psycopg_query(conn, "select inet_server_port()"), self.a.port)
            self.assertIs(await psycopg_query(conn, SSL_IN_USE), True)
        finally:
            await threads.deferToThread(conn.close)
        [line] = await self.lines(proxy)
        self.assertEqual(line.upstream, f"{A}:{self.a.port}")

    @inline
    async def test_direct_tls_routed_is_converted_to_ssl_request(self) -> None:
        """A direct-TLS ClientHello is routed by SNI and sent after an SSLRequest to an upstream without direct TLS.

        The upstream here is a second, originating listener (whose TLS
        server negotiates ALPN), in front of PostgreSQL 15: the routed
        listener must send it an SSLRequest, since it does not accept direct
        TLS, and forward the ClientHello once it answers S.
        """
        need_psycopg(170000)
        inner = self.originate_client_tls_proxy()
        routes = f'routes:\n  - {{sni: "{A}", upstream: "{A}:{inner.port("orig")}"}}'
        outer = InProcessProxy(self, config([yaml_listener("routed", routes)], [yaml_cluster("unused", f"{A}:1")]))
        conn = await psycopg_connect(
            self.dsn(self.a, outer.port("routed"), sslnegotiation="direct", channel_binding="disable")
        )
        try:
            self.assertEqual(await psycopg_query(conn, "select inet_server_port()"), self.a.port)
        finally:
            await threads.deferToThread(conn.close)
        [line] = await self.lines(outer)
        self.assertEqual(line.upstream, f"{A}:{inner.port('orig')}")

    @inline
    async def test_direct_tls_passthrough_to_postgres_15_lacks_alpn(self) -> None:
        """Passed through to PostgreSQL 15, direct TLS is converted and handshakes, but libpq wants ALPN the server lacks.

        This pins a limit, not a wish: in passthrough the server's own TLS
        answers the client, and servers before PostgreSQL 17 negotiate no
        ALPN, which libpq requires with sslnegotiation=direct.
        """
        pg = need_psycopg(170000)
        proxy = self.routed_proxy()
        with self.assertRaises(pg.OperationalError) as raised:
            await psycopg_connect(self.dsn(self.a, proxy.port("routed"), sslnegotiation="direct"))
        self.assertIn("direct SSL connection was established without ALPN protocol negotiation extension",
                      str(raised.exception))
        [line] = await self.lines(proxy)
        self.assertEqual(line.upstream, f"{A}:{self.a.port}")

    # -- TLS origination ------------------------------------------------------------

    @staticmethod
    def plain_dsn(port: int) -> str:
        """What a driver without hostaddr uses: an address as host, plaintext to the proxy."""
        return (f"host=127.0.0.1 port={port} dbname=postgres user=postgres password={SUPERUSER_PASSWORD} "
                "sslmode=disable connect_timeout=10 gssencmode=disable")

    @inline
    async def test_originate_plaintext_client_reaches_tls_server(self) -> None:
        """A plaintext client (host=127.0.0.1 sslmode=disable) gets a verified TLS connection and 20 MB through it."""
        proxy = self.originate_proxy()
        conn = await psycopg_connect(self.plain_dsn(proxy.port("orig")))
        try:
            self.assertIs(await psycopg_query(conn, SSL_IN_USE), True)
            # 20 MB back through the TLS leg: producers work over TLS transports.
            self.assertEqual(len(await psycopg_query(conn, "select repeat('x', 20000000)")), 20_000_000)
        finally:
            await threads.deferToThread(conn.close)
        [line] = await self.lines(proxy)
        self.assertEqual(line.upstream, f"{A}:{self.a.port}")

    @inline
    async def test_originate_answers_n_to_ssl_request(self) -> None:
        """psql with sslmode=prefer is told N and carries on in plaintext to the proxy."""
        proxy = self.originate_proxy()
        out, err, code = await psql(self.plain_dsn(proxy.port("orig")).replace("disable", "prefer"), SSL_IN_USE)
        self.assertEqual((code, out.strip()), (0, "t"), err)

    @inline
    async def test_originate_wrong_ca(self) -> None:
        """A server certificate from another CA is refused with an ErrorResponse; no fallback."""
        other = TestCA.create(self.mktemp())
        proxy = self.originate_proxy(cluster_tls=f"tls: {{ca_file: {other.ca_path}}}")
        _, err, code = await psql(self.plain_dsn(proxy.port("orig")), "select 1")
        self.assertNotEqual(code, 0)
        self.assertIn(f"FATAL:  egressproxy: TLS with {A}:{self.a.port} failed: certificate verify failed", err)
        [line] = await self.lines(proxy)
        self.assertEqual(line.flags, "UF")
        self.assertEqual(proxy.service.clusters["a"].connect_failures["tls"], 1)
        printed("originate, wrong CA", err)

    @inline
    async def test_originate_wrong_name(self) -> None:
        """A certificate that does not name tls.server_name is refused with an ErrorResponse."""
        proxy = self.originate_proxy(cluster_tls=f"tls: {{server_name: wrong.egress.test, ca_file: {self.a.ca_path}}}")
        _, err, code = await psql(self.plain_dsn(proxy.port("orig")), "select 1")
        self.assertNotEqual(code, 0)
        self.assertIn(f"FATAL:  egressproxy: TLS with {A}:{self.a.port} failed: the server's certificate is not valid for 'wrong.egress.test'", err)
        [line] = await self.lines(proxy)
        self.assertEqual(line.flags, "UF")
        printed("originate, wrong server name", err)

    @inline
    async def test_originate_upstream_down(self) -> None:
        """An unreachable upstream is an ErrorResponse naming it and the cause."""
        proxy = self.originate_proxy(endpoint=f"{A}:{closed_loopback_port()}")
        _, err, code = await psql(self.plain_dsn(proxy.port("orig")), "select 1")
        self.assertNotEqual(code, 0)
        self.assertRegex(err, r"FATAL:  egressproxy: could not connect to a\.db\.egress\.test:\d+: connection refused")
        printed("originate, upstream down, sslmode=disable", err)

    # -- errors the client can read ---------------------------------------------------

    @inline
    async def test_upstream_down_plaintext(self) -> None:
        """Upstream refused, sslmode=disable: psql prints the egressproxy message."""
        endpoint = f"{A}:{closed_loopback_port()}"
        proxy = self.single_proxy(endpoint)
        _, err, code = await psql(self.dsn(self.a, proxy.port("single"), sslmode="disable"), "select 1")
        self.assertNotEqual(code, 0)
        self.assertIn(f"FATAL:  egressproxy: could not connect to {endpoint}: connection refused", err)
        self.assertNotIn("server closed the connection unexpectedly", err)
        [line] = await self.lines(proxy)
        self.assertEqual((line.upstream, line.flags), (endpoint, "UF"))
        printed("single cluster, upstream down, sslmode=disable", err)

    @inline
    async def test_upstream_down_tls(self) -> None:
        """Upstream refused, sslmode=require: psql prints the TLS alert, not a bare close."""
        proxy = self.single_proxy(f"{A}:{closed_loopback_port()}")
        _, err, code = await psql(self.dsn(self.a, proxy.port("single"), sslmode="require"), "select 1")
        self.assertNotEqual(code, 0)
        self.assertIn("SSL error: tlsv1 alert internal error", err)
        self.assertNotIn("server closed the connection unexpectedly", err)
        [line] = await self.lines(proxy)
        self.assertEqual(line.flags, "UF")
        printed("single cluster, upstream down, sslmode=require", err)

    @inline
    async def test_upstream_down_prefer(self) -> None:
        """With libpq's default sslmode=prefer, psql prints the alert and then, on its plaintext retry, the message."""
        endpoint = f"{A}:{closed_loopback_port()}"
        proxy = self.single_proxy(endpoint)
        _, err, code = await psql(self.dsn(self.a, proxy.port("single"), sslmode="prefer"), "select 1")
        self.assertNotEqual(code, 0)
        self.assertIn(f"egressproxy: could not connect to {endpoint}: connection refused", err)
        printed("single cluster, upstream down, sslmode=prefer", err)

    def hang_up_server(self) -> tuple[str, CountingFactory]:
        counting = CountingFactory()
        port = reactor.listenTCP(0, counting, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"{A}:{port.getHost().port}", counting

    @inline
    async def test_upstream_accepts_then_closes_plaintext(self) -> None:
        """An upstream that accepts and closes at once, sslmode=disable: the egressproxy message, 08006."""
        endpoint, counting = self.hang_up_server()
        proxy = self.single_proxy(endpoint)
        _, err, code = await psql(self.dsn(self.a, proxy.port("single"), sslmode="disable"), "select 1")
        self.assertNotEqual(code, 0)
        self.assertIn(
            f"FATAL:  egressproxy: {endpoint} closed the connection before answering: "
            "is this proxy's egress IP on the database's allowlist?", err
        )
        self.assertEqual(counting.connections, 1)
        [line] = await self.lines(proxy)
        self.assertEqual((line.upstream, line.flags), (endpoint, "UF"))
        printed("single cluster, upstream accepts then closes, sslmode=disable", err)

    @inline
    async def test_upstream_accepts_then_closes_tls(self) -> None:
        """An upstream that accepts and closes at once, sslmode=require: the TLS alert."""
        endpoint, _ = self.hang_up_server()
        proxy = self.single_proxy(endpoint)
        _, err, code = await psql(self.dsn(self.a, proxy.port("single"), sslmode="require"), "select 1")
        self.assertNotEqual(code, 0)
        self.assertIn("SSL error: tlsv1 alert internal error", err)
        self.assertNotIn("server closed the connection unexpectedly", err)
        printed("single cluster, upstream accepts then closes, sslmode=require", err)

    @inline
    async def test_routed_upstream_down(self) -> None:
        """A routed name whose upstream is down gets the internal_error alert."""
        port = closed_loopback_port()
        routes = f'routes:\n  - {{sni: "*.db.egress.test", upstream: "{{sni}}:{port}"}}'
        proxy = InProcessProxy(self, config([yaml_listener("routed", routes)], [yaml_cluster("unused", f"{A}:1")]))
        _, err, code = await psql(self.dsn(self.a, proxy.port("routed"), sslmode="require"), "select 1")
        self.assertNotEqual(code, 0)
        self.assertIn("SSL error: tlsv1 alert internal error", err)
        [line] = await self.lines(proxy)
        self.assertEqual((line.upstream, line.flags), (f"{A}:{port}", "UF"))
        printed("routed, upstream down, sslmode=require", err)

    @inline
    async def test_refused_source(self) -> None:
        """A source outside allow_sources: access_denied for TLS clients, an ErrorResponse for plaintext ones."""
        proxy = self.single_proxy(extra='allow_sources: ["10.0.0.0/8"]')
        port = proxy.port("single")
        _, err_tls, _ = await psql(self.dsn(self.a, port, sslmode="require"), "select 1")
        _, err_plain, _ = await psql(self.dsn(self.a, port, sslmode="disable"), "select 1")
        self.assertIn("SSL error: tlsv1 alert access denied", err_tls)
        self.assertIn("FATAL:  egressproxy: connections from 127.0.0.1 are not allowed on this listener", err_plain)
        lines = await self.lines(proxy, 2)
        self.assertEqual([(line.upstream, line.flags) for line in lines], [("-", "RBAC")] * 2)
        printed("refused source, sslmode=require", err_tls)
        printed("refused source, sslmode=disable", err_plain)

    async def hold_one(self, port: int) -> Any:
        """A raw client holding a session open (its SSLRequest answered by the server)."""
        held = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), HeldClient())
        self.addCleanup(held.close)
        await wait_until(lambda: held.received == b"S")
        return held

    @inline
    async def test_listener_full(self) -> None:
        """Over the listener's max_connections: 53300 for plaintext clients, internal_error for TLS ones (OM)."""
        proxy = self.single_proxy(extra="max_connections: 1")
        port = proxy.port("single")
        await self.hold_one(port)
        _, err_plain, _ = await psql(self.dsn(self.a, port, sslmode="disable"), "select 1")
        _, err_tls, _ = await psql(self.dsn(self.a, port, sslmode="require"), "select 1")
        self.assertIn("FATAL:  egressproxy: too many connections to this listener", err_plain)
        self.assertIn("SSL error: tlsv1 alert internal error", err_tls)
        lines = await self.lines(proxy, 2)
        self.assertEqual([line.flags for line in lines], ["OM", "OM"])
        printed("listener full (OM), sslmode=disable", err_plain)
        printed("listener full (OM), sslmode=require", err_tls)

    @inline
    async def test_breaker_open(self) -> None:
        """With the cluster's breaker full, a plaintext client is told so (UO), nothing is dialled."""
        proxy = InProcessProxy(self, config(
            [yaml_listener("single", "cluster: a")],
            [yaml_cluster("a", f"{A}:{self.a.port}", "max_connections: 1")],
        ))
        port = proxy.port("single")
        await self.hold_one(port)
        _, err, _ = await psql(self.dsn(self.a, port, sslmode="disable"), "select 1")
        self.assertIn("FATAL:  egressproxy: too many connections to cluster a (circuit breaker open)", err)
        [line] = await self.lines(proxy)
        self.assertEqual((line.upstream, line.flags), ("-", "UO"))
        printed("cluster breaker open (UO), sslmode=disable", err)

    @inline
    async def test_require_tls_refuses_plaintext_startup(self) -> None:
        """require_tls: a plaintext startup gets the ErrorResponse; verify-full still reaches the server's own TLS."""
        proxy = self.single_proxy(extra="require_tls: true")
        port = proxy.port("single")
        _, err, code = await psql(self.dsn(self.a, port, sslmode="disable"), "select 1")
        self.assertNotEqual(code, 0)
        self.assertIn("FATAL:  egressproxy: TLS required on this listener", err)
        out, err_ok, code_ok = await psql(self.dsn(self.a, port), SSL_IN_USE)
        self.assertEqual((code_ok, out.strip()), (0, "t"), err_ok)
        lines = await self.lines(proxy, 2)
        self.assertEqual([line.flags for line in lines][:1], ["DPE"])
        self.assertEqual(lines[0].upstream, "-")
        printed("require_tls, sslmode=disable", err)

    # -- cancel requests -------------------------------------------------------------

    async def wait_sleeping(self, server: PostgresServer) -> None:
        await wait_sleeping(self, server)

    async def cancel_with_sigint(self, dsn: str) -> tuple[str, float]:
        return await cancel_sleep_with_sigint(self, self.a, dsn)

    @inline
    async def test_cancel_originate(self) -> None:
        """Ctrl-C in psql reaches the server that runs the query through an originating listener (over TLS)."""
        proxy = self.originate_proxy()
        err, seconds = await self.cancel_with_sigint(self.plain_dsn(proxy.port("orig")))
        self.assertIn("canceling statement due to user request", err)
        self.assertLess(seconds, 5)
        lines = await self.lines(proxy, 2)
        self.assertEqual({line.upstream for line in lines}, {f"{A}:{self.a.port}"})

    @inline
    async def test_cancel_single_cluster_passthrough(self) -> None:
        """Ctrl-C in psql (a plaintext CancelRequest) is forwarded to the cluster of a passthrough listener."""
        proxy = self.single_proxy()
        err, seconds = await self.cancel_with_sigint(self.dsn(self.a, proxy.port("single")))
        self.assertIn("canceling statement due to user request", err)
        self.assertLess(seconds, 5)
        lines = await self.lines(proxy, 2)
        self.assertEqual({line.upstream for line in lines}, {f"{A}:{self.a.port}"})

    @inline
    async def test_cancel_routed_over_tls(self) -> None:
        """A libpq 17+ cancel (sent over TLS, with SNI) is routed like a connection on an SNI-routed listener."""
        pg = need_psycopg(170000)
        proxy = self.routed_proxy()
        conn = await psycopg_connect(self.dsn(self.b, proxy.port("routed")))
        try:
            query = threads.deferToThread(psycopg_sleep, conn)
            await self.wait_sleeping(self.b)
            started = reactor.seconds()
            await threads.deferToThread(conn.cancel_safe)
            with self.assertRaises(pg.errors.QueryCanceled):
                await query
            self.assertLess(reactor.seconds() - started, 5)
        finally:
            await threads.deferToThread(conn.close)
        lines = await self.lines(proxy, 2)
        self.assertEqual([line.upstream for line in lines], [f"{B}:{self.b.port}"] * 2)

    @inline
    async def test_psql_cancel_on_routed_listener(self) -> None:
        """psql 15's Ctrl-C (a plaintext CancelRequest) on an SNI-routed listener reaches the server within 2 s.

        The cancel names no server; the proxy sends it to the endpoint this
        client's source has a live session with (b, through the {sni} route).
        """
        proxy = self.routed_proxy()
        err, seconds = await cancel_sleep_with_sigint(self, self.b, self.dsn(self.b, proxy.port("routed")))
        self.assertIn("canceling statement due to user request", err)
        self.assertLess(seconds, 2, f"cancel took {seconds:.2f}s")
        lines = await self.lines(proxy, 2)
        self.assertEqual([line.upstream for line in lines], [f"{B}:{self.b.port}"] * 2)

    @inline
    async def test_cancel_reaches_every_endpoint_of_the_source(self) -> None:
        """With live sessions to two servers, one unmatched cancel goes to both; the wrong one ignores it."""
        proxy = self.routed_proxy()
        conn_a = await psycopg_connect(self.dsn(self.a, proxy.port("routed")))
        self.addCleanup(lambda: threads.deferToThread(conn_a.close))
        err, seconds = await cancel_sleep_with_sigint(self, self.b, self.dsn(self.b, proxy.port("routed")))
        self.assertIn("canceling statement due to user request", err)
        self.assertEqual(await psycopg_query(conn_a, "select 1"), 1)
        self.assertLess(seconds, 2, f"cancel took {seconds:.2f}s")

    @inline
    async def test_plaintext_cancel_on_routed_listener_is_not_routed(self) -> None:
        """A plaintext CancelRequest from a source with no live session names no server: closed, flag NR, nothing dialled."""
        proxy = self.routed_proxy()
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port("routed")), Collect()
        )
        client.transport.write(struct.pack("!iiii", 16, 80877102, 1234, 5678))
        await wait_until(lambda: client.closed)
        [line] = await self.lines(proxy)
        self.assertEqual((line.upstream, line.flags, line.sent), ("-", "NR", 0))

    @inline
    async def test_gssenc_request_answered_n(self) -> None:
        """A GSSENCRequest is answered N, and the client may go on with an SSLRequest."""
        proxy = self.routed_proxy()
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port("routed")), Collect()
        )
        client.transport.write(struct.pack("!ii", 8, 80877104))
        await wait_until(lambda: client.received == b"N")
        client.transport.write(struct.pack("!ii", 8, 80877103))
        await wait_until(lambda: client.received == b"NS")
        client.transport.loseConnection()
        await wait_until(lambda: client.closed)


async def wait_sleeping(test: TestCase, server: PostgresServer) -> None:
    """Wait until ``server`` runs the test's pg_sleep (asked over its unix socket, not the proxy)."""
    for _ in range(200):
        out, _, _ = await run_process([
            require_tool("psql"), "-X", "-A", "-t", "-d", server.superuser_dsn(), "-c",
            "select count(*) from pg_stat_activity where query like 'select pg_sleep(30)%' and state = 'active'",
        ])
        if out.strip() == "1":
            return
    test.fail("pg_sleep never started")


async def cancel_sleep_with_sigint(test: TestCase, server: PostgresServer, dsn: str) -> tuple[str, float]:
    """Run pg_sleep(30) in psql over ``dsn``, SIGINT it once ``server`` runs it; (stderr, seconds to end)."""
    running, transport = spawn_psql(dsn, "select pg_sleep(30)")
    test.addCleanup(lambda: transport.signalProcess("KILL") if transport.pid else None)
    await wait_sleeping(test, server)
    started = reactor.seconds()
    transport.signalProcess("INT")
    _, err, code = await running.ended
    test.assertNotEqual(code, 0)
    return err, reactor.seconds() - started


def psycopg_sleep(conn: Any) -> None:
    with conn.cursor() as cursor:
        cursor.execute("select pg_sleep(30)")


class Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True


def printed(case: str, err: str) -> None:
    """Keep what psql printed per error case in $PGMODE_ERRORS, if set (for the docs)."""
    path = os.environ.get("PGMODE_ERRORS")
    if path:
        with open(path, "a") as f:
            f.write(f"### {case}\n{err.strip()}\n\n")
