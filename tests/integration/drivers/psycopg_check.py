"""
The driver-matrix checks for psycopg 3 (libpq underneath).

The connection string is the README's libpq shape: with ``--tls
verify-full``, ``host`` is the database's name (checked against its
certificate, sent as SNI) while ``hostaddr`` is the proxy's address; with
``--tls disable`` the proxy's address is the host and the proxy does the TLS.

Protocols, as psycopg uses them: ``execute()`` without parameters sends a
simple Query; with parameters, Parse/Bind/Execute on the unnamed statement;
``prepare=True`` a named server-side statement (``_pg3_N``). Cancel is
``conn.cancel()``, libpq's classic ``PQcancel``: a plaintext CancelRequest on
a new connection, the one most drivers send (``cancel_safe()`` would send it
over TLS with SNI, which libpq 17+ can; it is not what is tested here).

Run: ``python psycopg_check.py --addr 127.0.0.1 --port N --host db.egress.test
--tls verify-full --ca ca.pem --dbname D --user U --password P``; see
``contract.py`` for the output.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo

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

COPY_CHUNK = 64 * 1024


class Checks:
    """The contract's checks; each returns its detail or raises."""

    def __init__(self, args: Any) -> None:
        self.args = args

    def conninfo(self, password: str | None = None, application_name: str = "matrix-psycopg") -> str:
        """The libpq string for this run's address, mode and credentials."""
        args = self.args
        if args.tls == "verify-full":
            where = {"host": args.host, "hostaddr": args.addr, "sslmode": "verify-full", "sslrootcert": args.ca}
        else:
            where = {"host": args.addr, "sslmode": "disable"}
        return make_conninfo(
            **where,
            port=args.port,
            dbname=args.dbname,
            user=args.user,
            password=args.password if password is None else password,
            connect_timeout=CONNECT_SECONDS,
            # With a Kerberos ticket around, libpq would open with a
            # GSSENCRequest instead of the SSLRequest this matrix is about.
            gssencmode="disable",
            application_name=application_name,
        )

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.conninfo(**kwargs), autocommit=True)

    def check_connect(self) -> str:
        with self.connect() as conn:
            one = conn.execute("select 1").fetchone()
            server_ssl = conn.execute(SSL_IN_USE).fetchone()
            client_ssl = conn.pgconn.ssl_in_use
        if one != (1,):
            raise CheckFailed(f"select 1 returned {one}")
        if server_ssl != (True,):
            raise CheckFailed(f"the server says this session is not TLS: pg_stat_ssl.ssl = {server_ssl}")
        return f"select 1 ok; server sees TLS; client TLS {client_ssl} (sslmode={self.args.tls})"

    def check_simple_query(self) -> str:
        # No parameters and text results: psycopg sends a simple Query message.
        with self.connect() as conn:
            row = conn.execute("select 40 + 2").fetchone()
        if row != (42,):
            raise CheckFailed(f"select 40 + 2 returned {row}")
        return "simple Query: select 40 + 2 = 42"

    def check_extended_query(self) -> str:
        # Parameters: Parse/Bind/Execute of the unnamed statement, sent as $1, $2.
        with self.connect() as conn:
            row = conn.execute("select %s::int + %s::int", (40, 2), prepare=False).fetchone()
        if row != (42,):
            raise CheckFailed(f"select $1::int + $2::int with (40, 2) returned {row}")
        return "extended protocol (unnamed statement): $1::int + $2::int = 42"

    def check_prepared(self) -> str:
        query = "select %s::int * %s::int"
        pairs = [(6, 7), (11, 13), (-3, 5), (1000, 1000)]
        with self.connect() as conn:
            for a, b in pairs:
                row = conn.execute(query, (a, b), prepare=True).fetchone()
                if row != (a * b,):
                    raise CheckFailed(f"prepared {a} * {b} returned {row}")
            named = conn.execute(
                "select name, generic_plans + custom_plans from pg_prepared_statements"
                " where statement like '%$1::int * $2::int%'"
            ).fetchall()
        if len(named) != 1 or named[0][1] < len(pairs):
            raise CheckFailed(f"expected one named statement run {len(pairs)} times; pg_prepared_statements: {named}")
        name, runs = named[0]
        return f"named statement {name} executed {runs} times with different parameters"

    def check_copy(self) -> str:
        sent = copy_payload()
        received = bytearray()
        with self.connect() as conn, conn.cursor() as cursor:
            cursor.execute(COPY_CREATE)
            with cursor.copy(f"copy {COPY_TABLE} (id, payload) from stdin") as copy:
                for start in range(0, len(sent), COPY_CHUNK):
                    copy.write(sent[start:start + COPY_CHUNK])
            loaded = cursor.rowcount
            with cursor.copy(f"copy ({COPY_OUT_QUERY}) to stdout") as copy:
                for chunk in copy:
                    received += chunk
        if sha256_hex(sent) != sha256_hex(bytes(received)):
            raise CheckFailed(
                f"COPY round trip differs: sent {len(sent)} bytes sha256 {sha256_hex(sent)[:16]}, "
                f"received {len(received)} bytes sha256 {sha256_hex(bytes(received))[:16]}"
            )
        return f"{loaded} rows, {len(sent)} bytes each way, sha256 {sha256_hex(sent)[:16]} equal"

    def check_listen_notify(self) -> str:
        channel, payload = random_token("matrix"), random_token("payload")
        with self.connect(application_name="matrix-listen") as listener, self.connect() as notifier:
            listener.execute(sql.SQL("listen {}").format(sql.Identifier(channel)))
            started = time.monotonic()
            notifier.execute("select pg_notify(%s, %s)", (channel, payload))
            got = list(listener.notifies(timeout=EVENT_SECONDS, stop_after=1))
            seconds = time.monotonic() - started
        if [(n.channel, n.payload) for n in got] != [(channel, payload)]:
            raise CheckFailed(f"expected {payload!r} on {channel!r} within {EVENT_SECONDS} s, got {got}")
        return f"notification on {channel} arrived after {seconds:.3f} s"

    def check_cancel(self) -> str:
        with self.connect(application_name="matrix-cancel") as sleeper, self.connect() as watcher:
            pid = sleeper.info.backend_pid
            outcome: dict[str, Any] = {}
            query = threading.Thread(target=run_sleep, args=(sleeper, outcome), daemon=True)
            query.start()
            try:
                return cancel_running(sleeper, watcher, pid, query, outcome)
            finally:
                # Whatever happened, stop the server's pg_sleep so the
                # connections (and the proxy's sessions) can close now.
                if query.is_alive():
                    watcher.execute("select pg_cancel_backend(%s)", (pid,))
                    query.join(EVENT_SECONDS)

    def check_wrong_password(self) -> str:
        try:
            psycopg.connect(self.conninfo(password=self.args.password + "-wrong")).close()
        except psycopg.OperationalError as e:
            message = " ".join(str(e).split())
            if e.sqlstate == "28P01" or "password authentication failed" in message:
                return f"refused as expected: {message[:300]}"
            raise CheckFailed(f"refused, but not for the password: {message[:500]}") from None
        raise CheckFailed("a wrong password was accepted")

    def all(self) -> dict[str, Callable[[], str]]:
        return {name: getattr(self, f"check_{name}") for name in CHECKS}


