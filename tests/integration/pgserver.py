"""
A real, throwaway PostgreSQL server for the integration tests.

What this module owns: finding the server binaries, making a cluster in a
temporary directory (``initdb``), configuring it for TLS with a certificate
from a test CA for made-up names (``db.egress.test``), starting and stopping
it (``pg_ctl``), and running ``psql`` against it or through the proxy. It does
not start the proxy and does not use the reactor: every call here blocks, so
call it from ``setUp``/``setUpClass`` or a plain function, not a callback.

Why a real server: the proxy's postgres mode has to pass libpq's SSLRequest
and a verify-full TLS handshake through untouched, and nothing short of a real
server and real ``psql``/``pgbench`` proves that.

Why the ``runuser`` dance: PostgreSQL refuses to run as root, and CI runs as
root. So when we are root, the temporary directory is handed to the
``postgres`` OS user (which Debian's postgresql package creates) and
``initdb``/``pg_ctl`` run as that user via ``runuser -u postgres --``. When we
are not root (a developer machine), the tools run as the current user and the
directory stays theirs. Clients (``psql``) always run as the current user:
they only need the CA certificate, which stays readable by us.

Why fsync, synchronous_commit and full_page_writes are off (and initdb
``--no-sync``): the data is thrown away after the run and a crash never has to
be survived, so durability only costs time. ``max_connections = 200`` leaves
room for ``pgbench -c`` through the proxy; ``shared_buffers = 32MB`` keeps
the server small on CI machines.

Authentication is a managed provider's: TCP clients must use TLS
(``hostssl`` only; a plaintext TCP startup gets "no pg_hba.conf entry ... no
encryption") and SCRAM-SHA-256 with a password per role
(``password_encryption = scram-sha-256``), so a test that passes here passes
against Neon, Supabase or RDS.  The superuser ``postgres`` has the password
``SUPERUSER_PASSWORD``, which ``dsn()`` puts in every connection string unless
told otherwise; ``create_role`` adds more roles.  Two role names are set
aside for tests *about* older methods: ``md5_user`` authenticates with md5
and ``password_user`` with a cleartext password (both over ``hostssl``);
``rejected_user`` meets a ``reject`` line (SQLSTATE 28000, what a missing
pg_hba entry gives).
Only the unix socket, used for setup SQL, trusts its local OS user: it is
never what a test exercises.

Limits: one server per ``PostgresServer``; no client certificates; a test process killed with SIGKILL leaves
its server running (``atexit`` does not run), and its directory under
``/tmp`` named ``egressproxy-pg-*``.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import unittest
from collections.abc import Sequence

from egressproxy.app.demo.pgcluster import file_size, read_from
from tests.tlsfixtures import TestCA

SERVER_OS_USER = "postgres"
SUPERUSER = "postgres"
#: The superuser's password over TCP (SCRAM); tests may print it.
SUPERUSER_PASSWORD = "egress-test-superuser"
#: Role names whose pg_hba line uses an older method than SCRAM.
MD5_ROLE = "md5_user"
PASSWORD_ROLE = "password_user"
#: A role pg_hba rejects outright (SQLSTATE 28000, as for a missing entry).
REJECTED_ROLE = "rejected_user"

_NO_BINARIES = (
    "PostgreSQL server binaries not found (initdb): "
    "install Debian's postgresql, as .ci/run does"
)

# pg_ctl's own wait (-t) is 60 s; the subprocess timeouts leave it room.
_TOOL_TIMEOUT = 120.0
_START_ATTEMPTS = 3


def find_pg_bindir() -> str | None:
    """
    Return the directory holding PostgreSQL's server binaries, or None.

    Tried in order: ``pg_config --bindir`` (on Debian, pg_config may come with
    libpq-dev and name a directory without the server), the highest
    ``/usr/lib/postgresql/<major>/bin`` (Debian's layout, off PATH), and the
    directory of ``initdb`` on PATH (symlinks resolved, so ``pg_ctl`` and
    ``postgres`` are found beside it).
    """
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            result = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            result = None
        if result is not None and result.returncode == 0:
            bindir = result.stdout.strip()
            if bindir and _has_initdb(bindir):
                return bindir

    def version_key(bindir: str) -> tuple[int, ...]:
        major = os.path.basename(os.path.dirname(bindir))
        try:
            return tuple(int(part) for part in major.split("."))
        except ValueError:
            return (-1,)

    debian = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if _has_initdb(d)]
    if debian:
        return max(debian, key=version_key)

    initdb = shutil.which("initdb")
    if initdb is not None:
        return os.path.dirname(os.path.realpath(initdb))
    return None


def _has_initdb(bindir: str) -> bool:
    return os.access(os.path.join(bindir, "initdb"), os.X_OK)


def _ipv6_loopback_works() -> bool:
    """
    Whether ``::1`` can be bound here (containers often run without IPv6).
    """
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _free_port(ipv6: bool) -> int:
    """
    A TCP port free on 127.0.0.1 (and on ::1 when ``ipv6``) right now.

    Racy by nature (someone may take it before the server binds it); the
    caller retries the start with a new port when the bind fails.
    """
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if not ipv6:
            return port
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                s6.bind(("::1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no TCP port is free on both 127.0.0.1 and ::1")


def _conf_string(value: str) -> str:
    """
    Quote ``value`` for postgresql.conf (single quotes, doubled inside).
    """
    return "'" + value.replace("'", "''") + "'"


_BARE_DSN_VALUE = re.compile(r"[A-Za-z0-9_.:/@+,-]+")


def _dsn_value(value: object) -> str:
    """
    Render ``value`` for a libpq key=value string, quoting when needed.
    """
    text = str(value)
    if _BARE_DSN_VALUE.fullmatch(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _conninfo(params: dict[str, object]) -> str:
    """
    Join ``params`` into a libpq connection string; None values are left out.
    """
    return " ".join(
        f"{key}={_dsn_value(value)}" for key, value in params.items() if value is not None
    )


def _clean_env() -> dict[str, str]:
    """
    The environment for PostgreSQL tools: no PG* variables, English messages.

    A developer's PGHOST, PGSSLMODE, PGOPTIONS or PGSERVICE would otherwise
    leak into connections, and tests check libpq's error text, which is
    translated under a non-English locale.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.pop("LANGUAGE", None)
    env["LC_ALL"] = "C.UTF-8"
    env["PGCLIENTENCODING"] = "UTF8"
    return env



class PsqlError(subprocess.CalledProcessError):
    """
    psql exited non-zero; unlike its base class, the message shows stderr.
    """

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr:\n{self.stderr}"


class PostgresServer:
    """
    One running PostgreSQL cluster in a temporary directory, with TLS on.

    Start it with ``PostgresServer.start()``; ``stop()`` (also run at exit)
    shuts it down and deletes the directory. Attributes: ``port`` (TCP, on
    127.0.0.1 and, when ``has_ipv6``, ::1), ``host_names`` (the names in the
    server certificate; the first is the default ``host`` in ``dsn()``),
    ``ca`` and ``ca_path`` (the CA that issued it, for ``sslrootcert``),
    ``datadir`` (also the unix socket directory), ``bindir`` and ``logfile``.
    """

    def __init__(
        self,
        bindir: str,
        base: str,
        host_names: tuple[str, ...],
        ca: TestCA,
        has_ipv6: bool,
    ) -> None:
        self.bindir = bindir
        self.host_names = host_names
        self.ca = ca
        self.ca_path = ca.ca_path
        self.has_ipv6 = has_ipv6
        self.datadir = os.path.join(base, "data")
        self.logfile = os.path.join(base, "postgres.log")
        self.port = 0
        self._base = base
        self._stopped = False
        #: Optional placement, set by ``start()``: see its keyword arguments.
        self.netns: str | None = None
        self.listen: tuple[str, ...] = ()
        self.hba_sources: tuple[str, ...] = ()

    @classmethod
    def start(
        cls,
        names: Sequence[str] = ("db.egress.test",),
        ca: TestCA | None = None,
        *,
        netns: str | None = None,
        listen: Sequence[str] = (),
        hba_sources: Sequence[str] = (),
    ) -> PostgresServer:
        """
        Make, configure and start a cluster; return when it accepts connections.

        Blocks for initdb and startup (a couple of seconds). The server
        certificate covers ``names`` and is issued by ``ca``, or by a new CA
        made in the server's directory when ``ca`` is None. Raises
        ``unittest.SkipTest`` when the binaries (or, as root, the ``postgres``
        OS user) are missing, and RuntimeError, with the server log, when the
        server fails to start.

        Placement, for tests that simulate a network (all optional; the
        defaults keep the loopback server described above): ``netns`` runs
        the server tools inside that network namespace (``ip netns exec``),
        ``listen`` replaces the loopback ``listen_addresses`` (e.g. the
        namespace's own address), and ``hba_sources`` adds a ``hostssl ...
        scram-sha-256`` line per CIDR, the only non-loopback peers admitted.
        The unix socket (``superuser_sql``) works from any namespace.
        """
        if isinstance(names, str) or not names:
            raise ValueError("names must be a non-empty sequence of host names")
        bindir = find_pg_bindir()
        if bindir is None:
            raise unittest.SkipTest(_NO_BINARIES)
        owner = _server_owner()
        base = tempfile.mkdtemp(prefix="egressproxy-pg-", dir="/tmp")
        try:
            if owner is not None:
                os.chown(base, owner.pw_uid, owner.pw_gid)
            os.chmod(base, 0o700)
            if ca is None:
                ca = TestCA.create(os.path.join(base, "ca"))
            server = cls(bindir, base, tuple(names), ca, _ipv6_loopback_works())
            server.netns, server.listen, server.hba_sources = netns, tuple(listen), tuple(hba_sources)
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            raise
        atexit.register(server.stop)
        try:
            server._create(owner)
            server._launch()
            server.create_role(SUPERUSER, SUPERUSER_PASSWORD, create=False)
        except BaseException:
            server.stop()
            raise
        return server

    @property
    def stopped(self) -> bool:
        return self._stopped

    def _tool(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        """
        Run a server tool from ``bindir`` as the server's OS user.
        """
        argv = [os.path.join(self.bindir, name), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", SERVER_OS_USER, "--", *argv]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            errors="replace",
            stdin=subprocess.DEVNULL,
            cwd=self._base,
            env=_clean_env(),
            timeout=_TOOL_TIMEOUT,
        )

    def _create(self, owner: pwd.struct_passwd | None) -> None:
        """
        initdb, then install the certificate and write pg_hba.conf.
        """
        result = self._tool(
            "initdb",
            "-D",
            self.datadir,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-U",
            SUPERUSER,
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C",
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        # The test process keeps its own copy; the server gets one it owns,
        # since PostgreSQL rejects a key file it does not own or others can read.
        cert_path, key_path = self.ca.issue(
            self.host_names, os.path.join(self._base, "tls"), "server"
        )
        for source, target_name, mode in (
            (cert_path, "server.crt", 0o644),
            (key_path, "server.key", 0o600),
        ):
            target = os.path.join(self.datadir, target_name)
            shutil.copyfile(source, target)
            os.chmod(target, mode)
            if owner is not None:
                os.chown(target, owner.pw_uid, owner.pw_gid)
        self._rewrite_owned(
            "pg_hba.conf",
            "# written by tests/integration/pgserver.py: like a managed provider,\n"
            "# TCP only over TLS and with SCRAM (two roles set aside for md5 and\n"
            "# cleartext tests); the unix socket is for the tests' own setup SQL.\n"
            "local all all trust\n"
            f"hostssl all {REJECTED_ROLE} 127.0.0.1/32 reject\n"
            f"hostssl all {REJECTED_ROLE} ::1/128 reject\n"
            f"hostssl all {MD5_ROLE} 127.0.0.1/32 md5\n"
            f"hostssl all {MD5_ROLE} ::1/128 md5\n"
            f"hostssl all {PASSWORD_ROLE} 127.0.0.1/32 password\n"
            f"hostssl all {PASSWORD_ROLE} ::1/128 password\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "hostssl all all ::1/128 scram-sha-256\n"
            + "".join(f"hostssl all all {cidr} scram-sha-256\n" for cidr in self.hba_sources),
        )
        with open(os.path.join(self.datadir, "postgresql.conf"), encoding="utf-8") as f:
            self._initdb_conf = f.read()

    def _rewrite_owned(self, name: str, text: str) -> None:
        """
        Replace a file in the data directory, keeping its owner and mode.
        """
        path = os.path.join(self.datadir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    def _write_conf(self) -> None:
        listen = "127.0.0.1,::1" if self.has_ipv6 else "127.0.0.1"
        if self.listen:
            listen = ",".join(self.listen)
        settings = {
            "port": str(self.port),
            "listen_addresses": _conf_string(listen),
            "unix_socket_directories": _conf_string(self.datadir),
            "ssl": "on",
            "password_encryption": "'scram-sha-256'",
            "ssl_cert_file": _conf_string(os.path.join(self.datadir, "server.crt")),
            "ssl_key_file": _conf_string(os.path.join(self.datadir, "server.key")),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": _conf_string("32MB"),
        }
        appended = "".join(f"{key} = {value}\n" for key, value in settings.items())
        self._rewrite_owned(
            "postgresql.conf",
            self._initdb_conf
            + "\n# appended by tests/integration/pgserver.py\n"
            + appended,
        )

    def _launch(self) -> None:
        """
        pg_ctl start on a free port, retrying with a new port if it was taken.
        """
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.port = _free_port(self.has_ipv6)
            self._write_conf()
            log_size = _size(self.logfile)
            result = self._tool(
                "pg_ctl", "-D", self.datadir, "-w", "-t", "60", "-l", self.logfile, "start"
            )
            if result.returncode == 0:
                return
            log = _read_from(self.logfile, log_size)
            if "could not bind" in log and attempt < _START_ATTEMPTS:
                continue
            raise RuntimeError(
                f"pg_ctl start failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\nserver log:\n{log}"
            )

    def stop(self) -> None:
        """
        Stop the server (fast shutdown) and delete its directory.

        Idempotent and never raises: a server already stopped, killed or never
        started is fine, since this also runs at exit and from cleanups.
        """
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        pidfile = os.path.join(self.datadir, "postmaster.pid")
        if os.path.exists(pidfile):
            if not self._pg_ctl_stop("fast") and os.path.exists(pidfile):
                self._pg_ctl_stop("immediate")
        shutil.rmtree(self._base, ignore_errors=True)

    def _pg_ctl_stop(self, mode: str) -> bool:
        try:
            result = self._tool(
                "pg_ctl", "-D", self.datadir, "-m", mode, "-w", "-t", "60", "stop"
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return result.returncode == 0

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def dsn(
        self,
        port: int | None = None,
        hostaddr: str | None = "127.0.0.1",
        host: str | None = None,
        sslmode: str = "verify-full",
        dbname: str = "postgres",
        user: str = SUPERUSER,
        **extra: object,
    ) -> str:
        """
        A libpq key=value connection string for this server (or a proxy).

        ``host`` (default: the first certificate name) is what verify-full
        checks the certificate against, while ``hostaddr`` is where libpq
        actually connects, so no DNS entry is needed. Pass the proxy's
        ``port`` to go through the proxy. ``sslrootcert`` is added for
        verify-ca and verify-full. ``extra`` adds or overrides keys
        (``connect_timeout`` is 10 unless given); a None value leaves a key out.

        ``password`` is the superuser's unless given (pass ``password=None``
        to leave it out, e.g. to see the server refuse a login without one).

        ``gssencmode=disable`` is a default too: with a Kerberos ticket
        around (a developer machine), libpq would otherwise open with a
        GSSENCRequest rather than the SSLRequest the tests expect.
        """
        params: dict[str, object] = {
            "host": self.host_names[0] if host is None else host,
            "hostaddr": hostaddr,
            "port": self.port if port is None else port,
            "dbname": dbname,
            "user": user,
            "sslmode": sslmode,
        }
        if sslmode in ("verify-ca", "verify-full"):
            params["sslrootcert"] = self.ca_path
        params["password"] = SUPERUSER_PASSWORD if user == SUPERUSER else role_password(user)
        params["connect_timeout"] = 10
        params["gssencmode"] = "disable"
        params.update(extra)
        return _conninfo(params)

    def psql(
        self,
        sql: str,
        dsn: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """
        Run ``sql`` with psql over ``dsn`` (default: ``self.dsn()``).

        Output is unaligned tuples only (``-A -t``), so a one-value query
        prints just the value; psqlrc is ignored (``-X``) and the first error
        stops it. With ``check``, a non-zero exit raises PsqlError carrying
        stderr; without, the caller inspects ``returncode`` and ``stderr``.
        """
        argv = [
            _psql_binary(self.bindir),
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            self.dsn() if dsn is None else dsn,
            "-c",
            sql,
        ]
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            stdin=subprocess.DEVNULL,
            env=_clean_env(),
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise PsqlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def create_role(
        self,
        name: str,
        password: str | None = None,
        encryption: str = "scram-sha-256",
        create: bool = True,
        superuser: bool = False,
    ) -> str:
        """
        Create login role ``name`` (or, with ``create=False``, set its password).

        The password (default: ``role_password(name)``, which ``dsn()`` also
        uses) is stored as ``encryption`` says: ``scram-sha-256`` or ``md5``.
        Idempotent: an existing role gets the password again. Returns it.
        """
        if password is None:
            password = role_password(name)
        if encryption not in ("scram-sha-256", "md5"):
            raise ValueError(f"unknown password encryption {encryption!r}")
        quoted_name = '"' + name.replace('"', '""') + '"'
        quoted_password = "'" + password.replace("'", "''") + "'"
        statements = [f"set password_encryption = '{encryption}'"]
        if create:
            statements.append(
                "do $$ begin if not exists (select from pg_roles where rolname = "
                + "'" + name.replace("'", "''") + "'"
                + f") then create role {quoted_name} login; end if; end $$"
            )
        statements.append(
            f"alter role {quoted_name} with login {'superuser' if superuser else ''} password {quoted_password}"
        )
        self.psql("; ".join(statements), dsn=self.superuser_dsn())
        return password

    def superuser_dsn(self, dbname: str = "postgres") -> str:
        """
        A connection string over the unix socket: no TCP, no TLS, no proxy.
        """
        return _conninfo(
            {"host": self.datadir, "port": self.port, "dbname": dbname, "user": SUPERUSER}
        )

    def superuser_sql(
        self, sql: str, dbname: str = "postgres", timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """
        Run setup SQL (create tables, roles) as superuser over the unix socket.
        """
        return self.psql(sql, dsn=self.superuser_dsn(dbname), timeout=timeout)


def role_password(name: str) -> str:
    """
    The password ``create_role`` gives role ``name`` by default (and ``dsn()`` sends).
    """
    if name == SUPERUSER:
        return SUPERUSER_PASSWORD
    return f"egress-test-{name}"


def _server_owner() -> pwd.struct_passwd | None:
    """
    The OS user to run the server as: ``postgres`` when we are root, else us.

    Returns None when no switch is needed.
    """
    if os.geteuid() != 0:
        return None
    try:
        owner = pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        raise unittest.SkipTest(
            f"running as root and there is no {SERVER_OS_USER!r} OS user to run "
            "PostgreSQL as (it refuses root): install Debian's postgresql, "
            "as .ci/run does"
        ) from None
    if shutil.which("runuser") is None:
        raise unittest.SkipTest(
            "running as root and runuser (util-linux) is missing: "
            "cannot run PostgreSQL as the postgres user"
        )
    return owner


def _psql_binary(bindir: str) -> str:
    """
    psql from PATH (Debian's wrapper), else the one beside the server.
    """
    found = shutil.which("psql")
    if found is not None:
        return found
    beside = os.path.join(bindir, "psql")
    if os.access(beside, os.X_OK):
        return beside
    raise unittest.SkipTest("psql not found on PATH nor in " + bindir)


# A server log's size and its text from an offset: the demo's helpers, shared.
_size, _read_from = file_size, read_from


_shared: PostgresServer | None = None
_shared_skip: str | None = None
_shared_lock = threading.Lock()


def shared_server() -> PostgresServer:
    """
    The one server shared by all integration tests in this process.

    Started on first use and stopped at exit, because initdb and startup cost
    seconds and a trial run has many test modules. Tests must not stop it and
    should create their own tables or databases rather than rely on a clean
    server; a test that needs a pristine or differently configured server
    starts its own with ``PostgresServer.start()``. A skip (no binaries) is
    remembered so later tests skip at once with the same reason.
    """
    global _shared, _shared_skip
    with _shared_lock:
        if _shared_skip is not None:
            raise unittest.SkipTest(_shared_skip)
        if _shared is None or _shared.stopped:
            try:
                _shared = PostgresServer.start()
            except unittest.SkipTest as e:
                _shared_skip = str(e)
                raise
        return _shared
