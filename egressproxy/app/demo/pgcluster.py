"""The demo's PostgreSQL: a throwaway cluster with TLS, in a directory it is given.

Owns finding the server programs, ``initdb``, the server's configuration
(TLS on, TCP on 127.0.0.1 only, ``hostssl`` + SCRAM-SHA-256 as a managed
provider does), starting it on a free port, the demo's role and database, and
stopping it.  Every call blocks (``subprocess``): the runner calls them
before the reactor runs and after it stops.  It does not make certificates
(``certs``), choose the proxy's ports, or remove its directory (the runner
owns that).

Why the ``runuser`` step: PostgreSQL refuses to run as root.  When the demo
runs as root (a container, ``sudo``), the server's directory belongs to the
``postgres`` OS user (which the distributions' packages create) and
``initdb``, ``pg_ctl`` and the set-up ``psql`` run as that user through
``runuser -u postgres --``.  Otherwise they run as the current user.

Why fsync and friends are off: the data is thrown away on exit and no crash
ever has to be survived, so durability would only cost start-up time.

The unix socket (in the server's private directory) trusts the superuser
``postgres`` without a password: it carries the set-up SQL and nothing else.
Every TCP connection must use TLS and SCRAM.

Limits: ``pg_ctl`` starts the server in its own session, so a Ctrl-C in the
terminal reaches the demo, not the server, and :meth:`PgCluster.stop` is what
stops it; a demo killed with SIGKILL leaves it running (its directory is
named in the demo's first line of output).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import time

from egressproxy.app.demo.configtext import free_port

SERVER_OS_USER = "postgres"
SUPERUSER = "postgres"

INSTALL_HINT = (
    "install PostgreSQL's server package (Debian/Ubuntu: sudo apt-get install postgresql; "
    "macOS: brew install postgresql), or give --pg-bindir DIR"
)

# pg_ctl's own waits (-t) are shorter than these, so it reports first.
_TOOL_TIMEOUT = 90.0
_START_ATTEMPTS = 3
#: Where Homebrew keeps keg-only versions (postgresql@16 is not linked onto PATH).
_SEARCHED = ("/usr/lib/postgresql/*/bin", "/opt/homebrew/opt/postgresql*/bin", "/usr/local/opt/postgresql*/bin")


class DemoError(Exception):
    """Set-up cannot go on; the message says why and what to do (printed, then exit 1)."""


def _has_initdb(bindir: str) -> bool:
    return os.access(os.path.join(bindir, "initdb"), os.X_OK)


def _version_key(bindir: str) -> tuple[int, ...]:
    """``/usr/lib/postgresql/16/bin`` -> (16,); the highest version wins."""
    name = os.path.basename(os.path.dirname(bindir)).rpartition("@")[2]
    digits = "".join(c if c.isdigit() or c == "." else " " for c in name).split()
    try:
        return tuple(int(part) for part in digits[0].split(".") if part) if digits else (-1,)
    except ValueError:
        return (-1,)


def find_bindir(explicit: str | None = None) -> str:
    """The directory of ``initdb``, ``pg_ctl`` and ``postgres``; :class:`DemoError` when there is none.

    ``explicit`` (``--pg-bindir``) is used as given; else ``initdb`` on PATH
    (symlinks resolved, so the others are found beside it), else the highest
    version under Debian's ``/usr/lib/postgresql/*/bin`` or Homebrew's kegs.
    """
    if explicit is not None:
        if _has_initdb(explicit):
            return explicit
        raise DemoError(f"egressproxy demo: no initdb in {explicit}: {INSTALL_HINT}")
    on_path = shutil.which("initdb")
    if on_path is not None:
        return os.path.dirname(os.path.realpath(on_path))
    found = [d for pattern in _SEARCHED for d in glob.glob(pattern) if _has_initdb(d)]
    if found:
        return max(found, key=_version_key)
    raise DemoError(
        "egressproxy demo needs PostgreSQL's server programs (initdb, pg_ctl), found neither on PATH "
        f"nor in /usr/lib/postgresql/*/bin: {INSTALL_HINT}"
    )


def server_owner() -> pwd.struct_passwd | None:
    """The OS user to run the server as when we are root (None when we are not)."""
    if os.geteuid() != 0:
        return None
    try:
        owner = pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        raise DemoError(
            f"egressproxy demo: PostgreSQL refuses to run as root and there is no {SERVER_OS_USER!r} OS "
            "user to run it as: run the demo as an ordinary user, or install the postgresql package "
            "(it creates that user)"
        ) from None
    if shutil.which("runuser") is None:
        raise DemoError(
            "egressproxy demo: PostgreSQL refuses to run as root and runuser (util-linux) is missing: "
            "run the demo as an ordinary user"
        )
    return owner


def _conf_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_name(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _tool_environment() -> dict[str, str]:
    """The environment without PG* variables (a user's PGHOST must not steer set-up) and in plain English."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.pop("LANGUAGE", None)
    env["LC_ALL"] = "C"
    return env


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, waiting for its parent to reap it, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) said it exists


