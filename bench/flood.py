"""
One source floods the proxy with idle connections; do the others notice?

What it measures (issue 11's figures): a real ``twistd egressproxy`` with an
``http_connect`` listener (``max_connections: 200``), a ``tcp`` listener in
front of a real PostgreSQL (SCRAM over TLS) and its metrics service. The
flooder, bound to source 127.0.0.2, opens ``--idle`` connections to the
metrics port and ``--idle`` to the http_connect listener and never sends a
byte (what it loses it opens again, for the whole measurement). Meanwhile
the honest client, from 127.0.0.1, makes CONNECT requests through the proxy
to an echo origin and psql sessions through the tcp listener. Reported:
successes and latency (median, p95) for both, before and during the flood,
and the proxy's open descriptors before, during and after.

Run it twice to see what the caps do: as it is (the defaults:
``max_connections_per_source`` half of ``max_connections``, capped HTTP
services), and with ``--no-source-cap`` (``max_connections_per_source``
equal to ``max_connections``, as before it existed).

    .venv/bin/python bench/flood.py [--idle 5000] [--requests 200] [--no-source-cap]

Loopback only; every loop is bounded in count and time; it stops what it
started, by PID.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from bench.procs import Supervisor, fd_count, raise_nofile_limit, wait_listening  # noqa: E402
from tests.integration.pgserver import PostgresServer, SUPERUSER_PASSWORD  # noqa: E402

FLOOD_SOURCE = "127.0.0.2"
HONEST_SOURCE = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(ports: dict[str, int], origin: int, server: PostgresServer, source_cap: bool) -> str:
    cap = "" if source_cap else "\n    max_connections_per_source: 200"
    return f"""
admin: {{listen: "127.0.0.1:{ports['admin']}"}}
metrics: {{listen: "127.0.0.1:{ports['metrics']}"}}
hosts: {{"origin.egress.test": "127.0.0.1", "db.egress.test": "127.0.0.1"}}
listeners:
  - name: fwd
    listen: "127.0.0.1:{ports['fwd']}"
    mode: http_connect
    max_connections: 200{cap}
    allow_destinations: ["origin.egress.test:{origin}"]
  - name: pg
    listen: "127.0.0.1:{ports['pg']}"
    mode: tcp
    cluster: pg
clusters:
  - name: pg
    endpoints: ["db.egress.test:{server.port}"]
    health_check: {{kind: none}}
