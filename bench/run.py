"""
egressproxy's benchmark: one interleaved run against direct, HAProxy and socat.

    python3 bench/run.py [--quick] [--only PEER,...] [--out DIR]   (or: bash bench/run)

What this module owns: the schedule and the bookkeeping. It starts a
throwaway TLS PostgreSQL (tests/integration/pgserver.py), an iperf3 server and
an echo server on loopback, one long-lived instance of each peer in front of
them, and then runs rounds. In each round every test runs through every peer
back to back, the peer order rotating from round to round, so drift of the
machine (thermal, noisy neighbours, caches) lands on all peers alike instead
of on whichever ran last. Memory is measured on fresh instances, one per peer
per round, so a test that ran before cannot inflate or hide it. The
originate test (pgbench through a tcp and a ``tls: originate`` listener, back
to back) runs through the egressproxy peers only, which alone have that
mode. The 10,000 connection test runs last, through egressproxy alone, on
its own instance.

Each figure is the median of the rounds; results/<time>/results.json keeps
every sample, results.md has the tables (also printed at the end). Every
process started is stopped by its PID when the run ends, fails or is
interrupted. Only 127.0.0.1 is used.

See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import unittest
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, REPO_ROOT)

import memory  # noqa: E402
import peers  # noqa: E402
import provenance  # noqa: E402
import procs  # noqa: E402
import report  # noqa: E402
import workloads  # noqa: E402
from tests.integration.pgserver import PostgresServer  # noqa: E402

TRAFFIC_TESTS = ("pgbench_c1", "pgbench_c32", "pgbench_connect", "iperf3", "copy")
# ``--tests originate``: pgbench -c 8 through egressproxy's tcp listener (TLS
# end to end) and through its ``tls: originate`` listener (plaintext to the
# proxy, which dials TLS), back to back, egressproxy peers only.
ORIGINATE_PAIR = ("pgbench_c8", "pgbench_originate")
# --tests names -> internal test names.
TEST_NAMES = {
    "c1": "pgbench_c1",
    "c32": "pgbench_c32",
    "connect": "pgbench_connect",
    "iperf3": "iperf3",
    "copy": "copy",
    "originate": "pgbench_originate",
    "idle": "idle",
    "c10k": "c10k",
}
COPY_TABLE = "bench_copy"
# One COPY row is about 98 bytes of text.
COPY_ROW_BYTES = 98


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark egressproxy against direct, HAProxy and socat on loopback.",
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run (under 2 minutes)")
    parser.add_argument(
        "--only",
        default=",".join(peers.PEERS),
        help="comma-separated peers to run (direct is always added as the baseline); "
        f"default: {','.join(peers.PEERS)}",
    )
    parser.add_argument(
        "--tests",
        default=",".join(TEST_NAMES),
        help=f"comma-separated tests; default: {','.join(TEST_NAMES)}",
    )
    parser.add_argument("--out", default=os.path.join(BENCH_DIR, "results"), help="results directory (default: bench/results)")
    parser.add_argument("--render", metavar="RESULTS_JSON", help="only rewrite the markdown report of an earlier run's results.json")
    parser.add_argument("--rounds", type=int, help="rounds (default 5, quick 1)")
    parser.add_argument("--seconds", type=int, help="pgbench seconds per run (default 6, quick 2)")
    parser.add_argument("--idle-conns", type=int, help="idle connections per peer (default 2000, quick 200)")
    parser.add_argument("--c10k-conns", type=int, help="concurrent connections through egressproxy (default 10000, quick 1000)")
    parser.add_argument(
        "--fast-path",
        choices=("auto", "relay", "python", "off"),
        help="egressproxy's fast_path setting (default: not written, the proxy's own default)",
    )
    args = parser.parse_args(argv)
    chosen = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in peers.PEERS]
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(peers.PEERS)}")
    args.peers = [p for p in peers.PEERS if p in chosen or p == "direct"]
    tests = [t.strip() for t in args.tests.split(",") if t.strip()]
    unknown = [t for t in tests if t not in TEST_NAMES]
    if unknown:
        parser.error(f"unknown test(s) {', '.join(unknown)}; choose from {', '.join(TEST_NAMES)}")
    args.tests = [TEST_NAMES[t] for t in tests]
    quick = args.quick
    args.rounds = args.rounds or (1 if quick else 5)
    args.seconds = args.seconds or (2 if quick else 6)
    args.iperf3_seconds = 2 if quick else 4
    args.idle_conns = args.idle_conns or (200 if quick else 2000)
    args.c10k_conns = args.c10k_conns or (1000 if quick else 10000)
    args.copy_rows = 200_000 if quick else 2_500_000
    return args


class Run:
    """
    One benchmark run: its upstreams, peer instances, samples and output.
    """

    def __init__(self, args: argparse.Namespace, run_dir: str, supervisor: procs.Supervisor, nofile: int) -> None:
        self.args = args
        self.run_dir = run_dir
        self.supervisor = supervisor
        self.nofile = nofile
        self.started = time.monotonic()
        self.pg: PostgresServer | None = None
        self.upstreams: dict[str, int] = {}
        self.instances: dict[str, peers.Instance] = {}
        self.samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.errors: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.c10k: dict[str, Any] | None = None
        self.copy_bytes = 0
        self.select1 = os.path.join(run_dir, "select1.sql")
        self.code_root = provenance.snapshot_code(run_dir)

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {text}", flush=True)

    # -- setup ---------------------------------------------------------------

    def start_upstreams(self) -> None:
        self.say("starting PostgreSQL with TLS (tests/integration/pgserver.py)")
        self.pg = PostgresServer.start()
        with open(self.select1, "w", encoding="ascii") as f:
            f.write("SELECT 1;\n")

        echo = self.supervisor.start(
            [sys.executable, os.path.join(BENCH_DIR, "echoserver.py")],
            os.path.join(self.run_dir, "echoserver.log"),
            stdout_pipe=True,
        )
        self.upstreams["echo"] = _read_port(echo, timeout=15)
        self.upstreams["pg"] = self.pg.port

        iperf_port = peers.free_port()
        iperf = self.supervisor.start(
            ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)],
            os.path.join(self.run_dir, "iperf3-server.log"),
        )
        procs.wait_listening(iperf, [iperf_port], 15, "iperf3 server")
        self.upstreams["iperf"] = iperf_port

        if "copy" in self.args.tests:
            rows = self.args.copy_rows
            self.say(f"creating the COPY table ({rows:,} rows, about {rows * COPY_ROW_BYTES / 1e6:.0f} MB)")
            self.pg.superuser_sql(
                f"DROP TABLE IF EXISTS {COPY_TABLE};"
                f"CREATE UNLOGGED TABLE {COPY_TABLE} AS SELECT g AS id, md5(g::text) AS a, "
                f"repeat('x', 56) AS b FROM generate_series(1, {rows}) AS g;",
                timeout=600,
            )
            self.copy_bytes = workloads.count_copy_bytes(self.pg.dsn(), COPY_TABLE)

    def start_peers(self) -> None:
        for peer in self.args.peers:
            self.instances[peer] = self.start_instance(peer, f"{peer}-main")
        self.say("listening: " + ", ".join(f"{p} {dict(i.ports)}" for p, i in self.instances.items()))

    def start_instance(self, peer: str, tag: str) -> peers.Instance:
        assert self.pg is not None
        originate = (self.pg.host_names[0], self.pg.ca_path)
        return peers.start(
            peer, self.upstreams, self.supervisor, self.run_dir, tag, self.code_root, self.nofile,
            originate=originate, fast_path=self.args.fast_path,
        )

    def originate_dsn(self, instance: peers.Instance) -> str:
        """Plaintext to the proxy's originate listener; the proxy dials verified TLS."""
        assert self.pg is not None
        return self.pg.dsn(port=instance.ports[peers.ORIGINATE], sslmode="disable")

    def warm_up(self) -> None:
        """
        A short pgbench through every peer, so PostgreSQL's caches and each
        proxy's first-use allocations are not charged to the first round.
        """
        assert self.pg is not None
        for peer, instance in self.instances.items():
            try:
                workloads.pgbench(self.pg.dsn(port=instance.ports["pg"]), self.select1, 4, 2, 1, False)
                if "pgbench_originate" in self.args.tests and peers.ORIGINATE in instance.ports:
                    workloads.pgbench(self.originate_dsn(instance), self.select1, 4, 2, 1, False)
            except workloads.MeasurementError as e:
                self.error(0, "warm-up", peer, str(e))
        if "copy" in self.args.tests:
            workloads.copy_out(self.pg.dsn(), COPY_TABLE, self.copy_bytes)

    # -- measuring -------------------------------------------------------------

    def error(self, round_no: int, test: str, peer: str, text: str) -> None:
        self.errors.append({"round": round_no, "test": test, "peer": peer, "error": text})
        self.say(f"ERROR round {round_no} {test} {peer}: {text.splitlines()[0] if text else ''}")

    def record(self, test: str, peer: str, sample: dict[str, Any]) -> None:
        self.samples.setdefault(test, {}).setdefault(peer, []).append(sample)

    def our_roots(self) -> set[int]:
        """
        This process and the PostgreSQL server: whatever descends from them is ours.
        """
        roots = {os.getpid()}
        if self.pg is not None:
            try:
                with open(os.path.join(self.pg.datadir, "postmaster.pid"), encoding="ascii") as f:
                    roots.add(int(f.readline()))
            except (OSError, ValueError):
                pass
        return roots

    def foreign(
        self, sample: dict[str, Any], snapshot: dict[int, tuple[int, int, str, int]], stat_before: tuple[int, int]
    ) -> None:
        """
        Add to ``sample`` the CPU other processes took since ``snapshot``, and
        the share of the machine's CPU time the hypervisor stole since ``stat_before``.
        """
        total_before, steal_before = stat_before
        total_after, steal_after = procs.machine_cpu()
        sample["steal_share"] = (steal_after - steal_before) / (total_after - total_before) if total_after > total_before else 0.0
        by_name = procs.foreign_cpu(snapshot, procs.cpu_snapshot(), self.our_roots())
        sample["foreign_cpu_s"] = sum(by_name.values())
        top = sorted(by_name.items(), key=lambda item: -item[1])[:3]
        sample["foreign_top"] = {name: round(seconds, 2) for name, seconds in top}

    def traffic_test(self, test: str, instance: peers.Instance) -> dict[str, Any]:
        assert self.pg is not None
        port = instance.ports["iperf" if test == "iperf3" else "pg"]
        seconds = self.args.seconds
        calls: dict[str, Callable[[], dict[str, Any]]] = {
            "pgbench_c1": lambda: workloads.pgbench(self.pg.dsn(port=port), self.select1, 1, 1, seconds, False),
            "pgbench_c32": lambda: workloads.pgbench(self.pg.dsn(port=port), self.select1, 32, 2, seconds, False),
            "pgbench_connect": lambda: workloads.pgbench(self.pg.dsn(port=port), self.select1, 8, 2, seconds, True),
            "pgbench_c8": lambda: workloads.pgbench(self.pg.dsn(port=port), self.select1, 8, 2, seconds, False),
            "pgbench_originate": lambda: workloads.pgbench(self.originate_dsn(instance), self.select1, 8, 2, seconds, False),
            "iperf3": lambda: workloads.iperf3(port, self.args.iperf3_seconds),
            "copy": lambda: workloads.copy_out(self.pg.dsn(port=port), COPY_TABLE, self.copy_bytes),
        }
        snapshot = procs.cpu_snapshot()
        stat_before = procs.machine_cpu()
        cpu_before = sum(procs.tree_cpu_seconds(pid) for pid in instance.pids)
        started = time.perf_counter()
        sample = calls[test]()
        sample["wall_s"] = time.perf_counter() - started
        if instance.pids:
            sample["peer_cpu_s"] = sum(procs.tree_cpu_seconds(pid) for pid in instance.pids) - cpu_before
        self.foreign(sample, snapshot, stat_before)
        return sample

    def ensure_alive(self, peer: str, round_no: int, test: str) -> peers.Instance:
        """
        The peer's long-lived instance; restarted (and the death recorded) if it died.
        """
        instance = self.instances[peer]
        dead = [p for p in instance.procs if p.poll() is not None]
        if dead:
            self.error(round_no, test, peer, f"{peer} had exited (status {dead[0].returncode}); restarting it")
            peers.stop(instance, self.supervisor)
            instance = self.instances[peer] = self.start_instance(peer, f"{peer}-restart-r{round_no}-{test}")
        return instance

    def idle_test(self, peer: str, round_no: int) -> dict[str, Any]:
        """
        ``idle_conns`` connections held through a fresh instance; PSS per connection.
        """
        instance = self.start_instance(peer, f"{peer}-idle-r{round_no}")
        try:
            # What the proxy occupies freshly started, every worker listening
            # (the sizing table's baseline).
            rss_start = sum(memory.tree_rss_kib(pid) for pid in instance.pids)
            # A few connections first, so one-time allocations (first
            # session, first dial) are in the baseline, not charged per connection.
            workloads.held_connections(instance.ports["echo"], 10, dict)
            time.sleep(0.5)
            baseline = sum(memory.tree_pss_kib(pid) for pid in instance.pids)
            slab_baseline = memory.socket_slab_kib()

            def measure() -> dict[str, Any]:
                time.sleep(1.0)
                return {
                    "pss_held_kib": sum(memory.tree_pss_kib(pid) for pid in instance.pids),
                    "slab_held_kib": memory.socket_slab_kib(),
                }

            snapshot = procs.cpu_snapshot()
            stat_before = procs.machine_cpu()
            started = time.perf_counter()
            sample = workloads.held_connections(instance.ports["echo"], self.args.idle_conns, measure)
            sample["wall_s"] = time.perf_counter() - started
            self.foreign(sample, snapshot, stat_before)
            sample["pss_baseline_kib"] = baseline
            sample["rss_start_kib"] = rss_start
            sample["slab_baseline_kib"] = slab_baseline
            if sample["accepted"] and slab_baseline is not None and sample["slab_held_kib"] is not None:
                # Machine-wide: every socket of the test (client, proxy, echo
                # server) and whatever else ran; costs.py subtracts direct's.
                sample["slab_kib_per_conn"] = (sample["slab_held_kib"] - slab_baseline) / sample["accepted"]
            if instance.pids and sample["accepted"]:
                sample["kib_per_conn"] = (sample["pss_held_kib"] - baseline) / sample["accepted"]
            return sample
        finally:
            peers.stop(instance, self.supervisor)

    def rounds(self) -> None:
        peer_list = self.args.peers
        for r in range(1, self.args.rounds + 1):
            shift = (r - 1) % len(peer_list)
            order = peer_list[shift:] + peer_list[:shift]
            self.say(f"round {r}/{self.args.rounds}, peer order: {', '.join(order)}")
            for test in TRAFFIC_TESTS:
                if test not in self.args.tests:
                    continue
                for peer in order:
                    instance = self.ensure_alive(peer, r, test)
                    try:
                        sample = self.traffic_test(test, instance)
                    except (workloads.MeasurementError, OSError) as e:
                        self.error(r, test, peer, str(e))
                        continue
                    sample["round"] = r
                    self.record(test, peer, sample)
                    self.say(f"round {r} {test:16} {peer:12} {_brief(test, sample)}")
            if "pgbench_originate" in self.args.tests:
                self.originate_round(r, order)
            if "idle" in self.args.tests:
                for peer in order:
                    try:
                        sample = self.idle_test(peer, r)
                    except (RuntimeError, OSError) as e:
                        self.error(r, "idle", peer, str(e))
                        continue
                    sample["round"] = r
                    self.record("idle", peer, sample)
                    self.say(f"round {r} {'idle':16} {peer:12} {_brief('idle', sample)}")

    def originate_round(self, r: int, order: list[str]) -> None:
        """
        pgbench -c 8 through tcp and through originate, back to back per
        egressproxy peer; which goes first alternates from round to round.
        """
        pair = ORIGINATE_PAIR if r % 2 else ORIGINATE_PAIR[::-1]
        for peer in order:
            if peer not in peers.EGRESSPROXY_WORKERS:
                continue
            for test in pair:
                instance = self.ensure_alive(peer, r, test)
                try:
                    sample = self.traffic_test(test, instance)
                except (workloads.MeasurementError, OSError) as e:
                    self.error(r, test, peer, str(e))
                    continue
                sample["round"] = r
                self.record(test, peer, sample)
                self.say(f"round {r} {test:16} {peer:12} {_brief(test, sample)}")

    def c10k_test(self) -> None:
        """
        ``c10k_conns`` concurrent connections through a fresh egressproxy.

        All must echo; after they close, the proxy's descriptor count must
        return to what it was before (leaked sessions would keep theirs).
        """
        n = self.args.c10k_conns
        instance = self.start_instance("egressproxy", "egressproxy-c10k")
        (pid,) = instance.pids
        port = instance.ports["echo"]
        try:
            workloads.held_connections(port, 10, dict)
            time.sleep(0.5)
            # Every worker process counts: descriptors are summed over the
            # tree, and each worker has its own descriptor limit.
            workers = len(procs.process_tree(pid))
            fd_baseline = procs.tree_fd_count(pid)
            pss_baseline = memory.tree_pss_kib(pid)
            per_process_limit = procs.nofile_limit(pid)
            fd_limit = per_process_limit * workers if per_process_limit is not None else None
            fd_needed = 2 * n + fd_baseline
            self.say(f"c10k: {n:,} connections through egressproxy, {workers} worker(s) (descriptors: baseline {fd_baseline}, limit {fd_limit}, needed {fd_needed:,})")
            if fd_limit is not None and fd_limit < fd_needed:
                self.notes.append(
                    f"The proxy's descriptor limit ({fd_limit:,} over {workers} worker(s)) is below what {n:,} proxied connections need "
                    f"(2 per connection + {fd_baseline} = {fd_needed:,}); this machine's hard limit cannot be raised "
                    "(no CAP_SYS_RESOURCE), so some connections are expected to fail for want of descriptors."
                )

            def measure() -> dict[str, Any]:
                time.sleep(1.0)
                return {"fd_held": procs.tree_fd_count(pid), "pss_held_kib": memory.tree_pss_kib(pid)}

            result = workloads.held_connections(port, n, measure, concurrency=200, deadline_seconds=300)
            settle_started = time.monotonic()
            fd_after = procs.tree_fd_count(pid)
            while fd_after > fd_baseline and time.monotonic() - settle_started < 60:
                time.sleep(0.2)
                fd_after = procs.tree_fd_count(pid)
            result["fd_settle_seconds"] = time.monotonic() - settle_started
            result.update(
                fd_baseline=fd_baseline,
                fd_after=fd_after,
                fd_back_to_baseline=fd_after <= fd_baseline,
                fd_limit=fd_limit,
                fd_needed=fd_needed,
                workers=workers,
                pss_baseline_kib=pss_baseline,
                kib_per_conn=(result["pss_held_kib"] - pss_baseline) / result["accepted"] if result["accepted"] else None,
            )
            after = workloads.held_connections(port, 1, dict)
            result["serves_after"] = after["accepted"] == 1
            self.c10k = result
        finally:
            peers.stop(instance, self.supervisor)
        self.c10k["access_flags"] = _access_flags(instance.log_paths[0], "ECHO")
        self.say(
            f"c10k: {self.c10k['accepted']:,}/{n:,} served, failures {self.c10k['failures'] or 'none'}, "
            f"fds {fd_baseline} -> {self.c10k['fd_held']} -> {self.c10k['fd_after']}"
        )

    # -- output ----------------------------------------------------------------

    def results(self, machine: Mapping[str, str]) -> dict[str, Any]:
        return {
            "meta": {
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(time.time() - (time.monotonic() - self.started))),
                "duration_seconds": time.monotonic() - self.started,
                "command": " ".join(["bench/run.py", *sys.argv[1:]]),
                "peers": self.args.peers,
                "tests": self.args.tests,
                "params": {
                    "quick": self.args.quick,
                    "rounds": self.args.rounds,
                    "pgbench_seconds": self.args.seconds,
                    "iperf3_seconds": self.args.iperf3_seconds,
                    "idle_conns": self.args.idle_conns,
                    "c10k_conns": self.args.c10k_conns,
                    "copy_rows": self.args.copy_rows,
                    "copy_bytes": self.copy_bytes,
                    "fast_path": self.args.fast_path or "default",
                    "workers": {p: peers.worker_count(p) for p in self.args.peers if p in peers.EGRESSPROXY_WORKERS},
                    "nofile_limit": self.nofile,
                    "haproxy_maxconn": peers.haproxy_maxconn(self.nofile),
                },
                "machine": dict(machine),
            },
            "samples": self.samples,
            "c10k": self.c10k,
            "errors": self.errors,
            "notes": self.notes,
        }


