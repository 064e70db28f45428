"""The benchmark's arithmetic: per-unit costs, the originate ratio and the Fly sizing table.

bench/ is a directory of scripts, not a package, so its modules are imported
by putting it on ``sys.path`` (at the end, so nothing else is shadowed).
These tests feed hand-made samples of the shape ``bench/run.py`` records
and check the figures against sums done by hand, so a change to a formula
or to a sample key shows up here rather than as a silently wrong table. The
generated egressproxy config is checked with the proxy's own parser, so a
renamed key cannot leave the benchmark measuring a listener that never
starts. Nothing here measures, starts a process or touches the network.
"""

from __future__ import annotations

import os
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from egressproxy.config.load import parse_config

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
if BENCH not in sys.path:
    sys.path.append(BENCH)

import costs  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import sizing  # noqa: E402


def pgbench(round_no: int, tps: float, transactions: int, cpu: float | None) -> dict:
    sample = {"round": round_no, "tps": tps, "transactions": transactions, "failed": 0, "wall_s": 6.0}
    if cpu is not None:
        sample["peer_cpu_s"] = cpu
    return sample


def idle(round_no: int, kib: float | None, slab_per_conn: float, rss_kib: int) -> dict:
    sample = {
        "round": round_no, "target": 1000, "accepted": 1000, "alive_after_measure": 1000, "failures": {},
        "slab_kib_per_conn": slab_per_conn, "rss_start_kib": rss_kib,
    }
    if kib is not None:
        sample["kib_per_conn"] = kib
    return sample


def sample_set() -> dict:
    """Three rounds for direct, one- and two-worker egressproxy and HAProxy."""
    return {
        "pgbench_c32": {
            "direct": [pgbench(r, 50_000, 300_000, None) for r in (1, 2, 3)],
            # 2.0 s / 100,000 = 20 µs; 1.5 s / 100,000 = 15 µs; 3.0 s / 100,000 = 30 µs: median 20.
            "egressproxy-1w": [pgbench(1, 30_000, 100_000, 2.0), pgbench(2, 30_000, 100_000, 1.5), pgbench(3, 30_000, 100_000, 3.0)],
            "egressproxy": [pgbench(r, 32_000, 200_000, 3.2) for r in (1, 2, 3)],  # 16 µs
            "haproxy": [pgbench(r, 33_000, 200_000, 3.6) for r in (1, 2, 3)],  # 18 µs
        },
        "pgbench_c1": {
            # One client: 2.5 s / 100,000 = 25 µs a transaction, against 16 with 32 clients.
            "egressproxy": [pgbench(r, 16_000, 100_000, 2.5) for r in (1, 2, 3)],
            "egressproxy-1w": [pgbench(r, 16_000, 100_000, 2.5) for r in (1, 2, 3)],
        },
        "pgbench_connect": {
            "egressproxy-1w": [pgbench(r, 150, 1000, 1.0) for r in (1, 2, 3)],  # 1,000 µs
            "egressproxy": [pgbench(r, 150, 1000, 1.2) for r in (1, 2, 3)],  # 1,200 µs
            "haproxy": [pgbench(r, 160, 1000, 0.5) for r in (1, 2, 3)],  # 500 µs
        },
        "pgbench_c8": {
            "egressproxy": [pgbench(1, 20_000, 120_000, 2.4), pgbench(2, 22_000, 132_000, 2.6)],
        },
        "pgbench_originate": {
            "egressproxy": [pgbench(1, 10_000, 60_000, 4.8), pgbench(2, 13_200, 79_200, 5.0)],
        },
        "idle": {
            "direct": [idle(r, None, 8.0, 0) for r in (1, 2, 3)],
            "egressproxy-1w": [idle(r, 6.0, 15.0, 60 * 1024) for r in (1, 2, 3)],
            "egressproxy": [idle(r, 5.0, 14.0, 120 * 1024) for r in (1, 2, 3)],
            "haproxy": [idle(1, 3.5, 14.5, 15 * 1024), idle(2, 3.5, 7.0, 15 * 1024), idle(3, 3.5, 14.5, 15 * 1024)],
        },
    }


def results(samples: dict, workers: dict | None = None) -> dict:
    peer_list = ["direct", "egressproxy", "egressproxy-1w", "haproxy"]
    return {
        "meta": {
            "started": "now", "duration_seconds": 60.0, "command": "bench/run.py", "peers": peer_list,
            "tests": ["pgbench_c32", "pgbench_connect", "pgbench_originate", "idle"],
            "params": {
                "quick": False, "rounds": 3, "pgbench_seconds": 6, "iperf3_seconds": 4, "idle_conns": 1000,
                "c10k_conns": 10000, "copy_rows": 0, "copy_bytes": 0, "nofile_limit": 1 << 20, "haproxy_maxconn": 20000,
                "fast_path": "default",
                "workers": {"egressproxy": 2, "egressproxy-1w": 1} if workers is None else workers,
            },
            "machine": {"cpus": "2"},
        },
        "samples": samples,
        "c10k": None,
        "errors": [],
        "notes": [],
    }


