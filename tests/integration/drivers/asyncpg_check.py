"""
The driver-matrix checks for asyncpg.

asyncpg has no ``hostaddr``: the host it dials is also the name it gives TLS
(SNI and certificate check). To reach a database by its real name through a
proxy at another address, pass the proxy's address as ``host`` and an
``ssl.SSLContext`` that always uses the database's name:
``ServerNameContext`` below, the recipe for asyncpg users. With ``--tls
disable`` it is ``ssl=False`` and the proxy does the TLS.

Where asyncpg differs from libpq, and what each check therefore proves:

- simple_query: ``execute()`` without arguments sends a simple Query but
  returns only the command tag, so the query stores ``40 + 2`` in a session
  setting, which a second query reads back.
- extended_query and prepared: asyncpg always uses named statements for
  parameterised queries; ``prepare()`` makes one explicitly, and
  pg_prepared_statements confirms the server ran it each time.
- cancel: asyncpg has no public cancel call. Its own mechanism is a query
  timeout (or a cancelled task): it then sends a CancelRequest on a new
  connection (over TLS with the same context when ``ssl`` is set) and drops
  the server's error. So the check runs ``pg_sleep(30)`` inside a
  transaction with ``timeout=0.5``, then requires (1) pg_stat_activity to
  show the same backend no longer running it within 5 s, and (2) the next
  statement on that connection to fail with 25P02 (in failed transaction),
  which only a server-side error in the sleep (the 57014) explains; the
  backend is still alive, so it was not terminated.
"""

from __future__ import annotations

import asyncio
import io
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg

from contract import (
    CHECK_SECONDS,
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
)


class ServerNameContext(ssl.SSLContext):
    """
    A client SSLContext that uses ``server_name`` for SNI and verification, whatever host was dialled.

    asyncpg hands its connect host to ``wrap_bio`` (or ``wrap_socket``) as
    ``server_hostname``; this context replaces it, so the socket goes to
    the proxy while TLS names the database. Verification is unchanged:
    chain against the loaded CA, name with ``check_hostname``.

        ctx = ServerNameContext.verifying("db.example.cloud", "provider-ca.pem")
        await asyncpg.connect(host="<proxy address>", ..., ssl=ctx)
    """

    server_name: str

    @classmethod
    def verifying(cls, server_name: str, cafile: str) -> ServerNameContext:
        context = cls(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
        context.load_verify_locations(cafile)
        context.server_name = server_name
        return context

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):  # type: ignore[no-untyped-def]
        return super().wrap_bio(incoming, outgoing, server_side, self.server_name, session)

    def wrap_socket(  # type: ignore[no-untyped-def]
        self, sock, server_side=False, do_handshake_on_connect=True, suppress_ragged_eofs=True,
        server_hostname=None, session=None,
    ):
        return super().wrap_socket(
            sock, server_side, do_handshake_on_connect, suppress_ragged_eofs, self.server_name, session
        )


