"""
A real, throwaway PgBouncer in front of the test PostgreSQL server.

What this module owns: finding the ``pgbouncer`` binary, writing its
configuration (``pgbouncer.ini``, the auth file, a resolv.conf) in a
temporary directory, issuing its client-side certificate from the server's
test CA, answering its DNS queries for the server's name, running it in the
foreground as a subprocess on a free loopback port, and stopping that one
process.  It does not start PostgreSQL (pass it a running
``PostgresServer``), does not start the proxy and does not use the reactor:
every call blocks, so call it from ``setUp``/``setUpClass`` or a plain
function, not a callback.

Why a real PgBouncer: in the reference deployment the proxy's ``:6432``
listener goes to the provider's PgBouncer, not to PostgreSQL, and a pooler
answers cancels, TLS and authentication itself.  Only the real program shows
whether psql, pgbench and Ctrl-C still work through proxy and pooler.

The setup is a managed provider's, with nothing trusted:

- clients must use TLS (``client_tls_sslmode = require``), with a certificate
  for ``names`` (``pool.egress.test``) from the server's CA, so a client keeps
  ``sslmode=verify-full`` with the same ``sslrootcert`` as for the server;
- PgBouncer checks the server too (``server_tls_sslmode = verify-full``
  against the CA file).  PgBouncer 1.18 checks the server certificate against
  the ``host=`` of the ``[databases]`` entry: with ``host=127.0.0.1`` it
  wants 127.0.0.1 in the certificate, which names only ``db.egress.test``,
  and there is no separate setting for the expected name.  So the entry says
  ``host=db.egress.test`` and that name has to resolve.  PgBouncer's own
  ``resolv_conf`` setting points its resolver (c-ares) at a file naming only
  127.0.0.1 as name server, and ``LoopbackResolver``, a few lines of DNS in a
  thread of the test process on 127.0.0.1:53, answers the names it was given
  with 127.0.0.1 and every other name with NXDOMAIN.  Nothing system-wide
  (``/etc/hosts``, the machine's resolver) is touched or asked, and a name the
  certificate lacks really fails (see the tests).  Cheaper routes fail:
  c-ares reads ``CARES_HOSTS`` only when the caller asks for it (PgBouncer
  does not), and ignores a port in resolv.conf's ``nameserver``, hence :53,
  which needs root (as CI runs; otherwise the tests skip);
- ``auth_type = scram-sha-256`` with an auth file of the SCRAM secrets that
  ``pg_authid`` holds when PgBouncer starts (what providers fetch with
  ``auth_query``).  PgBouncer then logs in to the server with the keys from
  the client's own SCRAM exchange, so no plaintext password is stored;
- ``pool_mode = transaction``, the mode providers run; prepared statements
  (``pgbench -M prepared``) do not survive it, the simple protocol does.

Why not ``runuser`` (which ``pgserver.py`` uses for ``pg_ctl``): PgBouncer
refuses to run as root, but ``runuser`` forks and stays between us and the
program, and on SIGTERM it waits two seconds and then SIGKILLs its child.
The process is started with ``subprocess.Popen(user=..., group=...)``
instead, so the PID we hold is PgBouncer's own, SIGTERM reaches it directly
and it exits at once.

Limits: one PgBouncer per ``PgBouncer``; roles created after ``start`` are not
in the auth file (start another PgBouncer); IPv4 to the server only (names
resolve to 127.0.0.1 and nothing else); one test process at a time can hold
127.0.0.1:53, so a second run alongside skips these tests; a test process
killed with SIGKILL leaves PgBouncer running (``atexit`` does not run), and
its directory under ``/tmp`` named ``egressproxy-pgbouncer-*``.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import unittest
from collections.abc import Sequence

from tests.integration.pgserver import (
    SUPERUSER,
    PostgresServer,
    _clean_env,
    _free_port,
    _ipv6_loopback_works,
    _read_from,
    _server_owner,
    _size,
)

_NO_BINARY = "pgbouncer not found: install Debian's pgbouncer, as .ci/run does"

#: Where Debian puts it (in /usr/sbin, off a non-root PATH).
_KNOWN_PATHS = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer")

#: The only address names resolve to, and where the resolver listens.
LOOPBACK = "127.0.0.1"
#: c-ares ignores a port in resolv.conf, so the resolver must use DNS's own.
_DNS_PORT = 53

_START_ATTEMPTS = 3
#: How long PgBouncer has to open its port (it starts in well under a second).
_START_TIMEOUT = 20.0
#: How long a SIGTERMed PgBouncer has to exit before it is SIGKILLed.
_STOP_TIMEOUT = 10.0
_POLL_STEP = 0.05


def find_pgbouncer() -> str | None:
    """
    The path of the ``pgbouncer`` program, or None.
    """
    found = shutil.which("pgbouncer")
    if found is not None:
        return found
    for path in _KNOWN_PATHS:
        if os.access(path, os.X_OK):
            return path
    return None


def _resolver_backend(binary: str) -> str:
    """
    The name resolver ``binary`` was built with, from ``pgbouncer --version``.

    Only c-ares and evdns honour the ``resolv_conf`` setting; PgBouncer built
    with the libc resolver would ask the machine's DNS for ``db.egress.test``.
    """
    try:
        result = subprocess.run(
            [binary, "--version"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("adns:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


# -- DNS for the server's name ---------------------------------------------------

_DNS_HEADER = struct.Struct("!HHHHHH")
_QR, _OPCODE_AND_RD, _AA, _NXDOMAIN = 0x8000, 0x7900, 0x0400, 3
_TYPE_A = _CLASS_IN = 1
_MAX_LABELS = 127


def _question(query: bytes) -> tuple[str, int, int, int] | None:
    """
    (name, qtype, qclass, end offset) of a one-question query, else None.

    Compression pointers never occur in a question a resolver sends; a
    packet with one, or cut short, is not answered.
    """
    if len(query) < _DNS_HEADER.size:
        return None
    _, flags, qdcount, _, _, _ = _DNS_HEADER.unpack_from(query)
    if flags & _QR or qdcount != 1:
        return None
    offset, labels = _DNS_HEADER.size, []
    for _ in range(_MAX_LABELS):
        if offset >= len(query):
            return None
        length = query[offset]
        offset += 1
        if length == 0:
            break
        if length & 0xC0 or offset + length > len(query):
            return None
        labels.append(query[offset : offset + length])
        offset += length
    else:
        return None
    if offset + 4 > len(query):
        return None
    qtype, qclass = struct.unpack_from("!HH", query, offset)
    name = b".".join(labels).decode("ascii", "replace").lower()
    return name, qtype, qclass, offset + 4


def dns_answer(query: bytes, names: frozenset[str]) -> bytes | None:
    """
    The reply to a DNS ``query``: an A record 127.0.0.1 for a name in ``names``.

    Other types for those names get an empty answer (so an AAAA lookup does
    not mask the A), other names NXDOMAIN; a malformed query gets nothing.
    """
    question = _question(query)
    if question is None:
        return None
    name, qtype, qclass, end = question
    ident, flags = struct.unpack_from("!HH", query)
    known = name in names
    answer = b""
    if known and qtype == _TYPE_A and qclass == _CLASS_IN:
        # A pointer to the question's name, type A, class IN, TTL 60 s, 4 bytes.
        answer = struct.pack("!HHHIH", 0xC00C, _TYPE_A, _CLASS_IN, 60, 4)
        answer += socket.inet_aton(LOOPBACK)
    reply_flags = _QR | (flags & _OPCODE_AND_RD) | _AA | (0 if known else _NXDOMAIN)
    header = _DNS_HEADER.pack(ident, reply_flags, 1, 1 if answer else 0, 0, 0)
    return header + query[_DNS_HEADER.size : end] + answer


class LoopbackResolver:
    """
    A DNS server on 127.0.0.1:53, in a daemon thread, for made-up names.

    One per test process (``shared()``), since port 53 is one port; each
    PgBouncer ``add``s the names it must reach.  It answers only what
    ``dns_answer`` says and forwards nothing.  Runs until the process exits.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._socket = sock
        self._names: frozenset[str] = frozenset()
        self._closed = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, name="pgbouncer-test-dns", daemon=True
        )
        self._thread.start()
        atexit.register(self.close)

    _shared: LoopbackResolver | None = None
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls) -> LoopbackResolver:
        """
        The process's resolver, started on first use.

        Raises ``unittest.SkipTest`` when 127.0.0.1:53 cannot be bound (not
        root, or a local DNS server already there).
        """
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls(_bind_dns_socket())
            return cls._shared

    def add(self, name: str) -> None:
        self._names = self._names | {name.lower()}

    def _serve(self) -> None:
        self._socket.settimeout(0.2)
        while not self._closed.is_set():
            try:
                query, peer = self._socket.recvfrom(512)
            except socket.timeout:
                continue
            except OSError:
                return
            reply = dns_answer(query, self._names)
            if reply is not None:
                try:
                    self._socket.sendto(reply, peer)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        self._socket.close()