"""


class Flood:
    """Idle connections from one source, kept open (and reopened) up to a target count."""

    def __init__(self, target: int, ports: list[int]) -> None:
        self.target = target
        self.ports = ports
        self.sockets: dict[int, list[socket.socket]] = {port: [] for port in ports}
        self.refused = 0

    def top_up(self, seconds: float) -> None:
        """Open connections until each port has ``target`` open ones, or ``seconds`` pass."""
        deadline = time.monotonic() + seconds
        for port in self.ports:
            held = self.sockets[port]
            held[:] = [s for s in held if not _closed(s)]
            for _ in range(self.target - len(held)):
                if time.monotonic() > deadline:
                    return
                s = socket.socket()
                s.setblocking(True)
                s.settimeout(1.0)
                try:
                    s.bind((FLOOD_SOURCE, 0))
                    s.connect(("127.0.0.1", port))
                except OSError:
                    self.refused += 1
                    s.close()
                    continue
                s.setblocking(False)
                held.append(s)

    def open_counts(self) -> dict[int, int]:
        return {port: sum(1 for s in held if not _closed(s)) for port, held in self.sockets.items()}

    def close(self) -> None:
        for held in self.sockets.values():
            for s in held:
                s.close()
            held.clear()


def _closed(s: socket.socket) -> bool:
    """Whether the peer closed ``s``: its answer (a 503, say) is read and dropped, then EOF or reset."""
    for _ in range(16):
        try:
            data = s.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if not data:
            return True
    return False


def connect_once(port: int, origin: int) -> float | None:
    """One CONNECT through the proxy and a ping through the tunnel; seconds, or None on failure."""
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(HONEST_SOURCE, 0)) as s:
            s.sendall(f"CONNECT origin.egress.test:{origin} HTTP/1.1\r\nHost: origin.egress.test:{origin}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    return None
                head += chunk
            if not head.startswith(b"HTTP/1.1 200"):
                return None
            s.sendall(b"ping")
            if s.recv(16) != b"ping":
                return None
    except OSError:
        return None
    return time.monotonic() - started


def psql_once(port: int, server: PostgresServer) -> float | None:
    dsn = server.dsn(port=port)
    started = time.monotonic()
    try:
        result = subprocess.run(["psql", "-X", "-A", "-t", "-d", dsn, "-c", "select 1"], capture_output=True,
                                text=True, timeout=15, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PGPASSWORD": SUPERUSER_PASSWORD})
    except subprocess.TimeoutExpired:
        return None
    if result.returncode != 0 or result.stdout.strip() != "1":
        return None
    return time.monotonic() - started


def measure(label: str, ports: dict[str, int], origin: int, server: PostgresServer, requests: int,
            flood: Flood | None) -> dict[str, object]:
    connects: list[float] = []
    failures = 0
    for i in range(requests):
        if flood is not None and i % 50 == 0:
            flood.top_up(2.0)
        took = connect_once(ports["fwd"], origin)
        if took is None:
            failures += 1
        else:
            connects.append(took)
    sessions: list[float] = []
    psql_failures = 0
    for _ in range(max(1, requests // 10)):
        took = psql_once(ports["pg"], server)
        if took is None:
            psql_failures += 1
        else:
            sessions.append(took)
    return {
        "label": label,
        "connect_ok": len(connects), "connect_failed": failures,
        "connect_median_ms": _ms(statistics.median(connects)) if connects else None,
        "connect_p95_ms": _ms(_p95(connects)) if connects else None,
        "psql_ok": len(sessions), "psql_failed": psql_failures,
        "psql_median_ms": _ms(statistics.median(sessions)) if sessions else None,
    }


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=5000, help="idle connections per flooded port (default 5000)")
    parser.add_argument("--requests", type=int, default=200, help="honest CONNECTs per phase (default 200)")
    parser.add_argument("--no-source-cap", action="store_true", help="max_connections_per_source = max_connections")
    args = parser.parse_args()
    raise_nofile_limit()
    work = tempfile.mkdtemp(prefix="egressproxy-flood-")
    supervisor = Supervisor()
    server = PostgresServer.start()
    flood: Flood | None = None
    try:
        origin_proc = supervisor.start([sys.executable, os.path.join(REPO_ROOT, "bench", "echoserver.py")],
                                       os.path.join(work, "origin.log"), stdout_pipe=True)
        assert origin_proc.stdout is not None
        origin = int(origin_proc.stdout.readline().split()[1])
        ports = {name: free_port() for name in ("fwd", "pg", "admin", "metrics")}
        path = os.path.join(work, "egressproxy.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(config(ports, origin, server, not args.no_source_cap))
        proxy = supervisor.start(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "egressproxy",
             "--config", path],
            os.path.join(work, "proxy.log"), env={**os.environ, "PYTHONPATH": REPO_ROOT},
        )
        wait_listening(proxy, list(ports.values()), 30, "egressproxy")
        fds = {"before": fd_count(proxy.pid)}
        results = [measure("before the flood", ports, origin, server, args.requests, None)]
        flood = Flood(args.idle, [ports["metrics"], ports["fwd"]])
        flood.top_up(60.0)
        time.sleep(1.0)
        fds["flooded"] = fd_count(proxy.pid)
        held = flood.open_counts()
        results.append(measure("during the flood", ports, origin, server, args.requests, flood))
        held_after = flood.open_counts()
        fds["during"] = fd_count(proxy.pid)
        flood.close()
        time.sleep(2.0)
        fds["after"] = fd_count(proxy.pid)
        print(f"flood from {FLOOD_SOURCE}: {args.idle} idle connections per port; "
              f"held open at start: metrics {held[ports['metrics']]}, listener {held[ports['fwd']]}; "
              f"at the end: metrics {held_after[ports['metrics']]}, listener {held_after[ports['fwd']]}; "
              f"connects refused outright: {flood.refused}")
        print(f"source cap: {'off (max_connections_per_source: 200)' if args.no_source_cap else 'default (100)'}")
        print(f"proxy descriptors: {fds}")
        for row in results:
            print(row)
        return 0
    finally:
        if flood is not None:
            flood.close()
        supervisor.stop_all()
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
