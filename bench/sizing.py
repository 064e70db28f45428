"""
How much a Fly Machine of a given size carries, from one run's medians.

What this module owns: the Machine sizes, the CPU allowance assumed for each
kind of vCPU, the headroom, the two formulas, and the "Sizing" section of
results.md. It does no measuring; the per-unit figures come from costs.py.

The formulas (headroom 30% of memory and of CPU):

    connections = (RAM × 0.70 − resident at start) ÷ memory per connection
    TPS         = CPU allowance in cores × 0.70 ÷ CPU per transaction
    new conn/s  = CPU allowance in cores × 0.70 ÷ CPU per new connection

"resident at start" is RSS summed over all the proxy's workers right after
start; "memory per connection" is PSS growth per idle connection plus the
kernel's per-connection slab growth where the run measured it. The CPU
allowance of a ``shared`` vCPU is Fly's sustained quota, 1/16 of a core
(6.25%), and it may run a whole core while its burst balance lasts; a
``performance`` vCPU is a whole core. With ``workers: auto`` a Machine runs
one worker per vCPU, so a 1-vCPU Machine is sized from the one-worker
figures and a 2-vCPU one from a two-worker run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import costs

#: Share of RAM and of CPU kept free: for the kernel and the guest's own
#: processes, bursts of new connections, TLS handshakes, GC, and error.
HEADROOM = 0.30
#: A shared vCPU's sustained CPU quota on Fly (5 ms of each 80 ms period).
SHARED_SUSTAINED_CORES = 1 / 16


@dataclass(frozen=True)
class Machine:
    """A Fly Machine size: name, RAM in MiB, vCPUs and their kind."""

    name: str
    ram_mib: int
    vcpus: int
    shared: bool

    @property
    def sustained_cores(self) -> float:
        return self.vcpus * (SHARED_SUSTAINED_CORES if self.shared else 1.0)

    @property
    def burst_cores(self) -> float:
        return float(self.vcpus)


MACHINES = (
    Machine("shared-cpu-1x", 256, 1, True),
    Machine("shared-cpu-1x", 512, 1, True),
    Machine("performance-2x", 4096, 2, False),
)


def connections(ram_mib: float, start_rss_mib: float, kib_per_conn: float) -> int:
    """Idle connections that fit: (RAM × 0.70 − resident at start) ÷ memory per connection."""
    if kib_per_conn <= 0:
        raise ValueError("memory per connection must be positive")
    usable_kib = (ram_mib * (1 - HEADROOM) - start_rss_mib) * 1024
    return max(0, math.floor(usable_kib / kib_per_conn))


def rate(cores: float, us_per_unit: float) -> float:
    """Units per second the CPU carries: cores × 0.70 ÷ CPU per unit (µs)."""
    if us_per_unit <= 0:
        raise ValueError("CPU per unit must be positive")
    return cores * (1 - HEADROOM) / (us_per_unit * 1e-6)


def choose_peer(machine: Machine, workers: Mapping[str, int], available: Sequence[str]) -> str | None:
    """
    The egressproxy peer of the run whose worker count is what ``workers:
    auto`` runs on ``machine`` (one per vCPU), else the closest one.
    """
    candidates = [p for p in available if p in workers]
    if not candidates:
        return None
    return min(candidates, key=lambda p: (abs(workers[p] - machine.vcpus), p))


@dataclass(frozen=True)
class Sized:
    """What one Machine carries; None where the run lacks the figure."""

    machine: Machine
    peer: str
    workers: int
    memory_per_conn_kib: float | None
    connections: int | None
    tps_sustained: float | None
    tps_burst: float | None
    conn_rate_sustained: float | None
    conn_rate_burst: float | None


def size(machine: Machine, peer: str, workers: int, figures: Mapping[str, float | None]) -> Sized:
    """Apply the formulas to one Machine with one peer's per-unit figures (costs.per_unit)."""
    user = figures.get("kib_per_conn")
    kernel = figures.get("kernel_kib_per_conn")
    per_conn = user + (kernel or 0.0) if user is not None else None
    start = figures.get("start_rss_mib")
    conns = connections(machine.ram_mib, start, per_conn) if per_conn and start is not None else None
    txn = figures.get("us_per_txn")
    new = figures.get("us_per_conn")
    return Sized(
        machine=machine,
        peer=peer,
        workers=workers,
        memory_per_conn_kib=per_conn,
        connections=conns,
        tps_sustained=rate(machine.sustained_cores, txn) if txn else None,
        tps_burst=rate(machine.burst_cores, txn) if txn else None,
        conn_rate_sustained=rate(machine.sustained_cores, new) if new else None,
        conn_rate_burst=rate(machine.burst_cores, new) if new else None,
    )


def size_all(samples: costs.Samples, workers: Mapping[str, int]) -> list[Sized]:
    """Every Machine of ``MACHINES`` sized from the run's egressproxy peers."""
    available = [p for p in workers if any(samples.get(t, {}).get(p) for t in ("pgbench_c32", "pgbench_connect", "idle"))]
    out = []
    for machine in MACHINES:
        peer = choose_peer(machine, workers, available)
        if peer is not None:
            out.append(size(machine, peer, workers[peer], costs.per_unit(samples, peer)))
    return out


