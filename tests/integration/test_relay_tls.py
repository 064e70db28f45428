"""``tls: originate`` carried by the compiled relay, against a real TLS + SCRAM PostgreSQL.

The relay does SSL_read/SSL_write on pyOpenSSL's SSL object itself
(``egressproxy/_relaytls.h``, ``egressproxy/datapath/relaytls.py``).  Each
test runs real clients (psql, pgbench, psycopg) through an originating
listener and checks one guarantee: the pair is relayed (the runtime's
``tls_taken`` and the upstream leg's ``relayed_tls``), queries and COPY in
both directions work, the access line's byte counts equal what the Python
path logs for the same psql script, a client's \\q ends without a flag, a
backend terminated by the server ends as the Python path ends it, the idle
timeout (DI) and the drain's abort (DT) still reach it, and with a needed
OpenSSL function missing the hand-off declines and the Python path carries
the session.  Bulk and half-close tests against a plain TLS server are in
``tests/integration/test_relay_tls_bulk.py``.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import TestCase

from egressproxy.datapath import relay as relay_path
from egressproxy.datapath import relaytls
from tests.integration.pgserver import SUPERUSER_PASSWORD, PostgresServer, shared_server
from tests.integration.proxy import InProcessProxy, inline, require_tool, run_process, wait_until
from tests.integration.test_postgres import parse_access, psql
from tests.relaykit import relay_module

NAME = "db.egress.test"

#: A deterministic script: the same bytes cross the proxy on every run.
SCRIPT = (
    "select 1",
    "select repeat('x', 300000)",
    "create temporary table t as select g, md5(g::text) from generate_series(1, 20000) g",
    "select count(*), sum(length(md5)) from t",
)


def originate_config(server: PostgresServer, fast_path: str, extra: str = "") -> str:
    return (
        f"fast_path: {fast_path}\n"
        "drain_timeout: 1s\n"
        "listeners:\n"
        "  - name: orig\n"
        '    listen: "127.0.0.1:0"\n'
        "    mode: postgres\n"
        "    tls: originate\n"
        "    cluster: pg\n"
        "clusters:\n"
        "  - name: pg\n"
        f'    endpoints: ["{NAME}:{server.port}"]\n'
        "    connect_timeout: 2s\n"
        f"    tls: {{ca_file: {server.ca_path}}}\n"
        + "".join(f"    {line}\n" for line in extra.strip().splitlines())
        + f"hosts:\n  {NAME}: 127.0.0.1\n"
    )


def plain_dsn(port: int, **extra: object) -> str:
    """A plaintext client to the proxy (the proxy originates TLS upstream)."""
    text = (f"host=127.0.0.1 port={port} dbname=postgres user=postgres password={SUPERUSER_PASSWORD} "
            "sslmode=disable connect_timeout=10 gssencmode=disable")
    return text + "".join(f" {k}={v}" for k, v in extra.items())


class OriginateRelayTests(TestCase):
    """Each test has its own proxy in front of the shared server."""

    timeout = 240

    def setUp(self) -> None:
        self.server = shared_server()
        relay_module()
        self.events: list[dict[str, Any]] = []
        self.patch(relay_path, "log", Logger(observer=self.events.append))

    def data_path_line(self) -> str:
        """The relay's start-up line (one per proxy started)."""
        [line] = [formatEvent(e) for e in self.events if formatEvent(e).startswith("data path:")]
        return line

    def proxy(self, fast_path: str = "relay", extra: str = "") -> InProcessProxy:
        return InProcessProxy(self, originate_config(self.server, fast_path, extra))

    def runtime(self, proxy: InProcessProxy) -> Any:
        runtime = proxy.service.fast_path.relay
        self.assertIsNotNone(runtime)
        self.assertEqual(runtime.tls_unavailable, "")
        return runtime

    async def script(self, fast_path: str) -> Any:
        proxy = self.proxy(fast_path)
        out, err, code = await psql(plain_dsn(proxy.port("orig")), *SCRIPT)
        self.assertEqual(code, 0, err)
        lines = out.split()
        self.assertEqual((lines[0], lines[1], lines[-1]), ("1", "x" * 300000, "20000|640000"))
        [line] = await proxy.wait_for_lines(1)
        return proxy, parse_access(line)

    @inline
    async def test_counts_equal_the_python_path(self) -> None:
        """The same psql script, relayed and in Python: the pair was relayed; both log the same counts, no flag."""
        relayed_proxy, relayed = await self.script("relay")
        self.assertEqual(self.runtime(relayed_proxy).tls_taken, 1)
        self.assertIn("; originated TLS upstreams are relayed too (pyOpenSSL's OpenSSL);", self.data_path_line())
        self.events.clear()
        _python_proxy, python = await self.script("python")
        self.assertEqual((relayed.received, relayed.sent), (python.received, python.sent))
        self.assertGreater(relayed.sent, 300000)
        self.assertEqual((relayed.flags, python.flags), ("-", "-"))

    @inline
    async def test_session_is_relayed_with_live_counts(self) -> None:
        """While a psycopg session is open its upstream TLS leg is the relay's, and its counters move."""
        psycopg = _psycopg()
        proxy = self.proxy()
        conn = await _deferred_call(psycopg.connect, plain_dsn(proxy.port("orig")))
        try:
            [session] = list(proxy.service.listeners["orig"].sessions)
            self.assertTrue(session.relayed)
            self.assertTrue(session.up.transport.relayed_tls)
            before = session.bytes_sent
            self.assertEqual(await _query(conn, "select length(repeat('y', 1000000))"), 1000000)
            self.assertEqual(await _query(conn, "select ssl from pg_stat_ssl where pid = pg_backend_pid()"), True)
            self.assertGreater(session.bytes_sent, before)
        finally:
            await _deferred_call(conn.close)
        [line] = await proxy.wait_for_lines(1)
        self.assertEqual(parse_access(line).flags, "-")

    @inline
    async def test_copy_several_megabytes_both_ways(self) -> None:
        """COPY 8 MB in and out through the relayed TLS leg: the data arrives intact both ways."""
        proxy = self.proxy()
        dsn = plain_dsn(proxy.port("orig"))
        rows = 80_000  # about 8 MB of COPY text each way
        copy_file = os.path.abspath(self.mktemp())
        out, err, code = await psql(
            dsn,
            "create temporary table big (n int, s text)",
            f"insert into big select g, repeat(md5(g::text), 3) from generate_series(1, {rows}) g",
            "create temporary table back (n int, s text)",
            # out to the client, then back in from it: \copy through the same session
            f"\\copy big to '{copy_file}'",
            f"\\copy back from '{copy_file}'",
            "select count(*), sum(length(s)), sum(n) from back",
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out.split()[-1], f"{rows}|{rows * 96}|{rows * (rows + 1) // 2}")
        [line] = await proxy.wait_for_lines(1)
        access = parse_access(line)
        self.assertGreater(access.received, 8_000_000)
        self.assertGreater(access.sent, 8_000_000)
        self.assertEqual(access.flags, "-")
        self.assertEqual(self.runtime(proxy).tls_taken, 1)

    @inline
    async def test_pgbench_through_the_relay(self) -> None:
        """pgbench -c 4 SELECT 1 through originate: every transaction succeeds, every session relayed."""
        pgbench = require_tool("pgbench")
        proxy = self.proxy()
        script = os.path.abspath(self.mktemp())
        with open(script, "w") as f:
            f.write("select 1;\n")
        out, err, code = await run_process(
            [pgbench, "-n", "-c", "4", "-j", "2", "-t", "200", "-f", script, plain_dsn(proxy.port("orig"))],
            env={"PGPASSWORD": SUPERUSER_PASSWORD}, timeout=120,
        )
        self.assertEqual(code, 0, err)
        self.assertIn("number of transactions actually processed: 800/800", out)
        await wait_until(lambda: proxy.live_sessions() == 0, timeout=10)
        lines = proxy.access_lines()  # the 4 clients, and pgbench's own first connection
        self.assertGreaterEqual(len(lines), 4)
        self.assertEqual([parse_access(line).flags for line in lines], ["-"] * len(lines))
        self.assertEqual(self.runtime(proxy).tls_taken, len(lines))

    async def terminated(self, fast_path: str) -> str:
        """The flags of a session whose backend the server terminated."""
        psycopg = _psycopg()
        proxy = self.proxy(fast_path)
        conn = await _deferred_call(psycopg.connect, plain_dsn(proxy.port("orig")))
        try:
            pid = await _query(conn, "select pg_backend_pid()")
            self.server.superuser_sql(f"select pg_terminate_backend({pid})")
            [line] = await proxy.wait_for_lines(1, timeout=20)
        finally:
            await _deferred_call(conn.close)
        return parse_access(line).flags

    @inline
    async def test_server_terminating_the_backend(self) -> None:
        """pg_terminate_backend from another session: the relayed session ends as the Python path's does.

        The backend sends its FATAL error and a close_notify, an orderly end
        on both paths: no UC (the session also ends at once, though the
        client keeps its socket open until it closes the connection).
        """
        relayed, python = await self.terminated("relay"), await self.terminated("python")
        self.assertEqual((relayed, python), ("-", "-"))

    @inline
    async def test_idle_timeout_ends_a_relayed_session(self) -> None:
        """idle_timeout still applies: a silent relayed session ends with DI."""
        psycopg = _psycopg()
        proxy = self.proxy(extra="idle_timeout: 600ms")
        conn = await _deferred_call(psycopg.connect, plain_dsn(proxy.port("orig")))
        try:
            [session] = list(proxy.service.listeners["orig"].sessions)
            self.assertTrue(session.up.transport.relayed_tls)
            [line] = await proxy.wait_for_lines(1, timeout=10)
        finally:
            await _deferred_call(conn.close)
        self.assertEqual(parse_access(line).flags, "DI")

    @inline
    async def test_drain_abort_reaches_a_relayed_session(self) -> None:
        """The drain's abort ends a relayed originate session with DT."""
        psycopg = _psycopg()
        proxy = self.proxy()
        conn = await _deferred_call(psycopg.connect, plain_dsn(proxy.port("orig")))
        try:
            [session] = list(proxy.service.listeners["orig"].sessions)
            self.assertTrue(session.up.transport.relayed_tls)
            proxy.service.abort_sessions(flag="DT")
            [line] = await proxy.wait_for_lines(1)
        finally:
            await _deferred_call(conn.close)
        self.assertEqual(parse_access(line).flags, "DT")

    @inline
    async def test_missing_function_falls_back_to_python(self) -> None:
        """A needed OpenSSL function missing: the start-up line says so, and the Python path carries the session."""
        real = relaytls._address

        def lacking(lib: Any, ffi: Any, name: str) -> int:
            if name == "SSL_write":
                raise AttributeError(name)
            return real(lib, ffi, name)

        self.patch(relaytls, "_address", lacking)
        proxy = self.proxy()
        runtime = proxy.service.fast_path.relay
        self.assertEqual(runtime.tls_unavailable, "pyOpenSSL's OpenSSL lacks SSL_write")
        self.assertIn("; originated TLS upstreams are not relayed (pyOpenSSL's OpenSSL lacks SSL_write);",
                      self.data_path_line())
        out, err, code = await psql(plain_dsn(proxy.port("orig")), "select 41 + 1")
        self.assertEqual((code, out.strip()), (0, "42"), err)
        [line] = await proxy.wait_for_lines(1)
        self.assertEqual(parse_access(line).flags, "-")
        self.assertEqual(runtime.tls_taken, 0)
        self.assertEqual(len(runtime.relay), 0)


def _psycopg() -> Any:
    """psycopg, or SkipTest saying how to get it."""
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is in the test extra
        from twisted.trial.unittest import SkipTest

        raise SkipTest("psycopg is not installed (pip install '.[test]')")
    return psycopg


async def _deferred_call(f: Any, *args: Any) -> Any:
    """``f(*args)`` in a thread (psycopg blocks; the proxy shares the test's reactor)."""
    from twisted.internet import threads

    return await threads.deferToThread(f, *args)


async def _query(conn: Any, sql: str) -> Any:
    """The first value of ``sql``'s first row."""

    def run() -> Any:
        with conn.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchone()[0]

    return await _deferred_call(run)
