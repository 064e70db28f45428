"""
Postgres mode against a server that authenticates like a managed provider.

The server here (``pgserver.py``) takes TCP logins only over TLS
(``hostssl``) and with SCRAM-SHA-256, as Neon, Supabase and RDS do.  That is
where a TLS-originating proxy meets channel binding: the server offers
``SCRAM-SHA-256-PLUS`` on its TLS session with the proxy, which a plaintext
client must not see and a TLS client cannot use.  These tests drive real
psql, pgbench and psycopg through ``tls: originate`` listeners and check
what each kind of client gets: a working login, the server's own refusal
(and the ``LR:<SQLSTATE>`` flag and counter), or the proxy's explanation.
md5 and cleartext logins are tested here too, on the roles pgserver sets
aside for them.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import threads
from twisted.trial.unittest import TestCase

from tests.integration.pgserver import MD5_ROLE, PASSWORD_ROLE, REJECTED_ROLE, role_password
from tests.integration.proxy import InProcessProxy, inline, require_tool, run_process
from tests.integration.test_postgres import SSL_IN_USE, parse_access, psql
from tests.integration import test_postgres_mode as modes
from tests.integration.test_postgres_mode import (
    A,
    cancel_sleep_with_sigint,
    psycopg_connect,
    psycopg_query,
    servers,
)


def plain_dsn(port: int, user: str = "postgres", password: str | None = None, **extra: str) -> str:
    """What a driver without hostaddr uses on an originating listener: plaintext to the proxy."""
    params = {
        "host": "127.0.0.1", "port": str(port), "dbname": "postgres", "user": user,
        "password": role_password(user) if password is None else password,
        "sslmode": "disable", "connect_timeout": "10", "gssencmode": "disable", **extra,
    }
    return " ".join(f"{key}={value}" for key, value in params.items())


def login_refused(proxy: InProcessProxy) -> dict[str, int]:
    return dict(proxy.service.listeners["orig"].login_refused)


class OriginateScramTests(TestCase):
    """``tls: originate`` in front of a hostssl + scram-sha-256 server."""

    def setUp(self) -> None:
        self.a, _ = servers()

    def originate(self) -> InProcessProxy:
        # PostgresModeTests' helper reads only ``self.a`` and adds cleanups.
        return modes.PostgresModeTests.originate_proxy(self)  # type: ignore[arg-type]

    async def lines(self, proxy: InProcessProxy, count: int = 1) -> list[Any]:
        return [parse_access(line) for line in await proxy.wait_for_lines(count)]

    @inline
    async def test_psql_scram_through_originate(self) -> None:
        """psql (libpq 15) in plaintext logs in with SCRAM through originate; the server sees TLS."""
        proxy = self.originate()
        out, err, code = await psql(plain_dsn(proxy.port("orig")), SSL_IN_USE)
        self.assertEqual((code, out.strip()), (0, "t"), err)
        [line] = await self.lines(proxy)
        self.assertEqual((line.upstream, line.flags), (f"{A}:{self.a.port}", "-"))
        self.assertEqual(login_refused(proxy), {})

    @inline
    async def test_psycopg_scram_through_originate(self) -> None:
        """psycopg (its own libpq 17+) logs in with SCRAM through originate, whatever channel_binding=prefer says."""
        proxy = self.originate()
        for binding in ("prefer", "disable"):
            conn = await psycopg_connect(plain_dsn(proxy.port("orig"), channel_binding=binding))
            try:
                self.assertIs(await psycopg_query(conn, SSL_IN_USE), True)
            finally:
                await threads.deferToThread(conn.close)

    @inline
    async def test_pgbench_scram_through_originate(self) -> None:
        """pgbench through originate: every transaction processed, none failed."""
        pgbench = require_tool("pgbench")
        self.a.superuser_sql("select 1")
        init = await run_process([pgbench, "-i", "-q", "-s", "1", "-d", self.a.superuser_dsn()], timeout=120)
        self.assertEqual(init[2], 0, init[1])
        proxy = self.originate()
        out, err, code = await run_process(
            [pgbench, "-n", "-c", "4", "-j", "2", "-t", "100", "-d", plain_dsn(proxy.port("orig"))], timeout=120
        )
        self.assertEqual(code, 0, err)
        self.assertIn("number of transactions actually processed: 400/400", out)
        failed = re.search(r"number of failed transactions: (\d+)", out)
        if failed is not None:  # printed by pgbench 15+
            self.assertEqual(failed.group(1), "0", out)
        self.assertEqual(login_refused(proxy), {})

    @inline
    async def test_md5_and_cleartext_roles_through_originate(self) -> None:
        """Roles whose pg_hba line says md5 or password log in unchanged through originate."""
        self.a.create_role(MD5_ROLE, encryption="md5")
        self.a.create_role(PASSWORD_ROLE)
        proxy = self.originate()
        for role in (MD5_ROLE, PASSWORD_ROLE):
            out, err, code = await psql(plain_dsn(proxy.port("orig"), user=role), "select current_user")
            self.assertEqual((code, out.strip()), (0, role), err)

    @inline
    async def test_wrong_password_is_flagged_with_its_sqlstate(self) -> None:
        """A wrong password: psql prints the server's error; the log says LR:28P01; the counter counts it."""
        proxy = self.originate()
        _, err, code = await psql(plain_dsn(proxy.port("orig"), password="not-the-password"), "select 1")
        self.assertNotEqual(code, 0)
        self.assertIn('password authentication failed for user "postgres"', err)
        [line] = await self.lines(proxy)
        self.assertEqual(line.flags, "LR:28P01")
        self.assertEqual(login_refused(proxy), {"28P01": 1})

    @inline
    async def test_pg_hba_refusal_is_flagged_28000(self) -> None:
        """A login pg_hba turns away is told apart from a wrong password: LR:28000."""
        self.a.create_role(REJECTED_ROLE)
        proxy = self.originate()
        _, err, code = await psql(plain_dsn(proxy.port("orig"), user=REJECTED_ROLE), "select 1")
        self.assertNotEqual(code, 0)
        self.assertIn("pg_hba.conf rejects connection", err)
        [line] = await self.lines(proxy)
        self.assertEqual(line.flags, "LR:28000")
        self.assertEqual(login_refused(proxy), {"28000": 1})

    @inline
    async def test_unknown_database_is_flagged_3d000(self) -> None:
        """A database that does not exist: the server's error relayed, LR:3D000."""
        proxy = self.originate()
        _, err, code = await psql(plain_dsn(proxy.port("orig"), dbname="no_such_db"), "select 1")
        self.assertNotEqual(code, 0)
        self.assertIn('database "no_such_db" does not exist', err)
        [line] = await self.lines(proxy)
        self.assertEqual(line.flags, "LR:3D000")

    @inline
    async def test_plaintext_channel_binding_require_is_stopped_by_libpq(self) -> None:
        """A plaintext client that requires channel binding is stopped by libpq itself, before any password.

        The proxy cannot answer first: libpq decides on seeing the mechanism
        list.  What it prints names the cause, and the server never sees a
        login attempt (no LR flag).
        """
        proxy = self.originate()
        _, err, code = await psql(plain_dsn(proxy.port("orig"), channel_binding="require"), "select 1")
        self.assertNotEqual(code, 0)
        self.assertRegex(err, r"channel binding (is )?required")
        [line] = await self.lines(proxy)
        self.assertNotIn("LR", line.flags)

    @inline
    async def test_cancel_through_originate_under_scram(self) -> None:
        """psql Ctrl-C through originate reaches the backend (by its key, over verified TLS) within 2 s."""
        proxy = self.originate()
        err, seconds = await cancel_sleep_with_sigint(self, self.a, plain_dsn(proxy.port("orig")))
        self.assertIn("canceling statement due to user request", err)
        self.assertLess(seconds, 2, f"cancel took {seconds:.2f}s")


