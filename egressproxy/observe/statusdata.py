"""What the admin status page shows, as JSON-ready data computed from the service on each request.

One function, :func:`status`, reads the running service (listeners, their
live sessions, clusters, readiness, the egress-address check) and returns
plain dicts, lists, strings and numbers: ``/status.json`` serves it as is and
``statuspage.py`` renders it as HTML.  Nothing is kept between requests and
nothing here writes to the service.

Scope, stated on the page too: with ``workers: N`` the listener totals are
the whole proxy's (the other workers' counters are added, as ``/stats``
does), but the live connections, endpoint health and breakers are this
process's only: other workers' sessions are not visible from here.

Refusals: the proxy keeps counts per reason, per listener the reason of
the newest refusal (``ListenerRuntime.last_refusal``), and the access records
of its last ``RECENT_PROBLEMS`` refused or failed connections
(``recent_problems``: any flag but the quiet ones).  The page shows the
counts, the newest reason with its access-log flag, and those records merged
across listeners, newest first (this process's only, like live connections).

Strings here are raw, often client input (a peer's unix socket path, a TLS
server name a client sent, a forward-proxy user): whoever renders them
escapes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.interfaces import IListeningPort

from egressproxy.addresses import format_peer
from egressproxy.datapath.listener import RECENT_PROBLEMS, ListenerRuntime
from egressproxy.observe import snapshot
from egressproxy.observe.accesslog import FLAGS, format_timestamp
from egressproxy.upstream.cluster import UpstreamCluster

#: The live-connection table shows at most this many, the newest first.
LIVE_LIMIT = 200

#: The access-log flag a connection refused for each ``rejected`` reason carries.
REFUSAL_FLAGS = {
    "source": "RBAC",
    "max_connections": "OM",
    "max_connections_per_source": "OM",
    "proxy_protocol": "DPE",
    "proxy_protocol_untrusted": "DPE",
    "internal_address": "IA",
    "own_address": "IA",
    "no_route": "NR",
    "protocol": "DPE",
    "tls_required": "DPE",
    "channel_binding": "DPE",
}

#: Where each session is in its life; see :func:`_stage`.
STAGES = ("awaiting PROXY header", "handshake", "dialling", "upstream handshake", "spliced", "closing")

ClusterStatus = Callable[[UpstreamCluster], dict[str, Any]]


def status(service: Any, cluster_status: ClusterStatus, limit: int = LIVE_LIMIT) -> dict[str, Any]:
    """The whole page's data now; ``cluster_status`` is ``/clusters``' per-cluster view (admin.py)."""
    now = service.reactor.seconds()
    runtimes = _runtimes(service)
    return {
        "generated_at": now,
        "server": _server(service),
        "egress": _egress(service, now),
        "listeners": _listeners(service, runtimes),
        "clusters": [cluster_status(cluster) for cluster in service.all_clusters().values()],
        "connections": _connections(runtimes, now, limit),
        "recent_problems": _recent_problems(runtimes),
    }


def _recent_problems(runtimes: list[tuple[ListenerRuntime, bool]]) -> list[dict[str, Any]]:
    """The listeners' remembered refused or failed connections, newest first, at most RECENT_PROBLEMS."""
    records = sorted(
        (record for runtime, _ in runtimes for record in runtime.recent_problems),
        key=lambda record: record.start, reverse=True,
    )[:RECENT_PROBLEMS]
    return [{
        "start_time": format_timestamp(record.start),
        "listener": record.listener,
        "downstream": record.downstream,
        "upstream": record.upstream,
        "flags": list(record.flags),
        "meanings": [FLAGS.get(flag.split(":", 1)[0], "") for flag in record.flags],
        "bytes_received": record.bytes_received,
        "bytes_sent": record.bytes_sent,
        "duration_ms": record.duration_ms,
    } for record in records]


def _runtimes(service: Any) -> list[tuple[ListenerRuntime, bool]]:
    """Every listener runtime with live state: (runtime, retired by a reload)."""
    found = [(runtime, False) for runtime in service.listeners.values()]
    return found + [(runtime, True) for runtime in getattr(service, "retired", ())]


def _server(service: Any) -> dict[str, Any]:
    ready = bool(service.ready)
    reason = getattr(service, "not_ready_reason", None)
    if ready:
        why = None
    elif reason is not None:
        why = reason()
    else:
        why = "draining" if service.draining else "starting"
    return {
        "ready": ready,
        "not_ready_reason": why,
        "draining": bool(service.draining),
        "workers": getattr(service, "worker_count", 1),
        "worker_index": getattr(service, "worker_index", 0),
        "reloads": dict(service.reloads),
    }


