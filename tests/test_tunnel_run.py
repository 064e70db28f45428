"""The tunnel process's set-up, signals and undo, on a memory reactor and a temporary hosts file."""

from __future__ import annotations

import io
import os

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.tunnel.logline import TunnelLog
from egressproxy.tunnel.options import TunnelOptions
from egressproxy.tunnel.parse import Destination, Path
from egressproxy.tunnel.run import Tunnel
from egressproxy.tunnel.hostsfile import HostsFileError

PATHS = (Path("socks5", "10.0.0.21", 1080, "app", "pw"),)
DESTS = (Destination("db.egress.test", 5432), Destination("api.egress.test", 443))


class FakeChild:
    """Records the signals passed to the wrapped command."""

    def __init__(self) -> None:
        self.signals: list[str] = []

    def signal(self, name: str) -> bool:
        self.signals.append(name)
        return True


class TunnelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.stream = io.StringIO()
        self.hosts = self.mktemp()
        with open(self.hosts, "w", encoding="utf-8") as f:
            f.write("127.0.0.1 localhost\n")

    def tunnel(self, transparent: bool = True, command: tuple[str, ...] = ()) -> Tunnel:
        options = TunnelOptions(PATHS, DESTS, transparent=transparent, command=command)
        return Tunnel(self.reactor, options, TunnelLog(self.stream), {}, hosts_path=self.hosts)

    def hosts_text(self) -> str:
        with open(self.hosts, encoding="utf-8") as f:
            return f.read()

    def test_transparent_start_and_undo(self) -> None:
        """Set-up binds 127.77.0.N on each destination's port, adds one hosts line per host; undo removes them."""
        tunnel = self.tunnel()
        tunnel.start()
        self.assertEqual([(port, interface) for port, _, _, interface in self.reactor.tcpServers],
                         [(5432, "127.77.0.1"), (443, "127.77.0.2")])
        pid = os.getpid()
        self.assertEqual(self.hosts_text(), "127.0.0.1 localhost\n"
                         f"127.77.0.1 db.egress.test  # egressproxy tunnel {pid}\n"
                         f"127.77.0.2 api.egress.test  # egressproxy tunnel {pid}\n")
        self.assertIn("egressproxy tunnel: paths, in order: socks5://app@10.0.0.21:1080\n", self.stream.getvalue())
        tunnel.undo()
        tunnel.undo()
        self.assertEqual(self.hosts_text(), "127.0.0.1 localhost\n")

    def test_conflict_leaves_nothing_behind(self) -> None:
        """A name already in the hosts file fails the start; undo then leaves the file as it was."""
        with open(self.hosts, "a", encoding="utf-8") as f:
            f.write("10.0.0.30 db.egress.test\n")
        before = self.hosts_text()
        tunnel = self.tunnel()
        self.assertRaises(HostsFileError, tunnel.start)
        tunnel.undo()
        self.assertEqual(self.hosts_text(), before)

    def test_plain_mode_does_not_touch_hosts(self) -> None:
        """Without --transparent the listeners are on 127.0.0.1 and the hosts file is not edited."""
        tunnel = self.tunnel(transparent=False)
        tunnel.start()
        self.assertEqual({interface for *_, interface in self.reactor.tcpServers}, {"127.0.0.1"})
        self.assertEqual(self.hosts_text(), "127.0.0.1 localhost\n")

    def test_signals_go_to_the_command(self) -> None:
        """With a command, SIGTERM, SIGHUP and (off a terminal) SIGINT are passed on; the tunnel keeps running."""
        tunnel = self.tunnel(command=("bin/server",))
        tunnel.child = child = FakeChild()  # type: ignore[assignment]
        tunnel.terminal_shared = lambda: False
        for name in ("SIGTERM", "SIGHUP", "SIGINT"):
            tunnel._signalled(name)
        self.assertEqual(child.signals, ["TERM", "HUP", "INT"])
        self.assertFalse(tunnel.stopping)

    def test_terminal_ctrl_c_not_sent_twice(self) -> None:
        """A SIGINT the terminal also delivered to the command (same foreground group) is not passed on again."""
        tunnel = self.tunnel(command=("psql",))
        tunnel.child = child = FakeChild()  # type: ignore[assignment]
        tunnel.terminal_shared = lambda: True
        tunnel._signalled("SIGINT")
        tunnel._signalled("SIGTERM")
        self.assertEqual(child.signals, ["TERM"])

    def test_command_status_is_the_exit_status(self) -> None:
        """When the command ends, the tunnel stops with its status."""
        tunnel = self.tunnel(command=("bin/server",))
        tunnel.start()
        tunnel._child_ended(143)
        self.reactor.advance(0)
        self.assertTrue(self.reactor.hasStopped)
        self.assertEqual(tunnel.status, 143)

    def test_foreground_sigterm_stops_and_sighup_is_ignored(self) -> None:
        """Without a command, SIGHUP is noted and ignored, SIGTERM stops the tunnel with status 0."""
        tunnel = self.tunnel()
        tunnel.start()
        tunnel._signalled("SIGHUP")
        self.assertFalse(tunnel.stopping)
        self.assertIn("SIGHUP ignored", self.stream.getvalue())
        tunnel._signalled("SIGTERM")
        self.reactor.advance(0)
        self.assertTrue(self.reactor.hasStopped)
        self.assertEqual(tunnel.status, 0)
        tunnel.undo()