class ClientTlsChannelBindingTests(TestCase):
    """``tls: originate`` with ``client_tls``: the client's TLS ends at the proxy."""

    def setUp(self) -> None:
        self.a, _ = servers()

    def proxy(self) -> InProcessProxy:
        return modes.PostgresModeTests.originate_client_tls_proxy(self)  # type: ignore[arg-type]

    def client_tls_files(self) -> tuple[str, str]:
        return modes.PostgresModeTests.client_tls_files(self)  # type: ignore[arg-type]

    def dsn(self, port: int, **extra: str) -> str:
        return self.a.dsn(port=port, **extra)

    @inline
    async def test_channel_binding_disable_logs_in(self) -> None:
        """channel_binding=disable over TLS to the proxy: SCRAM without binding, logged in."""
        proxy = self.proxy()
        out, err, code = await psql(self.dsn(proxy.port("orig"), channel_binding="disable"), SSL_IN_USE)
        self.assertEqual((code, out.strip()), (0, "t"), err)

    @inline
    async def test_channel_binding_is_explained(self) -> None:
        """With channel binding wanted (libpq's default prefer, and require) the proxy's FATAL says why and what to do."""
        proxy = self.proxy()
        for binding in ("prefer", "require"):
            _, err, code = await psql(self.dsn(proxy.port("orig"), channel_binding=binding), "select 1")
            self.assertNotEqual(code, 0)
            self.assertIn("FATAL:  egressproxy: SCRAM channel binding cannot pass through this listener", err)
            self.assertIn("channel_binding=disable", err)
            self.assertIn("tls: passthrough", err)
        lines = [parse_access(line) for line in await proxy.wait_for_lines(2)]
        # libpq drops its socket on the FATAL without a TLS goodbye, so a DC may follow.
        self.assertEqual([line.flags.split(",")[0] for line in lines], ["DPE", "DPE"])
        self.assertEqual(proxy.service.listeners["orig"].rejected["channel_binding"], 2)
        self.assertEqual(dict(proxy.service.listeners["orig"].login_refused), {})
