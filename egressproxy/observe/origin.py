"""Which Machine wrote a line: Fly's region and Machine ID, when the platform sets them.

With two Machines in two regions, every access line and every scrape looks
the same unless it says where it came from.  Fly sets ``FLY_REGION`` and
``FLY_MACHINE_ID`` in each Machine's environment; this module reads them once
and renders them the ways the rest of the proxy needs: ``key=value`` fields
for the text access log and start-up line, keys for the JSON access log, and
labels for one ``egressproxy_info`` series.  Outside Fly (neither variable
set) it renders nothing, so existing lines keep their exact shape.

Metrics carry the identity only on ``egressproxy_info`` rather than as a
label on every series: Fly's own scraper already attaches ``region`` and
``instance`` to what it collects, and a second copy on every series would
collide with those (Prometheus renames one to ``exported_region``).  Join on
``egressproxy_info`` where another scraper is used.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs


@attrs.frozen
class Origin:
    """The region and Machine ID of this process; empty strings when not on Fly."""

    region: str = ""
    machine_id: str = ""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "Origin":
        """Read ``FLY_REGION`` and ``FLY_MACHINE_ID``, stripped of spaces."""
        return cls(environ.get("FLY_REGION", "").strip(), environ.get("FLY_MACHINE_ID", "").strip())

    def text_fields(self) -> str:
        """`` region=ams machine=148e...``: appended to text lines; empty when unset."""
        parts = []
        if self.region:
            parts.append(f"region={self.region}")
        if self.machine_id:
            parts.append(f"machine={self.machine_id}")
        return "".join(" " + part for part in parts)

    def json_fields(self) -> dict[str, str]:
        """``fly_region`` and ``fly_machine_id`` for JSON lines; only the ones that are set."""
        fields = {}
        if self.region:
            fields["fly_region"] = self.region
        if self.machine_id:
            fields["fly_machine_id"] = self.machine_id
        return fields


#: Outside Fly: nothing to add.
NO_ORIGIN = Origin()