def _n(value: float | None, step: int = 1) -> str:
    """A count rounded down to ``step`` (so the table never promises more than measured)."""
    if value is None:
        return "–"
    return f"{math.floor(value / step) * step:,}"


def _rate_step(value: float | None) -> int:
    return 100 if value is not None and value >= 10_000 else 10 if value is not None and value >= 100 else 1


def render(results: Mapping[str, Any]) -> list[str]:
    """The "Sizing" section of results.md (empty without an egressproxy figure)."""
    meta = results["meta"]
    workers: dict[str, int] = dict(meta["params"].get("workers") or {})
    if not workers:
        # A run from before "workers" was recorded: auto was one per CPU.
        cpus = int(meta.get("machine", {}).get("cpus") or 1)
        workers = {p: {"egressproxy": cpus, "egressproxy-1w": 1}[p] for p in meta["peers"] if p in ("egressproxy", "egressproxy-1w")}
    sized = size_all(results["samples"], workers)
    if not any(s.connections is not None or s.tps_sustained is not None for s in sized):
        return []
    rows = []
    for s in sized:
        m = s.machine
        kind = f"{m.vcpus} shared vCPU ({m.sustained_cores:.4g} core sustained, {m.burst_cores:g} burst)" if m.shared else (
            f"{m.vcpus} performance vCPU ({m.sustained_cores:g} cores)"
        )
        note = "" if s.workers == m.vcpus else f" (measured with {s.workers}, not {m.vcpus})"
        rows.append(
            [
                m.name,
                f"{m.ram_mib:,} MiB",
                kind,
                f"{s.peer}, {s.workers} worker{'s' if s.workers != 1 else ''}{note}",
                _n(s.connections, 100 if (s.connections or 0) >= 1000 else 1),
                _n(s.tps_sustained, _rate_step(s.tps_sustained)),
                _n(s.tps_burst, _rate_step(s.tps_burst)) if m.shared else "(same)",
                _n(s.conn_rate_sustained, _rate_step(s.conn_rate_sustained)),
                _n(s.conn_rate_burst, _rate_step(s.conn_rate_burst)) if m.shared else "(same)",
            ]
        )
    header = [
        "Machine", "RAM", "CPU allowance", "figures from", "idle connections",
        "TPS sustained", "TPS burst", "new conn/s sustained", "new conn/s burst",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    inputs = []
    for s in sized:
        f = costs.per_unit(results["samples"], s.peer)
        inputs.append(
            f"{s.peer}: resident at start {_fmt(f['start_rss_mib'], 1)} MiB, "
            f"{_fmt(f['kib_per_conn'], 1)} KiB PSS + {_fmt(f['kernel_kib_per_conn'], 1)} KiB kernel per idle connection, "
            f"{_fmt(f['us_per_txn'], 1)} µs CPU per transaction (c32), {_fmt(f['us_per_conn'], 0)} µs per new connection"
        )
    light = []
    for s in sized:
        f = costs.per_unit(results["samples"], s.peer)
        if s.machine.shared and f["us_per_txn_c1"] and f["us_per_txn"] and f["us_per_txn_c1"] > f["us_per_txn"]:
            light.append(
                f"Under light load a transaction costs more: through {s.peer} one client at a time (c1) took "
                f"{f['us_per_txn_c1']:.1f} µs of CPU per transaction against {f['us_per_txn']:.1f} with 32, "
                f"which would put {s.machine.name}'s sustained figure at "
                f"{_n(rate(s.machine.sustained_cores, f['us_per_txn_c1']), 10)} TPS."
            )
            break
    rough = []
    params = meta["params"]
    if params.get("quick") or params.get("rounds", 0) < 3:
        rough.append(
            f"**Rough:** {params.get('rounds')} round(s), {params.get('idle_conns', 0):,} idle connections and "
            f"{params.get('pgbench_seconds')} s pgbench runs are too few for figures to quote; "
            "use a full run (5 rounds, 2,000 idle connections)."
        )
        rough.append("")
    return [
        "## Sizing on Fly Machines (from this run's medians)",
        "",
        *rough,
        *lines,
        "",
        f"Formulas, with {HEADROOM:.0%} headroom on both: idle connections = (RAM × {1 - HEADROOM:.2f} − resident "
        f"at start) ÷ (PSS + kernel KiB per idle connection); TPS = CPU allowance in cores × {1 - HEADROOM:.2f} ÷ "
        "µs CPU per c32 `SELECT 1` transaction; new conn/s likewise with µs CPU per new connection (`pgbench -C`, "
        "TLS passed through). A shared vCPU's sustained allowance is 1/16 core (Fly's quota of 5 ms per 80 ms); "
        "\"burst\" is a whole core, which lasts only while the Machine's burst balance does. A performance vCPU is "
        "a whole core. Inputs: " + "; ".join(dict.fromkeys(inputs)) + ". Counts are rounded down.",
        "",
        "These are the proxy's limits alone, on this machine's CPUs: the database, TLS handshakes the proxy "
        "originates, larger queries (more bytes per transaction) and busy rather than idle connections all cost "
        "more. The config's own caps apply first: a cluster's `max_connections` defaults to 1,024. "
        + " ".join(light),
        "",
    ]


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"