class Checks:
    """The contract's checks as coroutines; each returns its detail or raises."""

    def __init__(self, args: Any) -> None:
        self.args = args
        self.tls: ssl.SSLContext | bool = (
            ServerNameContext.verifying(args.host, args.ca) if args.tls == "verify-full" else False
        )

    async def connect(self, password: str | None = None) -> asyncpg.Connection:
        args = self.args
        try:
            return await asyncpg.connect(
                host=args.addr,
                port=args.port,
                user=args.user,
                password=args.password if password is None else password,
                database=args.dbname,
                ssl=self.tls,
                timeout=CONNECT_SECONDS,
                command_timeout=CHECK_SECONDS,
            )
        except asyncio.TimeoutError:
            raise CheckFailed(f"no connection within {CONNECT_SECONDS} s (asyncpg's connect timeout)") from None

    async def check_connect(self) -> str:
        conn = await self.connect()
        try:
            one = await conn.fetchval("select 1")
            server_ssl = await conn.fetchval(SSL_IN_USE)
        finally:
            await conn.close()
        if one != 1:
            raise CheckFailed(f"select 1 returned {one!r}")
        if server_ssl is not True:
            raise CheckFailed(f"the server says this session is not TLS: pg_stat_ssl.ssl = {server_ssl!r}")
        mode = "ServerNameContext (SNI and verification by --host)" if self.tls else "ssl=False"
        return f"select 1 ok; server sees TLS; client {mode}"

    async def check_simple_query(self) -> str:
        conn = await self.connect()
        try:
            tag = await conn.execute("select set_config('matrix.answer', (40 + 2)::text, false)")
            answer = await conn.fetchval("select current_setting('matrix.answer')")
        finally:
            await conn.close()
        if (tag, answer) != ("SELECT 1", "42"):
            raise CheckFailed(f"simple Query tag {tag!r}, stored answer {answer!r}")
        return "simple Query (execute without args, tag SELECT 1) computed 40 + 2 = 42, read back"

    async def check_extended_query(self) -> str:
        conn = await self.connect()
        try:
            value = await conn.fetchval("select $1::int + $2::int", 40, 2)
        finally:
            await conn.close()
        if value != 42:
            raise CheckFailed(f"select $1::int + $2::int with (40, 2) returned {value!r}")
        return "extended protocol: $1::int + $2::int = 42"

    async def check_prepared(self) -> str:
        pairs = [(6, 7), (11, 13), (-3, 5), (1000, 1000)]
        conn = await self.connect()
        try:
            statement = await conn.prepare("select $1::int * $2::int")
            name = statement.get_name()
            for a, b in pairs:
                value = await statement.fetchval(a, b)
                if value != a * b:
                    raise CheckFailed(f"prepared {a} * {b} returned {value!r}")
            runs = await conn.fetchval(
                "select generic_plans + custom_plans from pg_prepared_statements where name = $1", name
            )
        finally:
            await conn.close()
        if runs is None or runs < len(pairs):
            raise CheckFailed(f"pg_prepared_statements shows {name} run {runs} times")
        return f"named statement {name} executed {runs} times with different parameters"

    async def check_copy(self) -> str:
        sent = copy_payload()
        received = bytearray()

        async def collect(chunk: bytes) -> None:
            received.extend(chunk)

        conn = await self.connect()
        try:
            await conn.execute(COPY_CREATE)
            tag = await conn.copy_to_table(COPY_TABLE, source=io.BytesIO(sent), columns=["id", "payload"],
                                           format="text")
            await conn.copy_from_query(COPY_OUT_QUERY, output=collect, format="text")
        finally:
            await conn.close()
        if sha256_hex(sent) != sha256_hex(bytes(received)):
            raise CheckFailed(
                f"COPY round trip differs ({tag}): sent {len(sent)} bytes sha256 {sha256_hex(sent)[:16]}, "
                f"received {len(received)} bytes sha256 {sha256_hex(bytes(received))[:16]}"
            )
        return f"{tag}, {len(sent)} bytes each way, sha256 {sha256_hex(sent)[:16]} equal"

    async def check_listen_notify(self) -> str:
        channel, payload = random_token("matrix"), random_token("payload")
        arrived: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()

        def on_notify(_conn: Any, _pid: int, got_channel: str, got_payload: str) -> None:
            if not arrived.done():
                arrived.set_result((got_channel, got_payload))

        listener, notifier = await self.connect(), await self.connect()
        try:
            await listener.add_listener(channel, on_notify)
            started = time.monotonic()
            await notifier.execute("select pg_notify($1, $2)", channel, payload)
            try:
                got = await asyncio.wait_for(arrived, EVENT_SECONDS)
            except asyncio.TimeoutError:
                raise CheckFailed(f"no notification on {channel} within {EVENT_SECONDS} s") from None
            seconds = time.monotonic() - started
        finally:
            await asyncio.gather(listener.close(), notifier.close())
        if got != (channel, payload):
            raise CheckFailed(f"expected {(channel, payload)}, got {got}")
        return f"notification on {channel} arrived after {seconds:.3f} s"

    async def check_cancel(self) -> str:
        sleeper, watcher = await self.connect(), await self.connect()
        pid = sleeper.get_server_pid()
        try:
            return await cancel_by_timeout(sleeper, watcher, pid)
        finally:
            # If the cancel did not work, stop the sleep so nothing lingers.
            await watcher.execute("select pg_cancel_backend(pid) from pg_stat_activity"
                                  " where pid = $1 and state = 'active'", pid)
            await asyncio.gather(sleeper.close(timeout=EVENT_SECONDS), watcher.close(), return_exceptions=True)

    async def check_wrong_password(self) -> str:
        try:
            conn = await self.connect(password=self.args.password + "-wrong")
        except asyncpg.InvalidPasswordError as e:
            return f"refused as expected: {e.sqlstate} {e}"
        except asyncpg.PostgresError as e:
            raise CheckFailed(f"refused, but not for the password: {e.sqlstate} {e}") from None
        await conn.close()
        raise CheckFailed("a wrong password was accepted")

    def all(self) -> dict[str, Callable[[], str]]:
        return {name: synchronous(getattr(self, f"check_{name}")) for name in CHECKS}


