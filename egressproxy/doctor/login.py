"""The login step (``--login USER --dbname DB``): a real PostgreSQL startup over the doctor's TLS connection.

It authenticates as the server asks: SCRAM-SHA-256 (with the maintained
``scramp`` library; without channel binding, like libpq's
``channel_binding=disable``), md5 or a cleartext password, the password
being ``PGPASSWORD`` as libpq reads it.  The password is never shown.
Success is ReadyForQuery; the doctor then sends Terminate.

What a refusal means, each with its own hint:

- ``28P01``: wrong password for that role;
- ``28000`` with the address the server saw in its message ("no pg_hba.conf
  entry for host \"10.77.0.30\" ..."): that address is not admitted, shown
  as "the database sees you as 10.77.0.30", the allowlist fix in the hint;
- ``3D000``: no such database; any other SQLSTATE: shown with its message.
"""

from __future__ import annotations

import re
from typing import Any

from scramp import ScramClient, ScramException

from egressproxy.doctor import hints, pgclient
from egressproxy.doctor.conn import Closed, ProbeConnection, TimedOut
from egressproxy.doctor.report import FAIL, OK, Check

#: Messages read before giving up on ReadyForQuery (a startup sends a few dozen).
MAX_MESSAGES = 500

_HOST_SEEN = re.compile(r'host "([^"]+)"')


class LoginFailed(Exception):
    """The login ended without ReadyForQuery; ``detail`` and ``hint`` are the check's."""

    def __init__(self, detail: str, hint: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.hint = hint


def refusal(error: pgclient.ServerError, user: str, database: str, egress: str | None) -> LoginFailed:
    """The check text for an ErrorResponse during the startup."""
    said = f"{error.code}: {error.message}"
    if error.code == "28P01":
        return LoginFailed(said, f"wrong password for {user}: set PGPASSWORD to the role's password "
                                 f"(as the provider shows it; reset it there if unsure)")
    if error.code == "28000":
        seen = _HOST_SEEN.search(error.message)
        if seen:
            address = seen.group(1)
            return LoginFailed(f"{said}; the database sees you as {address}", hints.sees_you_as(address, egress))
        return LoginFailed(said, f"the server does not admit {user} to {database} from here: check --login and "
                                 f"--dbname, and the provider's allowlist / pg_hba")
    if error.code == "3D000":
        return LoginFailed(said, f"no database {database} there: check --dbname")
    if error.code in ("53300", "53400"):
        return LoginFailed(said, "the server is out of connection slots: close idle ones or raise the limit")
    detail = f"{said}" + (f" ({error.detail})" if error.detail else "")
    return LoginFailed(detail, error.hint or f"the server refused the login with SQLSTATE {error.code}: see its message")


class _Login:
    """One startup conversation; :meth:`run` returns the method used or raises :class:`LoginFailed`."""

    def __init__(self, conn: ProbeConnection, user: str, database: str, password: str | None,
                 timeout: float, egress: str | None) -> None:
        self.conn = conn
        self.user = user
        self.database = database
        self.password = password
        self.timeout = timeout
        self.egress = egress
        self.method = "trust"
        self.scram: ScramClient | None = None
        self.version: str | None = None

    def _need_password(self) -> str:
        if self.password is None:
            raise LoginFailed("the server asks for a password and PGPASSWORD is not set",
                              "set PGPASSWORD to the role's password (doctor reads it as libpq does)")
        return self.password

    async def run(self) -> str:
        self.conn.write(pgclient.startup_message(self.user, self.database))
        for _ in range(MAX_MESSAGES):
            kind, length = pgclient.read_header(await self.conn.read(5, self.timeout))
            payload = await self.conn.read(length, self.timeout) if length else b""
            if kind == b"R":
                self._authenticate(*pgclient.auth_request(payload))
            elif kind == b"E":
                raise refusal(pgclient.error_fields(payload), self.user, self.database, self.egress)
            elif kind == b"S" and payload.startswith(b"server_version\0"):
                self.version = payload.split(b"\0")[1].decode("utf-8", "replace")
            elif kind == b"Z":
                self.conn.write(pgclient.TERMINATE)
                return self.method
        raise LoginFailed(f"no ReadyForQuery after {MAX_MESSAGES} messages", "this does not look like PostgreSQL")

    def _authenticate(self, code: int, rest: bytes) -> None:
        if code == pgclient.AUTH_OK:
            return
        if code == pgclient.AUTH_CLEARTEXT:
            self.method = "password"
            self.conn.write(pgclient.password_message(self._need_password()))
        elif code == pgclient.AUTH_MD5:
            self.method = "md5"
            self.conn.write(pgclient.password_message(pgclient.md5_password(self.user, self._need_password(), rest[:4])))
        elif code == pgclient.AUTH_SASL:
            offered = pgclient.sasl_mechanisms(rest)
            if "SCRAM-SHA-256" not in offered:
                raise LoginFailed(f"the server offers only {', '.join(offered)}",
                                  "the doctor logs in with SCRAM-SHA-256, md5 or a password only")
            self.method = "SCRAM-SHA-256"
            self.scram = ScramClient(["SCRAM-SHA-256"], self.user, self._need_password())
            first = self.scram.get_client_first().encode("utf-8")
            self.conn.write(pgclient.sasl_initial_response("SCRAM-SHA-256", first))
        elif code == pgclient.AUTH_SASL_CONTINUE and self.scram is not None:
            self._scram(lambda scram: scram.set_server_first(rest.decode("utf-8")))
            self.conn.write(pgclient.sasl_response(self.scram.get_client_final().encode("utf-8")))
        elif code == pgclient.AUTH_SASL_FINAL and self.scram is not None:
            self._scram(lambda scram: scram.set_server_final(rest.decode("utf-8")))
        else:
            raise LoginFailed(f"the server asks for authentication method {code}",
                              "the doctor logs in with SCRAM-SHA-256, md5 or a password only")

    def _scram(self, step: Any) -> None:
        try:
            step(self.scram)
        except (ScramException, UnicodeDecodeError) as e:
            raise LoginFailed(f"SCRAM exchange failed: {e}",
                              "the server's SCRAM answer did not verify: something between here and the "
                              "database rewrites the login") from None


async def login_step(
    reactor: Any, conn: ProbeConnection, subject: str, address: str, user: str, database: str,
    password: str | None, timeout: float, egress: str | None,
) -> Check:
    """Log in as ``user`` to ``database`` and judge the outcome; see the module notes."""
    started = reactor.seconds()
    login = _Login(conn, user, database, password, timeout, egress)
    try:
        method = await login.run()
    except LoginFailed as e:
        return Check(subject, "login", FAIL, e.detail, reactor.seconds() - started, e.hint, address)
    except (Closed, TimedOut, pgclient.WireError) as e:
        return Check(subject, "login", FAIL, f"the login did not finish: {e}", reactor.seconds() - started,
                     "the server closed or stalled the startup: check its log; a pooler in front may refuse "
                     "this database or user", address)
    version = f"; server {login.version}" if login.version else ""
    return Check(subject, "login", OK, f"logged in as {user} to {database} ({method}{version})",
                 reactor.seconds() - started, None, address)
