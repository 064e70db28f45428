"""The access log: one record per finished downstream connection.

Shape (Envoy's default TCP line, which operators already grep)::

    [2026-06-07T08:11:33.490Z] DIRECT [fdaa:0:1::3]:63276 db.example.cloud:5432 1284 892 45 "-"

start time (UTC, ms) · prefix · downstream peer · upstream host:port dialled ·
bytes received from downstream · bytes sent to downstream · duration ms ·
response flags (comma separated, ``-`` for none).

Forward-proxy listeners (``http_connect``, ``socks5``) append two
``key=value`` fields, so parsers of the first eight keep working::

    [...] FWD 10.0.0.7:50122 api.vendor.com:443 517 4420 310 "-" user=app dialled=203.0.113.9:443

the authenticated user (``-`` without one; never a password) and the
address actually dialled (the upstream socket's peer, ``-`` when nothing
was connected); field 4 stays the destination as the client asked for it.

This module owns the record and the pure formatters; it does not decide
flags (sessions do) or where lines go (``make_access_logger`` wires a
``twisted.logger`` observer to a stream; the service passes stdout).
"""

from __future__ import annotations

import functools
import json
import time
from typing import IO, Callable

import attrs
from twisted.logger import FileLogObserver, Logger

from egressproxy.observe.origin import NO_ORIGIN, Origin

#: Response flags, as Envoy spells them, and what each means here.
FLAGS = {
    "UF": "upstream connect failure (refused, unreachable, DNS)",
    "UT": "upstream connect timeout",
    "UO": "upstream overflow: the cluster's circuit breaker is open",
    "UH": "no healthy upstream",
    "NR": "no route: destination or server name not allowed",
    "DI": "idle timeout",
    "NB": "no bytes: an upstream_connect: on_first_byte client left or stayed silent before sending a byte; "
    "nothing was dialled",
    "DC": "downstream connection terminated abnormally (reset)",
    "UC": "upstream connection terminated abnormally (reset)",
    "RBAC": "source address not in the listener's allow_sources",
    "OM": "listener at max_connections (overload)",
    "DPE": "downstream protocol error: no valid PROXY protocol header, or a malformed, oversized, "
    "unsupported or too slow forward-proxy request (HTTP, SOCKS5)",
    "UAEX": "unauthorized: missing or wrong forward-proxy credentials (407, SOCKS5 auth failure)",
    "IA": "internal address: the destination resolves to an address the listener refuses (loopback, private, "
    "link-local, ...), or to one of the proxy's own sockets; never dialled",
    "DT": "cut when drain_timeout expired during shutdown",
    "LR": "Postgres login refused by the server, written LR:<SQLSTATE> (LR:28P01 wrong password, "
    "LR:28000 no pg_hba entry for this address, LR:3D000 no such database); originate and plaintext listeners",
    "RP": "report mode: allowed, but policy enforce would refuse it (the log says why)",
}


@attrs.frozen
class AccessRecord:
    """What is known about one downstream connection once it has ended."""

    start: float  # seconds since the epoch
    listener: str
    prefix: str
    downstream: str
    upstream: str
    bytes_received: int
    bytes_sent: int
    duration_ms: int
    flags: tuple[str, ...] = ()
    #: Forward listeners only (None elsewhere, and then not written): the
    #: authenticated user's name and the ``ip:port`` actually dialled, ``-``
    #: when there is none (no users configured, refused before a connect).
    user: str | None = None
    upstream_address: str | None = None


def format_timestamp(seconds: float) -> str:
    """``2026-06-07T08:11:33.490Z``: UTC with milliseconds, like Envoy's START_TIME."""
    whole = int(seconds)
    millis = int(round((seconds - whole) * 1000))
    if millis == 1000:
        whole, millis = whole + 1, 0
    return f"{_second(whole)}.{millis:03d}Z"


@functools.lru_cache(maxsize=4)
def _second(whole: int) -> str:
    """A whole second's ``2026-06-07T08:11:33``: lines come in bursts within a second, so it is remembered."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def format_flags(flags: tuple[str, ...]) -> str:
    return ",".join(flags) if flags else "-"


def format_text(record: AccessRecord) -> str:
    """The Envoy-shaped text line, without a newline.

    Forward listeners' lines end in two more fields, ``user=NAME``
    and ``dialled=IP:PORT`` (``-`` for none), after the eight Envoy ones.
    """
    line = (
        f"[{format_timestamp(record.start)}] {record.prefix} {record.downstream} "
        f"{record.upstream} {record.bytes_received} {record.bytes_sent} "
        f'{record.duration_ms} "{format_flags(record.flags)}"'
    )
    if record.user is not None or record.upstream_address is not None:
        line += f" user={record.user or '-'} dialled={record.upstream_address or '-'}"
    return line


def format_json(record: AccessRecord) -> str:
    """One JSON object, keys named after Envoy's command operators.

    Forward listeners' objects also have ``user`` and ``upstream_address``
    (the ``ip:port`` dialled), ``-`` for none as in the other fields.
    """
    fields: dict[str, object] = {
        "start_time": format_timestamp(record.start),
        "listener": record.listener,
        "prefix": record.prefix,
        "downstream_remote_address": record.downstream,
        "upstream_host": record.upstream,
        "bytes_received": record.bytes_received,
        "bytes_sent": record.bytes_sent,
        "duration_ms": record.duration_ms,
        "response_flags": format_flags(record.flags),
    }
    if record.user is not None or record.upstream_address is not None:
        fields["user"] = record.user or "-"
        fields["upstream_address"] = record.upstream_address or "-"
    return json.dumps(fields, separators=(",", ":"))


FORMATTERS: dict[str, Callable[[AccessRecord], str]] = {"text": format_text, "json": format_json}


def with_origin(formatter: Callable[[AccessRecord], str], format: str, origin: Origin) -> Callable[[AccessRecord], str]:
    """``formatter`` whose lines also say which Machine wrote them (see ``origin.py``); itself when off Fly."""
    if origin == NO_ORIGIN:
        return formatter
    if format == "json":
        extra = json.dumps(origin.json_fields(), separators=(",", ":"))[1:-1]
        return lambda record: formatter(record)[:-1] + "," + extra + "}"
    suffix = origin.text_fields()
    return lambda record: formatter(record) + suffix


def make_access_logger(stream: IO[str], format: str = "text", origin: Origin = NO_ORIGIN) -> Logger:
    """A Logger whose only observer writes each record as one line to ``stream``.

    A Logger given its own observer never reaches the global log publisher,
    so access lines are not duplicated in twistd's log.  Emit records with
    ``logger.info("{record}", record=record)``.  On Fly, each line ends with
    the Machine's region and ID (``origin``).
    """
    formatter = with_origin(FORMATTERS[format], format, origin)

    def format_event(event: dict) -> str | None:
        record = event.get("record")
        if not isinstance(record, AccessRecord):
            return None
        return formatter(record) + "\n"

    return Logger(namespace="egressproxy.access", observer=FileLogObserver(stream, format_event))