class PgCluster:
    """One PostgreSQL cluster in ``directory`` (which the caller made and will remove).

    Call :meth:`initdb`, :meth:`install_tls`, :meth:`start`, then
    :meth:`create_login`; :meth:`stop` is safe at any point, even before
    :meth:`start` and twice.  ``port`` and ``pid`` are set by :meth:`start`.
    """

    def __init__(self, bindir: str, directory: str, owner: pwd.struct_passwd | None) -> None:
        self.bindir = bindir
        self.directory = directory
        self.owner = owner
        self.datadir = os.path.join(directory, "data")
        self.logfile = os.path.join(directory, "postgres.log")
        self.port = 0
        self.pid: int | None = None
        #: A ``pg_ctl start`` was cut short (by a signal): the server may be starting.
        self._start_unfinished = False
        if owner is not None:
            os.chown(directory, owner.pw_uid, owner.pw_gid)
        os.chmod(directory, 0o700)

    # -- running the programs ----------------------------------------------

    def _program(self, name: str) -> str:
        path = os.path.join(self.bindir, name)
        if name == "psql" and not os.access(path, os.X_OK):
            return shutil.which("psql") or path
        return path

    def _tool(self, name: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL program as the server's OS user, in its directory, with output captured."""
        argv = [self._program(name), *args]
        if self.owner is not None:
            argv = ["runuser", "-u", SERVER_OS_USER, "--", *argv]
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, errors="replace", cwd=self.directory,
                env=_tool_environment(), timeout=_TOOL_TIMEOUT,
                input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DemoError(f"egressproxy demo: {name} could not run: {e}") from None

    def version(self) -> str:
        """The number in ``postgres --version`` (``postgres (PostgreSQL) 15.18 (Debian ...)``), or ``?``."""
        result = self._tool("postgres", "--version")
        numbers = [word for word in result.stdout.split() if word[:1].isdigit()]
        return numbers[0] if result.returncode == 0 and numbers else "?"

    # -- set-up ------------------------------------------------------------

    def initdb(self) -> None:
        """Create the cluster: superuser ``postgres``, UTF8, C locale, no fsync."""
        result = self._tool(
            "initdb", "-D", self.datadir, "-U", SUPERUSER, "--auth-local=trust", "--auth-host=reject",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )
        if result.returncode != 0:
            raise DemoError(f"egressproxy demo: initdb failed ({result.returncode}):\n{result.stdout}{result.stderr}")

    def install_tls(self, cert_pem: bytes, key_pem: bytes) -> None:
        """Give the server its certificate and key, owned by its user (it refuses a key others can read)."""
        for name, data, mode in (("server.crt", cert_pem, 0o644), ("server.key", key_pem, 0o600)):
            path = os.path.join(self.datadir, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            try:
                os.fchmod(fd, mode)
                os.write(fd, data)
            finally:
                os.close(fd)
            if self.owner is not None:
                os.chown(path, self.owner.pw_uid, self.owner.pw_gid)
        self._write_owned("pg_hba.conf", (
            "# written by egressproxy demo: TCP only over TLS and with SCRAM, like a\n"
            "# managed provider; the unix socket (a private directory) is for set-up.\n"
            f"local all {SUPERUSER} trust\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "hostssl all all ::1/128 scram-sha-256\n"
        ))
        with open(os.path.join(self.datadir, "postgresql.conf"), encoding="utf-8") as f:
            self._initdb_conf = f.read()

    def _write_owned(self, name: str, text: str) -> None:
        """Replace a file initdb made (it keeps its owner, so the server can read it)."""
        with open(os.path.join(self.datadir, name), "w", encoding="utf-8") as f:
            f.write(text)

    def _write_conf(self) -> None:
        settings = {
            "port": str(self.port),
            "listen_addresses": _conf_string("127.0.0.1"),
            "unix_socket_directories": _conf_string(self.directory),
            "ssl": "on",
            "ssl_cert_file": _conf_string(os.path.join(self.datadir, "server.crt")),
            "ssl_key_file": _conf_string(os.path.join(self.datadir, "server.key")),
            "password_encryption": _conf_string("scram-sha-256"),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": _conf_string("32MB"),
            "max_connections": "50",
        }
        appended = "".join(f"{key} = {value}\n" for key, value in settings.items())
        self._write_owned("postgresql.conf", self._initdb_conf + "\n# appended by egressproxy demo\n" + appended)

    def start(self) -> None:
        """``pg_ctl start`` on a free port (another, up to 3 times, if it was taken meanwhile)."""
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.port = free_port()
            self._write_conf()
            log_size = file_size(self.logfile)
            self._start_unfinished = True
            result = self._tool("pg_ctl", "-D", self.datadir, "-l", self.logfile, "-w", "-t", "60", "start")
            self._start_unfinished = False
            if result.returncode == 0:
                self.pid = self._read_pid()
                return
            log = read_from(self.logfile, log_size)
            if "could not bind" in log and attempt < _START_ATTEMPTS:
                continue
            raise DemoError(
                f"egressproxy demo: pg_ctl start failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\nserver log:\n{log}"
            )

    def _read_pid(self) -> int | None:
        """The postmaster's PID from the first line of ``postmaster.pid``."""
        try:
            with open(os.path.join(self.datadir, "postmaster.pid"), encoding="ascii") as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def create_login(self, role: str, password: str, database: str) -> None:
        """Create login ``role`` (SCRAM ``password``) and ``database`` it owns, over the unix socket.

        The SQL goes to psql on stdin, so the password is never on a command line.
        """
        sql = (
            "set password_encryption = 'scram-sha-256';\n"
            f"create role {_sql_name(role)} login password {_sql_string(password)};\n"
            f"create database {_sql_name(database)} owner {_sql_name(role)};\n"
        )
        result = self._tool(
            "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.directory, "-p", str(self.port),
            "-U", SUPERUSER, "-d", "postgres", "-f", "-", stdin=sql,
        )
        if result.returncode != 0:
            raise DemoError(f"egressproxy demo: creating the demo role failed:\n{result.stdout}{result.stderr}")

    # -- stop --------------------------------------------------------------

    def stop(self) -> None:
        """Stop the server if it runs: ``pg_ctl stop`` fast, then immediate, then SIGKILL by PID.

        Never raises (it runs on every way out).  When a start was cut short by
        a signal, waits up to 5 s for the server to write its PID file first.
        """
        pid = self.pid or self._read_pid() or self._wait_for_pid()
        if pid is None:
            return
        # Bounded so that Ctrl-C always ends within about 20 s, whatever state
        # the server was caught in (it may be mid-start, or shutting down already).
        for mode, seconds in (("fast", "10"), ("immediate", "5")):
            if not _alive(pid):
                break
            try:
                self._tool("pg_ctl", "-D", self.datadir, "-m", mode, "-w", "-t", seconds, "stop")
            except DemoError:
                pass
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for _ in range(50):
            if not _alive(pid):
                break
            time.sleep(0.1)
        self.pid = None

    def _wait_for_pid(self) -> int | None:
        if not self._start_unfinished:
            return None
        for _ in range(50):
            pid = self._read_pid()
            if pid is not None:
                return pid
            time.sleep(0.1)
        return None


def file_size(path: str) -> int:
    """A file's size now, 0 when it is missing: where to start reading what a server logs next."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def read_from(path: str, offset: int) -> str:
    """A log's text from ``offset`` on (for an error message), or why it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
    except OSError as e:
        return f"(no server log: {e})"