async def cancel_by_timeout(sleeper: asyncpg.Connection, watcher: asyncpg.Connection, pid: int) -> str:
    """Time out pg_sleep(30) in a transaction; prove the server cancelled it (see the module docstring)."""
    await sleeper.execute("begin")
    try:
        await sleeper.fetch("select pg_sleep(30)", timeout=0.5)
    except asyncio.TimeoutError:
        pass
    else:
        raise CheckFailed("pg_sleep(30) returned within its 0.5 s timeout")
    cancelled_at = time.monotonic()
    stopped_after = await wait_stopped(watcher, pid)
    if stopped_after is None:
        raise CheckFailed(
            f"after the timeout's CancelRequest, backend {pid} still ran pg_sleep(30) {EVENT_SECONDS} s later"
        )
    try:
        await asyncio.wait_for(sleeper.fetchval("select pg_backend_pid()"), EVENT_SECONDS)
    except asyncpg.InFailedSQLTransactionError:
        pass
    else:
        raise CheckFailed("the transaction was not aborted: the sleep ended without a server error")
    await sleeper.execute("rollback")
    same_backend = await sleeper.fetchval("select pg_backend_pid()")
    if same_backend != pid:
        raise CheckFailed(f"the connection's backend changed from {pid} to {same_backend}")
    return (
        "fetch(timeout=0.5) sent a CancelRequest: the server stopped pg_sleep "
        f"{stopped_after:.3f} s after the timeout, the transaction was aborted (next statement 25P02, "
        "so the sleep ended in an error: asyncpg drops the 57014 itself), same backend alive "
        f"(total {time.monotonic() - cancelled_at:.3f} s)"
    )


async def wait_stopped(watcher: asyncpg.Connection, pid: int) -> float | None:
    """Seconds until backend ``pid`` no longer runs pg_sleep, or None after ``EVENT_SECONDS``."""
    started = time.monotonic()
    while time.monotonic() - started < EVENT_SECONDS:
        running = await watcher.fetchval(
            "select count(*) from pg_stat_activity where pid = $1 and state = 'active'"
            " and query like 'select pg_sleep(30)%'",
            pid,
        )
        if running == 0:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    return None


def synchronous(check: Callable[[], Coroutine[Any, Any, str]]) -> Callable[[], str]:
    """A coroutine check as the plain callable the runner wants: one event loop per check."""
    return lambda: asyncio.run(check())


def main() -> None:
    args = parse_args("asyncpg checks for the egressproxy driver matrix")
    finish(run_checks(args.checks, Checks(args).all()))


if __name__ == "__main__":
    main()
