"""
The driver-matrix contract, for the Python-run scripts beside this file.

Every driver script (psycopg, asyncpg, psql/pgbench here; node-postgres and
pgjdbc in ``node/`` and ``java/``) takes the same arguments, runs the same
checks in the same order and prints one JSON line per check, so the trial
harness (``tests/integration/test_driver_matrix.py``) can run any of them
through any proxy listener and read the results the same way.

Arguments: ``--addr`` (where to connect: the proxy), ``--port``, ``--host``
(the database's real name, for TLS verification and SNI), ``--tls
verify-full|disable``, ``--ca``, ``--dbname``, ``--user``, ``--password`` and
an optional ``--checks a,b,c``.

Output: ``{"check": NAME, "ok": bool, "detail": str, "seconds": float}`` per
check on stdout, diagnostics on stderr, exit 0 iff every check passed.

This module is imported by a script run as a program (its directory is then
first on ``sys.path``), never by the harness, so it needs nothing but the
standard library.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence

#: The checks every driver runs, in this order.
CHECKS = (
    "connect",
    "simple_query",
    "extended_query",
    "prepared",
    "copy",
    "listen_notify",
    "cancel",
    "wrong_password",
)

#: What the server says about the session's TLS; true in every mode, since
#: with ``--tls disable`` the proxy's upstream leg is TLS.
SSL_IN_USE = "select ssl from pg_stat_ssl where pid = pg_backend_pid()"

#: The bound on one check.
CHECK_SECONDS = 20.0
#: The bound on the whole run: checks not started by then fail as "not run",
#: so a script ends well within a minute even against a peer that never answers.
RUN_SECONDS = 45.0
#: How long a notification, or a cancelled query's error, may take.
EVENT_SECONDS = 5.0
#: How long a driver may take to connect.
CONNECT_SECONDS = 5

COPY_ROWS = 20_000
#: A temp table: each check's connection has its own, nothing to clean up.
COPY_TABLE = "matrix_copy"
COPY_CREATE = f"create temp table {COPY_TABLE} (id int, payload text)"
COPY_OUT_QUERY = f"select id, payload from {COPY_TABLE} order by id"


class CheckFailed(Exception):
    """A check's own verdict (as opposed to a driver error): its text is the detail."""


def parse_args(description: str, checks: Sequence[str] = CHECKS) -> argparse.Namespace:
    """
    The contract's arguments; ``--checks`` is turned into a list of names.

    A name outside ``checks`` is a usage error (exit 2), so a typo cannot
    make a run that checks nothing look green.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--addr", required=True, help="address to connect to (the proxy)")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--host", required=True, help="the database's name, for TLS and SNI")
    parser.add_argument("--tls", required=True, choices=("verify-full", "disable"))
    parser.add_argument("--ca", required=True, help="CA file for verify-full")
    parser.add_argument("--dbname", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--checks", default=",".join(checks), help="comma-separated subset")
    args = parser.parse_args()
    selected = [name.strip() for name in args.checks.split(",") if name.strip()]
    unknown = [name for name in selected if name not in checks]
    if unknown or not selected:
        parser.error(f"--checks: unknown or empty {unknown or selected}; known: {', '.join(checks)}")
    args.checks = [name for name in checks if name in selected]
    return args


def copy_payload() -> bytes:
    """
    The COPY text the copy check sends: 20,000 rows, about 1 MB, UTF-8.

    The same bytes as the node-postgres and pgjdbc scripts send (SHA-256
    ``7e56c7623b9e9346...``; see README.md here). Row ``id`` (1-based) has
    the payload ``row <id><TAB>café ß 日本語 🐘\\ <LF>`` followed by ``id % 17``
    ``x``: tabs, a newline, a backslash and 2-, 3- and 4-byte UTF-8, written
    with COPY's text escapes as the server writes them. So ``select id,
    payload ... order by id`` comes back as the same bytes, and equal
    SHA-256 proves they crossed both ways intact, escapes and all.
    """
    lines = []
    for i in range(1, COPY_ROWS + 1):
        payload = f"row {i}\tcafé ß 日本語 \U0001f418\\ \n" + "x" * (i % 17)
        lines.append(f"{i}\t{copy_escape(payload)}\n")
    return "".join(lines).encode("utf-8")


def copy_escape(text: str) -> str:
    """``text`` as a COPY text-format field (backslashes first, so the escapes' own are kept single)."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def random_token(prefix: str) -> str:
    """A fresh lower-case name, so concurrent runs never share a channel."""
    return f"{prefix}_{secrets.token_hex(6)}"


def wait_for(predicate: Callable[[], bool], seconds: float, step: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``seconds`` pass; whether it became true."""
    deadline = time.monotonic() + seconds
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


def error_text(error: BaseException) -> str:
    """An exception as one detail string: its type, SQLSTATE if it has one, its message."""
    sqlstate = getattr(error, "sqlstate", None)
    message = " ".join(str(error).split()) or "(no message)"
    prefix = type(error).__name__ + (f" [{sqlstate}]" if sqlstate else "")
    return f"{prefix}: {message}"[:2000]


def report(name: str, ok: bool, detail: str, seconds: float) -> None:
    """One contract line on stdout, flushed at once so a killed script still leaves its lines."""
    line = {"check": name, "ok": ok, "detail": detail, "seconds": round(seconds, 3)}
    sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def run_one(name: str, check: Callable[[], str], limit: float) -> bool:
    """
    Run one check in a daemon thread and report it; whether it passed.

    The thread is what bounds the check: a driver stuck in a read past
    ``limit`` seconds is reported as failed and left behind, and the script
    goes on to the next check. A check returns its detail, or raises.
    """
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["detail"] = check()
            outcome["ok"] = True
        except BaseException as e:  # noqa: B036 - the check's verdict, whatever it is
            outcome["detail"] = error_text(e) if not isinstance(e, CheckFailed) else str(e)
            outcome["ok"] = False

    started = time.monotonic()
    worker = threading.Thread(target=target, name=f"check-{name}", daemon=True)
    worker.start()
    worker.join(limit)
    seconds = time.monotonic() - started
    if worker.is_alive():
        report(name, False, f"no result within {limit:.1f} s (left running)", seconds)
        return False
    ok = bool(outcome.get("ok"))
    report(name, ok, str(outcome.get("detail", "")), seconds)
    if not ok:
        print(f"{name}: {outcome.get('detail')}", file=sys.stderr)
    return ok


def run_checks(selected: Sequence[str], checks: dict[str, Callable[[], str]]) -> int:
    """Run the ``selected`` checks in order, within ``RUN_SECONDS``; the exit code: 0 iff all passed."""
    deadline = time.monotonic() + RUN_SECONDS
    results = []
    for name in selected:
        left = deadline - time.monotonic()
        if left <= 0:
            report(name, False, f"not run: the script's {RUN_SECONDS:.0f} s budget is used up", 0.0)
            results.append(False)
            continue
        results.append(run_one(name, checks[name], min(CHECK_SECONDS, left)))
    return 0 if all(results) else 1


def finish(code: int) -> None:
    """
    Exit now with ``code``.

    ``os._exit``, so a check left running (a hung driver call in its
    daemon thread) cannot hold the process, or its interpreter's shutdown,
    past the contract's bound.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
