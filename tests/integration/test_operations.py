"""Operating a real twistd process: drain on SIGTERM, reload on SIGHUP, /metrics.

Each test starts ``twistd -n egressproxy`` as a subprocess against a real TLS
PostgreSQL, and drives it with real psql and pgbench, as an operator would.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from typing import Any

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from tests.integration.pgserver import shared_server
from tests.integration.proxy import require_tool, run_process, wait_until
from tests.integration.test_forwarding import REPO, inline, twistd_argv


def free_port() -> int:
    """A loopback port nobody listens on right now (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Twistd(protocol.ProcessProtocol):
    """A twistd child: its output so far, its exit status, and signals."""

    def __init__(self) -> None:
        self.text = ""
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.exit_code: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.text += data.decode("utf-8", "replace")

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.exit_code = reason.value.exitCode
        self.ended.callback(self.exit_code)

    def signal(self, name: str) -> None:
        self.transport.signalProcess(name)

    def access_lines(self, prefix: str) -> list[str]:
        return [line for line in self.text.splitlines() if f"] {prefix} " in line]


class Interactive(protocol.ProcessProtocol):
    """A psql session fed through stdin, so it can stay open across a signal."""

    def __init__(self) -> None:
        self.out = ""
        self.ended: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data.decode("utf-8", "replace")

    errReceived = outReceived

    def send(self, sql: str) -> None:
        self.transport.write(sql.encode())

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value.exitCode)


def psql_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({"LC_ALL": "C.UTF-8", "PGCLIENTENCODING": "UTF8"})
    return env


class OperationsTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        require_tool("psql")
        self.server = shared_server()
        self.tmp = tempfile.mkdtemp(prefix="egress-ops-")
        self.config_path = os.path.join(self.tmp, "egressproxy.yaml")

    def write_config(self, text: str) -> None:
        # Write then rename, so a SIGHUP never reads half a file.
        partial = self.config_path + ".tmp"
        with open(partial, "w") as f:
            f.write(text)
        os.replace(partial, self.config_path)

    def config(self, listeners: dict[str, int], metrics_port: int, drain: str = "10s") -> str:
        lines = ["listeners:"]
        for name, port in listeners.items():
            lines.append(f"  - {{name: {name}, listen: \"127.0.0.1:{port}\", cluster: pg, log_prefix: {name.upper()}}}")
        lines += [
            "clusters:",
            f"  - {{name: pg, endpoints: [\"db.egress.test:{self.server.port}\"], health_check: {{kind: none}}}}",
            "hosts: {db.egress.test: 127.0.0.1}",
            f"metrics: {{listen: \"127.0.0.1:{metrics_port}\"}}",
            "admin: false",
            f"drain_timeout: {drain}",
            "shutdown_delay: 0s",
        ]
        return "\n".join(lines) + "\n"

    async def start(self) -> Twistd:
        child = Twistd()
        process = reactor.spawnProcess(
            child, sys.executable, twistd_argv(self.config_path), env={**os.environ, "PYTHONPATH": REPO}
        )

        async def stop() -> None:
            if child.exit_code is None:
                process.signalProcess("KILL")
                await child.ended

        self.addCleanup(lambda: defer.ensureDeferred(stop()))
        await wait_until(lambda: "metrics HTTP service listening" in child.text or child.ended.called, timeout=30)
        self.assertFalse(child.ended.called, child.text)
        return child

    def dsn(self, port: int, **extra: str) -> str:
        return self.server.dsn(port=port, **extra)

    async def psql(self, port: int, sql: str) -> tuple[str, str, int]:
        return await run_process(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.dsn(port), "-c", sql])

    async def metrics(self, port: int) -> str:
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/metrics".encode())
        return (await readBody(response)).decode()

    @inline
    async def test_sigterm_drains_live_transaction(self) -> None:
        """After SIGTERM a live transaction still commits, new connections are refused, and twistd exits 0."""
        self.server.superuser_sql("create table if not exists drain_check (id int)")
        port, metrics_port = free_port(), free_port()
        self.write_config(self.config({"direct": port}, metrics_port))
        child = await self.start()

        session = Interactive()
        reactor.spawnProcess(session, "psql", ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d",
                                               self.dsn(port)], env=psql_env())
        session.send("begin;\ninsert into drain_check values (4242);\nselect 'in-transaction';\n")
        await wait_until(lambda: "in-transaction" in session.out, timeout=30)

        child.signal("TERM")
        await wait_until(lambda: "draining" in child.text, timeout=10)
        with self.assertRaises(error.ConnectionRefusedError):
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), protocol.Protocol())
        ready = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{metrics_port}/ready".encode())
        self.assertEqual(ready.code, 503)

        session.send("commit;\nselect 'committed';\n\\q\n")
        self.assertEqual(await session.ended, 0, session.out)
        self.assertIn("committed", session.out)
        self.assertEqual(await child.ended, 0, child.text)
        rows = self.server.superuser_sql("select count(*) from drain_check where id = 4242")
        self.assertIn("1", rows.stdout if hasattr(rows, "stdout") else str(rows))
        [line] = child.access_lines("DIRECT")
        self.assertNotIn('"DT"', line)

    @inline
    async def test_session_longer_than_drain_timeout_is_cut(self) -> None:
        """A session still running at drain_timeout is cut, logged with DT, and twistd exits 0."""
        port, metrics_port = free_port(), free_port()
        self.write_config(self.config({"direct": port}, metrics_port, drain="2s"))
        child = await self.start()
        sleeper = defer.ensureDeferred(self.psql(port, "select pg_sleep(30)"))
        await wait_until(lambda: self._backend_sleeping(), timeout=20)
        started = reactor.seconds()
        child.signal("TERM")
        out, err, code = await sleeper
        self.assertNotEqual(code, 0)
        self.assertIn("server closed the connection unexpectedly", err)
        self.assertLess(reactor.seconds() - started, 10)
        self.assertEqual(await child.ended, 0, child.text)
        [line] = child.access_lines("DIRECT")
        self.assertIn('"DT"', line)

    def _backend_sleeping(self) -> bool:
        result = self.server.superuser_sql(
            "select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'"
        )
        text = result.stdout if hasattr(result, "stdout") else str(result)
        return text.strip().splitlines()[-1].strip() == "1" if text.strip() else False

    @inline
    async def test_sighup_reload_under_pgbench(self) -> None:
        """SIGHUP adds and removes listeners while pgbench on a kept one loses nothing; a broken file changes nothing."""
        require_tool("pgbench")
        self.server.superuser_sql("select 1")
        init = await run_process(["pgbench", "-i", "-q", "-s", "1", "-d", self.server.dsn()])
        self.assertEqual(init[2], 0, init[1])
        kept, removed, added, metrics_port = free_port(), free_port(), free_port(), free_port()
        self.write_config(self.config({"direct": kept, "old": removed}, metrics_port))
        child = await self.start()

        bench = defer.ensureDeferred(run_process(
            ["pgbench", "-n", "-c", "4", "-j", "2", "-T", "6", "-S", "-d", self.dsn(kept)], timeout=60
        ))
        await deferLater(reactor, 1.5, lambda: None)
        self.write_config(self.config({"direct": kept, "new": added}, metrics_port))
        child.signal("HUP")
        await wait_until(lambda: "config reloaded" in child.text, timeout=10)
        self.assertIn("config reloaded: listeners added: new; removed: old\n", child.text)

        out, err, code = await self.psql(added, "select 'via new'")
        self.assertEqual((code, out.strip()), (0, "via new"), err)
        with self.assertRaises(error.ConnectionRefusedError):
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", removed, timeout=5), protocol.Protocol())

        out, err, code = await bench
        self.assertEqual(code, 0, out + err)
        self.assertRegex(out, r"number of failed transactions: 0 ")
        self.assertRegex(out, r"number of transactions actually processed: [1-9]\d*")

        self.write_config("listeners: [this is not: valid\n")
        child.signal("HUP")
        await wait_until(lambda: "reload failed" in child.text, timeout=10)
        scrape = await self.metrics(metrics_port)
        self.assertIn('egressproxy_config_reloads_total{result="error"} 1.0', scrape)
        self.assertIn('egressproxy_config_reloads_total{result="success"} 1.0', scrape)
        out, err, code = await self.psql(kept, "select 'still serving'")
        self.assertEqual((code, out.strip()), (0, "still serving"), err)
        child.signal("TERM")
        self.assertEqual(await child.ended, 0, child.text)
