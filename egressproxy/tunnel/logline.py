"""What the tunnel writes: one ``TUNNEL`` line per connection, and its own notes.

The connection line is in the proxy's access-log family (``observe/accesslog.py``):
the same eight Envoy-shaped fields, then ``key=value`` fields::

    [2026-06-07T08:11:33.490Z] TUNNEL 127.0.0.1:50122 db.example.com:5432 1284 892 45 "-" via=socks5://app@my-egress.flycast:1080
    [...] TUNNEL 127.0.0.1:50124 db.example.com:5432 1284 892 3045 "-" via=socks5://app@[fdaa::5]:1080 failed=socks5://app@my-egress.flycast:1080(UT)
    [...] TUNNEL 127.0.0.1:50126 api.evil.example:443 0 0 3 "NR" via=- failed=socks5://app@my-egress.flycast:1080(NR)

start (UTC, ms) · ``TUNNEL`` · the app's local peer · the destination ·
bytes from the app · bytes to the app · duration ms · flags (the proxy's:
``UF`` no path reached, ``UT`` timeout, ``NR`` refused by the egress app's
allowlist, ``UAEX`` credentials refused, ``DC``/``UC`` reset by the app or
the path) · ``via=`` the path that carried it (``-``: none) · ``failed=``
(only when some failed) each path tried before, with its flag.  A path
shows its user but never its password.

Notes (start-up, the listener map, failovers, refusals) are plain lines
starting ``egressproxy tunnel:``.  Both go to one stream, stderr by default:
stdout belongs to the wrapped command, whose output scripts may read.
"""

from __future__ import annotations

from typing import IO

import attrs
from twisted.logger import FileLogObserver, Logger

from egressproxy.observe.accesslog import format_flags, format_timestamp

PREFIX = "TUNNEL"
NOTE = "egressproxy tunnel: "


@attrs.frozen
class TunnelRecord:
    """One finished local connection."""

    start: float
    peer: str
    destination: str
    bytes_received: int
    bytes_sent: int
    duration_ms: int
    flags: tuple[str, ...] = ()
    via: str = "-"
    #: Paths tried before ``via`` (or all of them, when none worked), each ``path(FLAG)``.
    failed: tuple[str, ...] = ()


def format_line(record: TunnelRecord) -> str:
    """The ``TUNNEL`` line, without a newline."""
    line = (
        f"[{format_timestamp(record.start)}] {PREFIX} {record.peer} {record.destination} "
        f"{record.bytes_received} {record.bytes_sent} {record.duration_ms} "
        f'"{format_flags(record.flags)}" via={record.via}'
    )
    if record.failed:
        line += f" failed={','.join(record.failed)}"
    return line


class TunnelLog:
    """Where the tunnel's lines go: one ``twisted.logger`` Logger with its own observer.

    A Logger given its own observer never reaches the global log publisher,
    so nothing is written twice (as with the proxy's access log).
    """

    def __init__(self, stream: IO[str]) -> None:
        def render(event: dict) -> str | None:
            record = event.get("record")
            if isinstance(record, TunnelRecord):
                return format_line(record) + "\n"
            text = event.get("text")
            return NOTE + text + "\n" if isinstance(text, str) else None

        self.stream = stream
        self._log = Logger(namespace="egressproxy.tunnel", observer=FileLogObserver(stream, render))

    def record(self, record: TunnelRecord) -> None:
        self._log.info("{record}", record=record)
        self._flush()

    def note(self, text: str) -> None:
        self._log.info("{text}", text=text)
        self._flush()

    def _flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass
