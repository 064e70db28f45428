"""The two stand-ins the Fly simulation puts around the Machines: Fly's proxy and a STUN server.

``flysim.py`` assembles the deployment; what here stands in for a service
outside this project lives here, each with one job:

- :class:`FlyProxy`: Debian's haproxy in the ``flyproxy`` namespace, in the
  foreground (``-db``), as Fly's proxy: ``mode tcp``, round robin over the
  Machines' Postgres listeners, ``send-proxy-v2`` toward them, health checks
  on each Machine's ``/ready`` (metrics port), ``option redispatch 1`` and
  ``retries 3``.  Its stats socket tells the tests what haproxy thinks of
  each Machine (``UP``/``DOWN``) and how often it retried.
- :class:`StunReflector`: a STUN Binding responder that answers with the
  address it saw, as a public STUN server reports a NAT's outside address.

Also :func:`wait_for`, the bounded poll every wait in the simulation uses.
Processes are started inside a namespace and stopped by pid.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import subprocess
import threading
import time
import unittest
from typing import Callable

from tests.integration.netns import NetNS

PG_PORT, METRICS_PORT = 5432, 9091
#: haproxy's health check: every CHECK_INTER s, FALL failures mark a Machine down.
CHECK_INTER, FALL, RISE = 0.5, 2, 2

HAPROXY_CONFIG = """\
global
    maxconn 2000
    stats socket {socket} mode 600 level admin
    log stdout format raw local0

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 1s
    retries 3
    option redispatch 1

frontend flycast
    bind {address}:{pg}
    default_backend machines

backend machines
    balance roundrobin
    option httpchk GET /ready
    http-check expect status 200
    default-server check port {metrics} inter {inter}ms fall {fall} rise {rise} send-proxy-v2
{servers}"""


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> float:
    """Poll ``predicate`` until true, at most ``timeout`` s; the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic() - started
        time.sleep(step)
    if predicate():
        return time.monotonic() - started
    raise AssertionError(f"{what} not within {timeout}s")


def find_haproxy() -> str:
    """haproxy's path, or SkipTest saying how to get it (/usr/sbin is often off PATH)."""
    for candidate in (shutil.which("haproxy"), "/usr/sbin/haproxy"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise unittest.SkipTest("haproxy not found on PATH nor at /usr/sbin/haproxy: apt-get install haproxy, as .ci/run does")


class FlyProxy:
    """haproxy in the ``flyproxy`` namespace, in the foreground, with an admin stats socket."""

    def __init__(self, ns: NetNS, directory: str, address: str, machines: dict[str, str]) -> None:
        """haproxy will listen on ``address`` and balance over ``machines`` (name -> address)."""
        self.ns, self.directory = ns, directory
        self.address, self.machines = address, machines
        self.socket_path = os.path.join(directory, "haproxy.sock")
        self.log_path = os.path.join(directory, "haproxy.log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = find_haproxy()
        config = os.path.join(self.directory, "haproxy.cfg")
        with open(config, "w", encoding="utf-8") as f:
            f.write(HAPROXY_CONFIG.format(
                socket=self.socket_path, address=self.address, pg=PG_PORT, metrics=METRICS_PORT,
                inter=int(CHECK_INTER * 1000), fall=FALL, rise=RISE,
                servers="".join(f"    server {name} {ip}:{PG_PORT}\n" for name, ip in self.machines.items()),
            ))
        checked = subprocess.run([binary, "-c", "-f", config], capture_output=True, text=True, timeout=30)
        if checked.returncode != 0:
            raise RuntimeError(f"haproxy -c refused the config:\n{checked.stdout}{checked.stderr}")
        with open(self.log_path, "wb") as out:
            self.process = self.ns.popen([binary, "-db", "-f", config], stdout=out, stderr=subprocess.STDOUT)
        # Ready once its stats socket answers (it binds before serving); a
        # probe of the frontend would be a client connection to a Machine.
        wait_for(self._answers, 20, "haproxy's stats socket", step=0.1)

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"haproxy exited with {self.process.returncode}:\n{self.log()[-2000:]}")
        try:
            return set(self.machines) <= set(self.stats())
        except OSError:
            return False

    def stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` over the stats socket: the machines backend's rows by server name."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(3)
            sock.connect(self.socket_path)
            sock.sendall(b"show stat\n")
            data = b""
            for _ in range(1000):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {row["svname"]: row for row in rows if row.get("pxname") == "machines"}

    def counters(self) -> dict[str, int]:
        """The backend's connect errors, retries and redispatches so far (haproxy's econ, wretr, wredis)."""
        row = self.stats()["BACKEND"]
        return {key: int(row[key] or 0) for key in ("econ", "wretr", "wredis")}

    def status(self, server: str) -> str:
        """``UP``, ``DOWN``, ``UP 1/2`` ... as haproxy sees ``server`` now."""
        return self.stats()[server]["status"]

    def wait_status(self, server: str, up: bool, timeout: float) -> float:
        """Wait until haproxy calls ``server`` fully UP (or DOWN); the seconds it took."""
        want = "UP" if up else "DOWN"
        return wait_for(lambda: self.status(server) == want, timeout, f"haproxy marking {server} {want}")

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


class StunReflector:
    """A STUN Binding responder in the db namespace that answers with the address it saw.

    A public STUN server reports the NAT's outside address; here the
    Machines reach the db host directly, so the address seen is the
    Machine's own.  A thread serves a socket made inside the namespace until
    :meth:`close` (or 15 minutes, so a forgotten one still ends).
    """

    def __init__(self, ns: NetNS, host: str, port: int) -> None:
        from aioice import stun  # the STUN codec egressproxy itself uses

        self._stun = stun
        self.sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.settimeout(0.2)
        self.answered: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="stun-reflector", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        stun = self._stun
        deadline = time.monotonic() + 900
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                data, peer = self.sock.recvfrom(2048)
            except OSError:
                continue
            try:
                request = stun.parse_message(data)
            except ValueError:
                continue
            reply = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, request.transaction_id,
                                 {"XOR-MAPPED-ADDRESS": (peer[0], peer[1])})
            self.sock.sendto(bytes(reply), peer)
            self.answered[peer[0]] = self.answered.get(peer[0], 0) + 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