class CostTests(SynchronousTestCase):
    """costs.py: each figure is the median of per-round quotients."""

    def test_cpu_per_transaction_is_the_median_of_each_rounds_quotient(self) -> None:
        samples = sample_set()
        self.assertAlmostEqual(costs.cpu_us_per_unit(samples, "pgbench_c32", "egressproxy-1w"), 20.0)
        self.assertAlmostEqual(costs.cpu_us_per_unit(samples, "pgbench_connect", "haproxy"), 500.0)

    def test_no_cpu_figure_without_processes_or_transactions(self) -> None:
        samples = sample_set()
        self.assertIsNone(costs.cpu_us_per_unit(samples, "pgbench_c32", "direct"))
        samples["pgbench_c32"]["haproxy"] = [dict(pgbench(1, 0, 0, 1.0), transactions=None)]
        self.assertIsNone(costs.cpu_us_per_unit(samples, "pgbench_c32", "haproxy"))
        samples["pgbench_c32"]["socat"] = [pgbench(1, 100, 1000, 0.0)]
        self.assertIsNone(costs.cpu_us_per_unit(samples, "pgbench_c32", "socat"))
        self.assertIsNone(costs.cpu_us_per_unit(samples, "pgbench_c1", "haproxy"))

    def test_kernel_memory_is_the_slab_growth_beyond_directs(self) -> None:
        samples = sample_set()
        self.assertAlmostEqual(costs.kernel_kib(samples, "egressproxy-1w"), 7.0)
        # HAProxy's rounds: 14.5, 7.0, 14.5 -> median 14.5, less direct's 8.0.
        self.assertAlmostEqual(costs.kernel_kib(samples, "haproxy"), 6.5)
        self.assertIsNone(costs.kernel_kib(samples, "direct"))

    def test_kernel_memory_below_directs_is_noise_and_reads_zero(self) -> None:
        samples = sample_set()
        samples["idle"]["haproxy"] = [idle(1, 3.5, 6.0, 1)]
        self.assertEqual(costs.kernel_kib(samples, "haproxy"), 0.0)
        del samples["idle"]["direct"]
        self.assertIsNone(costs.kernel_kib(samples, "egressproxy"))

    def test_per_unit_collects_every_figure(self) -> None:
        figures = costs.per_unit(sample_set(), "egressproxy")
        self.assertEqual(
            {k: round(v, 3) for k, v in figures.items()},
            {"us_per_txn": 16.0, "us_per_txn_c1": 25.0, "us_per_conn": 1200.0, "kib_per_conn": 5.0, "kernel_kib_per_conn": 6.0, "start_rss_mib": 120.0},
        )

    def test_originate_ratio_and_its_range_over_rounds(self) -> None:
        f = costs.originate_figures(sample_set(), "egressproxy")
        self.assertEqual((f["tcp_tps"], f["originate_tps"]), (21_000, 11_600))
        self.assertAlmostEqual(f["ratio"], 11_600 / 21_000)
        self.assertAlmostEqual(f["ratio_min"], 0.5)
        self.assertAlmostEqual(f["ratio_max"], 0.6)
        # 4.8 s / 60,000 = 80 µs and 5.0 / 79,200 = 63.1 µs: median 71.6.
        self.assertAlmostEqual(f["originate_us_per_txn"], (80.0 + 5.0e6 / 79_200) / 2)

    def test_originate_table_lists_only_peers_that_ran_it(self) -> None:
        text = "\n".join(costs.render_originate(sample_set(), ["direct", "egressproxy", "haproxy"]))
        self.assertIn("| egressproxy | 21,000 | 11,600 | 0.55× (rounds 0.50–0.60) |", text)
        self.assertNotIn("| haproxy", text)
        self.assertEqual(costs.render_originate({}, ["egressproxy"]), [])


