"""The admin service's ``GET /`` (an HTML status page) and ``GET /status.json`` (the same data).

The page is one self-contained HTML document rendered on the server from
:func:`egressproxy.observe.statusdata.status`: no external assets, no
framework.  A few lines of inline script fetch ``/`` again every two seconds
and swap the ``<main id="status">`` element for the new one; without script
(or with it blocked) the page is complete as served, and a ``<noscript>``
meta refresh reloads it every ten seconds.  Each request computes the page
afresh; nothing is cached or kept.

Every string from the service goes through :func:`html.escape` in one
place (:func:`_cell`): peers, server names and user names are client input.
As a second line, the response's Content-Security-Policy allows only the
page's own inline script and style (by hash), and fetches to the page's own
origin; an injected ``<script>`` or event attribute would not run.

Read-only, and therefore open without the admin token, like ``/stats``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from egressproxy.observe.httpsite import JSON, respond
from egressproxy.observe.statusdata import ClusterStatus, status

HTML = b"text/html; charset=utf-8"

#: Seconds between the page's refreshes by script, and by ``<noscript>`` meta refresh.
REFRESH_SECONDS = 2
NOSCRIPT_REFRESH_SECONDS = 10

SCRIPT = """
(function () {
  var refreshes = 0;
  function refresh() {
    fetch(location.pathname, {cache: "no-store"})
      .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.text(); })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("status");
        var old = document.getElementById("status");
        if (fresh && old) { fresh.setAttribute("data-refreshes", String(++refreshes)); old.replaceWith(fresh); }
        document.body.classList.remove("stale");
      })
      .catch(function () { document.body.classList.add("stale"); })
      .finally(function () { setTimeout(refresh, %d); });
  }
  setTimeout(refresh, %d);
})();
""" % (REFRESH_SECONDS * 1000, REFRESH_SECONDS * 1000)

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #1b1b1b; background: #fff; }
h1 { font-size: 1.4em; margin: 0 0 .3em; } h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
table { border-collapse: collapse; margin: .3em 0; } caption { text-align: left; color: #555; padding: .2em 0; }
th, td { border: 1px solid #ccc; padding: .2em .5em; text-align: left; vertical-align: top; }
th { background: #f1f1f1; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #0a6b1f; font-weight: 600; } .bad { color: #b00020; font-weight: 600; }
.unknown { color: #7a5d00; } .note { color: #555; } code { font-size: .95em; }
#stale { display: none; background: #fff3cd; padding: .3em .6em; }
body.stale #stale { display: block; }
"""


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


#: Only the page's own script and style run; it may fetch from its own origin and nothing else.
CSP = (
    f"default-src 'none'; script-src {_hash(SCRIPT)}; style-src {_hash(STYLE)}; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
).encode("ascii")

#: A cell: its text, or (text, CSS class); the text is always escaped.
Cell = Any


def _cell(value: Cell, tag: str = "td") -> str:
    """One table cell, its text escaped (the one place service strings become HTML)."""
    css = ""
    if isinstance(value, tuple):
        value, css = value
    if isinstance(value, int) and not isinstance(value, bool):
        css = (css + " num").strip()
    text = "-" if value is None or value == "" else str(value)
    attribute = f' class="{html.escape(css)}"' if css else ""
    return f"<{tag}{attribute}>{html.escape(text)}</{tag}>"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Cell]], caption: str | None = None) -> str:
    head = "".join(_cell(h, "th") for h in headers)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _p(text: str, css: str = "note") -> str:
    return f'<p class="{css}">{html.escape(text)}</p>'