def _brief(test: str, s: Mapping[str, Any]) -> str:
    if test.startswith("pgbench"):
        lat = f", latency {s['latency_ms']:.3f} ms" if s.get("latency_ms") is not None else ""
        return f"tps {s['tps']:,.0f}{lat}, failed {s['failed']}"
    if test == "iperf3":
        return f"{s['gbit_s']:.2f} Gbit/s"
    if test == "copy":
        return f"{s['mb_s']:.0f} MB/s ({s['seconds']:.2f} s)"
    if test == "idle":
        per = f", {s['kib_per_conn']:.1f} KiB/conn" if s.get("kib_per_conn") is not None else ""
        return f"{s['accepted']:,}/{s['target']:,} accepted, {s['alive_after_measure']:,} alive{per}, failures {s['failures'] or 'none'}"
    return ""


def _read_port(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """
    The port from the echo server's ``listening PORT`` line.
    """
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode(errors="replace") if ready else ""
    match = re.fullmatch(r"listening (\d+)\s*", line)
    if match is None:
        raise RuntimeError(f"echo server did not report its port (got {line!r})")
    return int(match.group(1))


_ACCESS_LINE = re.compile(r'^\[\S+\] (\S+) .* "([^"]*)"\s*$')


def _access_flags(log_path: str, prefix: str) -> dict[str, int]:
    """
    How many access-log lines of listener ``prefix`` carry each flag.
    """
    flags: Counter[str] = Counter()
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = _ACCESS_LINE.match(line)
                if m and m.group(1) == prefix:
                    flags[m.group(2)] += 1
    except OSError:
        pass
    return dict(flags)


def _check_tools(args: argparse.Namespace) -> None:
    needed = ["psql", "pgbench", "iperf3"]
    needed += [p for p in ("haproxy", "socat") if p in args.peers]
    missing = [t for t in needed if shutil.which(t) is None]
    if missing:
        sys.exit(f"missing: {', '.join(missing)} (bash bench/run installs them with apt-get)")


class Interrupted(BaseException):
    """SIGTERM arrived: stop everything, write what was measured, exit 143."""


def _terminate(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.render:
        with open(args.render, encoding="utf-8") as f:
            markdown = report.render(json.load(f))
        target = os.path.join(os.path.dirname(os.path.abspath(args.render)), "results.md")
        with open(target, "w", encoding="utf-8") as f:
            f.write(markdown)
        print(markdown)
        return 0
    _check_tools(args)
    nofile = procs.raise_nofile_limit()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.join(os.path.abspath(args.out), stamp)
    os.makedirs(run_dir, exist_ok=True)
    signal.signal(signal.SIGTERM, _terminate)
    supervisor = procs.Supervisor()
    run = Run(args, run_dir, supervisor, nofile)
    run.say(f"results and logs: {run_dir}")
    status = 0
    try:
        run.start_upstreams()
        run.start_peers()
        run.warm_up()
        run.rounds()
        for instance in run.instances.values():
            peers.stop(instance, supervisor)
        if "c10k" in args.tests and "egressproxy" in args.peers:
            try:
                run.c10k_test()
            except (RuntimeError, OSError) as e:
                run.error(0, "c10k", "egressproxy", str(e))
    except unittest.SkipTest as e:
        print(f"cannot start PostgreSQL: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted) as e:
        run.say("interrupted; stopping everything")
        status = 128 + (e.args[0] if isinstance(e, Interrupted) else signal.SIGINT)
    finally:
        supervisor.stop_all()
        if run.pg is not None:
            run.pg.stop()
    results = run.results(provenance.machine_info(run.pg.bindir if run.pg else None, run.code_root))
    with open(os.path.join(run_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=False)
        f.write("\n")
    markdown = report.render(results)
    with open(os.path.join(run_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    for name in ("results.json", "results.md"):
        shutil.copyfile(os.path.join(run_dir, name), os.path.join(os.path.abspath(args.out), "latest-" + name))
    print()
    print(markdown)
    run.say(f"wrote {os.path.join(run_dir, 'results.md')} and results.json")
    if (run.errors or report.failed_checks(results)) and status == 0:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
