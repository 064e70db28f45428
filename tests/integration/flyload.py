"""Load for the Fly simulation: psql and pgbench from an app host, and what they report.

``flysim.py`` builds the deployment; this module drives clients through it
and turns their output into figures the tests assert and print:

- :func:`prepare_database`: the ``app`` role and the ``flysim_tx`` table, as
  superuser over the unix socket (which no network namespace hides);
- :func:`psql`: one psql run inside an app host, libpq settings from the
  environment (``host=db.egress.test hostaddr=<flyproxy>``, verify-full);
- :func:`start_pgbench` / :func:`finish_pgbench`: pgbench in the background
  with a custom script of one ``INSERT`` per transaction, so the rows in
  ``flysim_tx`` for a run count exactly the transactions that committed,
  and pgbench's own count can be checked against them;
- :class:`PgbenchResult`: the summary lines (processed, failed), aborted
  clients and error lines from stderr, and the per-transaction log (``-l``)
  for timing a failover.

pgbench opens one connection of its own before the clients start (it counts
no transaction), so a run makes ``processed + 1`` connections.

pgbench 15 aborts a client on any error but a serialization failure or
deadlock, so a connection cut in flight shows as ``client N aborted`` in
stderr and exit status 2, not in the "failed" count: both are read.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from dataclasses import dataclass, field

from tests.integration.netns import NetNS
from tests.integration.pgserver import PostgresServer, role_password

ROLE = "app"
SCRIPT = "INSERT INTO flysim_tx (run, client) VALUES (:run, :client_id);\n"
#: stderr lines that mean a connection or a transaction went wrong.
ERROR_LINE = re.compile(r"error|abort|could not|closed the connection|fatal|timeout|refused", re.IGNORECASE)


def prepare_database(db: PostgresServer) -> None:
    """The ``app`` role and the table every pgbench run inserts into."""
    db.create_role(ROLE)
    db.superuser_sql(
        "CREATE TABLE IF NOT EXISTS flysim_tx (run int NOT NULL, client int NOT NULL,"
        " at timestamptz NOT NULL DEFAULT clock_timestamp());"
        f" GRANT INSERT, SELECT ON flysim_tx TO {ROLE}"
    )


def committed(db: PostgresServer, run: int) -> int:
    """Rows run ``run`` inserted: the transactions that committed."""
    out = db.superuser_sql(f"SELECT count(*) FROM flysim_tx WHERE run = {int(run)}")
    return int(out.stdout.strip())


def client_env(db: PostgresServer, hostaddr: str, port: int = 5432) -> dict[str, str]:
    """libpq settings for the apps: the database's name for TLS, ``hostaddr:port`` for TCP."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.pop("LANGUAGE", None)
    env.update({
        "LC_ALL": "C.UTF-8",
        "PGHOST": db.host_names[0],
        "PGHOSTADDR": hostaddr,
        "PGPORT": str(port),
        "PGDATABASE": "postgres",
        "PGUSER": ROLE,
        "PGPASSWORD": role_password(ROLE),
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": db.ca_path,
        "PGGSSENCMODE": "disable",
        "PGCONNECT_TIMEOUT": "5",
    })
    return env


def psql(app: NetNS, env: dict[str, str], sql: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``psql -c sql`` inside ``app``; the caller checks returncode and stderr."""
    return app.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql], timeout=timeout, env=env)


@dataclass
class Transaction:
    """One line of pgbench's per-transaction log: who, when it ended, how long it took."""

    client: int
    end: float
    latency: float | None  # None for a failed transaction

    @property
    def start(self) -> float:
        return self.end - (self.latency or 0.0)


@dataclass
class PgbenchResult:
    """What one pgbench run reported."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    processed: int | None = None
    failed: int | None = None
    tps: float | None = None
    aborted_clients: list[str] = field(default_factory=list)
    error_lines: list[str] = field(default_factory=list)
    transactions: list[Transaction] = field(default_factory=list)

    def summary(self) -> str:
        return (f"pgbench exit {self.returncode}: {self.processed} transactions, {self.failed} failed, "
                f"{len(self.aborted_clients)} clients aborted, tps {self.tps} over {self.seconds:.0f}s")


@dataclass
class PgbenchRun:
    """A pgbench started in the background."""

    process: subprocess.Popen[str]
    run: int
    seconds: float
    log_prefix: str


def start_pgbench(app: NetNS, env: dict[str, str], directory: str, run: int, clients: int,
                  seconds: int) -> PgbenchRun:
    """pgbench -C (a new connection per transaction, as serverless clients do) for ``seconds``."""
    script = os.path.join(directory, "flysim.sql")
    with open(script, "w", encoding="utf-8") as f:
        f.write(SCRIPT)
    log_prefix = os.path.join(directory, f"pgbench-run{run}")
    argv = ["pgbench", "-n", "-C", "-c", str(clients), "-j", "2", "-T", str(seconds), "-P", "1",
            "-f", script, "-D", f"run={run}", "-l", f"--log-prefix={log_prefix}"]
    process = app.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                        cwd=directory)
    return PgbenchRun(process, run, seconds, log_prefix)


def finish_pgbench(running: PgbenchRun, slack: float = 60.0) -> PgbenchResult:
    """Wait (bounded) for the run to end and parse what it printed and logged."""
    try:
        stdout, stderr = running.process.communicate(timeout=running.seconds + slack)
    except subprocess.TimeoutExpired:
        NetNS.stop(running.process)
        stdout, stderr = running.process.communicate(timeout=10)
        stderr += f"\n(the test stopped pgbench: still running {slack}s after its -T)"
    result = PgbenchResult(running.process.returncode, stdout, stderr, running.seconds)
    if m := re.search(r"number of transactions actually processed: (\d+)", stdout):
        result.processed = int(m.group(1))
    if m := re.search(r"number of failed transactions: (\d+)", stdout):
        result.failed = int(m.group(1))
    if m := re.search(r"^tps = ([\d.]+)", stdout, re.MULTILINE):
        result.tps = float(m.group(1))
    lines = [line for line in stderr.splitlines() if not line.startswith("progress:")]
    result.aborted_clients = [line for line in lines if "aborted" in line and "client" in line]
    result.error_lines = [line for line in lines if ERROR_LINE.search(line)]
    result.transactions = read_transaction_log(running.log_prefix)
    return result


def read_transaction_log(prefix: str) -> list[Transaction]:
    """pgbench's ``-l`` files: ``client tx latency_us script epoch us [...]`` per transaction."""
    done: list[Transaction] = []
    for path in glob.glob(glob.escape(prefix) + ".*"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6:
                    continue
                latency = int(parts[2]) / 1e6 if parts[2].isdigit() else None
                done.append(Transaction(int(parts[0]), int(parts[4]) + int(parts[5]) / 1e6, latency))
    done.sort(key=lambda t: t.end)
    return done


def longest_pause(transactions: list[Transaction], start: float, end: float) -> float:
    """The longest time in [start, end] with no transaction committing."""
    ends = [start] + [t.end for t in transactions if t.latency is not None and start <= t.end <= end] + [end]
    return max(b - a for a, b in zip(ends, ends[1:]))


def resumed_after(transactions: list[Transaction], moment: float) -> float | None:
    """Seconds from ``moment`` to the commit of the first transaction begun after it."""
    later = [t.end for t in transactions if t.latency is not None and t.start >= moment]
    return min(later) - moment if later else None