def _bind_dns_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((LOOPBACK, _DNS_PORT))
    except OSError as e:
        sock.close()
        raise unittest.SkipTest(
            f"cannot bind {LOOPBACK}:{_DNS_PORT}/udp for the resolver PgBouncer "
            f"needs to reach the server by its certificate name ({e}): "
            "run as root, as CI does, with no local DNS server on that address"
        ) from None
    return sock


# -- the configuration -------------------------------------------------------------


def _ini_value(value: object) -> str:
    """
    Render ``value`` for pgbouncer.ini, refusing what its parser would misread.
    """
    text = str(value)
    if "\n" in text or text != text.strip():
        raise ValueError(f"cannot write {text!r} in pgbouncer.ini")
    return text


def _auth_line(user: str, secret: str) -> str:
    """
    One auth-file line: both fields in double quotes, inner quotes doubled.
    """
    return '"{}" "{}"\n'.format(user.replace('"', '""'), secret.replace('"', '""'))


def _scram_secrets(server: PostgresServer) -> dict[str, str]:
    """
    Every login role's SCRAM secret, read from ``pg_authid`` as superuser.

    Roles stored with md5 or no password are left out: with
    ``auth_type = scram-sha-256`` PgBouncer could not log them in anyway.
    """
    result = server.superuser_sql(
        "select coalesce(json_object_agg(rolname, rolpassword), '{}') from pg_authid "
        "where rolcanlogin and rolpassword like 'SCRAM-SHA-256$%'"
    )
    secrets: dict[str, str] = json.loads(result.stdout)
    if SUPERUSER not in secrets:
        raise RuntimeError(f"the server has no SCRAM secret for {SUPERUSER!r}: {secrets}")
    return secrets


