"""The two-Machine Fly deployment, end to end, in network namespaces (issue 14, items 2 and 4).

``flysim.py`` builds it: app1 and app2, haproxy standing in for Fly's proxy
(round robin, PROXY v2 toward the Machines, health checks on ``/ready``
every 0.5 s, down after 2 failures), two real ``twistd egressproxy``
Machines, and a PostgreSQL whose ``pg_hba`` admits only the Machines.  The
scenarios, in order (they share the deployment, built once for the class
and removed after the last; each starts from both Machines UP):

1. psql and pgbench from app1 through the stand-in work; the database sees
   only the Machines' addresses; the access logs name app1 (10.77.0.11),
   never haproxy; app2 is refused by ``allow_sources`` and named in the log.
2. A rolling deploy (SIGTERM m1, wait for exit, start it, wait until haproxy
   has it UP; then m2) under ``pgbench -c 8 -C``: 0 failed transactions, no
   aborted client, and the rows inserted equal pgbench's count.
3. SIGKILL m1 under the same load: the transactions that were in flight
   through it fail (pgbench aborts those clients), the rest carry on
   through m2; the time until commits resume is bounded by haproxy's check
   interval × fall + slack.
4. m2 expecting an egress address it does not have (STUN on the db host
   reports 10.77.0.22, it expects 10.77.0.99): its ``/ready`` is 503,
   haproxy marks it down, and every connection goes through m1.

Figures (transactions, failures, timings) are printed and logged.  Skipped,
with the reason, where namespaces, haproxy, PostgreSQL or pgbench are
missing.
"""

from __future__ import annotations

import atexit
import signal
import time
from typing import ClassVar

from twisted.python import log
from twisted.trial.unittest import SkipTest, TestCase

from tests.integration import flyload
from tests.integration.flyparts import CHECK_INTER, FALL, METRICS_PORT, wait_for
from tests.integration.flysim import APP1, APP2, DB, DRAIN_TIMEOUT, FLYPROXY, M1, M2, SHUTDOWN_DELAY, FlySim, http_get
from tests.integration.netns import NetNS

#: Room on top of haproxy's detection time (CHECK_INTER × FALL) for a
#: reconnect on a machine shared with other work.
SLACK = 2.0
#: Long enough for the whole rolling deploy (two drains of SHUTDOWN_DELAY,
#: two starts, two rises), measured at about 18 s.
ROLLING_SECONDS = 28


def report(text: str) -> None:
    """A figure for the test log: printed (CI keeps trial's output) and logged."""
    print(f"\n[flysim] {text}", flush=True)
    log.msg(f"[flysim] {text}")


def host_of(peer: str) -> str:
    """``10.77.0.11:40000`` or ``[fd77::11]:40000`` -> the address."""
    return peer.rsplit(":", 1)[0].strip("[]")


