"""The tunnel's world in network namespaces: an app, two egress Machines, a database, an API, DNS.

``test_tunnel_netns.py`` and ``test_tunnel_binary.py`` need what issue 15
describes: an app whose connection strings name the real database, two
egress Machines each running a real ``twistd -n egressproxy``, and a
database that admits only the Machines.  On one
:class:`~tests.integration.netlab.Lab` switch (``10.77.0.0/24``):

==========  ============  ====================================================
host        address       runs
==========  ============  ====================================================
``app``     .11           the tunnel and the clients (psql, pgbench, curl)
``m1/m2``   .21, .22      ``twistd -n egressproxy``: a ``socks5`` listener on
                          1080 (user ``app``, allowlist: the database and
                          ``api.egress.test:443``) and a ``tcp`` listener on
                          5432 to the database
``db``      .30           PostgreSQL (TLS for ``db.egress.test``, SCRAM,
                          ``pg_hba`` admits .21 and .22 only)
``origin``  .40           an HTTPS server for ``api.egress.test``
``dns``     .53           the lab's DNS: ``db``, ``api`` and ``evil``
                          (``.egress.test``, the last not allowlisted)
==========  ============  ====================================================

Every host's resolver asks the lab's DNS, so nothing is ever resolved
outside the lab.  The app's clients do not use the lab's answer for the
database: the tunnel's ``/etc/hosts`` lines point the names at it.

:meth:`TunnelLab.tunnel_argv` builds the app-side command: ``ip netns exec
app unshare --mount --propagation private sh -c 'mount --bind COPY
/etc/hosts && exec TUNNEL ...'``: the tunnel edits a copy of ``/etc/hosts``
bind-mounted in a private mount namespace, so the machine's own file is
never touched (and if the bind mount fails, nothing runs).

:class:`SharedLab` lets a test class build the lab once (its first test)
and close it after its last.  Every wait is bounded; every process is
started in a namespace and stopped by pid (``NetNS.close``).
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import unittest
from typing import Any, Sequence

from tests.integration.netlab import Lab
from tests.integration.netns import NetNS
from tests.integration.pgserver import PostgresServer, find_pg_bindir, role_password
from tests.tlsfixtures import TestCA

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

APP, M1, M2, DB, ORIGIN, DNS = "10.77.0.11", "10.77.0.21", "10.77.0.22", "10.77.0.30", "10.77.0.40", "10.77.0.53"
#: An address on the lab's subnet where no host is: connects to it fail.
NOWHERE = "10.77.0.99"
SOCKS_PORT, TCP_PORT = 1080, 5432
ROLE, PASSWORD_ENV, SOCKS_PASSWORD = "app", "TUNNEL_PASSWORD", "tunnel-pw-7f3a"

#: ``fast_path: false``: these tests are about the tunnel, so the Machines
#: splice on Twisted's ordinary path; the egress data paths (the fast path,
#: the compiled relay) have their own tests and must not make these flaky.
MACHINE_CONFIG = """\
fast_path: false
admin: {{listen: "127.0.0.1:9901"}}
metrics: {{listen: "127.0.0.1:9091"}}
listeners:
  - name: socks
    listen: "{address}:{socks}"
    mode: socks5
    log_prefix: SOCKS
    users: [{{name: {role}, password: "${{{password_env}}}"}}]
    allow_destinations: ["db.egress.test:{db_port}", "api.egress.test:443"]
    allow_addresses: ["10.77.0.0/24"]
  - name: pg
    listen: "{address}:{tcp}"
    cluster: pg
    log_prefix: PG
clusters:
  - name: pg
    endpoints: ["db.egress.test:{db_port}"]
    connect_timeout: 2s
    health_check: {{kind: none}}
"""


def find_psql() -> str:
    """psql's path (the server's bindir first: Debian's /usr/bin/psql is a Perl wrapper)."""
    bindir = find_pg_bindir()
    for candidate in ([os.path.join(bindir, "psql")] if bindir else []) + [shutil.which("psql") or ""]:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise unittest.SkipTest("psql not found: install Debian's postgresql-client, as .ci/run does")


class TunnelLab:
    """The lab of the module notes; build it with :meth:`create`, end it with :meth:`close`."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.lab: Lab | None = None
        self.db: PostgresServer | None = None
        self.hosts: dict[str, NetNS] = {}
        self.machines: dict[str, subprocess.Popen[bytes]] = {}
        self.ca: TestCA | None = None

    @classmethod
    def create(cls) -> "TunnelLab":
        if shutil.which("unshare") is None or shutil.which("mount") is None:
            raise unittest.SkipTest("unshare and mount (util-linux) are needed for the private /etc/hosts")
        lab = cls(tempfile.mkdtemp(prefix="egressproxy-tunnel-"))
        try:
            lab._build()
        except BaseException:
            lab.close()
            raise
        return lab

    def _build(self) -> None:
        self.lab = Lab.create()
        for name, address in (("dns", DNS), ("app", APP), ("m1", M1), ("m2", M2), ("db", DB), ("origin", ORIGIN)):
            self.hosts[name] = self.lab.host([address], nameserver=DNS)
        self.ca = TestCA.create(os.path.join(self.directory, "ca"))
        os.chmod(self.directory, 0o755)
        self._start_dns()
        self.db = PostgresServer.start(
            ("db.egress.test",), self.ca, netns=self.hosts["db"].name, listen=(DB,), hba_sources=(f"{M1}/32", f"{M2}/32")
        )
        self.db.create_role(ROLE)
        self._start_origin()
        for name, address in (("m1", M1), ("m2", M2)):
            self._start_machine(name, address)

    def _python(self, ns: NetNS, args: Sequence[str], log: str, pipe: bool = True) -> subprocess.Popen[bytes]:
        """Python with ``args`` in ``ns``: stderr (and, unless ``pipe``, stdout) to ``log`` in the lab's directory."""
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["PYTHONPATH"] = REPO
        env[PASSWORD_ENV] = SOCKS_PASSWORD
        with open(os.path.join(self.directory, log), "wb") as out:
            return ns.popen([sys.executable, *args], stdout=subprocess.PIPE if pipe else out, stderr=out,
                            stdin=subprocess.DEVNULL, env=env, cwd=REPO)

    def log(self, name: str) -> str:
        """What a lab process wrote (``m1.log``, ``dns.log``, ...), for failure messages."""
        try:
            with open(os.path.join(self.directory, name), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError as e:
            return f"(no {name}: {e})"

    def _start_dns(self) -> None:
        zone = os.path.join(self.directory, "zone.json")
        with open(zone, "w", encoding="utf-8") as f:
            json.dump({"db.egress.test": [DB], "api.egress.test": [ORIGIN], "evil.egress.test": [ORIGIN]}, f)
        process = self._python(self.hosts["dns"], ["-m", "tests.integration.dnsserver", "--zone", zone,
                                                   "--listen", f"{DNS}:53"], "dns.log")
        line = NetNS.read_line(process)
        if not line.startswith("ready"):
            raise RuntimeError(f"the lab's DNS server did not start: {line!r}")

    def _start_origin(self) -> None:
        assert self.ca is not None
        cert, key = self.ca.issue(["api.egress.test", "evil.egress.test"], os.path.join(self.directory, "origin"), "origin")
        process = self._python(self.hosts["origin"], ["-m", "tests.integration.httpsorigin", "--cert", cert, "--key", key,
                                                      "--listen", f"{ORIGIN}:443"], "origin.log")
        line = NetNS.read_line(process)
        if not line.startswith("ready"):
            raise RuntimeError(f"the HTTPS origin did not start: {line!r}")

    def _start_machine(self, name: str, address: str) -> None:
        assert self.db is not None
        config = os.path.join(self.directory, f"{name}.yaml")
        with open(config, "w", encoding="utf-8") as f:
            f.write(MACHINE_CONFIG.format(address=address, socks=SOCKS_PORT, tcp=TCP_PORT, role=ROLE,
                                          password_env=PASSWORD_ENV, db_port=self.db.port))
        ns = self.hosts[name]
        # twistd from the checkout, whose twisted/plugins/ holds the plugin (as flysim.py runs it).
        process = self._python(ns, ["-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
                                    "egressproxy", "--config", config], f"{name}.log", pipe=False)
        self.machines[name] = process
        ns.wait_for_port(address, SOCKS_PORT, timeout=30, process=process)

    # -- what tests use ------------------------------------------------------------------

    @property
    def db_port(self) -> int:
        assert self.db is not None
        return self.db.port

    def socks(self, address: str, password: str = SOCKS_PASSWORD) -> str:
        """A ``--via`` URL for a Machine's socks5 listener (the password literal, or ``${...}``)."""
        return f"socks5://{ROLE}:{password}@{address}:{SOCKS_PORT}"

    def conninfo(self, **extra: Any) -> str:
        """The app's unmodified connection string: the real name, verify-full, channel binding required."""
        assert self.ca is not None
        params = {"host": "db.egress.test", "port": self.db_port, "dbname": "postgres", "user": ROLE,
                  "password": role_password(ROLE), "sslmode": "verify-full", "sslrootcert": self.ca.ca_path,
                  "channel_binding": "require", "connect_timeout": 10, "gssencmode": "disable"}
        params.update(extra)
        return " ".join(f"{key}={value}" for key, value in params.items())

    def hosts_copy(self, extra: str = "") -> str:
        """A private copy of the machine's /etc/hosts (plus ``extra``) for one tunnel run to edit."""
        fd, path = tempfile.mkstemp(prefix="hosts-", dir=self.directory)
        os.close(fd)
        shutil.copyfile("/etc/hosts", path)
        os.chmod(path, 0o644)
        if extra:
            with open(path, "a", encoding="utf-8") as f:
                f.write(extra)
        return path

    def tunnel_argv(self, hosts: str, tunnel: Sequence[str], args: Sequence[str]) -> list[str]:
        """The app host's command: the tunnel with ``args``, in a private mount namespace over ``hosts``.

        The helpers are named by absolute path, so the command also runs
        with an environment whose PATH finds nothing (the single-file test).
        """
        tools = {name: shutil.which(name) for name in ("ip", "unshare", "sh", "mount")}
        missing = [name for name, path in tools.items() if path is None]
        if missing:
            raise unittest.SkipTest(f"{', '.join(missing)} not found on PATH (iproute2, util-linux)")
        inner = "{} --bind {} /etc/hosts && exec {}".format(
            tools["mount"], shlex.quote(hosts), " ".join(shlex.quote(word) for word in [*tunnel, *args])
        )
        return [str(tools["ip"]), "netns", "exec", self.hosts["app"].name, str(tools["unshare"]), "--mount",
                "--propagation", "private", str(tools["sh"]), "-c", inner]

    def tunnel_env(self, **extra: str) -> dict[str, str]:
        """The tunnel's environment: the checkout on PYTHONPATH, no PG*, English messages, the password secret."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and not k.lower().endswith("_proxy")}
        env.update({"PYTHONPATH": REPO, "LC_ALL": "C.UTF-8", PASSWORD_ENV: SOCKS_PASSWORD})
        env.update(extra)
        return env

    def close(self) -> None:
        for process in self.machines.values():
            NetNS.stop(process)
        if self.db is not None:
            self.db.stop()
        if self.lab is not None:
            self.lab.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class SharedLab:
    """One lab for a test class: built by its first test, closed after its last (or at exit).

    Building it (initdb, two twistd, DNS, the origin) takes seconds, so the
    tests share it; trial has no setUpClass.  A skip while building (not
    root, no PostgreSQL) is remembered and repeated for every test.
    """

    def __init__(self) -> None:
        self.lab: TunnelLab | None = None
        self.skip: str | None = None
        self.failed: str | None = None

    def get(self) -> TunnelLab:
        if self.skip is not None:
            raise unittest.SkipTest(self.skip)
        if self.failed is not None:
            raise AssertionError(f"the tunnel lab did not start (see the first test's error): {self.failed}")
        if self.lab is None:
            try:
                self.lab = TunnelLab.create()
            except unittest.SkipTest as e:
                self.skip = str(e)
                raise
            except Exception as e:
                self.failed = f"{type(e).__name__}: {e}"
                raise
            atexit.register(self.close)
        return self.lab

    def done(self, test: Any, cls: type) -> None:
        """Close the lab after the class's last test (trial runs a class's tests in name order)."""
        last = max(name for name in dir(cls) if name.startswith("test_"))
        if test._testMethodName == last:
            self.close()

    def close(self) -> None:
        lab, self.lab = self.lab, None
        if lab is not None:
            lab.close()
