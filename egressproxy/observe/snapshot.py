"""The proxy's counters as plain data, so that workers can add theirs up.

With ``workers: N`` every process counts its own connections, bytes and
failures.  Each extra worker sends :func:`take` of its service to the main
worker (see :mod:`egressproxy.app.workers`), and the main worker's metrics
collector starts from its own :func:`take` and :func:`add`\\ s the others,
so ``/metrics`` describes the whole proxy.  With one worker the collector
exports :func:`take` of the service alone: one code path either way.

A snapshot is JSON-ready: ``{"listeners": {name: {...}}, "clusters":
{name: {...}}}`` with integer counters, reason maps, and a cluster's
connect-time histogram as per-bucket (not cumulative) counts and a sum.
Gauges (``active``) are kept apart from counters so that :func:`retire`
can drop them for a worker that has exited while its counters still count.
Health is not part of a snapshot: every worker probes for itself, and the
main worker's view is the one exported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from egressproxy.datapath.listener import ListenerRuntime
    from egressproxy.upstream.cluster import UpstreamCluster

Snapshot = dict[str, dict[str, dict[str, Any]]]

#: Per-entry keys that are gauges: live values, not totals.
GAUGES = ("active",)


class SnapshotSource(Protocol):
    listeners: dict[str, ListenerRuntime]
    def all_clusters(self) -> dict[str, UpstreamCluster]: ...


#: The fields of each entry and their kinds: what :func:`clean` accepts.
_FIELDS = {
    "listeners": {
        "connections": "count", "active": "count", "rejected": "reasons", "received": "count", "sent": "count",
        "login_refused": "reasons", "reported": "reasons",
    },
    "clusters": {
        "active": "count", "connections": "count", "failures": "reasons", "overflows": "count",
        "buckets": "counts", "sum": "number",
    },
}


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _clean_field(kind: str, value: object) -> object:
    """``value`` if it is of ``kind``, else None."""
    if kind == "count":
        return value if _is_count(value) else None
    if kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        return float(value) if ok else None  # type: ignore[arg-type]
    if kind == "reasons":
        if isinstance(value, dict) and all(isinstance(k, str) and _is_count(v) for k, v in value.items()):
            return dict(value)
        return None
    if isinstance(value, list) and all(_is_count(v) for v in value):  # "counts"
        return list(value)
    return None


def clean(value: object) -> Snapshot | None:
    """A snapshot received from another process, checked field by field; None if it is not one.

    Only known fields of the right kind are kept, so whatever a worker sends
    (another build during an upgrade, a bug) can never break a scrape.
    """
    if not isinstance(value, dict):
        return None
    result: Snapshot = empty()
    for section, fields in _FIELDS.items():
        entries = value.get(section, {})
        if not isinstance(entries, dict):
            return None
        for name, entry in entries.items():
            if not isinstance(name, str) or not isinstance(entry, dict):
                return None
            kept = {}
            for key, kind in fields.items():
                if key in entry:
                    field = _clean_field(kind, entry[key])
                    if field is None:
                        return None
                    kept[key] = field
            result[section][name] = kept
    return result


def empty() -> Snapshot:
    return {"listeners": {}, "clusters": {}}


def take(service: SnapshotSource) -> Snapshot:
    """The service's counters now, live connections' bytes included."""
    listeners = {
        name: {
            "connections": runtime.connections_total,
            "active": runtime.active,
            "rejected": dict(runtime.rejected),
            "login_refused": dict(runtime.login_refused),
            "reported": dict(runtime.reported),
            "received": runtime.bytes_received,
            "sent": runtime.bytes_sent,
        }
        for name, runtime in service.listeners.items()
    }
    clusters = {
        name: {
            "active": cluster.breaker.active,
            "connections": cluster.connections_total,
            "failures": dict(cluster.connect_failures),
            "overflows": cluster.breaker.overflows,
            "buckets": list(cluster.connect_seconds.counts),
            "sum": cluster.connect_seconds.sum,
        }
        for name, cluster in service.all_clusters().items()
    }
    return {"listeners": listeners, "clusters": clusters}


def _add_entry(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        mine = into.get(key)
        if isinstance(value, dict):
            if not isinstance(mine, dict):
                mine = into[key] = {}
            for reason, count in value.items():
                mine[reason] = mine.get(reason, 0) + count
        elif isinstance(value, list):
            if isinstance(mine, list) and len(mine) == len(value):
                into[key] = [a + b for a, b in zip(mine, value)]
            elif mine is None:
                into[key] = list(value)
            # Buckets of another length (a different build): not addable; keep ours.
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            into[key] = (mine if isinstance(mine, (int, float)) else 0) + value


def add(into: Snapshot, other: Snapshot, only_known: bool = False) -> Snapshot:
    """Add ``other``'s values into ``into`` (and return it).

    With ``only_known``, entries ``into`` does not have are skipped: the
    collector exports the listeners and clusters of the running config only,
    even if another worker still counts one a reload removed.
    """
    for section in ("listeners", "clusters"):
        mine = into.setdefault(section, {})
        theirs = other.get(section)
        if not isinstance(theirs, dict):
            continue
        for name, entry in theirs.items():
            if not isinstance(entry, dict):
                continue
            if name not in mine:
                if only_known:
                    continue
                mine[name] = {}
            _add_entry(mine[name], entry)
    return into


def retire(snapshot: Snapshot) -> Snapshot:
    """``snapshot`` without its gauges: what an exited worker still contributes."""
    return {
        section: {
            name: {key: value for key, value in entry.items() if key not in GAUGES}
            for name, entry in entries.items()
        }
        for section, entries in snapshot.items()
    }
