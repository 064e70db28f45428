"""
The driver-matrix checks with libpq's own programs: psql and pgbench.

These are what an operator types, and they use the system libpq (Debian's,
PostgreSQL 15 here) rather than a driver's bundled one. The connection
string is the README's libpq shape (``host`` + ``hostaddr`` with
verify-full, or the proxy as ``host`` with ``sslmode=disable``); the
password goes in ``PGPASSWORD``, in an environment with no other PG*
variable, ``-X`` ignores any psqlrc, and messages are in English.

How each check maps to the tools:

- connect, simple_query: ``psql -c`` (a simple Query).
- extended_query, prepared: psql 15 has no ``\\bind``, so pgbench runs a
  script that adds two random numbers in SQL and checks the sum in its own
  arithmetic (a mismatch divides by zero, which aborts the client), with
  ``-M extended`` (unnamed statements) and ``-M prepared`` (named ones), 2
  clients x 20 transactions each.
- copy: psql ``\\copy`` from and to files; the files' SHA-256 must match.
- listen_notify: one psql reads commands from a pipe: it LISTENs, then is
  sent ``select`` polls, after each of which psql prints any notification;
  a second psql NOTIFYs.
- cancel: psql running ``pg_sleep(30)`` gets SIGINT (Ctrl-C) once
  pg_stat_activity (asked through the same proxy) shows the sleep; psql
  15 then sends a plaintext CancelRequest (``PQcancel``).
- wrong_password: psql's message.
- pgbench (this script only): the built-in TPC-B-like script, 4 clients x
  50 transactions, on tables the harness made with ``pgbench -i``.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from contract import (
    CHECKS,
    CONNECT_SECONDS,
    COPY_CREATE,
    COPY_OUT_QUERY,
    COPY_TABLE,
    EVENT_SECONDS,
    SSL_IN_USE,
    CheckFailed,
    copy_payload,
    finish,
    parse_args,
    random_token,
    run_checks,
    sha256_hex,
    wait_for,
)

LIBPQ_CHECKS = (*CHECKS, "pgbench")

#: A subprocess's bound, below the contract's bound on a check.
TOOL_SECONDS = 15.0
#: How long a started psql may take to be seen running its query.
STARTUP_SECONDS = 8.0

#: pgbench's script for extended_query and prepared: ``:a`` and ``:b`` are
#: sent as $1 and $2; a wrong sum makes the client fail (division by zero).
SUM_SCRIPT = """\
\\set a random(1, 1000000)
\\set b random(1, 1000000)
select :a::int + :b::int as total \\gset
\\if :total != :a + :b
\\set wrong_sum 1 / 0
\\endif
"""


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise CheckFailed(f"{name} not found on PATH")
    return path


class Checks:
    """The contract's checks plus pgbench; each returns its detail or raises."""

    def __init__(self, args: Any, workdir: str) -> None:
        self.args = args
        self.workdir = workdir

    # -- running the tools ---------------------------------------------------

    def conninfo(self, application_name: str = "matrix-psql") -> str:
        args = self.args
        if args.tls == "verify-full":
            where = f"host={args.host} hostaddr={args.addr} sslmode=verify-full sslrootcert={quote(args.ca)}"
        else:
            where = f"host={args.addr} sslmode=disable"
        return (
            f"{where} port={args.port} dbname={quote(args.dbname)} user={quote(args.user)} "
            f"connect_timeout={CONNECT_SECONDS} gssencmode=disable application_name={application_name}"
        )

    def env(self, password: str | None = None) -> dict[str, str]:
        """A clean environment: no inherited PG* variable, English messages, the password."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.pop("LANGUAGE", None)
        env.update(LC_ALL="C.UTF-8", PGCLIENTENCODING="UTF8")
        env["PGPASSWORD"] = self.args.password if password is None else password
        return env

    def psql_argv(self, *extra: str, application_name: str = "matrix-psql") -> list[str]:
        return [tool("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", *extra, "-d",
                self.conninfo(application_name)]

    def psql(self, *commands: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run psql with one ``-c`` per command; the caller judges the result."""
        argv = self.psql_argv()
        for command in commands:
            argv += ["-c", command]
        return run(argv, self.env(password))

    def psql_ok(self, *commands: str) -> list[str]:
        """Run psql and return its output lines; a non-zero exit fails the check."""
        result = self.psql(*commands)
        if result.returncode != 0:
            raise CheckFailed(f"psql exited {result.returncode}: {one_line(result.stderr)}")
        return result.stdout.splitlines()

    def pgbench(self, *options: str) -> tuple[str, int]:
        """Run pgbench (the connection string is its database argument); (output, processed)."""
        result = run([tool("pgbench"), *options, self.conninfo("matrix-pgbench")], self.env(), timeout=TOOL_SECONDS)
        output = result.stdout + result.stderr
        if result.returncode != 0:
            raise CheckFailed(f"pgbench {' '.join(options)} exited {result.returncode}: {one_line(output)[-600:]}")
        failed = re.search(r"number of failed transactions: (\d+)", output)
        if failed and failed.group(1) != "0":
            raise CheckFailed(f"pgbench: {failed.group(0)}")
        processed = re.search(r"number of transactions actually processed: (\d+)/(\d+)", output)
        if processed is None:
            raise CheckFailed(f"pgbench printed no transaction count: {one_line(output)[-600:]}")
        return output, int(processed.group(1))

    # -- the checks ----------------------------------------------------------------

    def check_connect(self) -> str:
        lines = self.psql_ok("select 1", SSL_IN_USE)
        if lines != ["1", "t"]:
            raise CheckFailed(f"expected 1 and t (server sees TLS), psql printed {lines}")
        return f"psql: select 1 ok; server sees TLS (sslmode={self.args.tls})"

    def check_simple_query(self) -> str:
        lines = self.psql_ok("select 40 + 2")
        if lines != ["42"]:
            raise CheckFailed(f"select 40 + 2 printed {lines}")
        return "psql -c (simple Query): select 40 + 2 = 42"

    def check_extended_query(self) -> str:
        return self.sum_script("extended")

    def check_prepared(self) -> str:
        return self.sum_script("prepared")

    def sum_script(self, mode: str) -> str:
        script = os.path.join(self.workdir, "sum.sql")
        with open(script, "w", encoding="utf-8") as f:
            f.write(SUM_SCRIPT)
        _, processed = self.pgbench("-n", "-M", mode, "-f", script, "-t", "20", "-c", "2")
        if processed != 40:
            raise CheckFailed(f"pgbench -M {mode}: {processed} of 40 transactions processed")
        kind = "named statements" if mode == "prepared" else "unnamed statements"
        return f"pgbench -M {mode} ({kind}): 40/40 transactions, each sum $1 + $2 checked, 0 failed"

    def check_copy(self) -> str:
        source = os.path.join(self.workdir, "copy-in.txt")
        target = os.path.join(self.workdir, "copy-out.txt")
        sent = copy_payload()
        with open(source, "wb") as f:
            f.write(sent)
        lines = self.psql_ok(
            COPY_CREATE,
            f"\\copy {COPY_TABLE} (id, payload) from {quote(source)}",
            f"select count(*) from {COPY_TABLE}",
            f"\\copy ({COPY_OUT_QUERY}) to {quote(target)}",
        )
        with open(target, "rb") as f:
            received = f.read()
        if sha256_hex(sent) != sha256_hex(received):
            raise CheckFailed(
                f"COPY round trip differs: sent {len(sent)} bytes sha256 {sha256_hex(sent)[:16]}, "
                f"received {len(received)} bytes sha256 {sha256_hex(received)[:16]} (psql printed {lines})"
            )
        return f"psql \\copy: {lines[-1] if lines else '?'} rows, {len(sent)} bytes each way, sha256 {sha256_hex(sent)[:16]} equal"

    def check_listen_notify(self) -> str:
        channel, payload = random_token("matrix"), random_token("payload")
        with PipedPsql(self.psql_argv(application_name="matrix-listen"), self.env()) as listener:
            listener.send(f"listen {channel};\nselect 'listening';\n")
            if listener.wait_line(lambda line: line == "listening", STARTUP_SECONDS) is None:
                raise CheckFailed(f"the listening psql never answered: {listener.stderr_text()}")
            started = time.monotonic()
            notify = self.psql(f"select pg_notify('{channel}', '{payload}')")
            if notify.returncode != 0:
                raise CheckFailed(f"the notifying psql exited {notify.returncode}: {one_line(notify.stderr)}")
            expected = f'Asynchronous notification "{channel}" with payload "{payload}" received'
            line = listener.poll_for(expected, EVENT_SECONDS)
            seconds = time.monotonic() - started
        if line is None:
            raise CheckFailed(f"no '{expected}' within {EVENT_SECONDS} s of the NOTIFY")
        return f"psql printed the notification {seconds:.3f} s after the NOTIFY"

    def check_cancel(self) -> str:
        name = random_token("matrix-cancel")
        argv = self.psql_argv("-v", "VERBOSITY=verbose", application_name=name) + ["-c", "select pg_sleep(30)"]
        sleeper = subprocess.Popen(argv, env=self.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, errors="replace")
        try:
            return self.interrupt(sleeper, name)
        finally:
            if sleeper.poll() is None:
                sleeper.kill()
                sleeper.wait()
                # The server would sleep on for up to 30 s; stop it now.
                self.psql(f"select pg_cancel_backend(pid) from pg_stat_activity where application_name = '{name}'")

    def interrupt(self, sleeper: subprocess.Popen[str], name: str) -> str:
        """SIGINT ``sleeper`` once its pg_sleep runs; judge what psql printed."""
        running = (
            "select count(*) from pg_stat_activity where application_name = "
            f"'{name}' and state = 'active' and query like 'select pg_sleep(30)%'"
        )
        if not wait_for(lambda: self.psql(running).stdout.strip() == "1" or sleeper.poll() is not None, STARTUP_SECONDS):
            raise CheckFailed(f"pg_sleep(30) never showed in pg_stat_activity within {STARTUP_SECONDS:.0f} s")
        if sleeper.poll() is not None:
            raise CheckFailed(f"psql ended before the cancel (exit {sleeper.returncode}): {one_line(sleeper.stderr.read())}")
        cancelled_at = time.monotonic()
        sleeper.send_signal(signal.SIGINT)
        try:
            _, stderr = sleeper.communicate(timeout=EVENT_SECONDS)
        except subprocess.TimeoutExpired:
            raise CheckFailed(
                f"SIGINT (psql's PQcancel, plaintext CancelRequest) sent; pg_sleep(30) still ran {EVENT_SECONDS} s later"
            ) from None
        seconds = time.monotonic() - cancelled_at
        if "canceling statement due to user request" not in stderr:
            raise CheckFailed(f"psql exited {sleeper.returncode} after SIGINT without the cancel message: {one_line(stderr)}")
        sqlstate = "57014" if "57014" in stderr else "no SQLSTATE printed"
        return f"SIGINT (psql's PQcancel, plaintext CancelRequest): {sqlstate} '{one_line(stderr)}' after {seconds:.3f} s"

    def check_wrong_password(self) -> str:
        result = self.psql("select 1", password=self.args.password + "-wrong")
        if result.returncode == 0:
            raise CheckFailed("a wrong password was accepted")
        if "password authentication failed" not in result.stderr:
            raise CheckFailed(f"refused, but not for the password: {one_line(result.stderr)}")
        return f"refused as expected: {one_line(result.stderr)}"

    def check_pgbench(self) -> str:
        _, processed = self.pgbench("-n", "-c", "4", "-j", "2", "-t", "50")
        if processed != 200:
            raise CheckFailed(f"pgbench TPC-B: {processed} of 200 transactions processed")
        return "pgbench TPC-B-like, 4 clients x 50: 200/200 transactions, 0 failed"

    def all(self) -> dict[str, Callable[[], str]]:
        return {name: getattr(self, f"check_{name}") for name in LIBPQ_CHECKS}


