"""
The peers compared: no proxy, egressproxy (one worker per CPU, and one
worker), HAProxy and socat.

What this module owns: each peer's configuration and how to start one
instance of it on loopback in front of the benchmark's upstreams (the TLS
PostgreSQL, the iperf3 server and the echo server), one listening port per
upstream. It does not measure anything and does not decide the order of the
runs (run.py does).

The configurations are what an operator would write for a TCP forward, with
the limits raised so that no peer refuses the test load by its own cap:
HAProxy's ``maxconn`` (sized to the descriptor limit, since HAProxy refuses to
start when it cannot reserve two descriptors per connection), egressproxy's
per-listener ``max_connections`` (and ``max_connections_per_source``: every
benchmark client is 127.0.0.1) and per-cluster circuit breaker
(``max_connections``, ``max_pending``; the defaults, 1024 and 128, would
refuse parts of the 2,000 and 10,000 connection tests by design), and socat's
listen backlog (5 by default). HAProxy runs its default of one thread per
CPU, and ``egressproxy`` the same with ``workers: auto``; ``egressproxy-1w``
is a single worker, as on a one-vCPU Fly Machine (where ``auto`` is 1 too).

egressproxy instances get one more port when the caller passes
``originate``: a ``mode: postgres`` listener with ``tls: originate`` in front
of the same PostgreSQL, for clients in plaintext (``sslmode=disable``), the
proxy dialling verified TLS itself (``server_name`` and ``ca_file`` of the
bench CA). The other peers have no such mode, so they get no such port.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from procs import Supervisor, wait_listening

PEERS = ("direct", "egressproxy", "egressproxy-1w", "haproxy", "socat")

#: ``workers`` for each egressproxy peer: one per CPU (as HAProxy's default
#: threads), and a single worker (what a one-vCPU Fly Machine runs).
EGRESSPROXY_WORKERS = {"egressproxy": "auto", "egressproxy-1w": "1"}

# The upstreams every instance forwards to, by the key used for its ports.
UPSTREAMS = ("pg", "iperf", "echo")

#: The port key of egressproxy's ``tls: originate`` listener (to the "pg" upstream).
ORIGINATE = "pg_originate"

#: egressproxy's log line for each listener each worker binds, whatever its mode.
_LISTENING = re.compile(r"listener \S+ \(\w+\) listening on ")

_START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Instance:
    """
    One running peer: the port in front of each upstream and its processes.

    ``pids`` is empty for ``direct`` (the ports are the upstreams' own);
    ``procs`` are what the supervisor stops.
    """

    peer: str
    ports: Mapping[str, int]
    procs: tuple[subprocess.Popen[bytes], ...]
    log_paths: tuple[str, ...]

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self.procs)


def free_port() -> int:
    """
    A TCP port free on 127.0.0.1 right now (racy; a failed start says so).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def haproxy_maxconn(nofile: int) -> int:
    """
    HAProxy's global maxconn: 20,000, or what the descriptor limit allows.
    """
    return max(100, min(20000, (nofile - 200) // 2))


def egressproxy_config(
    ports: Mapping[str, int],
    upstreams: Mapping[str, int],
    workers: str = "1",
    originate: tuple[str, str] | None = None,
    fast_path: str | None = None,
) -> str:
    """
    egressproxy's YAML: a tcp listener per upstream, and with ``originate``
    (the database's TLS server name and the CA file) a Postgres originate
    listener on ``ports[ORIGINATE]``. ``fast_path`` is written only when
    given; otherwise the proxy's default data path runs.
    """
    listeners = []
    clusters = []
    for name in UPSTREAMS:
        listeners.append(
            f"  - name: {name}\n"
            f'    listen: "127.0.0.1:{ports[name]}"\n'
            f"    cluster: {name}\n"
            f"    max_connections: 20000\n"
            # Every benchmark client is 127.0.0.1: one source must be allowed the lot.
            f"    max_connections_per_source: 20000\n"
        )
        clusters.append(
            f"  - name: {name}\n"
            f'    endpoints: ["127.0.0.1:{upstreams[name]}"]\n'
            f"    health_check: false\n"
            f"    max_connections: 20000\n"
            f"    max_pending: 1024\n"
        )
    if originate is not None:
        server_name, ca_file = originate
        listeners.append(
            f"  - name: {ORIGINATE}\n"
            f'    listen: "127.0.0.1:{ports[ORIGINATE]}"\n'
            f"    mode: postgres\n"
            f"    tls: originate\n"
            f"    cluster: pg_tls\n"
            f"    max_connections: 20000\n"
            f"    max_connections_per_source: 20000\n"
        )
        clusters.append(
            f"  - name: pg_tls\n"
            f'    endpoints: ["127.0.0.1:{upstreams["pg"]}"]\n'
            f"    tls: {{server_name: {server_name}, ca_file: {json.dumps(ca_file)}}}\n"
            f"    health_check: false\n"
            f"    max_connections: 20000\n"
            f"    max_pending: 1024\n"
        )
    return (
        "# written by bench/peers.py\n"
        "admin: false\n"
        "metrics: false\n"
        "drain_timeout: 2s\n"
        f"workers: {workers}\n"
        + (f"fast_path: {fast_path}\n" if fast_path else "")
        + "listeners:\n" + "".join(listeners) + "clusters:\n" + "".join(clusters)
    )


def haproxy_config(ports: Mapping[str, int], upstreams: Mapping[str, int], maxconn: int) -> str:
    sections = []
    for name in UPSTREAMS:
        sections.append(
            f"frontend fe_{name}\n"
            f"    bind 127.0.0.1:{ports[name]}\n"
            f"    default_backend be_{name}\n"
            f"\n"
            f"backend be_{name}\n"
            f"    server {name} 127.0.0.1:{upstreams[name]}\n"
            f"\n"
        )
    return (
        "# written by bench/peers.py\n"
        "global\n"
        f"    maxconn {maxconn}\n"
        "\n"
        "defaults\n"
        "    mode tcp\n"
        f"    maxconn {maxconn}\n"
        "    timeout connect 5s\n"
        "    timeout client 1h\n"
        "    timeout server 1h\n"
        "\n" + "".join(sections)
    )


def twistd_argv(config_path: str) -> list[str]:
    """
    twistd from the running Python's environment, for egressproxy's plugin.
    """
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(twistd, os.X_OK):
        head = [twistd]
    else:
        head = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]
    return [*head, "-n", "--pidfile=", "egressproxy", "--config", config_path]


def start(
    peer: str,
    upstreams: Mapping[str, int],
    supervisor: Supervisor,
    workdir: str,
    tag: str,
    code_root: str,
    nofile: int,
    originate: tuple[str, str] | None = None,
    fast_path: str | None = None,
) -> Instance:
    """
    Start one instance of ``peer``; return once every port listens.

    ``tag`` names its config and log files in ``workdir`` (instances are
    started more than once: fresh ones for the memory tests). egressproxy
    runs from ``code_root`` (put first on PYTHONPATH), whatever the Python
    environment has installed; ``originate`` and ``fast_path`` are passed
    to its config (see ``egressproxy_config``) and ignored for other peers.
    """
    if peer == "direct":
        return Instance(peer, dict(upstreams), (), ())
    ports = {name: free_port() for name in UPSTREAMS}
    log_path = os.path.join(workdir, f"{tag}.log")
    procs: list[subprocess.Popen[bytes]] = []
    listens: list[list[int]] = []  # the ports each process in procs binds
    if peer in EGRESSPROXY_WORKERS:
        if originate is not None:
            ports[ORIGINATE] = free_port()
        config_path = os.path.join(workdir, f"{tag}.yaml")
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(egressproxy_config(ports, upstreams, EGRESSPROXY_WORKERS[peer], originate, fast_path))
        env = dict(os.environ)
        env["PYTHONPATH"] = code_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        procs.append(supervisor.start(twistd_argv(config_path), log_path, env=env))
        listens.append(list(ports.values()))
    elif peer == "haproxy":
        config_path = os.path.join(workdir, f"{tag}.cfg")
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(haproxy_config(ports, upstreams, haproxy_maxconn(nofile)))
        procs.append(supervisor.start(["haproxy", "-f", config_path, "-db"], log_path))
        listens.append(list(ports.values()))
    elif peer == "socat":
        for name in UPSTREAMS:
            argv = [
                "socat",
                f"TCP-LISTEN:{ports[name]},fork,reuseaddr,bind=127.0.0.1,backlog=1024",
                f"TCP:127.0.0.1:{upstreams[name]}",
            ]
            procs.append(supervisor.start(argv, log_path))
            listens.append([ports[name]])
    else:
        raise ValueError(f"unknown peer {peer!r}")
    instance = Instance(peer, ports, tuple(procs), (log_path,))
    try:
        for proc, bound in zip(procs, listens):
            wait_listening(proc, bound, _START_TIMEOUT, peer)
        if peer in EGRESSPROXY_WORKERS:
            # The main worker listens first; wait for every worker's listeners,
            # or the first connections would all land on the main worker.
            _wait_for_log(log_path, len(ports) * worker_count(peer), procs[0], peer)
    except BaseException:
        stop(instance, supervisor)
        raise
    return instance


def worker_count(peer: str) -> int:
    """The worker processes an egressproxy peer runs here (``auto``: one per CPU we may use)."""
    workers = EGRESSPROXY_WORKERS[peer]
    return len(os.sched_getaffinity(0)) if workers == "auto" else int(workers)


def _wait_for_log(path: str, count: int, proc: subprocess.Popen[bytes], what: str) -> None:
    """Wait until ``count`` listener-bound lines are in the log at ``path``."""
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} while starting its workers")
        with open(path, encoding="utf-8", errors="replace") as f:
            if len(_LISTENING.findall(f.read())) >= count:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what}: {count} listeners were not up after {_START_TIMEOUT:.0f}s (see {path})")


def stop(instance: Instance, supervisor: Supervisor) -> None:
    for proc in instance.procs:
        supervisor.stop(proc)
