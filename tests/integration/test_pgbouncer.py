"""
The proxy in front of a real PgBouncer, as in the reference deployment.

There the proxy's ``:6432`` listener goes to the provider's PgBouncer, not to
PostgreSQL, so what has to keep working is psql, pgbench and Ctrl-C through
proxy *and* pooler.  Each test starts a PgBouncer (``tests/integration/
pgbouncer.py``: TLS required from clients with a certificate for
``pool.egress.test``, verify-full to the server, SCRAM, transaction pooling)
in front of the shared fixture server (``db.egress.test``).  Clients keep
``sslmode=verify-full`` against ``pool.egress.test`` with the test CA, so a
pass means TLS went end to end to PgBouncer, byte for byte through the proxy.

The proxy (``InProcessProxy``) has two listeners to the PgBouncer cluster,
with ``pool.egress.test`` pinned to 127.0.0.1 by ``hosts:``:

- ``pooled``: ``mode: tcp``, log prefix POOLED, what the reference deployment
  runs on :6432;
- ``routed``: ``mode: postgres`` routing the TLS server name
  ``pool.egress.test`` to the same cluster, log prefix ROUTED.

Client programs run as subprocesses through ``run_process``/``spawn_psql``
(never blocking calls once a proxy exists: it shares the reactor).  Blocking
setup (PgBouncer, pgbench's tables) happens before the proxy starts.

PgBouncer 1.18 behaviours these tests pin:

- a plaintext CancelRequest is accepted although ``client_tls_sslmode =
  require`` (libpq before 17 always cancels in plaintext);
- the server's certificate is checked against the ``host=`` of the
  ``[databases]`` entry, so ``host=127.0.0.1`` fails against a certificate
  for ``db.egress.test``;
- a cancel connection that closes before PgBouncer has forwarded the request
  loses the cancel or makes PgBouncer exit ("FATAL ... disconnect_client():
  bad client state: 0", pgbouncer#801, fixed in 1.19.1), so whoever relays a
  cancel must wait for PgBouncer to close, as libpq does.
"""

from __future__ import annotations

import re
import socket
import struct

from twisted.internet import defer, reactor
from twisted.python import log
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.integration.pgbouncer import PgBouncer, dns_answer
from tests.integration.pgserver import PostgresServer, shared_server
from tests.integration.proxy import InProcessProxy, inline, require_tool, run_process, wait_until
from tests.integration.test_postgres import (
    SSL_IN_USE,
    AccessLine,
    cluster,
    listener,
    parse_access,
    proxy_config,
    psql,
)
from tests.integration.test_postgres_mode import spawn_psql, yaml_listener

POOL = "pool.egress.test"

SLEEP = "select pg_sleep(30)"
SLEEPING = (
    "select count(*) from pg_stat_activity "
    "where query like 'select pg_sleep(30)%' and state = 'active'"
)
CANCELED = "canceling statement due to user request"
#: PgBouncer's log line when it has forwarded a cancel and closes the cancel
#: connection itself (rather than "client unexpected eof").
CANCEL_FORWARDED = re.compile(
    r"C-0x[0-9a-f]+: \S+/\(nouser\)@\S+ closing because: successfully sent cancel request"
)
#: How soon after Ctrl-C psql must have the cancel's answer.
CANCEL_WITHIN = 2.0
#: How long a psql whose cancel got lost is left before it is killed.
CANCEL_GIVE_UP = 5.0

#: The size of a CancelRequest: length, code 80877102, backend PID, key.
CANCEL_REQUEST_SIZE = 16

PGBENCH_CLIENTS, PGBENCH_PER_CLIENT = 4, 50
PGBENCH_DATABASE = "egress_pgbouncer_bench"


def pooled_proxy_config(bouncer: PgBouncer) -> str:
    """The ``pooled`` (tcp) and ``routed`` (postgres, by SNI) listeners to one PgBouncer."""
    routed = yaml_listener(
        "routed", f'routes:\n  - {{sni: "{POOL}", cluster: pooled}}\nlog_prefix: ROUTED'
    )
    return proxy_config(
        listener("pooled", "pooled", extra="mode: tcp\nlog_prefix: POOLED") + routed,
        cluster("pooled", f"{POOL}:{bouncer.port}"),
        hosts=f"{POOL}: 127.0.0.1",
    )