class PipedPsql:
    """
    A psql that reads SQL from a pipe, with its output lines read in a thread.

    psql prints pending notifications after each command it runs, so a
    listener sends cheap ``select`` polls and watches for the line.
    """

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            list(argv), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, errors="replace", bufsize=1,
        )
        #: Output lines; None once psql's stdout is closed (it exited).
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def send(self, text: str) -> None:
        self.process.stdin.write(text)  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]

    def wait_line(self, wanted: Callable[[str], bool], seconds: float) -> str | None:
        """The first output line that ``wanted`` accepts within ``seconds``, or None."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                self.lines.put(None)  # the end stays visible to later calls
                return None
            if wanted(line):
                return line
        return None

    def poll_for(self, text: str, seconds: float) -> str | None:
        """Send a ``select`` every 0.1 s until a line starts with ``text``, for at most ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.send("select 'poll';\n")
            line = self.wait_line(lambda line: line.startswith(text), 0.1)
            if line is not None:
                return line
        return None

    def stderr_text(self) -> str:
        if self.process.poll() is None:
            return "(psql still running)"
        return one_line(self.process.stderr.read())  # type: ignore[union-attr]

    def __enter__(self) -> PipedPsql:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.process.stdin.close()  # type: ignore[union-attr]
            self.process.wait(timeout=EVENT_SECONDS)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()


def run(argv: list[str], env: dict[str, str], timeout: float = TOOL_SECONDS) -> subprocess.CompletedProcess[str]:
    """Run a tool to completion within ``timeout`` (a timeout fails the check)."""
    try:
        return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"{os.path.basename(argv[0])} did not finish within {timeout:.0f} s") from None


def quote(value: str) -> str:
    """A single-quoted value for a libpq string or a psql \\copy file name."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def one_line(text: str) -> str:
    return " ".join(text.split())[:1000]


def main() -> None:
    args = parse_args("psql and pgbench checks for the egressproxy driver matrix", LIBPQ_CHECKS)
    workdir = tempfile.mkdtemp(prefix="matrix-libpq-")
    try:
        code = run_checks(args.checks, Checks(args, workdir).all())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    finish(code)


if __name__ == "__main__":
    main()