def _port_open(port: int) -> bool:
    """
    Whether something accepts TCP connections on 127.0.0.1:``port``.
    """
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except OSError:
        return False


class PgBouncer:
    """
    One running PgBouncer in front of ``server``, with TLS on both sides.

    Start it with ``PgBouncer.start(server)``; ``stop()`` (also run at exit)
    ends it and deletes its directory.  Attributes: ``port`` (TCP, on
    127.0.0.1 and, when ``has_ipv6``, ::1), ``host_names`` (the names in its
    certificate; the first is the default ``host`` in ``dsn()``), ``ca_path``
    (the server's CA file, which also issued PgBouncer's certificate),
    ``server_host`` (the name PgBouncer dials and verifies the server by),
    ``logfile`` (its output) and ``pid``.
    """

    def __init__(
        self,
        binary: str,
        base: str,
        server: PostgresServer,
        host_names: tuple[str, ...],
        server_host: str,
        has_ipv6: bool,
    ) -> None:
        self.binary = binary
        self.server = server
        self.host_names = host_names
        self.server_host = server_host
        self.ca_path = server.ca_path
        self.has_ipv6 = has_ipv6
        self.logfile = os.path.join(base, "pgbouncer.log")
        self.port = 0
        self._base = base
        self._process: subprocess.Popen[bytes] | None = None
        self._stopped = False

    @classmethod
    def start(
        cls,
        server: PostgresServer,
        names: Sequence[str] = ("pool.egress.test",),
        server_host: str | None = None,
    ) -> PgBouncer:
        """
        Configure and start PgBouncer; return when its port accepts connections.

        Its client-side certificate covers ``names`` and is issued by
        ``server.ca``.  ``server_host`` (default: the server's first
        certificate name) is the ``host=`` PgBouncer dials and checks the
        server's certificate against; a name resolves to 127.0.0.1.  Pass
        another to see verify-full refuse it.  Raises ``unittest.SkipTest``
        when the binary, its c-ares, the ``postgres`` OS user (as root) or
        port 53 for the resolver is missing, and RuntimeError, with
        PgBouncer's log, when it does not come up in time.
        """
        if isinstance(names, str) or not names:
            raise ValueError("names must be a non-empty sequence of host names")
        binary = find_pgbouncer()
        if binary is None:
            raise unittest.SkipTest(_NO_BINARY)
        backend = _resolver_backend(binary)
        if not backend.startswith(("c-ares", "evdns")):
            raise unittest.SkipTest(
                f"{binary} resolves names with {backend}, which ignores its "
                "resolv_conf setting, so it cannot reach the server by its "
                "certificate name without the machine's DNS"
            )
        owner = _server_owner()
        host = server.host_names[0] if server_host is None else server_host
        if not _is_ip_literal(host):
            LoopbackResolver.shared().add(host)
        base = tempfile.mkdtemp(prefix="egressproxy-pgbouncer-", dir="/tmp")
        bouncer = cls(binary, base, server, tuple(names), host, _ipv6_loopback_works())
        atexit.register(bouncer.stop)
        try:
            bouncer._write_files()
            if owner is not None:
                _chown_tree(base, owner.pw_uid, owner.pw_gid)
            os.chmod(base, 0o700)
            bouncer._launch()
        except BaseException:
            bouncer.stop()
            raise
        return bouncer

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def running(self) -> bool:
        """Whether the PgBouncer we started is still running (it may exit on a FATAL)."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _path(self, name: str) -> str:
        return os.path.join(self._base, name)

    def _write_files(self) -> None:
        """
        The certificate, the auth file and resolv.conf (pgbouncer.ini is
        written per start attempt, since it holds the port).
        """
        self._cert_path, self._key_path = self.server.ca.issue(
            self.host_names, self._path("tls"), "pgbouncer"
        )
        with open(self._path("userlist.txt"), "w", encoding="utf-8") as f:
            for user, secret in sorted(_scram_secrets(self.server).items()):
                f.write(_auth_line(user, secret))
        os.chmod(self._path("userlist.txt"), 0o600)
        with open(self._path("resolv.conf"), "w", encoding="utf-8") as f:
            f.write(
                "# written by tests/integration/pgbouncer.py: only its own resolver\n"
                f"nameserver {LOOPBACK}\n"
            )

    def _settings(self) -> dict[str, object]:
        return {
            "listen_addr": f"{LOOPBACK},::1" if self.has_ipv6 else LOOPBACK,
            "listen_port": self.port,
            # No unix socket: clients come over TCP, and /tmp/.s.PGSQL.<port>
            # could collide with another run.
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256",
            "auth_file": self._path("userlist.txt"),
            "pool_mode": "transaction",
            "max_client_conn": 200,
            "default_pool_size": 20,
            # JDBC and others send extra_float_digits, and providers' routing
            # parameters arrive in options; PgBouncer refuses unknown ones.
            "ignore_startup_parameters": "extra_float_digits,options",
            "client_tls_sslmode": "require",
            "client_tls_cert_file": self._cert_path,
            "client_tls_key_file": self._key_path,
            "server_tls_sslmode": "verify-full",
            "server_tls_ca_file": self.ca_path,
            "resolv_conf": self._path("resolv.conf"),
            # After a failed server login PgBouncer refuses that pool's
            # clients for this long; the default 15 s would spill one
            # test's failure into the next.
            "server_login_retry": 1,
        }

    def _write_ini(self) -> None:
        database = f"host={self.server_host} port={self.server.port}"
        lines = [
            "; written by tests/integration/pgbouncer.py\n",
            "[databases]\n",
            f"* = {_ini_value(database)}\n",
            "[pgbouncer]\n",
        ]
        lines += [f"{key} = {_ini_value(value)}\n" for key, value in self._settings().items()]
        with open(self._path("pgbouncer.ini"), "w", encoding="utf-8") as f:
            f.writelines(lines)

    def _launch(self) -> None:
        """
        Run PgBouncer on a free port, retrying with a new port if it was taken.
        """
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.port = _free_port(self.has_ipv6)
            self._write_ini()
            log_size = _size(self.logfile)
            self._process = self._spawn()
            if self._wait_listening():
                return
            self._end_process()
            log = _read_from(self.logfile, log_size)
            if "Address already in use" in log and attempt < _START_ATTEMPTS:
                continue
            raise RuntimeError(
                f"pgbouncer did not start listening on {LOOPBACK}:{self.port} "
                f"within {_START_TIMEOUT:.0f}s:\n{log}"
            )

    def _spawn(self) -> subprocess.Popen[bytes]:
        """
        Start PgBouncer in the foreground, as the server's OS user when root.
        """
        owner = _server_owner()
        ids: dict[str, object] = {}
        if owner is not None:
            # extra_groups=[] drops root's supplementary groups too.
            ids = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        with open(self.logfile, "ab") as log:
            return subprocess.Popen(
                [self.binary, self._path("pgbouncer.ini")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._base,
                env=_clean_env(),
                # Its own session: a Ctrl-C meant for trial does not reach it.
                start_new_session=True,
                **ids,  # type: ignore[arg-type]
            )

    def _wait_listening(self) -> bool:
        """
        Poll the port until it accepts, PgBouncer exits, or time runs out.
        """
        assert self._process is not None
        deadline = time.monotonic() + _START_TIMEOUT
        for _ in range(int(_START_TIMEOUT / _POLL_STEP) + 1):
            if self._process.poll() is not None:
                return False
            if _port_open(self.port):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(_POLL_STEP)
        return False

    def _end_process(self) -> None:
        """
        SIGTERM the PgBouncer we started, SIGKILL it if it outlives the bound.
        """
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(_STOP_TIMEOUT)

    def stop(self) -> None:
        """
        Stop PgBouncer and delete its directory.

        Idempotent and never raises: this also runs at exit and from cleanups,
        and PgBouncer may have died already.
        """
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        try:
            self._end_process()
        except (OSError, subprocess.SubprocessError):
            pass
        shutil.rmtree(self._base, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log(self) -> str:
        """
        What PgBouncer has logged so far (empty once stopped).
        """
        return _read_from(self.logfile, 0)

    def dsn(
        self,
        port: int | None = None,
        hostaddr: str | None = LOOPBACK,
        host: str | None = None,
        sslmode: str = "verify-full",
        dbname: str = "postgres",
        user: str = SUPERUSER,
        **extra: object,
    ) -> str:
        """
        A libpq connection string for this PgBouncer (or a proxy in front of it).

        ``PostgresServer.dsn`` builds it, so its rules hold (the password of
        ``user``, ``sslrootcert`` for verify-ca/verify-full, the
        ``connect_timeout`` and ``gssencmode`` defaults, ``extra``), but
        ``host`` defaults to PgBouncer's first name and ``port`` to its port.
        """
        return self.server.dsn(
            port=self.port if port is None else port,
            hostaddr=hostaddr,
            host=self.host_names[0] if host is None else host,
            sslmode=sslmode,
            dbname=dbname,
            user=user,
            **extra,
        )


def _is_ip_literal(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def _chown_tree(top: str, uid: int, gid: int) -> None:
    """
    Give ``top`` and everything under it to ``uid``/``gid``.
    """
    os.chown(top, uid, gid)
    for directory, subdirectories, files in os.walk(top):
        for name in subdirectories + files:
            os.chown(os.path.join(directory, name), uid, gid)