class SizingFormulaTests(SynchronousTestCase):
    """sizing.py: the two formulas and which run's figures size which Machine."""

    def test_connections_formula(self) -> None:
        # (256 × 0.70 − 60) MiB = 119.2 MiB = 122,060.8 KiB; ÷ 12 KiB = 10,171.7.
        self.assertEqual(sizing.connections(256, 60, 12), 10_171)
        self.assertEqual(sizing.connections(256, 200, 12), 0)
        self.assertRaises(ValueError, sizing.connections, 256, 60, 0)

    def test_rate_formula(self) -> None:
        # 1/16 core × 0.70 ÷ 20 µs = 2,187.5 per second; a whole core, 35,000.
        self.assertAlmostEqual(sizing.rate(sizing.SHARED_SUSTAINED_CORES, 20.0), 2187.5)
        self.assertAlmostEqual(sizing.rate(1.0, 20.0), 35_000.0)
        self.assertRaises(ValueError, sizing.rate, 1.0, 0.0)

    def test_allowances(self) -> None:
        small, _, large = sizing.MACHINES
        self.assertEqual((small.sustained_cores, small.burst_cores), (0.0625, 1.0))
        self.assertEqual((large.sustained_cores, large.burst_cores), (2.0, 2.0))

    def test_one_vcpu_uses_the_one_worker_run_and_two_the_two_worker_run(self) -> None:
        workers = {"egressproxy": 2, "egressproxy-1w": 1}
        small, _, large = sizing.MACHINES
        self.assertEqual(sizing.choose_peer(small, workers, list(workers)), "egressproxy-1w")
        self.assertEqual(sizing.choose_peer(large, workers, list(workers)), "egressproxy")
        self.assertEqual(sizing.choose_peer(large, workers, ["egressproxy-1w"]), "egressproxy-1w")
        self.assertIsNone(sizing.choose_peer(large, workers, ["haproxy"]))

    def test_size_adds_kernel_memory_and_leaves_missing_figures_out(self) -> None:
        small = sizing.MACHINES[0]
        sized = sizing.size(small, "egressproxy-1w", 1, costs.per_unit(sample_set(), "egressproxy-1w"))
        # 6 KiB PSS + 7 KiB kernel; (179.2 − 60) MiB ÷ 13 KiB.
        self.assertEqual(sized.memory_per_conn_kib, 13.0)
        self.assertEqual(sized.connections, int(119.2 * 1024 / 13))
        self.assertAlmostEqual(sized.tps_sustained, 0.0625 * 0.7 / 20e-6)
        self.assertAlmostEqual(sized.conn_rate_burst, 0.7 / 1000e-6)
        bare = sizing.size(small, "egressproxy-1w", 1, {"kib_per_conn": 6.0, "start_rss_mib": 60.0})
        self.assertEqual(bare.connections, int(119.2 * 1024 / 6))
        self.assertIsNone(bare.tps_sustained)


class RenderTests(SynchronousTestCase):
    """The sections reach results.md, and a run without egressproxy has no sizing."""

    def test_report_has_cost_originate_and_sizing_sections(self) -> None:
        text = report.render(results(sample_set()))
        self.assertIn("## Cost per unit of work", text)
        self.assertIn("| egressproxy-1w | 20.0 (1.11×) | 25.0 | 1,000 (2.00×) | 6.0 (1.71×) |", text)
        # 1/16 core × 0.70 ÷ 25 µs = 1,750.
        self.assertIn("one client at a time (c1) took 25.0 µs of CPU per transaction against 20.0 with 32", text)
        self.assertIn("shared-cpu-1x's sustained figure at 1,750 TPS", text)
        self.assertIn("## TLS origination", text)
        self.assertIn("## Sizing on Fly Machines", text)
        # 256 MiB: 9,389 connections -> 9,300; sustained 2,187.5 TPS -> 2,180.
        self.assertIn("| shared-cpu-1x | 256 MiB |", text)
        self.assertIn("| egressproxy-1w, 1 worker | 9,300 | 2,180 | 35,000 |", text)
        self.assertIn("| performance-2x | 4,096 MiB | 2 performance vCPU (2 cores) | egressproxy, 2 workers |", text)

    def test_a_short_run_is_marked_rough(self) -> None:
        full = "\n".join(sizing.render(results(sample_set())))
        self.assertNotIn("Rough", full)
        short = results(sample_set())
        short["meta"]["params"].update(quick=True, rounds=1, idle_conns=200, pgbench_seconds=2)
        self.assertIn("**Rough:** 1 round(s), 200 idle connections and 2 s pgbench runs", "\n".join(sizing.render(short)))

    def test_no_sizing_without_egressproxy(self) -> None:
        samples = sample_set()
        for by_peer in samples.values():
            by_peer.pop("egressproxy", None)
            by_peer.pop("egressproxy-1w", None)
        self.assertEqual(sizing.render(results(samples)), [])

    def test_older_results_without_worker_counts_still_size(self) -> None:
        old = results(sample_set(), workers={})
        self.assertIn("egressproxy, 2 workers", "\n".join(sizing.render(old)))


class ConfigTests(SynchronousTestCase):
    """The config the benchmark writes is one egressproxy accepts, originate listener included."""

    def test_originate_listener_parses(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".pem") as ca:
            ports = {"pg": 15432, "iperf": 15201, "echo": 15007, peers.ORIGINATE: 15433}
            upstreams = {"pg": 5432, "iperf": 5201, "echo": 7}
            text = peers.egressproxy_config(ports, upstreams, "2", ("db.egress.test", ca.name), "python")
            config = parse_config(text, "bench.yaml", {})
        listener = next(item for item in config.listeners if item.name == peers.ORIGINATE)
        cluster = next(item for item in config.clusters if item.name == "pg_tls")
        self.assertEqual((listener.mode, listener.cluster), ("postgres", "pg_tls"))
        self.assertEqual((cluster.tls.server_name, cluster.tls.ca_file), ("db.egress.test", ca.name))
        self.assertEqual((config.workers, config.fast_path), (2, "python"))

    def test_without_originate_there_is_no_postgres_listener(self) -> None:
        text = peers.egressproxy_config({"pg": 1, "iperf": 2, "echo": 3}, {"pg": 4, "iperf": 5, "echo": 6})
        config = parse_config(text, "bench.yaml", {})
        self.assertEqual(sorted(item.name for item in config.listeners), ["echo", "iperf", "pg"])
        self.assertNotIn("fast_path", text)