def run_sleep(conn: psycopg.Connection[Any], outcome: dict[str, Any]) -> None:
    """Run the query to cancel; keep its error (None if it ended without one) and when it ended."""
    try:
        conn.execute("select pg_sleep(30)")
        outcome["error"] = None
    except BaseException as e:  # noqa: B036 - handed to the checking thread
        outcome["error"] = e
    outcome["at"] = time.monotonic()


def cancel_running(
    sleeper: psycopg.Connection[Any],
    watcher: psycopg.Connection[Any],
    pid: int,
    query: threading.Thread,
    outcome: dict[str, Any],
) -> str:
    """
    Once the server runs the sleep (and at least 0.5 s passed), ``conn.cancel()``; judge the error.

    Waiting for pg_stat_activity to show the query makes sure the cancel
    does not arrive before the query, which the server would ignore.
    """
    started = time.monotonic()

    def running() -> bool:
        row = watcher.execute(
            "select count(*) from pg_stat_activity where pid = %s and state = 'active'"
            " and query like 'select pg_sleep(30)%%'",
            (pid,),
        ).fetchone()
        return row == (1,)

    if not wait_for(running, EVENT_SECONDS):
        raise CheckFailed(f"pg_sleep(30) never showed in pg_stat_activity for pid {pid}")
    time.sleep(max(0.0, 0.5 - (time.monotonic() - started)))
    cancelled_at = time.monotonic()
    sleeper.cancel()
    query.join(EVENT_SECONDS)
    if query.is_alive():
        raise CheckFailed(
            f"conn.cancel() (PQcancel, plaintext CancelRequest) sent, but pg_sleep(30) still ran {EVENT_SECONDS} s later"
        )
    seconds = outcome["at"] - cancelled_at
    error = outcome["error"]
    if not isinstance(error, errors.QueryCanceled):
        raise CheckFailed(f"expected QueryCanceled (57014), the query ended with {error!r}")
    return (
        f"conn.cancel() (PQcancel, plaintext CancelRequest): {error.sqlstate} "
        f"'{str(error).strip()}' after {seconds:.3f} s"
    )


def main() -> None:
    args = parse_args("psycopg 3 checks for the egressproxy driver matrix")
    finish(run_checks(args.checks, Checks(args).all()))


if __name__ == "__main__":
    main()