async def sleeping_count(server: PostgresServer) -> int:
    """How many backends of ``server`` run the test's pg_sleep (asked over its unix socket)."""
    out, err, code = await run_process(
        [require_tool("psql"), "-X", "-A", "-t", "-d", server.superuser_dsn(), "-c", SLEEPING]
    )
    if code != 0:
        raise AssertionError(f"could not read pg_stat_activity: {err}")
    return int(out.strip())


async def end_sleepers(server: PostgresServer) -> None:
    """Terminate any pg_sleep left running, by a lost cancel, on the shared server."""
    await run_process(
        [
            require_tool("psql"), "-X", "-A", "-t", "-d", server.superuser_dsn(), "-c",
            "select pg_terminate_backend(pid) from pg_stat_activity "
            "where query like 'select pg_sleep(30)%' and pid <> pg_backend_pid()",
        ]
    )


class PgBouncerTests(TestCase):
    def setUp(self) -> None:
        self.server = shared_server()
        self.bouncer = self.start_bouncer()
        self.upstream = f"{POOL}:{self.bouncer.port}"

    def start_bouncer(self, server_host: str | None = None) -> PgBouncer:
        bouncer = PgBouncer.start(self.server, names=(POOL,), server_host=server_host)
        self.addCleanup(bouncer.stop)
        return bouncer

    def proxy(self) -> InProcessProxy:
        return InProcessProxy(self, pooled_proxy_config(self.bouncer))

    async def lines(self, proxy: InProcessProxy, count: int) -> list[AccessLine]:
        """The access log once ``count`` lines are there and every session has ended."""
        await proxy.wait_for_lines(count)
        await wait_until(lambda: proxy.live_sessions() == 0)
        return [parse_access(line) for line in proxy.access_lines()]

    def assertEndedNormally(self, line: AccessLine) -> None:
        """No flag but, at most, the resets that end TLS sessions (see test_postgres)."""
        if line.flags != "-":
            self.assertLessEqual(set(line.flags.split(",")), {"DC", "UC"}, line)

    async def cancel_with_sigint(self, proxy: InProcessProxy | None, dsn: str) -> tuple[str, float]:
        """
        Run pg_sleep(30) in psql over ``dsn``; SIGINT it once the server runs it.

        Returns psql's stderr and the seconds from the signal to psql's end.
        A cancel that gets lost would leave psql waiting out the 30 s, so after
        ``CANCEL_GIVE_UP`` seconds psql is killed and the test fails; any
        sleeper left on the shared server is terminated at cleanup.
        """
        self.addCleanup(lambda: defer.ensureDeferred(end_sleepers(self.server)))
        await end_sleepers(self.server)
        running, transport = spawn_psql(dsn, SLEEP)
        self.addCleanup(lambda: transport.signalProcess("KILL") if transport.pid else None)
        for _ in range(200):
            if await sleeping_count(self.server) == 1 or running.ended.called:
                break
        else:
            self.fail("pg_sleep never started")
        self.assertFalse(running.ended.called, running.err.decode())
        started = reactor.seconds()
        transport.signalProcess("INT")
        try:
            await wait_until(lambda: running.ended.called, timeout=CANCEL_GIVE_UP)
        except AssertionError:
            self.fail(
                f"psql still ran {CANCEL_GIVE_UP}s after SIGINT: the cancel was lost "
                f"on its way to the server; psql said: {running.err.decode()!r}\n"
                + self.diagnostics(proxy)
            )
        seconds = reactor.seconds() - started
        log.msg(f"psql ended {seconds:.3f}s after SIGINT ({dsn})")
        _, err, code = await running.ended
        self.assertNotEqual(code, 0, err)
        return err, seconds

    def diagnostics(self, proxy: InProcessProxy | None) -> str:
        """The proxy's access log (if any) and PgBouncer's last lines, for a failure message."""
        tail = "\n".join(self.bouncer.log().splitlines()[-12:])
        access = "" if proxy is None else "access log:\n" + "\n".join(proxy.access_lines()) + "\n"
        return access + "PgBouncer log:\n" + tail

    async def assertCancelForwarded(self, proxy: InProcessProxy | None) -> None:
        """
        PgBouncer forwarded the cancel, closed the cancel connection itself, and still runs.

        libpq keeps its cancel connection open until the server closes it.
        Whoever relays a cancel must do the same: PgBouncer 1.18 (Debian 12's)
        drops a cancel whose client hangs up first, or exits with "FATAL ...
        disconnect_client(): bad client state: 0" (pgbouncer#801, fixed in
        1.19.1 by #846).
        """
        try:
            await wait_until(lambda: CANCEL_FORWARDED.search(self.bouncer.log()) is not None, timeout=5)
        except AssertionError:
            self.fail("PgBouncer did not log a cancel it forwarded\n" + self.diagnostics(proxy))
        self.assertTrue(self.bouncer.running, "PgBouncer exited\n" + self.diagnostics(proxy))
        self.assertNotIn("FATAL", self.bouncer.log(), self.diagnostics(proxy))

    # -- PgBouncer itself -------------------------------------------------------------

    @inline
    async def test_psql_direct_verify_full(self) -> None:
        """psql reaches the server through PgBouncer alone, verify-full to PgBouncer, TLS on to the server."""
        out, err, code = await psql(
            self.bouncer.dsn(), "select 1", "select inet_server_port()", SSL_IN_USE
        )
        self.assertEqual((code, out.split()), (0, ["1", str(self.server.port), "t"]), err)

    @inline
    async def test_wrong_password_is_refused(self) -> None:
        """A wrong password gets PgBouncer's own SCRAM refusal; its log says why."""
        _, err, code = await psql(self.bouncer.dsn(password="not-the-password"), "select 1")
        self.assertNotEqual(code, 0)
        self.assertIn("FATAL:  SASL authentication failed", err)
        self.assertIn("postgres/postgres@127.0.0.1", self.bouncer.log())
        self.assertIn("password authentication failed", self.bouncer.log())

    @inline
    async def test_plaintext_cancel_accepted_although_tls_required(self) -> None:
        """psql 15's Ctrl-C, a plaintext CancelRequest, is honoured by PgBouncer with client_tls_sslmode = require.

        PgBouncer requires TLS for startups only: libpq before 17 always
        cancels in plaintext, and PgBouncer takes it.  This is the ground the
        proxied cancel tests stand on.
        """
        err, seconds = await self.cancel_with_sigint(None, self.bouncer.dsn())
        self.assertIn(CANCELED, err, f"psql said {err!r}\n" + self.diagnostics(None))
        self.assertLess(seconds, CANCEL_WITHIN, f"the cancel took {seconds:.3f}s")
        await self.assertCancelForwarded(None)

    @inline
    async def test_server_name_is_verified_not_its_address(self) -> None:
        """With host=127.0.0.1 in [databases], verify-full wants 127.0.0.1 in the server's certificate: refused."""
        await self.assertServerRefused(self.start_bouncer(server_host="127.0.0.1"), "127.0.0.1")

    @inline
    async def test_server_name_missing_from_certificate_is_refused(self) -> None:
        """A name that resolves but is not in the server's certificate is refused: verify-full really checks."""
        other = "other.egress.test"
        await self.assertServerRefused(self.start_bouncer(server_host=other), other)

    async def assertServerRefused(self, bouncer: PgBouncer, name: str) -> None:
        """psql through ``bouncer`` gets no server, and PgBouncer logs the name check that failed."""
        _, err, code = await psql(bouncer.dsn(connect_timeout=2), "select 1")
        self.assertNotEqual(code, 0, err)
        expected = f"TLS handshake error: name `{name}' not present in server certificate"
        await wait_until(lambda: expected in bouncer.log(), timeout=5)

    # -- through a tcp listener ---------------------------------------------------------

    @inline
    async def test_psql_through_tcp_listener(self) -> None:
        """psql with verify-full for pool.egress.test through the POOLED tcp listener; one log line with bytes."""
        proxy = self.proxy()
        out, err, code = await psql(self.bouncer.dsn(port=proxy.port("pooled")), "select 1")
        self.assertEqual((code, out.strip()), (0, "1"), err)
        [line] = await self.lines(proxy, 1)
        self.assertEqual((line.prefix, line.upstream), ("POOLED", self.upstream))
        self.assertRegex(line.peer, r"^127\.0\.0\.1:\d+$")
        self.assertGreater(line.received, 0)
        self.assertGreater(line.sent, 0)
        self.assertEndedNormally(line)

    @inline
    async def test_pgbench_through_tcp_listener(self) -> None:
        """pgbench (simple protocol, as transaction pooling needs) through proxy and PgBouncer: every transaction, no failure."""
        pgbench = require_tool("pgbench")
        exists = self.server.superuser_sql(
            f"select 1 from pg_database where datname = '{PGBENCH_DATABASE}'"
        )
        if not exists.stdout.strip():
            self.server.superuser_sql(f"create database {PGBENCH_DATABASE}")
        _, err, code = await run_process(
            [pgbench, "-i", "-s", "1", "-q", self.server.superuser_dsn(PGBENCH_DATABASE)]
        )
        self.assertEqual(code, 0, err)

        proxy = self.proxy()
        out, err, code = await run_process(
            [
                pgbench, "-n", "-c", str(PGBENCH_CLIENTS), "-j", "2",
                "-t", str(PGBENCH_PER_CLIENT),
                self.bouncer.dsn(port=proxy.port("pooled"), dbname=PGBENCH_DATABASE),
            ]
        )
        log.msg(f"pgbench through proxy and PgBouncer:\n{out}")
        self.assertEqual(code, 0, f"{out}\n{err}")
        expected = PGBENCH_CLIENTS * PGBENCH_PER_CLIENT
        self.assertEqual(pgbench_processed(out), (expected, expected), out)
        failed = re.search(r"number of failed transactions: (\d+)", out)
        if pgbench_major(out) >= 15:
            self.assertIsNotNone(failed, out)
        if failed is not None:
            self.assertEqual(int(failed[1]), 0, out)

        lines = await self.lines(proxy, PGBENCH_CLIENTS)
        self.assertGreaterEqual(len(lines), PGBENCH_CLIENTS)
        self.assertEqual({(line.prefix, line.upstream) for line in lines}, {("POOLED", self.upstream)})
        for line in lines:
            self.assertEndedNormally(line)

    @inline
    async def test_cancel_through_tcp_listener(self) -> None:
        """Ctrl-C in psql (a plaintext CancelRequest) reaches the server through the POOLED listener and PgBouncer."""
        proxy = self.proxy()
        err, seconds = await self.cancel_with_sigint(proxy, self.bouncer.dsn(port=proxy.port("pooled")))
        self.assertIn(CANCELED, err, f"psql said {err!r}\n" + self.diagnostics(proxy))
        self.assertLess(seconds, CANCEL_WITHIN, f"the cancel took {seconds:.3f}s")
        await self.assertCancelForwarded(proxy)
        lines = await self.lines(proxy, 2)
        self.assertEqual([(line.prefix, line.upstream) for line in lines], [("POOLED", self.upstream)] * 2)
        self.assertIn(CANCEL_REQUEST_SIZE, [line.received for line in lines])

    # -- through an SNI-routed postgres listener ----------------------------------------

    @inline
    async def test_psql_through_routed_listener(self) -> None:
        """psql with verify-full for pool.egress.test is routed by its server name to PgBouncer, TLS end to end."""
        proxy = self.proxy()
        out, err, code = await psql(self.bouncer.dsn(port=proxy.port("routed")), "select 1", SSL_IN_USE)
        self.assertEqual((code, out.split()), (0, ["1", "t"]), err)
        [line] = await self.lines(proxy, 1)
        self.assertEqual((line.prefix, line.upstream), ("ROUTED", self.upstream))
        self.assertGreater(line.received, 0)
        self.assertGreater(line.sent, 0)
        self.assertEndedNormally(line)

    @inline
    async def test_cancel_through_routed_listener(self) -> None:
        """Ctrl-C in psql on an SNI-routed listener: the plaintext cancel goes where the client's session went.

        A plaintext CancelRequest carries no server name, so the proxy sends
        it to the upstream this client source has live sessions with: here
        the PgBouncer that holds psql's session.
        """
        proxy = self.proxy()
        err, seconds = await self.cancel_with_sigint(proxy, self.bouncer.dsn(port=proxy.port("routed")))
        self.assertIn(CANCELED, err, f"psql said {err!r}\n" + self.diagnostics(proxy))
        self.assertLess(seconds, CANCEL_WITHIN, f"the cancel took {seconds:.3f}s")
        await self.assertCancelForwarded(proxy)
        lines = await self.lines(proxy, 2)
        self.assertEqual([(line.prefix, line.upstream) for line in lines], [("ROUTED", self.upstream)] * 2)
        [cancel] = [line for line in lines if line.received == CANCEL_REQUEST_SIZE]
        self.assertEqual(cancel.upstream, self.upstream)


