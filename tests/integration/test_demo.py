"""``egressproxy demo`` as a user runs it: a real process, its printed commands run for real.

The demo is started as a subprocess (``python -m egressproxy.app.cli demo
--port-base 0``, so it never fights another run for the default ports), in a
session of its own so a signal can go to its whole process group as a
terminal's Ctrl-C does.  Its output is read by a thread; every wait is
bounded.  The psql and curl lines of the banner are split with ``shlex`` and
run as printed (psql gets ``-c`` to run one query instead of a prompt); they
reach only 127.0.0.1, and the refused curl names ``example.com``, which curl
leaves to the proxy and the proxy refuses by name without resolving it.

After a stop, the test checks what a user would find: exit status 0, the
PostgreSQL server's PID gone, the work directory removed, and no process whose
command line or working directory lies in it.  Start-up failures are run too:
a ``--pg-bindir`` without initdb, and a ``pg_ctl`` that starts the server and
then reports failure (set-up fails with PostgreSQL running, half way).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Callable

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from egressproxy.app.demo.banner import READY
from egressproxy.app.demo.pgcluster import DemoError, find_bindir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


def _environment() -> dict[str, str]:
    """No PG* or *_proxy variables (a developer's PGHOST or NO_PROXY must not steer psql or curl)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and not k.lower().endswith("_proxy")}
    env["LC_ALL"] = "C.UTF-8"
    return env


def _need_postgres() -> str:
    try:
        return find_bindir()
    except DemoError as e:
        raise SkipTest(f"PostgreSQL's server programs are not installed here: {e}") from None


class DemoProcess:
    """One ``egressproxy demo`` subprocess and everything it printed so far."""

    def __init__(self, *args: str, sigint_ignored: bool = False) -> None:
        """Start the demo; ``sigint_ignored``: as a background job of a script would (SIGINT ignored)."""
        self.launched = time.monotonic()
        #: Seconds from launch until ``wait_for`` first saw its condition (the ready banner).
        self.ready_after = 0.0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "egressproxy.app.cli", "demo", *args],
            cwd=ROOT, env=_environment(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True,
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None,
        )
        self._lock = threading.Lock()
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, lines: list[str]) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            with self._lock:
                lines.append(line.rstrip("\n"))

    def stdout(self) -> str:
        with self._lock:
            return "\n".join(self.out)

    def stderr(self) -> str:
        with self._lock:
            return "\n".join(self.err)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        """Stdout once ``predicate`` holds for it; fail (with both streams) after ``timeout`` s or on exit."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 1):
            text = self.stdout()
            if predicate(text):
                self.ready_after = self.ready_after or time.monotonic() - self.launched
                return text
            if self.proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"demo: no {what} within {timeout}s (exit status {self.proc.poll()})\n"
            f"stdout:\n{self.stdout()}\nstderr:\n{self.stderr()}"
        )

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the demo's process group, as a terminal does on Ctrl-C."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signum)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"demo still running {timeout:g}s after the signal\nstdout:\n{self.stdout()}\nstderr:\n{self.stderr()}"
            ) from None
        for reader in self._readers:
            reader.join(5)
        return code

    def kill(self) -> None:
        """Last resort for a test that failed half way (our own process group only)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def workdir(self) -> str:
        found = re.search(r"work directory (\S+) \(removed on exit\)", self.stdout())
        assert found is not None, self.stdout()
        return found.group(1)


class Banner:
    """What a ready demo printed, parsed."""

    def __init__(self, text: str) -> None:
        self.text = text
        lines = [line.strip() for line in text.splitlines()]
        self.psql = [line for line in lines if line.startswith("PGPASSWORD=") and " psql " in line]
        self.curl = [line for line in lines if line.startswith("curl ")]
        self.doctor = [line for line in lines if " egressproxy doctor " in f" {line} "]
        found = re.search(r"\(pid (\d+), 127\.0\.0\.1:(\d+)\)", text)
        assert found is not None, text
        self.pg_pid, self.pg_port = int(found.group(1)), int(found.group(2))
        admin = re.search(r"the admin service: (http://127\.0\.0\.1:\d+)/ ", text)
        assert admin is not None, text
        self.admin = admin.group(1)
        started = re.search(re.escape(READY) + r" \(started in ([0-9.]+) s\)", text)
        assert started is not None, text
        self.startup_seconds = float(started.group(1))


