"""
Turning samples into the results: medians, ratios and the markdown report.

What this module owns: the table columns (which test and field each comes
from, and its unit), medians over rounds, ratios to a reference peer, the
spread of each cell, and rendering. It does no measuring and no I/O besides
returning strings; run.py writes the files.

Every ratio is peer ÷ reference for the same column: above 1 means more than
the reference, which is worse for latency and memory and better for
throughput and rates.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import costs
import sizing


@dataclass(frozen=True)
class Column:
    label: str
    test: str
    field: str
    digits: int
    proxy_only: bool = False  # no figure for "direct" (nothing runs there)


COLUMNS = (
    Column("c1 latency ms", "pgbench_c1", "latency_ms", 3),
    Column("c1 TPS", "pgbench_c1", "tps", 0),
    Column("c32 TPS", "pgbench_c32", "tps", 0),
    Column("connect/s (-C, c8)", "pgbench_connect", "tps", 0),
    Column("iperf3 Gbit/s", "iperf3", "gbit_s", 2),
    Column("COPY MB/s", "copy", "mb_s", 0),
    Column("idle KiB/conn", "idle", "kib_per_conn", 1, proxy_only=True),
)

# The tests whose samples carry the peer's CPU time, with their labels.
CPU_TESTS = (
    ("pgbench_c1", "c1"),
    ("pgbench_c32", "c32"),
    ("pgbench_connect", "-C c8"),
    ("iperf3", "iperf3"),
    ("copy", "COPY"),
    ("pgbench_c8", "c8 tcp"),
    ("pgbench_originate", "c8 originate"),
)

Samples = Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]]


def values(samples: Samples, test: str, peer: str, field: str) -> list[float]:
    return [s[field] for s in samples.get(test, {}).get(peer, []) if s.get(field) is not None]


def median(samples: Samples, test: str, peer: str, field: str) -> float | None:
    found = values(samples, test, peer, field)
    return statistics.median(found) if found else None


def summary(samples: Samples, peers: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """
    The median of each column for each peer: ``{peer: {label: value}}``.
    """
    return {p: {c.label: median(samples, c.test, p, c.field) for c in COLUMNS} for p in peers}


def ratios(table: Mapping[str, Mapping[str, float | None]], reference: str) -> dict[str, dict[str, float | None]]:
    """
    Each peer's medians divided by ``reference``'s (None where either is missing).
    """
    base = table.get(reference, {})
    out: dict[str, dict[str, float | None]] = {}
    for peer, row in table.items():
        if peer == reference:
            continue
        out[peer] = {}
        for label, value in row.items():
            ref = base.get(label)
            out[peer][label] = value / ref if value is not None and ref else None
    return out


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None, unresolved: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}×" + (" †" if unresolved else "")


def overlaps(samples: Samples, column: Column, peer: str, reference: str) -> bool:
    """
    Whether the two peers' samples for ``column`` overlap (min..max ranges).

    Overlapping ranges mean this run does not tell the two apart.
    """
    a = values(samples, column.test, peer, column.field)
    b = values(samples, column.test, reference, column.field)
    if len(a) < 2 or len(b) < 2:
        return False
    return max(a) >= min(b) and max(b) >= min(a)


def _accepted(samples: Samples, peer: str) -> str:
    runs = samples.get("idle", {}).get(peer, [])
    if not runs:
        return "–"
    target = runs[0]["target"]
    worst = min(min(s["accepted"], s["alive_after_measure"]) for s in runs)
    mark = "yes" if worst == target else "**no**"
    return f"{mark} ({worst:,}/{target:,})"


def failed_checks(results: Mapping[str, Any]) -> list[str]:
    """
    The pass/fail checks that failed: every connection served, descriptors back.
    """
    failed = []
    for peer, runs in results["samples"].get("idle", {}).items():
        for s in runs:
            if min(s["accepted"], s["alive_after_measure"]) < s["target"]:
                failed.append(
                    f"idle round {s['round']} {peer}: {s['accepted']:,}/{s['target']:,} accepted, "
                    f"{s['alive_after_measure']:,} alive"
                )
    c = results.get("c10k")
    if c:
        if min(c["accepted"], c["alive_after_measure"]) < c["target"]:
            failed.append(f"concurrent connections: {c['accepted']:,}/{c['target']:,} served")
        if not c["fd_back_to_baseline"]:
            failed.append(f"concurrent connections: {c['fd_after']} descriptors after closing, baseline {c['fd_baseline']}")
        if not c["serves_after"]:
            failed.append("concurrent connections: no new connection served afterwards")
    return failed


def _foreign_load(samples: Samples, meta: Mapping[str, Any]) -> list[str]:
    """
    How much CPU other processes on the machine took during the measurements.
    """
    cpus = int(meta["machine"].get("cpus") or 1)
    total_foreign = 0.0
    total_wall = 0.0
    loaded: list[tuple[float, str]] = []
    names: dict[str, float] = {}
    steal_weighted = 0.0
    for test, by_peer in samples.items():
        for peer, runs in by_peer.items():
            for s in runs:
                foreign = s.get("foreign_cpu_s")
                wall = s.get("wall_s")
                if foreign is None or not wall:
                    continue
                total_foreign += foreign
                total_wall += wall
                steal_weighted += s.get("steal_share", 0.0) * wall
                for name, seconds in (s.get("foreign_top") or {}).items():
                    names[name] = names.get(name, 0.0) + seconds
                share = foreign / (wall * cpus)
                if share >= 0.05:
                    loaded.append((share, f"round {s.get('round')} {test} {peer}: {share * 100:.0f}%"))
    if not total_wall:
        return []
    text = (
        f"Processes other than the benchmark's used {total_foreign:,.1f} CPU-seconds during the "
        f"{total_wall:,.0f} s of measurements, {total_foreign / (total_wall * cpus) * 100:.1f}% of the "
        f"{cpus} CPUs (a lower bound; kernel threads not counted)"
    )
    if names:
        top = sorted(names.items(), key=lambda item: -item[1])[:5]
        text += "; mostly " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in top)
    text += f". The hypervisor stole {steal_weighted / total_wall * 100:.1f}% of the CPU time."
    lines = ["## Other load on the machine", "", text]
    if loaded:
        loaded.sort(reverse=True)
        shown = "; ".join(text for _share, text in loaded[:10])
        more = f" and {len(loaded) - 10} more" if len(loaded) > 10 else ""
        lines.append(
            f"{len(loaded)} of the samples ran while it was 5% or more of the machine (they may read low; "
            f"the median over rounds discounts them); the worst: {shown}{more}."
        )
    lines.append("")
    return lines


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(results: Mapping[str, Any]) -> str:
    """
    The markdown report: parameters, the tables, the 10k test and the machine.
    """
    meta = results["meta"]
    samples: Samples = results["samples"]
    peers: list[str] = meta["peers"]
    table = summary(samples, peers)
    params = meta["params"]
    out: list[str] = []
    out.append(f"# egressproxy benchmark — {meta['started']}")
    out.append("")
    tests = meta.get("tests", [])
    parts = [f"`{meta['command']}`"]
    if any(t != "c10k" for t in tests):
        parts.append(f"{params['rounds']} round(s), median shown")
    if any(t.startswith("pgbench") for t in tests):
        parts.append(f"pgbench {params['pgbench_seconds']} s per run")
    if "iperf3" in tests:
        parts.append(f"iperf3 {params['iperf3_seconds']} s")
    if "copy" in tests:
        parts.append(f"COPY {params['copy_bytes'] / 1e6:,.0f} MB")
    if "idle" in tests:
        parts.append(f"{params['idle_conns']:,} idle connections")
    if "c10k" in tests:
        parts.append(f"{params['c10k_conns']:,} concurrent")
    if params.get("fast_path", "default") != "default":
        parts.append(f"egressproxy fast_path: {params['fast_path']}")
    parts.append(f"run time {meta.get('duration_seconds', 0) / 60:.1f} min")
    out.append(" · ".join(parts))
    out.append("")
    failed = failed_checks(results)
    errors = results.get("errors", [])
    if failed or errors:
        out.append(
            "**Checks failed:** " + "; ".join(failed + [f"{len(errors)} measurement error(s), see Errors"] * bool(errors)) + "."
        )
    else:
        out.append("All checks passed: every connection was served and echoed, descriptors returned to baseline, no measurement failed.")
    out.append("")
    if any(samples.get(c.test) for c in COLUMNS):
        out.append("## Absolute figures (median of rounds)")
        out.append("")
        header = ["peer", *[c.label for c in COLUMNS], "idle: all accepted"]
        rows = []
        for p in peers:
            row = [p]
            for c in COLUMNS:
                row.append("–" if c.proxy_only and p == "direct" else _fmt(table[p][c.label], c.digits))
            row.append(_accepted(samples, p))
            rows.append(row)
        out.append(_markdown_table(header, rows))
        out.append("")

        for reference, title in (("direct", "Ratio to direct (peer ÷ direct)"), ("haproxy", "Ratio to HAProxy (peer ÷ HAProxy)")):
            if reference not in peers or len(peers) < 2:
                continue
            rel = ratios(table, reference)
            cols = [c for c in COLUMNS if not (reference == "direct" and c.proxy_only)]
            rows = []
            for p in peers:
                if p == reference or (reference == "haproxy" and p == "direct"):
                    continue
                rows.append([p, *[_ratio(rel[p][c.label], overlaps(samples, c, p, reference)) for c in cols]])
            if rows:
                out.append(f"## {title}")
                out.append("")
                out.append(_markdown_table(["peer", *[c.label for c in cols]], rows))
                out.append("")
                if params["rounds"] >= 2:
                    out.append("† the two peers' samples overlap (min–max): this run does not tell them apart.")
                    out.append("")

        if params["rounds"] >= 2:
            out.append("## Spread between rounds ((max − min) ÷ median)")
            out.append("")
            rows = []
            for p in peers:
                row = [p]
                for c in COLUMNS:
                    found = values(samples, c.test, p, c.field)
                    if len(found) < 2 or (c.proxy_only and p == "direct"):
                        row.append("–")
                    else:
                        row.append(f"{(max(found) - min(found)) / statistics.median(found) * 100:.1f}%")
                rows.append(row)
            out.append(_markdown_table(["peer", *[c.label for c in COLUMNS]], rows))
            out.append("")

        proxies = [p for p in peers if p != "direct"]
        if proxies:
            out.append("## Proxy CPU (% of one core during the test, median)")
            out.append("")
            rows = []
            for p in proxies:
                row = [p]
                for test, _label in CPU_TESTS:
                    runs = samples.get(test, {}).get(p, [])
                    shares = [100 * s["peer_cpu_s"] / s["wall_s"] for s in runs if s.get("peer_cpu_s") is not None and s.get("wall_s")]
                    row.append(f"{statistics.median(shares):.0f}%" if shares else "–")
                rows.append(row)
            out.append(_markdown_table(["peer", *[label for _t, label in CPU_TESTS]], rows))
            out.append("")

    out.extend(costs.render_costs(samples, peers))
    out.extend(costs.render_originate(samples, peers))
    out.extend(sizing.render(results))

    c10k = results.get("c10k")
    if c10k:
        out.append("## Concurrent connections through egressproxy")
        out.append("")
        served = c10k.get("accepted", 0)
        target = c10k.get("target", 0)
        rows = [
            ["connections opened (echo proved)", f"{served:,} of {target:,}" + ("" if served == target else " **(not all)**")],
            ["still echoing after the measurement", f"{c10k.get('alive_after_measure', 0):,}"],
            ["time to open them all", f"{c10k.get('open_seconds', 0):.1f} s"],
            ["failures", ", ".join(f"{k}: {v:,}" for k, v in sorted(c10k.get("failures", {}).items())) or "none"],
            ["descriptors: baseline → held → after close", f"{c10k.get('fd_baseline')} → {c10k.get('fd_held')} → {c10k.get('fd_after')}"],
            ["back to baseline", ("yes" if c10k.get("fd_back_to_baseline") else "**no**") + f" (after {c10k.get('fd_settle_seconds', 0):.1f} s)"],
            ["worker processes", f"{c10k.get('workers', 1)}"],
            ["descriptor limit of the proxy, all workers (needed: 2 per connection + baseline)", f"{c10k.get('fd_limit')} (needed {c10k.get('fd_needed'):,})"],
            ["PSS held, KiB per connection", _fmt(c10k.get("kib_per_conn"), 1)],
            ["access-log flags", ", ".join(f"{k}: {v:,}" for k, v in sorted(c10k.get("access_flags", {}).items())) or "–"],
            ["serves a new connection afterwards", "yes" if c10k.get("serves_after") else "**no**"],
        ]
        out.append(_markdown_table(["", "egressproxy"], rows))
        out.append("")

    out.extend(_foreign_load(samples, meta))

    errors = results.get("errors", [])
    if errors:
        out.append("## Errors")
        out.append("")
        for e in errors:
            out.append(f"- round {e['round']}, {e['test']}, {e['peer']}: {e['error'].splitlines()[0] if e['error'] else ''}")
        out.append("")

    notes = results.get("notes", [])
    if notes:
        out.append("## Notes")
        out.append("")
        out.extend(f"- {n}" for n in notes)
        out.append("")

    out.append("## Machine")
    out.append("")
    for key, value in meta["machine"].items():
        out.append(f"- {key}: {value}")
    out.append("")
    return "\n".join(out)
