"""The dispatch shortcut on a private epoll reactor, turned by hand.

Each test builds its own ``EPollReactor`` (never run; ``doIteration(0)`` is
called directly), registers selectables on one end of a socketpair and
makes the other end readable, so what the poll step calls is observed
without the global reactor and without timing.
"""

from __future__ import annotations

import socket

from twisted.internet import main
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from egressproxy.datapath import fastdispatch
from egressproxy.datapath.fastpath import FastPath
from egressproxy.datapath.fastread import ATTRIBUTE


class Readable(FileDescriptor):
    """A selectable on one end of a socketpair that records how it was called."""

    def __init__(self, reactor: object, sock: socket.socket) -> None:
        super().__init__(reactor=reactor)
        self.sock = sock
        self.calls: list[str] = []
        self.lost: list[Failure] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> object:
        self.calls.append("doRead")
        self.sock.recv(4096)
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)
        self.reactor.removeReader(self)


class DispatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        if fastdispatch.EPollReactor is None:
            raise SkipTest("the epoll reactor exists only on Linux: nothing to shortcut here")
        self.reactor = fastdispatch.EPollReactor()
        self.addCleanup(self._close_reactor)

    def _close_reactor(self) -> None:
        self.reactor.removeAll()
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()

    def selectable(self, fast_read: object = None) -> tuple[Readable, socket.socket]:
        """A registered selectable and the socket whose writes make it readable."""
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        selectable = Readable(self.reactor, ours)
        if fast_read is not None:
            setattr(selectable, ATTRIBUTE, fast_read)
        self.reactor.addReader(selectable)
        self.addCleanup(self.reactor.removeReader, selectable)  # before the sockets close
        return selectable, theirs

    def test_not_installed_on_other_reactors(self) -> None:
        """A reactor that is not Twisted's epoll reactor is left as it is."""
        memory = MemoryReactorClock()
        fast = FastPath()
        self.assertEqual(
            fast.check(memory),
            ["dispatch: reactor twisted.internet.testing.MemoryReactorClock: is not Twisted's EPollReactor"],
        )
        self.assertNotIn("dispatch", fast.install(memory))
        self.assertNotIn("doIteration", vars(memory))

    def test_installed_once(self) -> None:
        """Two installs share one poll step; it goes back to Twisted's after the last uninstall."""
        first, second = FastPath(), FastPath()
        self.assertEqual(first.check(self.reactor), [], "Twisted's EPollReactor changed shape")
        self.assertIn("dispatch", first.install(self.reactor))
        step = self.reactor.doIteration
        self.assertNotEqual(step, fastdispatch.EPollReactor.doPoll.__get__(self.reactor))
        self.assertEqual(second.check(self.reactor), [], "an installed shortcut must pass the check")
        self.assertIn("dispatch", second.install(self.reactor))
        self.assertIs(self.reactor.doIteration, step)
        first.uninstall()
        self.assertIs(self.reactor.doIteration, step)
        second.uninstall()
        self.assertNotIn("doIteration", vars(self.reactor))
        self.assertFalse(hasattr(self.reactor, fastdispatch.MARK))

    def test_marked_selectable_read_directly(self) -> None:
        """A readable selectable with a fast reader has it called instead of doRead."""
        fastdispatch.install(self.reactor)
        reads: list[bytes] = []
        selectable, theirs = self.selectable(lambda: reads.append(selectable.sock.recv(4096)))
        theirs.sendall(b"query")
        self.reactor.doIteration(0)
        self.assertEqual(reads, [b"query"])
        self.assertEqual(selectable.calls, [])
        self.assertEqual(selectable.lost, [])

    def test_direct_method_takes_any_event(self) -> None:
        """A selectable with the DIRECT method (the relay's notifications, a quick-lane dial) has it called for any event."""
        fastdispatch.install(self.reactor)
        direct: list[None] = []
        selectable, theirs = self.selectable()
        setattr(selectable, fastdispatch.DIRECT, lambda: (direct.append(None), selectable.sock.recv(4096)))
        theirs.sendall(b"ended")
        theirs.close()  # readable and hung up: not the plain read event
        self.reactor.doIteration(0)
        self.assertEqual(direct, [None])
        self.assertEqual((selectable.calls, selectable.lost), ([], []))

    def test_other_selectables_keep_twisted_path(self) -> None:
        """A selectable without a fast reader still gets doRead."""
        fastdispatch.install(self.reactor)
        selectable, theirs = self.selectable()
        theirs.sendall(b"query")
        self.reactor.doIteration(0)
        self.assertEqual(selectable.calls, ["doRead"])

    def test_hangup_takes_twisted_path(self) -> None:
        """An event other than plain readability (here a hang-up) goes through Twisted's dispatch."""
        fastdispatch.install(self.reactor)
        fast_calls: list[None] = []
        selectable, theirs = self.selectable(lambda: fast_calls.append(None))
        theirs.sendall(b"last words")
        theirs.close()
        self.reactor.doIteration(0)
        self.assertEqual(fast_calls, [])
        self.assertEqual(selectable.calls, ["doRead"])

    def test_end_of_stream_disconnects(self) -> None:
        """A fast reader reporting CONNECTION_DONE disconnects the selectable with ConnectionDone."""
        fastdispatch.install(self.reactor)
        selectable, theirs = self.selectable(lambda: main.CONNECTION_DONE)
        theirs.sendall(b"x")
        self.reactor.doIteration(0)
        self.assertEqual(len(selectable.lost), 1)
        selectable.lost[0].trap(ConnectionDone)
        self.assertNotIn(selectable, self.reactor.getReaders())

    def test_reader_exception_logged_and_disconnects(self) -> None:
        """An exception in a fast reader is logged and disconnects only that selectable."""
        fastdispatch.install(self.reactor)

        def broken() -> None:
            raise ZeroDivisionError("reader bug")

        bad, bad_peer = self.selectable(broken)
        good_reads: list[bytes] = []
        good, good_peer = self.selectable(lambda: good_reads.append(good.sock.recv(4096)))
        bad_peer.sendall(b"x")
        good_peer.sendall(b"y")
        self.reactor.doIteration(0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len(bad.lost), 1)
        self.assertEqual(good_reads, [b"y"])
        self.assertEqual(good.lost, [])

    def test_connection_lost_reported(self) -> None:
        """A fast reader reporting CONNECTION_LOST disconnects with ConnectionLost."""
        fastdispatch.install(self.reactor)
        selectable, theirs = self.selectable(lambda: main.CONNECTION_LOST)
        theirs.sendall(b"x")
        self.reactor.doIteration(0)
        selectable.lost[0].trap(ConnectionLost)