def run_printed(line: str, *extra: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a printed ``VAR=value ... program args`` line, with ``extra`` arguments appended."""
    words = shlex.split(line)
    env = _environment()
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return subprocess.run(
        [*words, *extra], capture_output=True, text=True, errors="replace", env=env,
        stdin=subprocess.DEVNULL, timeout=timeout,
    )


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def processes_in(directory: str) -> list[str]:
    """Live processes whose command line or working directory lies in ``directory``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not alive(int(entry)):
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if directory in cmdline or cwd.startswith(directory):
            found.append(f"{entry}: {cmdline} (cwd {cwd})")
    return found


def left_behind(workdir: str, pg_pid: int | None = None) -> list[str]:
    """What a stopped demo left: its server's PID alive, its directory, processes in it (want: [])."""
    left = [f"PostgreSQL (pid {pg_pid}) still runs"] if pg_pid is not None and alive(pg_pid) else []
    if os.path.exists(workdir):
        left.append(f"{workdir} still exists")
    return left + processes_in(workdir)


_shared: dict[str, object] = {}


def _stop_shared() -> None:
    """At exit: SIGTERM the shared demo and wait for it (the SIGTERM test checks what it leaves)."""
    demo = _shared.get("demo")
    if isinstance(demo, DemoProcess):
        demo.signal_group(signal.SIGTERM)
        try:
            demo.wait()
        finally:
            demo.kill()


def shared_demo() -> tuple[DemoProcess, Banner]:
    """One demo for the command tests, started on first use and stopped at exit (as pgserver's shared server)."""
    _need_postgres()
    if shutil.which("curl") is None:
        raise SkipTest("curl not found on PATH: install Debian's curl")
    if "demo" not in _shared:
        demo = DemoProcess("--port-base", "0")
        _shared["demo"] = demo
        atexit.register(_stop_shared)
        try:
            text = demo.wait_for(lambda t: "Access log, one line per" in t, START_TIMEOUT, "ready banner")
        except BaseException:
            demo.kill()
            _shared["failed"] = "the shared demo did not start"
            raise
        _shared["banner"] = Banner(text)
    if "failed" in _shared:
        raise AssertionError(_shared["failed"])
    return _shared["demo"], _shared["banner"]  # type: ignore[return-value]


class RunningDemoTests(SynchronousTestCase):
    """Each printed command of one running demo, run for real."""

    def setUp(self) -> None:
        self.demo, self.banner = shared_demo()

    def access_line(self, *needles: str) -> str:
        """The access-log line holding every needle (waited for: it is written as the connection ends)."""
        text = self.demo.wait_for(
            lambda t: any(all(n in line for n in needles) for line in t.splitlines()), 10, f"access line {needles}"
        )
        return [line for line in text.splitlines() if all(n in line for n in needles)][-1]

    def psql(self, index: int, prefix: str) -> None:
        line = self.banner.psql[index]
        result = run_printed(line, "-X", "-A", "-t", "-c",
                             "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()")
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "demo|t"), result.stderr)
        upstream = f"db.demo.egress.test:{self.banner.pg_port}"
        # Other tests (doctor's doctor run) may leave lines of their own: this one is the
        # one that carried the TLS session, over a kilobyte each way.  Its flag is "-", or
        # "DC" when psql's socket still held the server's last TLS record as it closed
        # (the kernel then resets instead of closing: a timing matter, not a failure).
        line = self.access_line(f"] {prefix} 127.0.0.1:", f" {upstream} ")
        fields = line.split()
        self.assertGreater(int(fields[4]), 1000, line)
        self.assertGreater(int(fields[5]), 1000, line)
        self.assertIn(fields[7], ('"-"', '"DC"'), line)

    def test_commands_printed(self) -> None:
        """The banner has two psql lines (different ports), an allowed and a refused curl, and doctor."""
        self.assertEqual(len(self.banner.psql), 2, self.banner.text)
        self.assertNotEqual(self.banner.psql[0], self.banner.psql[1])
        self.assertEqual(len(self.banner.curl), 2, self.banner.text)
        self.assertEqual(len(self.banner.doctor), 1, self.banner.text)
        print(f"demo start-up: {self.banner.startup_seconds:.1f} s as it printed, "
              f"{self.demo.ready_after:.1f} s from launch to banner")

    def test_psql_through_tcp_listener(self) -> None:
        """The first psql line logs in as demo over TLS (verify-full) through the tcp listener."""
        self.psql(0, "DIRECT")

    def test_psql_through_postgres_listener(self) -> None:
        """The second psql line does the same through the postgres listener that routes by SNI."""
        self.psql(1, "ROUTED")

    def test_curl_allowed(self) -> None:
        """The first curl gets 200 to its CONNECT, and the proxy dials the database."""
        result = run_printed(self.banner.curl[0], "--max-time", "20")
        self.assertIn("< HTTP/1.1 200 Connection established", result.stderr)
        line = self.access_line("] CONNECT ", f"dialled=127.0.0.1:{self.banner.pg_port}")
        self.assertNotIn('"NR"', line)

    def test_curl_refused(self) -> None:
        """The second curl gets 403 to its CONNECT and nothing is dialled (flag NR)."""
        result = run_printed(self.banner.curl[1], "--max-time", "20")
        self.assertIn("< HTTP/1.1 403 Forbidden", result.stderr)
        self.assertNotEqual(result.returncode, 0)
        line = self.access_line("] CONNECT ", " example.com:443 ")
        self.assertIn('"NR"', line)
        self.assertTrue(line.endswith("dialled=-"), line)

    def test_config_shown_is_valid(self) -> None:
        """The config file the doctor line names passes ``egressproxy check-config``."""
        words = shlex.split(self.banner.doctor[0])
        path = words[words.index("--config") + 1]
        result = subprocess.run(
            [sys.executable, "-m", "egressproxy.app.cli", "check-config", path],
            capture_output=True, text=True, cwd=ROOT, env=_environment(), timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("OK (3 listeners, 1 cluster)", result.stdout)

    def test_doctor_passes(self) -> None:
        """The printed doctor line (this checkout's egressproxy) passes every check and logs in."""
        line = self.banner.doctor[0].replace(" egressproxy doctor ", f" {sys.executable} -m egressproxy.app.cli doctor ")
        result = run_printed(line, "--json")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        report = json.loads(result.stdout)
        steps = {(c["step"], c["status"]) for c in report["checks"]}
        self.assertIn(("login", "ok"), steps)
        self.assertIn(("tls chain", "ok"), steps)
        self.assertEqual(report["summary"]["fail"], 0)

    def test_admin_status_page(self) -> None:
        """The admin URL serves the status page."""
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an environment proxy
        with direct.open(self.banner.admin + "/", timeout=10) as response:
            self.assertEqual(response.status, 200)
            self.assertIn(b"egressproxy", response.read())


class StopAndFailureTests(SynchronousTestCase):
    """Ctrl-C with a session open, and start-ups that fail: nothing is left behind."""

    def test_ctrl_c_with_a_live_session(self) -> None:
        """Ctrl-C drains (cutting a long query), stops PostgreSQL, removes the directory and exits 0."""
        _need_postgres()
        demo = DemoProcess("--port-base", "0")
        self.addCleanup(demo.kill)
        banner = Banner(demo.wait_for(lambda t: "Access log, one line per" in t, START_TIMEOUT, "ready banner"))
        words = shlex.split(banner.psql[0])
        env = {**_environment(), "PGPASSWORD": words[0].partition("=")[2]}
        query = subprocess.Popen(
            [*words[1:], "-X", "-c", "select pg_sleep(30)"], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.addCleanup(lambda: query.poll() is None and (query.kill(), query.wait(10)))
        self.wait_for_query(banner.psql[1], "select pg_sleep(30)")
        self.assertIsNone(query.poll())
        workdir = demo.workdir()
        demo.signal_group(signal.SIGINT)
        self.assertEqual(demo.wait(), 0, demo.stderr())
        self.assertNotEqual(query.wait(30), 0)
        self.assertIn("SIGINT: stopping the proxy, then PostgreSQL", demo.stdout())
        self.assertIn("stopped; PostgreSQL is stopped and", demo.stdout())
        self.assertEqual(left_behind(workdir, banner.pg_pid), [])

    def test_sigterm(self) -> None:
        """SIGTERM: the demo exits 0, its PostgreSQL is gone and its directory removed."""
        _need_postgres()
        demo = DemoProcess("--port-base", "0")
        self.addCleanup(demo.kill)
        banner = Banner(demo.wait_for(lambda t: "Access log, one line per" in t, START_TIMEOUT, "ready banner"))
        self.assertTrue(alive(banner.pg_pid))
        workdir = demo.workdir()
        self.assertTrue(os.path.isdir(workdir))
        demo.signal_group(signal.SIGTERM)
        self.assertEqual(demo.wait(), 0, demo.stderr())
        self.assertIn("SIGTERM: stopping the proxy, then PostgreSQL", demo.stdout())
        self.assertEqual(left_behind(workdir, banner.pg_pid), [])

    def wait_for_query(self, psql_line: str, sql: str) -> None:
        """Until the server runs ``sql`` (asked through ``psql_line``, at most 20 times)."""
        check = f"select count(*) from pg_stat_activity where query = '{sql}'"
        for _ in range(20):
            result = run_printed(psql_line, "-X", "-A", "-t", "-c", check)
            if result.stdout.strip() == "1":
                return
            time.sleep(0.25)
        self.fail(f"the server never ran {sql!r}")

    def test_ctrl_c_during_start_up(self) -> None:
        """Ctrl-C while PostgreSQL is being set up: exit 0 and nothing left, wherever it landed.

        Started with SIGINT ignored, as a background job of a script inherits it
        (CI once ran that way and the demo ignored the Ctrl-C): the demo must
        take SIGINT back itself.
        """
        _need_postgres()
        demo = DemoProcess("--port-base", "0", sigint_ignored=True)
        self.addCleanup(demo.kill)
        demo.wait_for(lambda t: "starting PostgreSQL" in t, START_TIMEOUT, "set-up under way")
        workdir = demo.workdir()
        demo.signal_group(signal.SIGINT)
        self.assertEqual(demo.wait(), 0, demo.stdout() + demo.stderr())
        self.assertIn("SIGINT", demo.stdout())
        self.assertEqual(left_behind(workdir), [])

    def test_missing_initdb(self) -> None:
        """A --pg-bindir without initdb: exit 1, the packages to install named, nothing made."""
        missing = tempfile.mkdtemp(prefix="egressproxy-demo-test-")
        self.addCleanup(shutil.rmtree, missing, True)
        demo = DemoProcess("--pg-bindir", missing)
        self.addCleanup(demo.kill)
        self.assertEqual(demo.wait(), 1)
        self.assertIn("apt-get install postgresql", demo.stderr())
        self.assertIn("brew install postgresql", demo.stderr())
        self.assertNotIn("work directory", demo.stdout())

    def test_failure_half_way(self) -> None:
        """pg_ctl starts the server then fails: exit 1, and the server and directory are gone."""
        real = _need_postgres()
        bindir = tempfile.mkdtemp(prefix="egressproxy-demo-test-")
        self.addCleanup(shutil.rmtree, bindir, True)
        os.chmod(bindir, 0o755)  # as root, the server's user runs these
        scripts = {
            "initdb": f'exec {shlex.quote(real)}/initdb "$@"\n',
            "postgres": f'exec {shlex.quote(real)}/postgres "$@"\n',
            # Starts the server for real, then says it failed; stop passes through.
            "pg_ctl": (
                f'{shlex.quote(real)}/pg_ctl "$@"; status=$?\n'
                'case " $* " in *" start "*) echo "simulated failure after start" >&2; exit 1;; esac\n'
                'exit $status\n'
            ),
        }
        for name, body in scripts.items():
            path = os.path.join(bindir, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write("#!/bin/sh\n" + body)
            os.chmod(path, 0o755)
        demo = DemoProcess("--port-base", "0", "--pg-bindir", bindir)
        self.addCleanup(demo.kill)
        self.assertEqual(demo.wait(), 1, demo.stdout() + demo.stderr())
        self.assertIn("pg_ctl start failed", demo.stderr())
        self.assertIn("simulated failure after start", demo.stderr())
        self.assertIn("ready to accept connections", demo.stderr())  # the server log: it did start
        self.assertEqual(left_behind(demo.workdir()), [])
