"""Transparent mode's local side: /etc/hosts edits on a temp file, the loopback plan, and the wrapped command's helpers."""

from __future__ import annotations

import os
import signal

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.tunnel.child import CommandNotFound, child_environment, exit_status, find_program
from egressproxy.tunnel.hostsfile import HostsFile, HostsFileError, add_entries, names_in, remove_entries
from egressproxy.tunnel.listeners import Binding, TunnelStartError, plan
from egressproxy.tunnel.parse import Destination

ORIGINAL = "127.0.0.1\tlocalhost\n::1 localhost ip6-localhost  # the usual\n10.0.0.9 cache.internal\n"
ENTRIES = [("127.77.0.1", "db.egress.test"), ("127.77.0.2", "api.egress.test")]


class HostsTextTests(SynchronousTestCase):
    def test_add_appends_marked_lines(self) -> None:
        """Each entry becomes one line marked with the PID, after the file's own lines."""
        text, stale = add_entries(ORIGINAL, ENTRIES, 4242)
        self.assertEqual(stale, [])
        self.assertEqual(text, ORIGINAL + "127.77.0.1 db.egress.test  # egressproxy tunnel 4242\n"
                         "127.77.0.2 api.egress.test  # egressproxy tunnel 4242\n")

    def test_existing_name_is_an_error(self) -> None:
        """A name the file already maps is refused with its line; nothing is returned to write."""
        with self.assertRaises(HostsFileError) as caught:
            add_entries(ORIGINAL + "10.1.1.1 other DB.egress.test\n", ENTRIES, 4242)
        message = str(caught.exception)
        self.assertIn("db.egress.test is already in the hosts file (line 4: '10.1.1.1 other DB.egress.test')", message)
        self.assertIn("does not overwrite entries", message)

    def test_names_in_ignores_comments(self) -> None:
        """Names in comments do not count; every name on a line does."""
        names = names_in("# 1.2.3.4 commented.example\n1.2.3.4 a.example b.example # c.example\n")
        self.assertEqual(sorted(names), ["a.example", "b.example"])

    def test_live_tunnel_named(self) -> None:
        """A name held by a running tunnel is refused, saying which PID serves it."""
        text, _ = add_entries(ORIGINAL, ENTRIES[:1], os.getpid())
        with self.assertRaises(HostsFileError) as caught:
            add_entries(text, ENTRIES, 4242, alive=lambda pid: True)
        self.assertIn(f"added by egressproxy tunnel PID {os.getpid()}, which still runs", str(caught.exception))

    def test_stale_lines_dropped(self) -> None:
        """Lines of a tunnel whose PID is gone are dropped and reported."""
        text, _ = add_entries(ORIGINAL, ENTRIES, 999999)
        again, stale = add_entries(text, ENTRIES, 4242, alive=lambda pid: False)
        self.assertEqual(len(stale), 2)
        self.assertEqual(again.count("egressproxy tunnel"), 2)
        self.assertEqual(remove_entries(again, 4242), ORIGINAL)

    def test_remove_keeps_every_other_byte(self) -> None:
        """Removal takes only this PID's lines: another tunnel's stay, the rest is byte for byte as before."""
        text, _ = add_entries(ORIGINAL, ENTRIES[:1], 1111)
        text, _ = add_entries(text, ENTRIES[1:], 2222, alive=lambda pid: True)
        left = remove_entries(text, 2222)
        self.assertEqual(left, ORIGINAL + "127.77.0.1 db.egress.test  # egressproxy tunnel 1111\n")
        self.assertEqual(remove_entries(left, 1111), ORIGINAL)


class HostsFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(ORIGINAL.rstrip("\n"))  # no final newline, as some images have

    def read(self) -> str:
        with open(self.path, encoding="utf-8") as f:
            return f.read()

    def test_add_and_remove_in_place(self) -> None:
        """The file is edited in place (same inode, as a bind mount needs) and restored exactly."""
        inode = os.stat(self.path).st_ino
        hosts = HostsFile(self.path, pid=4242)
        hosts.add(ENTRIES)
        self.assertIn("127.77.0.2 api.egress.test  # egressproxy tunnel 4242\n", self.read())
        self.assertEqual(os.stat(self.path).st_ino, inode)
        hosts.remove()
        hosts.remove()
        self.assertEqual(self.read(), ORIGINAL)  # the newline added before our lines stays: one byte
        self.assertEqual(os.stat(self.path).st_ino, inode)

    def test_conflict_writes_nothing(self) -> None:
        """A conflict leaves the file untouched and remove() then does nothing."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n10.0.0.30 db.egress.test\n")
        before = self.read()
        hosts = HostsFile(self.path, pid=4242)
        self.assertRaises(HostsFileError, hosts.add, ENTRIES)
        hosts.remove()
        self.assertEqual(self.read(), before)

    def test_unwritable_names_the_fix(self) -> None:
        """A file that cannot be opened for writing gives an error naming the file and the fix."""
        missing = HostsFile(os.path.join(self.mktemp(), "hosts"), pid=1)
        with self.assertRaises(HostsFileError) as caught:
            missing.add(ENTRIES)
        self.assertIn("cannot edit", str(caught.exception))


class PlanTests(SynchronousTestCase):
    def test_transparent_address_per_host(self) -> None:
        """Each destination host gets its own 127.77.0.N; its ports share it."""
        dests = (Destination("db.a", 5432), Destination("db.b", 5432), Destination("db.a", 6432))
        self.assertEqual(plan(dests, transparent=True), [
            Binding(dests[0], "127.77.0.1", 5432), Binding(dests[1], "127.77.0.2", 5432),
            Binding(dests[2], "127.77.0.1", 6432),
        ])

    def test_plain_loopback_own_port_first(self) -> None:
        """Without --transparent, 127.0.0.1 on the destination's port; a repeated port gets the kernel's choice."""
        dests = (Destination("db.a", 5432), Destination("db.b", 5432))
        self.assertEqual([(b.address, b.port) for b in plan(dests, transparent=False)],
                         [("127.0.0.1", 5432), ("127.0.0.1", 0)])

    def test_transparent_ip_destination_refused(self) -> None:
        """An IP destination cannot be redirected by name: the error says to give the name."""
        with self.assertRaises(TunnelStartError) as caught:
            plan((Destination("10.0.0.30", 5432),), transparent=True)
        self.assertIn("give its name, or run without --transparent", str(caught.exception))


class ChildTests(SynchronousTestCase):
    def test_exit_status_like_a_shell(self) -> None:
        """An exit code is passed through; death by signal N is 128 + N."""
        self.assertEqual(exit_status(Failure(ProcessDone(0))), 0)
        self.assertEqual(exit_status(Failure(ProcessTerminated(exitCode=3))), 3)
        self.assertEqual(exit_status(Failure(ProcessTerminated(signal=signal.SIGTERM))), 128 + signal.SIGTERM)

    def test_single_file_library_path_undone(self) -> None:
        """In the single-file executable, the child gets the original LD_LIBRARY_PATH (or none)."""
        frozen = {"LD_LIBRARY_PATH": "/tmp/_MEI1:/opt/lib", "LD_LIBRARY_PATH_ORIG": "/opt/lib", "X": "1"}
        self.assertEqual(child_environment(frozen, frozen=True), {"LD_LIBRARY_PATH": "/opt/lib", "X": "1"})
        self.assertEqual(child_environment({"LD_LIBRARY_PATH": "/tmp/_MEI1"}, frozen=True), {})
        self.assertEqual(child_environment(frozen, frozen=False), frozen)

    def test_program_lookup(self) -> None:
        """COMMAND is looked up on the child's PATH; a missing one says where it looked."""
        self.assertEqual(find_program("sh", {"PATH": "/nonexistent:/bin"}), "/bin/sh")
        with self.assertRaises(CommandNotFound) as caught:
            find_program("sh", {"PATH": "/nonexistent"})
        self.assertIn("not found on PATH (/nonexistent)", str(caught.exception))
        self.assertRaises(CommandNotFound, find_program, "/nonexistent/psql", {})