def pgbench_processed(output: str) -> tuple[int, int] | None:
    """(processed, planned) from pgbench's 'number of transactions actually processed: N/M'."""
    match = re.search(r"number of transactions actually processed: (\d+)/(\d+)", output)
    return None if match is None else (int(match[1]), int(match[2]))


def pgbench_major(output: str) -> int:
    """pgbench's major version from the first line it prints, 'pgbench (15.18 ...)'; 0 if absent."""
    match = re.search(r"^pgbench \((\d+)", output, re.MULTILINE)
    return 0 if match is None else int(match[1])


class LoopbackResolverAnswerTests(SynchronousTestCase):
    """The fixture's DNS answers: only the names it was given, only with 127.0.0.1."""

    @staticmethod
    def query(name: str, qtype: int = 1) -> bytes:
        labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
        return struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)

    def test_known_name_gets_loopback(self) -> None:
        """A registered name, in any case, gets one A record: 127.0.0.1, the query's id echoed."""
        reply = dns_answer(self.query("DB.egress.test"), frozenset({"db.egress.test"}))
        assert reply is not None
        ident, flags, _, answers, _, _ = struct.unpack_from("!HHHHHH", reply)
        self.assertEqual((ident, flags & 0x800F, answers), (0x1234, 0x8000, 1))
        self.assertEqual(reply[-4:], socket.inet_aton("127.0.0.1"))

    def test_other_type_for_known_name_is_empty(self) -> None:
        """AAAA for a registered name is an empty NOERROR, so the A answer is not masked."""
        reply = dns_answer(self.query("db.egress.test", qtype=28), frozenset({"db.egress.test"}))
        assert reply is not None
        _, flags, _, answers, _, _ = struct.unpack_from("!HHHHHH", reply)
        self.assertEqual((flags & 0xF, answers), (0, 0))

    def test_unknown_name_is_nxdomain(self) -> None:
        """Any other name is NXDOMAIN: nothing is forwarded to a real resolver."""
        reply = dns_answer(self.query("example.com"), frozenset({"db.egress.test"}))
        assert reply is not None
        _, flags, _, answers, _, _ = struct.unpack_from("!HHHHHH", reply)
        self.assertEqual((flags & 0xF, answers), (3, 0))

    def test_malformed_queries_get_nothing(self) -> None:
        """Short, compressed or overlong questions are dropped, not answered."""
        names = frozenset({"db.egress.test"})
        whole = self.query("db.egress.test")
        for broken in (b"", whole[:11], whole[:-3], whole[:12] + b"\xc0\x0c\0\1\0\1", whole[:12] + b"\x3f" * 200):
            self.assertIsNone(dns_answer(broken, names), broken)
