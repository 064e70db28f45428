"""The two-Machine Fly deployment, rebuilt in network namespaces for one test module.

``test_fly_simulation.py`` needs the whole deployment at once, and nothing
short of real processes on separate hosts proves what it claims (which
address the database sees, which app the access log names, what a rolling
deploy costs).  This module owns building and driving it; the load and its
figures are ``flyload.py``'s.  On one :class:`~tests.integration.netlab.Lab`
switch (``10.77.0.0/24``):

====================  ============  ==================================================
host                  address       runs
====================  ============  ==================================================
``app1``, ``app2``    .11, .12      psql/pgbench, the consumer apps
``flyproxy``          .2            Debian's haproxy standing in for Fly's proxy:
                                    ``mode tcp``, round robin, ``send-proxy-v2``,
                                    health checks on each Machine's ``/ready``
``m1``, ``m2``        .21, .22      ``twistd -n egressproxy`` (a real process each)
``db``                .30           PostgreSQL (TLS, ``pg_hba`` admits only .21/.22)
                                    and a STUN responder reflecting the source address
====================  ============  ==================================================

Each Machine's listener takes PROXY v2 from ``10.77.0.2`` only
(``proxy_protocol_trusted``) and admits app1, not app2 (``allow_sources``),
so the proxy must read the app's address from the header to decide.  Each
also runs the egress-IP check against the db host's STUN responder, which
answers with the address it saw, as a public STUN server does.

What it does not own: assertions (the test module), pgbench (``flyload.py``)
and the stand-ins for services outside the project, haproxy and the STUN
responder (``flyparts.py``).
Every wait is bounded; every process is started by this module inside a
namespace and stopped by pid (:meth:`Machine.stop`, :meth:`NetNS.close`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from typing import Any

from tests.integration.flyparts import METRICS_PORT, PG_PORT, FlyProxy, StunReflector, find_haproxy
from tests.integration.netlab import Lab
from tests.integration.netns import NetNS
from tests.integration.pgserver import PostgresServer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Addresses on the lab's bridge (netlab.py): each exists only inside the netns the test creates.
APP1, APP2, FLYPROXY = "10.77.0.11", "10.77.0.12", "10.77.0.2"  # netns hosts
M1, M2, DB = "10.77.0.21", "10.77.0.22", "10.77.0.30"  # netns hosts
STUN_PORT = 3478
#: What README's deploy section and fly.toml recommend.
SHUTDOWN_DELAY, DRAIN_TIMEOUT = 5.0, 25.0

ACCESS_LINE = re.compile(
    r'^\[[^\]]+\] (?P<prefix>\S+) (?P<peer>\S+) (?P<upstream>\S+) (?P<received>\d+) (?P<sent>\d+) '
    r'(?P<duration>\d+) "(?P<flags>[^"]*)"'
)

MACHINE_CONFIG = """\
metrics: {{listen: "[::]:{metrics}"}}
admin: {{listen: "127.0.0.1:9901"}}
shutdown_delay: {shutdown_delay}s
drain_timeout: {drain_timeout}s
expected_egress_ips: ["{expected}"]
egress_ip_check: {{stun: ["{db}:{stun}"], interval: 1s}}
hosts:
  db.egress.test: {db}
listeners:
  - name: direct
    listen: "[::]:{pg}"
    cluster: pg
    log_prefix: DIRECT
    proxy_protocol: true
    proxy_protocol_trusted: ["{flyproxy}/32"]
    allow_sources: ["{app1}/32"]
clusters:
  - name: pg
    endpoints: ["db.egress.test:{db_port}"]
    connect_timeout: 2s
    health_check: {{kind: tcp, interval: 10s, timeout: 2s}}
