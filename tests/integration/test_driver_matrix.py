"""
The driver matrix: real Postgres drivers through each of the proxy's shapes.

Rows are drivers, each a script under ``drivers/`` with one contract (see
``drivers/contract.py``): psycopg 3, asyncpg, psql + pgbench (the system
libpq), node-postgres and pgjdbc. Columns are the three listener shapes of
one in-process proxy, in front of one PostgreSQL that authenticates like a
managed provider (``hostssl`` only, SCRAM-SHA-256), as role ``matrix_app``
on database ``matrix``:

- ``tcp``: a plain TCP forwarder; the driver does TLS with the database's
  name while its socket goes to the proxy (``--tls verify-full``).
- ``sni``: ``mode: postgres`` routing by the TLS server name
  ``db.egress.test``; TLS is still the driver's (``--tls verify-full``).
- ``orig``: ``mode: postgres`` with ``tls: originate``: the driver speaks
  plaintext to the proxy (``--tls disable``), which does verified TLS
  upstream.

Each cell is one test, ``test_<driver>_<listener>``, with a proxy of its
own having the same three listeners (trial wants the reactor clean after
each test, and the access log is then the cell's alone). It runs the
driver's script as a subprocess (the proxy shares trial's reactor, so
nothing may block once it runs) and requires every contract check to be
printed and ok: a script that prints nothing fails (``JudgeTests`` pins
how output is judged). It prints the cell's results, so the CI log shows
the matrix, and appends them to ``driver-matrix.jsonl`` in trial's working
directory; ``python -m tests.integration.test_driver_matrix FILE`` turns
that into the README's table. It then checks the proxy's access log for
the cell: the listener's prefix on every line, the database as upstream
of every session that ended normally, and no refusal flag (``NR``, ``UF``
and the like). A driver whose runtime is missing (node, a JDK, pgjdbc,
psql/pgbench, a Python package) is skipped with the reason; a missing
script or a PgCheck.java that does not compile fails.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.integration.pgserver import PostgresServer, role_password, shared_server
from tests.integration.proxy import InProcessProxy, inline, wait_until
from tests.integration.test_postgres import AccessLine, parse_access

HOST = "db.egress.test"
ROLE = "matrix_app"
DATABASE = "matrix"

DRIVERS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "drivers")
NODE_DIR = os.path.join(DRIVERS_DIR, "node")
JAVA_DIR = os.path.join(DRIVERS_DIR, "java")
PGJDBC_JAR = "/usr/share/java/postgresql.jar"

def _contract_checks() -> tuple[str, ...]:
    """The checks every driver script must print, in order: ``drivers/contract.py``'s own list.

    The scripts import ``contract`` as a sibling module, so it is loaded here
    by path rather than made part of the tests package.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "drivers", "contract.py")
    spec = importlib.util.spec_from_file_location("driver_contract", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.CHECKS)


CONTRACT = _contract_checks()

#: A script runs well under a minute; past this it is killed and the cell fails.
SCRIPT_SECONDS = 90.0
#: The bound on a one-off setup step run inside a cell's test (npm ci, javac).
SETUP_SECONDS = 150.0
#: Flags that mean the proxy refused or failed a connection: none belongs in a cell.
REFUSAL_FLAGS = frozenset({"NR", "UF", "UT", "UO", "RBAC", "OM", "DPE"})
#: Flags of a session that ended normally (DC/UC: a benign reset at the end).
NORMAL_FLAGS = frozenset({"-", "DC", "UC"})

SUMMARY_FILE = "driver-matrix.jsonl"


@attrs.frozen
class Listener:
    """One column: the listener's YAML body and the ``--tls`` its drivers use."""

    name: str
    yaml: str
    tls: str

    @property
    def prefix(self) -> str:
        return self.name.upper()


LISTENERS = (
    Listener("tcp", "mode: tcp\ncluster: pg", "verify-full"),
    Listener("sni", f'mode: postgres\nroutes:\n  - {{sni: "{HOST}", cluster: pg}}', "verify-full"),
    Listener("orig", "mode: postgres\ntls: originate\ncluster: pg", "disable"),
)


