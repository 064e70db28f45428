"""``egressproxy tunnel`` end to end in namespaces: unmodified clients, real egress Machines, a database that admits only them.

The lab (``tunnellab.py``): the app at .11, two Machines running ``twistd -n
egressproxy`` at .21 and .22, PostgreSQL at .30 whose ``pg_hba`` admits only
the Machines, an HTTPS origin for ``api.egress.test`` at .40, and DNS.  In
the app namespace each test runs ``egressproxy tunnel --transparent ... --
CLIENT`` in a private mount namespace over a copy of ``/etc/hosts``: psql
with ``host=db.egress.test sslmode=verify-full channel_binding=require``,
pgbench, curl by the origin's real name.  What each proves:

- the client reached the database through a Machine (``inet_client_addr()``
  is the Machine's address; a direct connection from the app is refused by
  ``pg_hba``), TLS verified for the real name and SCRAM with channel binding;
- a destination outside the allowlist is refused, with the tunnel's note;
- with the first ``--via`` target unreachable, the second carries it, and
  the note and the ``TUNNEL`` line say so;
- the ``/etc/hosts`` lines are gone after every exit (COMMAND's end, SIGTERM
  in the foreground, a refused start), and the machine's own file is never
  touched; the COMMAND's exit status is the tunnel's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.netns import NetNS
from tests.integration.tunnellab import (
    APP, M1, M2, NOWHERE, PASSWORD_ENV, ROLE, SOCKS_PORT, TCP_PORT, SharedLab, find_psql,
)

TUNNEL = [sys.executable, "-m", "egressproxy.tunnel"]
#: The same through the ``egressproxy`` console script's subcommand.
CONSOLE_TUNNEL = [sys.executable, "-m", "egressproxy.app.cli", "tunnel"]
LINE = re.compile(r'^\[[^\]]+\] TUNNEL (?P<peer>\S+) (?P<dest>\S+) (?P<received>\d+) (?P<sent>\d+) \d+ '
                  r'"(?P<flags>[^"]*)" via=(?P<via>\S+)(?: failed=(?P<failed>\S+))?$')


SHARED = SharedLab()


def tunnel_lines(stderr: str) -> list[re.Match[str]]:
    """The tunnel's access lines in ``stderr``.

    The wrapped command (curl) shares the tunnel's stderr, and its own
    message can be split around an access line ("c" ... "url: (35) ..."),
    so a line is found where it starts, not only at a line's start.
    """
    found = []
    for line in stderr.splitlines():
        start = line.find("[")
        m = LINE.match(line[start:]) if start >= 0 else None
        if m:
            found.append(m)
    return found


class TunnelNetnsTests(SynchronousTestCase):
    """Each test runs the tunnel in the app namespace of one lab, shared by the class (see ``SharedLab``)."""

    def setUp(self) -> None:
        self.lab = SHARED.get()
        self.psql = find_psql()
        with open("/etc/hosts", "rb") as f:
            self.machine_hosts = f.read()

    def tearDown(self) -> None:
        with open("/etc/hosts", "rb") as f:
            self.assertEqual(f.read(), self.machine_hosts, "the machine's own /etc/hosts changed")
        SHARED.done(self, TunnelNetnsTests)

    def run_tunnel(self, args: list[str], hosts: str | None = None, timeout: float = 90.0,
                   tunnel: list[str] = TUNNEL, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], str]:
        """The tunnel with ``args`` in the app namespace: (the finished process, its hosts file)."""
        hosts = hosts or self.lab.hosts_copy()
        done = subprocess.run(self.lab.tunnel_argv(hosts, tunnel, args), capture_output=True, text=True,
                              timeout=timeout, env=env or self.lab.tunnel_env(), stdin=subprocess.DEVNULL, check=False)
        return done, hosts

    def explain(self, done: subprocess.CompletedProcess[str]) -> str:
        """A failure message: the tunnel's output, then the end of each Machine's log."""
        machines = "".join(f"\n--- {name}.log (end):\n{self.lab.log(name + '.log')[-2500:]}" for name in ("m1", "m2"))
        return f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}{machines}"

    def assert_hosts_clean(self, hosts: str) -> None:
        with open(hosts, encoding="utf-8") as f:
            self.assertNotIn("egressproxy tunnel", f.read())

    def via(self, *addresses: str) -> list[str]:
        words = []
        for address in addresses:
            words += ["--via", self.lab.socks(address, password="${%s}" % PASSWORD_ENV)]
        return words

    def psql_args(self, sql: str, **extra: object) -> list[str]:
        return [self.psql, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.lab.conninfo(**extra), "-c", sql]

    # -- the database ------------------------------------------------------------------

    def test_direct_connection_is_refused(self) -> None:
        """Without the tunnel, the app's address has no pg_hba entry: the egress path is what admits it."""
        done = self.lab.hosts["app"].run(
            [self.psql, "-X", "-d", self.lab.conninfo(hostaddr="10.77.0.30"), "-c", "select 1"],
            env=self.lab.tunnel_env(), timeout=30)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn(f'no pg_hba.conf entry for host "{APP}"', done.stderr)

    def test_psql_transparent_verify_full_channel_binding(self) -> None:
        """psql with the real name, verify-full and channel_binding=require reaches the database through m1."""
        # channel_binding=require: libpq fails unless SCRAM-SHA-256-PLUS bound the login to this TLS channel.
        sql = "select inet_client_addr(), ssl from pg_stat_ssl where pid = pg_backend_pid()"
        done, hosts = self.run_tunnel(["--transparent", *self.via(M1), "--dest", f"db.egress.test:{self.lab.db_port}",
                                       "--", *self.psql_args(sql)])
        self.assertEqual(done.returncode, 0, self.explain(done))
        self.assertEqual(done.stdout.strip(), f"{M1}|t")
        self.assertIn(f"db.egress.test:{self.lab.db_port} on 127.77.0.1:{self.lab.db_port}", done.stderr)
        [line] = tunnel_lines(done.stderr)
        self.assertEqual((line["dest"], line["flags"], line["via"], line["failed"]),
                         (f"db.egress.test:{self.lab.db_port}", "-", f"socks5://{ROLE}@{M1}:{SOCKS_PORT}", None))
        self.assertTrue(line["peer"].startswith("127.0.0.1:") or line["peer"].startswith("127.77.0.1:"), line["peer"])
        self.assertGreater(int(line["received"]), 0)
        self.assertGreater(int(line["sent"]), 0)
        self.assert_hosts_clean(hosts)

    def test_pgbench_no_failed_transactions(self) -> None:
        """pgbench through the tunnel: every transaction of every client commits."""
        assert self.lab.db is not None
        self.lab.db.superuser_sql(f"grant create on schema public to {ROLE}")
        pgbench = os.path.join(os.path.dirname(self.psql), "pgbench")
        conninfo = self.lab.conninfo()
        init, _ = self.run_tunnel(["--transparent", *self.via(M1), "--dest", f"db.egress.test:{self.lab.db_port}",
                                   "--", pgbench, "-i", "-s", "1", "-q", conninfo])
        self.assertEqual(init.returncode, 0, self.explain(init))
        done, hosts = self.run_tunnel(["--transparent", *self.via(M1, M2), "--dest", f"db.egress.test:{self.lab.db_port}",
                                       "--", pgbench, "-n", "-c", "4", "-j", "2", "-t", "50", conninfo])
        self.assertEqual(done.returncode, 0, self.explain(done))
        self.assertIn("number of transactions actually processed: 200/200", done.stdout)
        self.assertIn("number of failed transactions: 0 (0.000%)", done.stdout)
        lines = tunnel_lines(done.stderr)
        self.assertGreaterEqual(len(lines), 4)
        self.assertEqual({line["via"] for line in lines}, {f"socks5://{ROLE}@{M1}:{SOCKS_PORT}"})
        # No path failed.  (A client that closes with the server's last bytes
        # unread ends with a reset, flagged DC as the proxy flags it: not a failure.)
        self.assertEqual({line["failed"] for line in lines}, {None})
        self.assertLessEqual({line["flags"] for line in lines}, {"-", "DC"})
        self.assert_hosts_clean(hosts)

    def test_tcp_path_plain_mode(self) -> None:
        """``egressproxy tunnel`` with a tcp:// path to a Machine's tcp listener, without --transparent: psql with hostaddr=127.0.0.1."""
        port = self.lab.db_port
        done, _ = self.run_tunnel(["--via", f"tcp://{M2}:{TCP_PORT}", "--dest", f"db.egress.test:{port}", "--",
                                   *self.psql_args("select inet_client_addr()", hostaddr="127.0.0.1")],
                                  tunnel=CONSOLE_TUNNEL)
        self.assertEqual(done.returncode, 0, self.explain(done))
        self.assertEqual(done.stdout.strip(), M2)
        [line] = tunnel_lines(done.stderr)
        self.assertEqual(line["via"], f"tcp://{M2}:{TCP_PORT}")

    # -- HTTPS -------------------------------------------------------------------------

    def test_curl_allowlisted_origin(self) -> None:
        """curl to the allowlisted API by its real name verifies its certificate through the tunnel."""
        assert self.lab.ca is not None
        done, hosts = self.run_tunnel(["--transparent", *self.via(M2), "--dest", "api.egress.test:443", "--",
                                       "curl", "-sS", "--max-time", "20", "--cacert", self.lab.ca.ca_path,
                                       "https://api.egress.test/"])
        self.assertEqual(done.returncode, 0, self.explain(done))
        self.assertEqual(done.stdout, "hello from api.egress.test\n")
        [line] = tunnel_lines(done.stderr)
        self.assertEqual((line["dest"], line["via"]), ("api.egress.test:443", f"socks5://{ROLE}@{M2}:{SOCKS_PORT}"))
        self.assert_hosts_clean(hosts)

    def test_not_allowlisted_is_refused(self) -> None:
        """A destination outside the allowlist is refused once, with a clear note; curl's failure is the exit status."""
        assert self.lab.ca is not None
        done, hosts = self.run_tunnel(["--transparent", *self.via(M1, M2), "--dest", "evil.egress.test:443", "--",
                                       "curl", "-sS", "--max-time", "20", "--cacert", self.lab.ca.ca_path,
                                       "https://evil.egress.test/"])
        self.assertNotEqual(done.returncode, 0)
        self.assertEqual(done.stdout, "")
        self.assertIn("egressproxy tunnel: refused by the egress proxy's allowlist: evil.egress.test:443 "
                      f"(via socks5://{ROLE}@{M1}:{SOCKS_PORT})", done.stderr)
        lines = tunnel_lines(done.stderr)
        self.assertEqual(len(lines), 1, done.stderr)
        [line] = lines
        self.assertEqual((line["flags"], line["via"], line["failed"]),
                         ("NR", "-", f"socks5://{ROLE}@{M1}:{SOCKS_PORT}(NR)"))
        self.assert_hosts_clean(hosts)

    # -- failover ----------------------------------------------------------------------

    def test_first_path_unreachable(self) -> None:
        """With the first --via target unreachable, psql gets through the second, and the log says so."""
        done, hosts = self.run_tunnel(["--transparent", "--connect-timeout", "2", *self.via(NOWHERE, M2),
                                       "--dest", f"db.egress.test:{self.lab.db_port}",
                                       "--", *self.psql_args("select inet_client_addr()")])
        self.assertEqual(done.returncode, 0, self.explain(done))
        self.assertEqual(done.stdout.strip(), M2)
        self.assertRegex(done.stderr, rf"socks5://{ROLE}@{NOWHERE}:{SOCKS_PORT} failed \(.+\); "
                                      rf"failing over to socks5://{ROLE}@{M2}:{SOCKS_PORT}")
        [line] = tunnel_lines(done.stderr)
        self.assertEqual(line["via"], f"socks5://{ROLE}@{M2}:{SOCKS_PORT}")
        self.assertRegex(line["failed"], rf"^socks5://{ROLE}@{NOWHERE}:{SOCKS_PORT}\((UF|UT)\)$")
        self.assert_hosts_clean(hosts)

    # -- --check -------------------------------------------------------------------------

    def test_check(self) -> None:
        """--check prints a line per destination and exits 1 when one is refused, 0 when all connect."""
        dests = ["--dest", f"db.egress.test:{self.lab.db_port}", "--dest", "api.egress.test:443"]
        done, _ = self.run_tunnel(["--check", *self.via(M1), *dests, "--dest", "evil.egress.test:443"])
        self.assertEqual(done.returncode, 1, self.explain(done))
        ok_db, ok_api, fail = done.stdout.splitlines()
        self.assertTrue(ok_db.startswith(f"ok   db.egress.test:{self.lab.db_port} via socks5://{ROLE}@{M1}:{SOCKS_PORT}"))
        self.assertTrue(ok_api.startswith("ok   api.egress.test:443 via"))
        self.assertEqual(fail, f"FAIL evil.egress.test:443: refused by the egress proxy's allowlist (socks5://{ROLE}@{M1}:{SOCKS_PORT})")
        done, _ = self.run_tunnel(["--check", "--connect-timeout", "2", *self.via(NOWHERE, M2), *dests])
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn(f"via socks5://{ROLE}@{M2}:{SOCKS_PORT}", done.stdout.splitlines()[0])
        self.assertIn(f"socks5://{ROLE}@{NOWHERE}:{SOCKS_PORT} failed", done.stdout.splitlines()[0])

    # -- the process -------------------------------------------------------------------

    def test_exit_status_is_the_commands(self) -> None:
        """The tunnel exits with COMMAND's status, after removing its hosts lines; COMMAND saw them."""
        done, hosts = self.run_tunnel(["--transparent", *self.via(M1), "--dest", "api.egress.test:443", "--",
                                       "sh", "-c", "grep -c 'api.egress.test  # egressproxy tunnel' /etc/hosts; exit 7"])
        self.assertEqual(done.returncode, 7, self.explain(done))
        self.assertEqual(done.stdout, "1\n")
        self.assert_hosts_clean(hosts)

    def test_existing_name_refuses_to_start(self) -> None:
        """A name already in /etc/hosts stops the start (exit 1), the file untouched, COMMAND never run."""
        hosts = self.lab.hosts_copy(extra="\n10.0.0.1 api.egress.test\n")
        with open(hosts, "rb") as f:
            before = f.read()
        done, _ = self.run_tunnel(["--transparent", *self.via(M1), "--dest", "api.egress.test:443", "--",
                                   "sh", "-c", "echo ran"], hosts=hosts)
        self.assertEqual(done.returncode, 1)
        self.assertEqual(done.stdout, "")
        self.assertIn("api.egress.test is already in the hosts file", done.stderr)
        with open(hosts, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_sigterm_in_the_foreground_and_to_a_command(self) -> None:
        """SIGTERM stops a foreground tunnel (exit 0) and is passed to COMMAND (exit 143); hosts lines go both times."""
        for command, expected in (([], 0), (["--", "sleep", "60"], 128 + signal.SIGTERM)):
            hosts = self.lab.hosts_copy()
            argv = self.lab.tunnel_argv(hosts, TUNNEL, ["--transparent", *self.via(M1), "--dest", "api.egress.test:443",
                                                        *command])
            process = subprocess.Popen(argv, env=self.lab.tunnel_env(), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                deadline = time.monotonic() + 30
                while "egressproxy tunnel" not in open(hosts, encoding="utf-8").read():
                    self.assertLess(time.monotonic(), deadline, "no hosts line within 30s")
                    self.assertIsNone(process.poll(), "the tunnel exited early")
                    time.sleep(0.05)
                time.sleep(0.3)  # COMMAND started, signal handlers taken over
                status = NetNS.stop(process, signal.SIGTERM, timeout=20)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait(5)
            stderr = process.stderr.read() if process.stderr else ""
            self.assertEqual(status, expected, stderr)
            self.assert_hosts_clean(hosts)