def _egress(service: Any, now: float) -> dict[str, Any] | None:
    """The ``expected_egress_ips`` check (an ``EgressIpWatch``); None when not configured."""
    watch = getattr(service, "egress", None)
    if watch is None:
        return None
    checked = watch.checked_at
    return {
        "ready": bool(watch.ready),
        "reason": watch.reason(),
        "seen": watch.seen,
        "expected": sorted(watch.expected or ()),
        "error": watch.error,
        "checked_seconds_ago": None if checked is None else max(0.0, now - checked),
        "interval": watch.interval,
    }


def _bound(port: IListeningPort | None) -> list[str]:
    if port is None:
        return []
    return [format_peer(port.getHost())]


def _listeners(service: Any, runtimes: list[tuple[ListenerRuntime, bool]]) -> list[dict[str, Any]]:
    """Per listener: config, bound address and totals (all workers' for configured listeners)."""
    totals = snapshot.take(service)
    for other in service.worker_snapshots():
        snapshot.add(totals, other, only_known=True)
    ports = getattr(service, "ports", {})
    result = []
    for runtime, retired in runtimes:
        config = runtime.config
        entry = totals["listeners"].get(config.name) if not retired else None
        if entry is None:
            entry = snapshot.take(_Only(runtime))["listeners"][config.name]
        last = runtime.last_refusal or None
        result.append({
            "name": config.name,
            "mode": config.mode,
            "cluster": runtime.cluster.name,
            "listen": config.listen.text,
            "bound": [] if retired else _bound(ports.get(config.name)),
            "retired": retired,
            "active": entry["active"],
            "awaiting_proxy_header": len(runtime.awaiting),
            "connections_total": entry["connections"],
            "bytes_received": entry["received"],
            "bytes_sent": entry["sent"],
            "rejected": {reason: count for reason, count in sorted(entry["rejected"].items()) if count},
            "last_refusal": last,
            "last_refusal_flag": REFUSAL_FLAGS.get(last) if last else None,
            "last_refusal_flag_meaning": FLAGS.get(REFUSAL_FLAGS.get(last, "")) if last else None,
        })
    return result


class _Only:
    """One listener runtime in the shape :func:`snapshot.take` reads (a retired listener's own totals)."""

    def __init__(self, runtime: ListenerRuntime) -> None:
        self.listeners = {runtime.config.name: runtime}

    def all_clusters(self) -> dict[str, UpstreamCluster]:
        return {}


def _stage(session: Any, awaiting: bool) -> str:
    """How far a live session has got, from its legs (one of :data:`STAGES`)."""
    if awaiting:
        return "awaiting PROXY header"
    if session.finished or (session.down is not None and session.down.lost):
        return "closing"
    up = session.up
    if up is None:
        return "handshake"
    if up.transport is None:
        return "dialling"
    return "upstream handshake" if up.peer is None else "spliced"


def _dialled(session: Any) -> str | None:
    """The address the upstream socket is connected to, if it is."""
    if session.dialled not in (None, "-"):
        return str(session.dialled)
    up = session.up
    transport = getattr(up, "transport", None) if up is not None and not up.lost else None
    if transport is None:
        return None
    return format_peer(transport.getPeer())


def _connection(session: Any, runtime: ListenerRuntime, now: float, awaiting: bool) -> dict[str, Any]:
    return {
        "peer": format_peer(session.peer_address),
        "listener": runtime.config.name,
        "upstream": session.upstream_name,
        "dialled": _dialled(session),
        "user": session.user,
        "bytes_received": session.bytes_received,
        "bytes_sent": session.bytes_sent,
        "age_seconds": max(0.0, now - session.start),
        "stage": _stage(session, awaiting),
        "flags": list(session.flags),
    }


def _connections(runtimes: Iterable[tuple[ListenerRuntime, bool]], now: float, limit: int) -> dict[str, Any]:
    """The newest ``limit`` live sessions of this process (admitted or awaiting a PROXY header)."""
    live = []
    for runtime, _retired in runtimes:
        live += [(session, runtime, False) for session in runtime.sessions]
        live += [(session, runtime, True) for session in runtime.awaiting]
    live.sort(key=lambda item: item[0].start, reverse=True)
    shown = [_connection(session, runtime, now, awaiting) for session, runtime, awaiting in live[:limit]]
    return {"total": len(live), "shown": shown, "more": max(0, len(live) - limit), "limit": limit}