def human_bytes(count: int) -> str:
    """``1.5 MiB``: bytes in binary units, exact below 1 KiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    """``4.2s``, ``3m 07s``, ``2h 05m``, ``3d 04h``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d {whole % 86400 // 3600:02d}h"


def _health(healthy: bool | None) -> Cell:
    if healthy is None:
        return ("unknown", "unknown")
    return ("healthy", "ok") if healthy else ("unhealthy", "bad")


def _server(data: dict[str, Any]) -> str:
    server = data["server"]
    if server["ready"]:
        state = '<span class="ok">ready</span>'
    else:
        state = f'<span class="bad">not ready: {html.escape(str(server["not_ready_reason"]))}</span>'
    reloads = server["reloads"]
    workers = server["workers"]
    parts = [
        f"<p>{state}{' (draining)' if server['draining'] else ''}</p>",
        _p(f"workers: {workers} (this page is from worker {server['worker_index']}); config reloads: "
           f"{reloads.get('success', 0)} succeeded, {reloads.get('error', 0)} failed"),
    ]
    return "".join(parts)


def _egress(data: dict[str, Any]) -> str:
    egress = data["egress"]
    if egress is None:
        return _p("Not checked: expected_egress_ips is not set.")
    checked = egress["checked_seconds_ago"]
    row = (
        egress["seen"] or "not known yet",
        ", ".join(egress["expected"]),
        ("expected", "ok") if egress["ready"] else (egress["reason"], "bad"),
        egress["error"],
        "not yet" if checked is None else human_age(checked) + " ago",
    )
    return _table(("egress address seen", "expected", "verdict", "last error", "checked"), [row])


def _listeners(data: dict[str, Any]) -> str:
    rows = []
    for entry in data["listeners"]:
        name = entry["name"] + (" (removed by reload, draining)" if entry["retired"] else "")
        rows.append((
            name, entry["mode"], entry["cluster"], ", ".join(entry["bound"]) or entry["listen"],
            entry["active"], entry["connections_total"],
            human_bytes(entry["bytes_received"]), human_bytes(entry["bytes_sent"]),
            sum(entry["rejected"].values()),
        ))
    if not rows:
        return _p("No listeners configured.")
    headers = ("listener", "mode", "cluster", "bound", "active", "total", "received", "sent", "refused")
    return _table(headers, rows)


def _refusals(data: dict[str, Any]) -> str:
    rows = []
    for entry in data["listeners"]:
        if not entry["rejected"] and not entry["last_refusal"]:
            continue
        counts = ", ".join(f"{reason}: {count}" for reason, count in entry["rejected"].items())
        rows.append((
            entry["name"], entry["last_refusal"], entry["last_refusal_flag"],
            entry["last_refusal_flag_meaning"], counts,
        ))
    note = _p("The newest refusal per listener and the counts by reason since start; "
              "the access log has a line (with its flags) for every refused connection.")
    recent = _recent(data.get("recent_problems", []))
    if not rows:
        return _p("No connection refused since start.") + note + recent
    return _table(("listener", "newest refusal", "flag", "flag meaning", "refusals by reason"), rows) + note + recent


def _recent(problems: list[dict[str, Any]]) -> str:
    """The last refused or failed connections with their flags, newest first."""
    if not problems:
        return ""
    rows = [(
        p["start_time"], p["listener"], p["downstream"], p["upstream"], ",".join(p["flags"]),
        "; ".join(m for m in p["meanings"] if m), human_bytes(p["bytes_received"]), human_bytes(p["bytes_sent"]),
    ) for p in problems]
    headers = ("started", "listener", "peer", "upstream", "flags", "meaning", "received", "sent")
    return _p("Last refused or failed connections (this process), newest first:") + _table(headers, rows)


def _clusters(data: dict[str, Any]) -> str:
    clusters, endpoints = [], []
    for cluster in data["clusters"]:
        breaker = cluster["circuit_breaker"]
        failures = ", ".join(f"{k}: {v}" for k, v in cluster["connect_failures"].items() if v)
        clusters.append((
            cluster["name"], ("open", "bad") if breaker["open"] else ("closed", "ok"),
            f"{breaker['active']} / {breaker['max_connections']}", f"{breaker['pending']} / {breaker['max_pending']}",
            breaker["overflows"], cluster["connections_total"], failures, cluster["health_check"]["kind"],
        ))
        for endpoint in cluster["endpoints"]:
            endpoints.append((
                cluster["name"], endpoint["address"], _health(endpoint["healthy"]), endpoint["last_error"],
                endpoint["active"], endpoint["connections_total"], endpoint["connect_failures"],
            ))
    if not clusters:
        return _p("No clusters.")
    out = _table(("cluster", "breaker", "active / max", "pending / max", "overflows", "connections",
                  "connect failures", "health check"), clusters)
    if endpoints:
        out += _table(("cluster", "endpoint", "health", "last error", "active", "total", "connect failures"),
                      endpoints)
    return out


def _connections(data: dict[str, Any]) -> str:
    live = data["connections"]
    server = data["server"]
    if server["workers"] > 1:
        scope = (f"Connections of this process only (worker {server['worker_index']} of {server['workers']}); "
                 "the other workers' connections are not listed here.")
    else:
        scope = "All live connections of this proxy."
    if not live["total"]:
        return _p("No live connections.") + _p(scope)
    rows = [
        (c["peer"], c["listener"], c["upstream"], c["dialled"], c["user"], c["stage"],
         human_bytes(c["bytes_received"]), human_bytes(c["bytes_sent"]), human_age(c["age_seconds"]),
         ",".join(c["flags"]))
        for c in live["shown"]
    ]
    caption = f"{live['total']} live, newest first"
    headers = ("peer", "listener", "upstream", "dialled", "user", "stage", "received", "sent", "age", "flags")
    out = _table(headers, rows, caption)
    if live["more"]:
        out += f'<p class="more">and {live["more"]} more (only the newest {live["limit"]} are listed)</p>'
    return out + _p(scope)


def render_page(data: dict[str, Any]) -> str:
    """The whole HTML document for :func:`statusdata.status`'s ``data``."""
    sections = [
        ("server", "Readiness", _server(data)),
        ("egress", "Egress address", _egress(data)),
        ("listeners", "Listeners", _listeners(data)),
        ("refusals", "Refusals", _refusals(data)),
        ("clusters", "Clusters", _clusters(data)),
        ("connections", "Live connections", _connections(data)),
    ]
    body = "".join(f'<section id="{key}"><h2>{title}</h2>{content}</section>' for key, title, content in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>egressproxy status</title>"
        f'<noscript><meta http-equiv="refresh" content="{NOSCRIPT_REFRESH_SECONDS}"></noscript>'
        f"<style>{STYLE}</style></head>\n<body>"
        '<p id="stale">Not refreshed: the admin service did not answer the last refresh.</p>'
        '<main id="status"><h1>egressproxy status</h1>'
        f"{body}</main>\n<script>{SCRIPT}</script></body></html>\n"
    )


def _no_store(request: Request) -> None:
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Referrer-Policy", b"no-referrer")


class _StatusResource(Resource):
    """A read-only view of :func:`statusdata.status` now: the page or its JSON (``render_body``)."""

    isLeaf = True

    def __init__(self, service: Any, cluster_status: ClusterStatus) -> None:
        super().__init__()
        self.service = service
        self.cluster_status = cluster_status

    def render_GET(self, request: Request) -> bytes:
        _no_store(request)
        return self.render_body(request, status(self.service, self.cluster_status))

    def render_body(self, request: Request, data: dict[str, Any]) -> bytes:
        raise NotImplementedError


class StatusPageResource(_StatusResource):
    """``GET /``: :func:`render_page` of the service now."""

    def render_body(self, request: Request, data: dict[str, Any]) -> bytes:
        request.setHeader(b"Content-Security-Policy", CSP)
        return respond(request, 200, render_page(data), HTML)


class StatusJsonResource(_StatusResource):
    """``GET /status.json``: :func:`statusdata.status` of the service now, as JSON."""

    def render_body(self, request: Request, data: dict[str, Any]) -> bytes:
        return respond(request, 200, json.dumps(data, indent=2) + "\n", JSON)
