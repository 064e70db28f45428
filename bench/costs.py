"""
What one unit of work costs each peer: CPU per transaction and per new
connection, memory per idle connection, and what TLS origination costs
against a plain tcp listener.

What this module owns: turning the samples run.py recorded into per-unit
figures (each the median over rounds of a per-round quotient) and rendering
their two tables, "Cost per unit of work" and "TLS origination". It does no
measuring and no I/O.

Why per unit: a throughput figure mixes the proxy's own cost with everything
else sharing the machine (pgbench, PostgreSQL, the other core). CPU seconds
the peer's processes used, divided by the transactions pgbench counted, is
the proxy's own price of one transaction, and it is what a Machine's CPU
allowance is spent on (sizing.py divides one by the other). Memory likewise:
PSS growth per held connection is what each idle client costs in user space,
and the growth of the kernel's socket slab caches beyond that of the direct
run is what the proxy's two extra sockets cost in the kernel.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

Samples = Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]]

#: Proxies whose rows get a ratio to this one in the cost table.
REFERENCE = "haproxy"


def _median(found: list[float]) -> float | None:
    return statistics.median(found) if found else None


def cpu_us_per_unit(samples: Samples, test: str, peer: str) -> float | None:
    """
    The median over rounds of the peer's CPU time ÷ pgbench's transactions, in µs.

    With ``pgbench -C`` every transaction is a new connection, so for the
    connect test this is CPU per new connection. None when the peer runs
    no process of its own (direct) or the test did not run. A round with no
    CPU time at all is left out: no proxy relays for free, so it is a gap in
    the reading (a child that exited unseen), not a figure.
    """
    found = [
        s["peer_cpu_s"] * 1e6 / s["transactions"]
        for s in samples.get(test, {}).get(peer, [])
        if s.get("peer_cpu_s") and s.get("transactions")
    ]
    return _median(found)


def idle_kib(samples: Samples, peer: str) -> float | None:
    """KiB of PSS per held idle connection (all the peer's processes), median."""
    return _median([s["kib_per_conn"] for s in samples.get("idle", {}).get(peer, []) if s.get("kib_per_conn") is not None])


def _slab_per_conn(samples: Samples, peer: str) -> float | None:
    return _median(
        [s["slab_kib_per_conn"] for s in samples.get("idle", {}).get(peer, []) if s.get("slab_kib_per_conn") is not None]
    )


def kernel_kib(samples: Samples, peer: str, baseline: str = "direct") -> float | None:
    """
    The kernel memory the peer adds per idle connection: the growth of the
    machine's socket slab caches (memory.SOCKET_CACHES) per connection through
    it, less the growth per connection made directly (the client's and the
    echo server's sockets, the same in both).

    Machine-wide, so other activity shows up in it; the median over rounds
    tames that, and a negative difference (pure noise) is reported as 0.
    None without both figures.
    """
    if peer == baseline:
        return None
    through = _slab_per_conn(samples, peer)
    direct = _slab_per_conn(samples, baseline)
    if through is None or direct is None:
        return None
    return max(0.0, through - direct)


def start_rss_mib(samples: Samples, peer: str) -> float | None:
    """MiB resident in all the peer's processes right after start (median of the fresh idle instances)."""
    found = [s["rss_start_kib"] / 1024 for s in samples.get("idle", {}).get(peer, []) if s.get("rss_start_kib")]
    return _median(found)


def per_unit(samples: Samples, peer: str) -> dict[str, float | None]:
    """Every per-unit figure of one peer, by key."""
    return {
        "us_per_txn": cpu_us_per_unit(samples, "pgbench_c32", peer),
        "us_per_txn_c1": cpu_us_per_unit(samples, "pgbench_c1", peer),
        "us_per_conn": cpu_us_per_unit(samples, "pgbench_connect", peer),
        "kib_per_conn": idle_kib(samples, peer),
        "kernel_kib_per_conn": kernel_kib(samples, peer),
        "start_rss_mib": start_rss_mib(samples, peer),
    }


COST_COLUMNS = (
    ("µs CPU per transaction (c32)", "us_per_txn", 1),
    ("µs CPU per transaction (c1)", "us_per_txn_c1", 1),
    ("µs CPU per new connection", "us_per_conn", 0),
    ("KiB per idle connection", "kib_per_conn", 1),
    ("kernel KiB per idle connection", "kernel_kib_per_conn", 1),
    ("MiB resident at start", "start_rss_mib", 1),
)


def _cell(value: float | None, digits: int, ref: float | None = None) -> str:
    if value is None:
        return "–"
    text = f"{value:,.{digits}f}"
    if ref:
        text += f" ({value / ref:.2f}×)"
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_costs(samples: Samples, peers: Sequence[str]) -> list[str]:
    """The "Cost per unit of work" section (empty when no test it needs ran)."""
    proxies = [p for p in peers if p != "direct"]
    figures = {p: per_unit(samples, p) for p in proxies}
    if not any(v is not None for f in figures.values() for v in f.values()):
        return []
    ref = figures.get(REFERENCE, {})
    rows = []
    for p in proxies:
        rows.append(
            [p]
            + [_cell(figures[p][key], digits, ref.get(key) if p != REFERENCE else None) for _label, key, digits in COST_COLUMNS]
        )
    return [
        "## Cost per unit of work (median of rounds; in brackets: ÷ HAProxy)",
        "",
        *_table(["peer", *[label for label, _key, _digits in COST_COLUMNS]], rows),
        "",
        "CPU is user + system time of all the peer's processes (every worker; HAProxy's threads are one "
        "process; socat's children included) during the pgbench run, divided by the transactions pgbench "
        "counted; with -C each transaction is a new connection. One client at a time (c1) costs more per "
        "transaction than 32: every message is its own wake-up, with nothing to batch. KiB per idle connection is PSS growth over "
        "all its processes (user space); kernel KiB is the growth of the kernel's socket slab caches "
        "(TCP socket, inode, file, epoll entry) per connection beyond direct's: the proxy's two sockets "
        "(machine-wide, so other activity can move it; a forking peer's process structures are not in "
        "it). MiB resident at start is RSS summed "
        "over all its processes right after start (shared pages counted in each).",
        "",
    ]


def _pair(samples: Samples, peer: str) -> list[tuple[float, float]]:
    """(tcp, originate) TPS of each round in which both ran for ``peer``."""
    tcp = {s.get("round"): s["tps"] for s in samples.get("pgbench_c8", {}).get(peer, [])}
    orig = {s.get("round"): s["tps"] for s in samples.get("pgbench_originate", {}).get(peer, [])}
    return [(tcp[r], orig[r]) for r in sorted(tcp, key=str) if r in orig and tcp[r]]


def originate_figures(samples: Samples, peer: str) -> dict[str, float | None]:
    """Median TPS through tcp and originate, their ratio, and the per-round ratio range."""
    tcp = _median([s["tps"] for s in samples.get("pgbench_c8", {}).get(peer, [])])
    orig = _median([s["tps"] for s in samples.get("pgbench_originate", {}).get(peer, [])])
    per_round = [o / t for t, o in _pair(samples, peer)]
    return {
        "tcp_tps": tcp,
        "originate_tps": orig,
        "ratio": orig / tcp if tcp and orig is not None else None,
        "ratio_min": min(per_round) if per_round else None,
        "ratio_max": max(per_round) if per_round else None,
        "tcp_us_per_txn": cpu_us_per_unit(samples, "pgbench_c8", peer),
        "originate_us_per_txn": cpu_us_per_unit(samples, "pgbench_originate", peer),
    }


def render_originate(samples: Samples, peers: Sequence[str]) -> list[str]:
    """The "TLS origination" section: pgbench -c 8 through tcp and through originate."""
    shown = [p for p in peers if samples.get("pgbench_originate", {}).get(p) or samples.get("pgbench_c8", {}).get(p)]
    if not shown:
        return []
    rows = []
    for p in shown:
        f = originate_figures(samples, p)
        spread = ""
        if f["ratio_min"] is not None and f["ratio_max"] is not None and f["ratio_min"] != f["ratio_max"]:
            spread = f" (rounds {f['ratio_min']:.2f}–{f['ratio_max']:.2f})"
        rows.append(
            [
                p,
                _cell(f["tcp_tps"], 0),
                _cell(f["originate_tps"], 0),
                (f"{f['ratio']:.2f}×" + spread) if f["ratio"] is not None else "–",
                _cell(f["tcp_us_per_txn"], 1),
                _cell(f["originate_us_per_txn"], 1),
            ]
        )
    header = ["peer", "c8 TPS, tcp", "c8 TPS, originate", "originate ÷ tcp", "µs CPU/txn, tcp", "µs CPU/txn, originate"]
    return [
        "## TLS origination (pgbench -c 8 SELECT 1, median of rounds)",
        "",
        *_table(header, rows),
        "",
        "tcp: TLS end to end through a `mode: tcp` listener (`sslmode=verify-full`). originate: the "
        "client connects in plaintext (`sslmode=disable`) to a `mode: postgres` listener with "
        "`tls: originate`, and the proxy does the verified TLS handshake and every record's encryption "
        "itself (SCRAM login). The two run back to back for each egressproxy peer, alternating which goes "
        "first; the ratio's range is over the rounds' own ratios.",
        "",
    ]