class FlySimulationTests(TestCase):
    """The deployment's promises, one scenario per test; see the module notes."""

    sim: ClassVar[FlySim | None] = None
    failed_start: ClassVar[BaseException | None] = None
    remaining: ClassVar[set[str] | None] = None

    def setUp(self) -> None:
        cls = FlySimulationTests
        if cls.remaining is None:
            cls.remaining = {name for name in dir(cls) if name.startswith("test_")}
        if cls.failed_start is not None:
            raise cls.failed_start
        if cls.sim is None:
            started = time.monotonic()
            try:
                cls.sim = FlySim.start()
            except SkipTest as e:
                cls.failed_start = e
                raise
            except BaseException as e:
                cls.failed_start = RuntimeError(f"the simulated deployment did not start: {e}")
                raise
            atexit.register(cls.sim.close)
            report(f"deployment up in {time.monotonic() - started:.1f}s: namespaces {cls.sim.describe()}")
            assert cls.sim.db is not None
            flyload.prepare_database(cls.sim.db)
        self.sim = cls.sim
        assert self.sim.db is not None and self.sim.flyproxy is not None
        self.db, self.flyproxy = self.sim.db, self.sim.flyproxy
        self.m1, self.m2 = self.sim.machines["m1"], self.sim.machines["m2"]
        self.app1, self.app2 = self.sim.hosts["app1"], self.sim.hosts["app2"]
        self.env = flyload.client_env(self.db, FLYPROXY)
        self.sim.ensure_baseline()
        self.marks = {name: len(m.access_lines()) for name, m in self.sim.machines.items()}
        self.started = time.monotonic()

    def tearDown(self) -> None:
        cls = FlySimulationTests
        report(f"{self._testMethodName}: {time.monotonic() - self.started:.1f}s")
        assert cls.remaining is not None
        cls.remaining.discard(self._testMethodName)
        try:
            for name, machine in self.sim.machines.items():
                output = machine.output()
                self.assertNotIn("Traceback", output, f"{name} logged an error:\n{output[-3000:]}")
        finally:
            if not cls.remaining and cls.sim is not None:
                cls.sim.close()
                atexit.unregister(cls.sim.close)
                cls.sim = None

    def pgbench(self, run: int, clients: int, seconds: int) -> flyload.PgbenchRun:
        """pgbench -C from app1 through the stand-in, stopped by pid if the test ends first."""
        running = flyload.start_pgbench(self.app1, self.env, self.sim.directory, run, clients, seconds)
        self.addCleanup(NetNS.stop, running.process)
        return running

    def new_lines(self, name: str) -> list:
        """Access-log lines machine ``name`` wrote since this test began."""
        return self.sim.machines[name].access_lines()[self.marks[name]:]

    def assert_clean(self, result: flyload.PgbenchResult, run: int) -> int:
        """pgbench ran without a failure or an error line, and every reported transaction committed."""
        rows = flyload.committed(self.db, run)
        self.assertEqual(result.returncode, 0, f"{result.summary()}\n{result.stdout}\n{result.stderr[-3000:]}")
        self.assertEqual(result.failed, 0, result.stdout)
        self.assertEqual(result.aborted_clients, [])
        self.assertEqual(result.error_lines, [])
        self.assertGreater(result.processed or 0, 0, result.stdout)
        self.assertEqual(rows, result.processed, "rows inserted vs transactions pgbench counted")
        return rows

    # -- 1 ---------------------------------------------------------------------

    def test_1_real_client_in_the_log(self) -> None:
        """psql/pgbench work through the stand-in; logs name app1; app2 is refused and named."""
        seen = []
        for _ in range(4):
            done = flyload.psql(self.app1, self.env, "SELECT inet_client_addr()")
            self.assertEqual(done.returncode, 0, done.stderr)
            seen.append(done.stdout.strip())
        # Round robin over both Machines; the database sees only their addresses.
        self.assertEqual(set(seen), {M1, M2}, seen)

        running = self.pgbench(run=1, clients=4, seconds=3)
        result = flyload.finish_pgbench(running)
        rows = self.assert_clean(result, 1)

        direct = flyload.psql(self.app1, flyload.client_env(self.db, DB, self.db.port), "SELECT 1")
        self.assertNotEqual(direct.returncode, 0, "the database must not admit an app directly")
        self.assertIn(f'no pg_hba.conf entry for host "{APP1}"', direct.stderr)

        refused = flyload.psql(self.app2, self.env, "SELECT 1")
        self.assertNotEqual(refused.returncode, 0, "allow_sources must refuse app2")

        def rbac_for_app2() -> bool:
            return any(host_of(m["peer"]) == APP2 and m["flags"] == "RBAC"
                       for name in ("m1", "m2") for m in self.new_lines(name))

        wait_for(rbac_for_app2, 10, "an RBAC access line naming app2")
        # 4 psql, pgbench's own first connection and its transactions; app2's refusal.
        expected = 4 + 1 + (result.processed or 0) + 1
        wait_for(lambda: sum(len(self.new_lines(n)) for n in ("m1", "m2")) >= expected, 10,
                 f"{expected} access lines")
        lines = self.new_lines("m1") + self.new_lines("m2")
        peers = {host_of(m["peer"]) for m in lines}
        self.assertEqual(peers, {APP1, APP2}, "the access logs name the apps, never the stand-in's address")
        self.assertNotIn(FLYPROXY, peers)
        from_app1 = [m for m in lines if host_of(m["peer"]) == APP1]
        self.assertEqual(len(from_app1), expected - 1)
        self.assertTrue(all(m["flags"] != "RBAC" for m in from_app1))
        report(f"scenario 1: 4 psql through the stand-in reached the database as {sorted(set(seen))}; "
               f"{result.summary()}; {rows} rows committed; access lines from {APP1}: {len(from_app1)} "
               f"(m1 {len(self.new_lines('m1'))}, m2 {len(self.new_lines('m2'))} incl. the refusal); "
               f"app2 refused: {refused.stderr.strip().splitlines()[0] if refused.stderr.strip() else '?'}")

    # -- 2 ---------------------------------------------------------------------

    def test_2_rolling_deploy_loses_nothing(self) -> None:
        """SIGTERM, restart and rejoin each Machine in turn under pgbench -c 8 -C: nothing fails."""
        running = self.pgbench(run=2, clients=8, seconds=ROLLING_SECONDS)
        began = time.monotonic()
        time.sleep(2)
        steps = []
        for machine in (self.m1, self.m2):
            t0 = time.monotonic()
            machine.send(signal.SIGTERM)
            down = self.flyproxy.wait_status(machine.name, up=False, timeout=SHUTDOWN_DELAY)
            code = machine.wait_exit(SHUTDOWN_DELAY + DRAIN_TIMEOUT + 5)
            exited = time.monotonic() - t0
            self.assertEqual(code, 0, f"{machine.name} after SIGTERM:\n{machine.output()[-2000:]}")
            t1 = time.monotonic()
            machine.start()
            up = self.flyproxy.wait_status(machine.name, up=True, timeout=30)
            steps.append(f"{machine.name}: down in haproxy {down:.1f}s after SIGTERM, exited 0 after "
                         f"{exited:.1f}s, back UP {time.monotonic() - t1:.1f}s after start (rise {up:.1f}s)")
            time.sleep(1)
        deploy = time.monotonic() - began
        self.assertIsNone(running.process.poll(),
                          f"pgbench -T {ROLLING_SECONDS} ended before the deploy did ({deploy:.1f}s): raise ROLLING_SECONDS")
        result = flyload.finish_pgbench(running)
        rows = self.assert_clean(result, 2)
        lines = self.new_lines("m1") + self.new_lines("m2")
        flags = {}
        for m in lines:
            flags[m["flags"]] = flags.get(m["flags"], 0) + 1
        # DC/UC on complete sessions are how TLS clients hang up (README, Access log);
        # DT would be a connection the drain cut, UF/UT a failed dial.
        self.assertLessEqual(set(flags), {"-", "DC", "UC"}, flags)
        self.assertEqual({host_of(m["peer"]) for m in lines}, {APP1})
        report(f"scenario 2 (rolling deploy, {deploy:.1f}s of {ROLLING_SECONDS}s load): {result.summary()}; "
               f"{rows} rows committed = processed; access flags {flags}; " + "; ".join(steps))

    # -- 3 ---------------------------------------------------------------------

    def test_3_sigkill_fails_over(self) -> None:
        """SIGKILL m1 under load: in-flight transactions through it fail, the rest carry on via m2."""
        running = self.pgbench(run=3, clients=8, seconds=10)
        time.sleep(3)
        counters = self.flyproxy.counters()
        killed_at = time.time()
        self.m1.send(signal.SIGKILL)
        self.assertEqual(self.m1.wait_exit(5), -signal.SIGKILL)
        down = self.flyproxy.wait_status("m1", up=False, timeout=10)
        result = flyload.finish_pgbench(running)
        rows = flyload.committed(self.db, 3)
        haproxy = {k: v - counters[k] for k, v in self.flyproxy.counters().items()}
        bound = CHECK_INTER * FALL + SLACK
        resumed = flyload.resumed_after(result.transactions, killed_at)
        pause = flyload.longest_pause(result.transactions, killed_at, killed_at + 5)
        before = sum(1 for t in result.transactions if t.end < killed_at)
        failed = (result.failed or 0) + len(result.aborted_clients)
        report(f"scenario 3 (SIGKILL m1 at 3s of 10s): {result.summary()}; failed transactions "
               f"{failed} (in flight through m1: {len(result.aborted_clients)} clients aborted); "
               f"committed rows {rows} vs reported {result.processed} ({rows - (result.processed or 0)} "
               f"committed but unreported); first commit begun after the kill {resumed}s later; "
               f"longest pause in commits {pause:.2f}s; haproxy marked m1 DOWN after {down:.1f}s more; "
               f"bound {bound}s; {before} committed before the kill; haproxy connect errors/retries/"
               f"redispatches {haproxy}; pgbench stderr {result.error_lines[:3]}")
        self.assertIsNotNone(resumed, "no transaction committed after the kill")
        self.assertLessEqual(resumed, bound)
        self.assertLessEqual(pause, bound)
        self.assertLess(len(result.aborted_clients), 8, "some clients must carry on through m2")
        self.assertGreaterEqual(rows, result.processed or 0, "a transaction pgbench counted is missing")
        self.assertEqual(result.failed, 0, "pgbench 15 aborts clients on connection errors instead")
        self.assertTrue(all("abort" in line or "server" in line or "connection" in line
                            for line in result.error_lines), result.error_lines)
        after = [m for m in self.new_lines("m2")]
        self.assertGreater(len(after), 0)

    # -- 4 ---------------------------------------------------------------------

    def test_4_unexpected_egress_gets_no_traffic(self) -> None:
        """m2 egressing from an address it does not expect is never routed to."""
        self.m2.stop(signal.SIGTERM)
        self.m2.start(expected="10.77.0.99")
        observer = self.sim.hosts["flyproxy"]

        def m2_says_why() -> bool:
            code, body = http_get(observer, M2, METRICS_PORT, "/ready")
            return code == 503 and "egress address 10.77.0.22 is not in expected_egress_ips (10.77.0.99)" in body

        wait_for(m2_says_why, 10, "m2's /ready naming its unexpected egress address", step=0.2)
        self.assertEqual(http_get(observer, M1, METRICS_PORT, "/ready"), (200, "ready\n"))
        self.assertEqual(self.flyproxy.status("m2"), "DOWN")
        # Rise is 2 checks: stay down well past that.
        time.sleep(CHECK_INTER * 3)
        self.assertEqual(self.flyproxy.status("m2"), "DOWN")
        marks = {name: len(m.access_lines()) for name, m in self.sim.machines.items()}
        haproxy_mark = len(self.flyproxy.log().splitlines())
        seen = set()
        for _ in range(4):
            done = flyload.psql(self.app1, self.env, "SELECT inet_client_addr()")
            self.assertEqual(done.returncode, 0, done.stderr)
            seen.add(done.stdout.strip())
        running = self.pgbench(run=4, clients=4, seconds=3)
        result = flyload.finish_pgbench(running)
        rows = self.assert_clean(result, 4)
        total = 4 + 1 + (result.processed or 0)  # psql, pgbench's first connection, its transactions
        wait_for(lambda: len(self.m1.access_lines()) - marks["m1"] >= total, 10, f"{total} access lines on m1")
        on_m1 = len(self.m1.access_lines()) - marks["m1"]
        on_m2 = len(self.m2.access_lines()) - marks["m2"]
        self.assertEqual(seen, {M1})
        self.assertEqual(on_m2, 0)
        self.assertEqual(on_m1, total)
        self.assertEqual(self.flyproxy.status("m2"), "DOWN")
        routed = self.flyproxy.log().splitlines()[haproxy_mark:]
        self.assertEqual(sum(" machines/m2 " in line for line in routed), 0)
        self.assertGreaterEqual(sum(" machines/m1 " in line for line in routed), total - 1)
        report(f"scenario 4 (m2 expects 10.77.0.99, STUN says 10.77.0.22): m2 /ready 503, DOWN in haproxy; "
               f"{result.summary()}; {rows} rows; access lines m1 {on_m1}, m2 {on_m2}; database saw {sorted(seen)}; "
               f"STUN answers {self.sim.stun.answered if self.sim.stun else {}}")