def proxy_yaml(server: PostgresServer) -> str:
    """One proxy, three listeners on 127.0.0.1, all to cluster ``pg`` (the server, by name)."""
    listeners = "".join(
        f'  - name: {listener.name}\n    listen: "127.0.0.1:0"\n'
        + "".join(f"    {line}\n" for line in listener.yaml.splitlines())
        for listener in LISTENERS
    )
    return (
        f"listeners:\n{listeners}"
        "clusters:\n"
        "  - name: pg\n"
        f'    endpoints: ["{HOST}:{server.port}"]\n'
        "    connect_timeout: 2s\n"
        "    max_connect_attempts: 1\n"
        f"    tls: {{ca_file: {server.ca_path}}}\n"
        f"hosts:\n  {HOST}: 127.0.0.1\n"
    )


# -- the database -----------------------------------------------------------------

_matrix_server: PostgresServer | None = None


def matrix_server() -> PostgresServer:
    """
    The shared server, with role ``matrix_app`` owning database ``matrix`` and pgbench's tables in it.

    Done once per process, blocking, before any proxy runs. The tables are
    made by ``pgbench -i`` as the role itself, over TLS straight to the
    server, so it owns them.
    """
    global _matrix_server
    server = shared_server()
    if _matrix_server is server:
        return server
    server.create_role(ROLE)
    server.superuser_sql(f"drop database if exists {DATABASE} with (force)")
    server.superuser_sql(f"create database {DATABASE} owner {ROLE}")
    pgbench = shutil.which("pgbench")
    if pgbench is not None:
        result = subprocess.run(
            [pgbench, "-i", "-q", "-s", "1", server.dsn(user=ROLE, dbname=DATABASE)],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, env=clean_env(), timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pgbench -i failed ({result.returncode}):\n{result.stderr}")
    _matrix_server = server
    return server


def clean_env() -> dict[str, str]:
    """The environment for driver scripts: no PG* variable of ours, English messages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.pop("LANGUAGE", None)
    env.update(LC_ALL="C.UTF-8", PYTHONDONTWRITEBYTECODE="1")
    return env


# -- the drivers -----------------------------------------------------------------------


@attrs.frozen
class Driver:
    """One row: how to start its script (or why it cannot run here) and what it must print."""

    name: str
    title: str
    command: Callable[[], list[str]]
    checks: tuple[str, ...] = CONTRACT


def need_tool(name: str, why: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SkipTest(f"{name} not found on PATH: {why}")
    return path


def need_script(path: str) -> str:
    """A driver script of this repository; its absence is a failure, not a skip."""
    if not os.path.exists(path):
        raise AssertionError(f"driver script {os.path.relpath(path, DRIVERS_DIR)} is missing from tests/integration/drivers")
    return path


def python_command(script: str, module: str) -> Callable[[], list[str]]:
    def command() -> list[str]:
        if importlib.util.find_spec(module) is None:
            raise SkipTest(f"Python package {module} is not installed in {sys.executable}")
        return [sys.executable, need_script(os.path.join(DRIVERS_DIR, script))]

    return command


def libpq_cli_command() -> list[str]:
    need_tool("psql", "install Debian's postgresql-client")
    need_tool("pgbench", "install Debian's postgresql-client")
    return [sys.executable, need_script(os.path.join(DRIVERS_DIR, "libpq_cli_check.py"))]


_npm_failure: str | None = None


def node_command() -> list[str]:
    """node on pg_check.js; ``npm ci`` once if node_modules is missing (its failure is a skip)."""
    global _npm_failure
    node = need_tool("node", "node-postgres needs Node.js")
    script = need_script(os.path.join(NODE_DIR, "pg_check.js"))
    if _npm_failure is not None:
        raise SkipTest(_npm_failure)
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules")):
        npm = need_tool("npm", "node-postgres's packages are installed with npm ci")
        try:
            result = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True,
                                    text=True, stdin=subprocess.DEVNULL, timeout=SETUP_SECONDS)
            failure = None if result.returncode == 0 else f"exit {result.returncode}: {result.stderr[-800:]}"
        except subprocess.TimeoutExpired:
            failure = f"no result within {SETUP_SECONDS:.0f} s"
        if failure is not None:
            _npm_failure = f"npm ci in {NODE_DIR} failed, node-postgres cannot run: {failure}"
            raise SkipTest(_npm_failure)
    return [node, script]


_java_build: dict[str, str] = {}


def pgjdbc_command() -> list[str]:
    """java on PgCheck, compiled once per run, with the JVM's hosts file naming the proxy."""
    javac = need_tool("javac", "pgjdbc's check is compiled with a JDK")
    java = need_tool("java", "pgjdbc needs a JVM")
    if not os.path.exists(PGJDBC_JAR):
        raise SkipTest(f"{PGJDBC_JAR} is missing: install Debian's libpostgresql-jdbc-java")
    source = need_script(os.path.join(JAVA_DIR, "PgCheck.java"))
    if not _java_build:
        _java_build.update(build_pgjdbc(javac, source))
    return [
        java,
        f"-Djdk.net.hosts.file={_java_build['hosts']}",
        "-cp",
        f"{_java_build['classes']}{os.pathsep}{PGJDBC_JAR}",
        "PgCheck",
    ]


def build_pgjdbc(javac: str, source: str) -> dict[str, str]:
    """Compile PgCheck.java into a new directory (removed at exit) and write the hosts file; a compile error fails the cell."""
    build = tempfile.mkdtemp(prefix="matrix-pgjdbc-")
    atexit.register(shutil.rmtree, build, True)
    result = subprocess.run([javac, "-d", build, "-cp", PGJDBC_JAR, source], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=SETUP_SECONDS)
    if result.returncode != 0:
        shutil.rmtree(build, ignore_errors=True)
        raise AssertionError(f"javac PgCheck.java failed ({result.returncode}):\n{result.stderr}")
    hosts = os.path.join(build, "hosts")
    with open(hosts, "w", encoding="utf-8") as f:
        f.write(f"127.0.0.1 {HOST}\n")
    return {"classes": build, "hosts": hosts}


DRIVERS = (
    Driver("psycopg", "psycopg 3", python_command("psycopg_check.py", "psycopg")),
    Driver("asyncpg", "asyncpg", python_command("asyncpg_check.py", "asyncpg")),
    Driver("psql", "psql + pgbench", libpq_cli_command, (*CONTRACT, "pgbench")),
    Driver("node", "node-postgres", node_command),
    Driver("pgjdbc", "pgjdbc", pgjdbc_command),
)


# -- running a script ------------------------------------------------------------------


@attrs.frozen
class ScriptRun:
    out: str
    err: str
    code: int | None
    seconds: float
    killed: bool


class Collect(protocol.ProcessProtocol):
    """A driver script's output; ``ended`` fires with the ScriptRun. Killed past ``SCRIPT_SECONDS``."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.killed = False
        self.started = time.monotonic()
        self.ended: defer.Deferred[ScriptRun] = defer.Deferred()
        self.deadline = reactor.callLater(SCRIPT_SECONDS, self.kill)

    def kill(self) -> None:
        self.killed = True
        self.transport.signalProcess("KILL")

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        if self.deadline.active():
            self.deadline.cancel()
        self.ended.callback(ScriptRun(
            self.out.decode("utf-8", "replace"), self.err.decode("utf-8", "replace"),
            reason.value.exitCode, time.monotonic() - self.started, self.killed,
        ))


async def run_script(argv: Sequence[str], cwd: str) -> ScriptRun:
    collect = Collect()
    reactor.spawnProcess(collect, argv[0], list(argv), env=clean_env(), path=cwd)
    return await collect.ended


def contract_lines(out: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The script's check lines, and the stdout lines that are not contract lines."""
    results, strays = [], []
    for line in out.splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and {"check", "ok", "detail", "seconds"} <= parsed.keys():
            results.append(parsed)
        elif line.strip():
            strays.append(line)
    return results, strays


# -- the matrix --------------------------------------------------------------------------


class DriverMatrixTests(TestCase):
    """One test per (driver, listener); the methods are added below the class."""

    # Room for a one-off npm ci or javac, then the script and the access log.
    timeout = SETUP_SECONDS + SCRIPT_SECONDS + 30

    def setUp(self) -> None:
        self.server = matrix_server()

    async def run_cell(self, driver: Driver, listener: Listener) -> None:
        try:
            command = driver.command()
        except SkipTest as e:
            record(driver, listener, "skip", reason=str(e))
            raise
        except AssertionError as e:
            record(driver, listener, "fail", problems=[str(e)])
            raise
        proxy = InProcessProxy(self, proxy_yaml(self.server))
        # A directory of its own, so nothing a script writes lands in the checkout.
        workdir = self.mktemp()
        os.makedirs(workdir)
        run = await run_script(command + self.arguments(proxy, listener), workdir)
        results, strays = contract_lines(run.out)
        lines = await self.settled_access_log(proxy)
        problems = judge(driver, run, results, strays) + self.access_problems(lines, listener)
        show(driver, listener, run, results, lines, problems)
        record(driver, listener, "fail" if problems else "pass", run=run, results=results,
               problems=problems, access=[line._asdict() for line in lines])
        if problems:
            self.fail(f"{driver.title} via {listener.name}:\n  " + "\n  ".join(problems)
                      + f"\nstderr (last 2000 chars):\n{run.err[-2000:]}")

    def arguments(self, proxy: InProcessProxy, listener: Listener) -> list[str]:
        return [
            "--addr", "127.0.0.1",
            "--port", str(proxy.port(listener.name)),
            "--host", HOST,
            "--tls", listener.tls,
            "--ca", self.server.ca_path,
            "--dbname", DATABASE,
            "--user", ROLE,
            "--password", role_password(ROLE),
        ]

    async def settled_access_log(self, proxy: InProcessProxy) -> list[AccessLine]:
        """
        The cell's access log once its sessions ended.

        A session the script left open (a query its cancel did not stop
        goes on server side) is aborted after 10 s, so its line is logged
        too, and the next cell starts with a proxy of its own anyway.
        """
        try:
            await wait_until(lambda: proxy.live_sessions() == 0, timeout=10)
        except AssertionError:
            print(f"    ({proxy.live_sessions()} proxy sessions still open 10 s after the script; aborted)")
            proxy.service.abort_sessions()
            await wait_until(lambda: proxy.live_sessions() == 0, timeout=5)
        return [parse_access(line) for line in proxy.access_lines()]

    def access_problems(self, lines: list[AccessLine], listener: Listener) -> list[str]:
        """What the access log says is wrong with this cell, as failure lines."""
        upstream = f"{HOST}:{self.server.port}"
        problems = []
        if not any(set(line.flags.split(",")) <= NORMAL_FLAGS for line in lines):
            problems.append(f"access log: no session ended normally ({len(lines)} lines)")
        for line in lines:
            flags = set(line.flags.split(","))
            if line.prefix != listener.prefix:
                problems.append(f"access log: prefix {line.prefix}, expected {listener.prefix}: {line}")
            if flags <= NORMAL_FLAGS and line.upstream != upstream:
                problems.append(f"access log: upstream {line.upstream}, expected {upstream}: {line}")
            if flags & REFUSAL_FLAGS:
                problems.append(f"access log: refused or failed by the proxy (flags {line.flags}): {line}")
        return problems


def judge(driver: Driver, run: ScriptRun, results: list[dict[str, Any]], strays: list[str]) -> list[str]:
    """Everything wrong with a script's run against the contract, as failure lines (none: the cell passes)."""
    problems = []
    if run.killed:
        problems.append(f"killed after {SCRIPT_SECONDS:.0f} s")
    names = [result["check"] for result in results]
    if names != list(driver.checks):
        missing = [name for name in driver.checks if name not in names]
        problems.append(f"checks printed {names}, expected {list(driver.checks)} (missing: {missing})")
    for result in results:
        if result["ok"] is not True:
            problems.append(f"{result['check']}: {result['detail']}")
    all_ok = bool(results) and all(result["ok"] is True for result in results)
    if all_ok and run.code != 0:
        problems.append(f"every check ok but the script exited {run.code}")
    if strays:
        problems.append(f"stdout lines outside the contract: {strays[:5]}")
    return problems


def show(driver: Driver, listener: Listener, run: ScriptRun, results: list[dict[str, Any]],
         lines: list[AccessLine], problems: list[str]) -> None:
    """Print the cell for the CI log: the outcome, one row per check, the access-log flags."""
    outcome = "FAIL" if problems else "PASS"
    print(f"\n  driver-matrix {driver.name} x {listener.name}: {outcome} (exit {run.code}, {run.seconds:.1f} s)")
    for result in results:
        mark = "ok  " if result["ok"] is True else "FAIL"
        print(f"    {mark} {result['check']:<15} {result['seconds']:7.3f}s  {str(result['detail'])[:300]}")
    flags: dict[str, int] = {}
    for line in lines:
        flags[line.flags] = flags.get(line.flags, 0) + 1
    print(f"    access log: {len(lines)} lines, flags {flags}")


def record(driver: Driver, listener: Listener, outcome: str, **fields: Any) -> None:
    """Append the cell to ``driver-matrix.jsonl`` in trial's working directory."""
    run = fields.pop("run", None)
    entry = {"driver": driver.name, "title": driver.title, "listener": listener.name, "outcome": outcome}
    if run is not None:
        entry.update(exit=run.code, seconds=round(run.seconds, 3), killed=run.killed)
    entry.update(fields)
    with open(SUMMARY_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")


class JudgeTests(SynchronousTestCase):
    """How a script's output is judged: only a full, all-ok, contract-shaped run passes."""

    driver = Driver("fake", "fake", lambda: [], ("connect", "copy"))

    @staticmethod
    def line(check: str, ok: bool = True, detail: str = "fine") -> str:
        return json.dumps({"check": check, "ok": ok, "detail": detail, "seconds": 0.1})

    def problems(self, out: str, code: int = 0, killed: bool = False) -> list[str]:
        results, strays = contract_lines(out)
        return judge(self.driver, ScriptRun(out, "", code, 1.0, killed), results, strays)

    def test_all_ok(self) -> None:
        self.assertEqual(self.problems(self.line("connect") + "\n" + self.line("copy") + "\n"), [])

    def test_nothing_printed_fails(self) -> None:
        [problem] = self.problems("", code=0)
        self.assertIn("missing: ['connect', 'copy']", problem)

    def test_missing_check_fails(self) -> None:
        self.assertIn("missing: ['copy']", self.problems(self.line("connect"))[0])

    def test_failed_check_is_listed_with_its_detail(self) -> None:
        out = self.line("connect") + "\n" + self.line("copy", False, "sha256 differs") + "\n"
        self.assertEqual(self.problems(out, code=1), ["copy: sha256 differs"])

    def test_exit_code_must_agree(self) -> None:
        out = self.line("connect") + "\n" + self.line("copy") + "\n"
        self.assertEqual(self.problems(out, code=1), ["every check ok but the script exited 1"])

    def test_stray_stdout_and_kill_fail(self) -> None:
        out = "hello\n" + self.line("connect") + "\n" + self.line("copy") + "\n"
        self.assertEqual(len(self.problems(out, killed=True)), 2)


def markdown_table(path: str) -> str:
    """
    The README's matrix from a ``driver-matrix.jsonl``: one row per driver, a cell per listener.

    A cell reads ``pass``, ``skip`` or ``fail: check, check``.
    Run ``python -m tests.integration.test_driver_matrix _trial_temp/driver-matrix.jsonl``.
    """
    cells: dict[tuple[str, str], str] = {}
    titles: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for entry in map(json.loads, f):
            titles[entry["driver"]] = entry["title"]
            failed = [r["check"] for r in entry.get("results", []) if r.get("ok") is not True]
            text = entry["outcome"] + (f": {', '.join(failed)}" if failed else "")
            cells[(entry["driver"], entry["listener"])] = text
    names = [listener.name for listener in LISTENERS]
    rows = [f"| driver | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
    for driver in DRIVERS:
        if driver.name in titles:
            rows.append(f"| {driver.title} | " + " | ".join(cells.get((driver.name, n), "-") for n in names) + " |")
    return "\n".join(rows)


def cell_test(driver: Driver, listener: Listener) -> Callable[[DriverMatrixTests], defer.Deferred[None]]:
    @inline
    async def test(self: DriverMatrixTests) -> None:
        await self.run_cell(driver, listener)

    test.__name__ = f"test_{driver.name}_{listener.name}"
    test.__doc__ = f"{driver.title} through the {listener.name} listener passes every check (--tls {listener.tls})."
    return test


for _driver in DRIVERS:
    for _listener in LISTENERS:
        setattr(DriverMatrixTests, f"test_{_driver.name}_{_listener.name}", cell_test(_driver, _listener))
del _driver, _listener


if __name__ == "__main__":
    print(markdown_table(sys.argv[1] if len(sys.argv) > 1 else os.path.join("_trial_temp", SUMMARY_FILE)))
