"""The modes are sealed: no module under ``egressproxy/modes/`` touches legs, transports or counters.

A mode's machine asks for effects with actions (``datapath/handshake.py``);
only the driver (``datapath/driver.py``) applies them.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

MODES = Path(__file__).resolve().parent.parent / "egressproxy" / "modes"

#: Attribute names that reach a leg, a transport or a session's counters.
FORBIDDEN = frozenset({
    "transport", "down", "up", "pending", "pending_size", "bytes_sent", "bytes_received",
    "connect_failures", "startTLS", "dataReceived",
})


def violations(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN:
            found.append(f"{name}:{node.lineno}: .{node.attr}")
    return found


class SealedTests(SynchronousTestCase):
    def test_modes_touch_no_leg_transport_or_counter(self) -> None:
        found = []
        files = sorted(MODES.rglob("*.py"))
        self.assertTrue(files)
        for path in files:
            found += violations(path.read_text(), str(path.relative_to(MODES.parent.parent)))
        self.assertEqual(found, [])

    def test_detects(self) -> None:
        """The check itself finds each kind of reach."""
        self.assertEqual(len(violations("s.down.transport.write(b'')\nx.up\ns.bytes_sent -= 1\n", "x.py")), 4)
        self.assertEqual(violations("self.upstream_name\nfront.start()\n", "x.py"), [])