"""


def http_get(ns: NetNS, host: str, port: int, path: str, timeout: float = 3.0) -> tuple[int, str]:
    """One HTTP/1.0 GET from inside ``ns``: (status, body)."""
    with ns.connect(host, port, timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        for _ in range(1000):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
    return int(head.split()[1]), body


class Machine:
    """One egressproxy Machine: a namespace host and the twistd process of its current run."""

    def __init__(self, name: str, ns: NetNS, address: str, directory: str, db_port: int) -> None:
        self.name, self.ns, self.address = name, ns, address
        self.directory, self.db_port = directory, db_port
        self.expected = address
        self.process: subprocess.Popen[bytes] | None = None
        self.outputs: list[str] = []

    def config_text(self, expected: str) -> str:
        return MACHINE_CONFIG.format(
            metrics=METRICS_PORT, shutdown_delay=int(SHUTDOWN_DELAY), drain_timeout=int(DRAIN_TIMEOUT),
            expected=expected, db=DB, stun=STUN_PORT, pg=PG_PORT, flyproxy=FLYPROXY, app1=APP1,
            db_port=self.db_port,
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, expected: str | None = None) -> float:
        """Start twistd with the egress check expecting ``expected`` (default: its own address).

        Returns the seconds until its metrics port accepted.
        """
        self.expected = self.address if expected is None else expected
        run = len(self.outputs) + 1
        config = os.path.join(self.directory, f"{self.name}-{run}.yaml")
        with open(config, "w", encoding="utf-8") as f:
            f.write(self.config_text(self.expected))
        output = os.path.join(self.directory, f"{self.name}-{run}.out")
        self.outputs.append(output)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["PYTHONPATH"] = REPO
        started = time.monotonic()
        with open(output, "wb") as out:
            # twistd from the checkout, whose twisted/plugins/ holds the plugin
            # (as test_address_guard.py and test_worker_processes.py run it).
            self.process = self.ns.popen(
                [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                 "-n", "--pidfile=", "egressproxy", "--config", config],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.directory,
            )
        try:
            # Only the metrics port: a probe of the Postgres listener would be
            # an access-log line from the Machine itself.  Every port is bound
            # before the reactor runs, so this one accepting means all do.
            self.ns.wait_for_port(self.address, METRICS_PORT, 30, self.process)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{self.name} output:\n{self.output()[-3000:]}") from None
        return time.monotonic() - started

    def send(self, sig: int) -> None:
        """Send ``sig`` to the current run, by pid."""
        assert self.process is not None
        os.kill(self.process.pid, sig)

    def wait_exit(self, timeout: float) -> int:
        """Wait for the current run to end (bounded); its exit status."""
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = SHUTDOWN_DELAY + DRAIN_TIMEOUT + 5) -> int | None:
        """Stop the current run by pid (SIGKILL after ``timeout``); its exit status."""
        if self.process is None:
            return None
        return NetNS.stop(self.process, sig, timeout)

    def output(self) -> str:
        """Everything every run printed, in order (twistd's log and the access log)."""
        text = []
        for path in self.outputs:
            with open(path, encoding="utf-8", errors="replace") as f:
                text.append(f.read())
        return "".join(text)

    def access_lines(self) -> list[re.Match[str]]:
        return [m for m in map(ACCESS_LINE.match, self.output().splitlines()) if m]


class FlySim:
    """The whole deployment; :meth:`start` builds it, :meth:`close` removes every part."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="egp-flysim-")
        self.lab: Lab | None = None
        self.db: PostgresServer | None = None
        self.stun: StunReflector | None = None
        self.machines: dict[str, Machine] = {}
        self.flyproxy: FlyProxy | None = None
        self.hosts: dict[str, NetNS] = {}

    @classmethod
    def start(cls) -> "FlySim":
        """Build it all (about 10 s); SkipTest naming what is missing, if anything is."""
        find_haproxy()
        for tool in ("psql", "pgbench"):
            if shutil.which(tool) is None:
                raise unittest.SkipTest(f"{tool} not on PATH: install Debian's postgresql-client, as .ci/run does")
        sim = cls()
        try:
            sim._build()
        except BaseException:
            sim.close()
            raise
        return sim

    def _build(self) -> None:
        self.lab = lab = Lab.create()
        # A resolver that answers nothing: no lookup may leave the lab.
        for name, address in (("app1", APP1), ("app2", APP2), ("flyproxy", FLYPROXY),
                              ("m1", M1), ("m2", M2), ("db", DB)):
            self.hosts[name] = lab.host([address], nameserver="127.0.0.1")
        db_ns = self.hosts["db"]
        self.db = PostgresServer.start(netns=db_ns.name, listen=[DB], hba_sources=[f"{M1}/32", f"{M2}/32"])
        self.stun = StunReflector(db_ns, DB, STUN_PORT)
        for name, address in (("m1", M1), ("m2", M2)):
            self.machines[name] = Machine(name, self.hosts[name], address, self.directory, self.db.port)
            self.machines[name].start()
        self.flyproxy = FlyProxy(self.hosts["flyproxy"], self.directory, FLYPROXY, {"m1": M1, "m2": M2})
        self.flyproxy.start()
        for name in self.machines:
            self.flyproxy.wait_status(name, up=True, timeout=30)

    def ensure_baseline(self) -> None:
        """Both Machines running with their own address expected, and UP in haproxy."""
        assert self.flyproxy is not None
        for name, machine in self.machines.items():
            if machine.running and machine.expected != machine.address:
                machine.stop(signal.SIGKILL)
            if not machine.running:
                machine.start()
        for name in self.machines:
            self.flyproxy.wait_status(name, up=True, timeout=30)

    def close(self) -> None:
        """Stop everything by pid, the database first, then remove the lab.  Idempotent."""
        for machine in self.machines.values():
            try:
                machine.stop(signal.SIGKILL, 5)
            except (OSError, subprocess.SubprocessError):
                pass
        if self.stun is not None:
            self.stun.close()
            self.stun = None
        if self.db is not None:
            self.db.stop()
            self.db = None
        if self.lab is not None:
            self.lab.close()
            self.lab = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def describe(self) -> dict[str, Any]:
        """What the test log prints before the scenarios."""
        return {name: ns.name for name, ns in self.hosts.items()}
