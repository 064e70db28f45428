"""FastPath: the start-up check of Twisted's private names, the fallback, and ``fast_path: off``.

Names are hidden the way a future Twisted would lose them: a module or class
attribute patched away, or an instance attribute the transport constructor
no longer sets.  Patches that would break Twisted itself while the reactor
runs (``_tempDataLen``, the reactor's internals) are undone as soon as the
check has seen them, before any traffic.
"""

from __future__ import annotations

from typing import Any

import attrs
import twisted
from twisted.internet import endpoints, protocol, reactor, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from egressproxy.datapath import fastdispatch
from egressproxy.datapath.fastpath import ORDINARY, FastPath
from egressproxy.datapath.fastread import ATTRIBUTE
from tests.integration.proxy import InProcessProxy, inline, wait_until
from tests.relaykit import relay_expected
from tests.splicerig import Peer


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Hiding:
    """Helpers that hide one private name each; every one returns its patch (``.restore()``)."""

    def capture_log(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        self.patch(FastPath, "log", Logger(observer=events.append))  # type: ignore[attr-defined]
        return events

    def hide_temp_data_len(self) -> Any:
        """TCP transports built from now on have no ``_tempDataLen`` (Twisted's writes break: undo soon)."""
        original = tcp.Connection.__init__

        def init(connection: Any, *args: Any, **kwargs: Any) -> None:
            original(connection, *args, **kwargs)
            del connection._tempDataLen

        return self.patch(tcp.Connection, "__init__", init)  # type: ignore[attr-defined]

    def hide_wrapping_protocol(self) -> Any:
        """``endpoints._WrappingProtocol`` gone (harmless: the factory keeps its own reference)."""
        return self.patch(endpoints, "_WrappingProtocol", None)  # type: ignore[attr-defined]

    def replace_poll_step(self) -> Any:
        """``EPollReactor.doIteration`` no longer Twisted's ``doPoll`` (harmless: it calls it)."""
        epoll = fastdispatch.EPollReactor
        own = epoll.doPoll

        def doIteration(self: Any, timeout: Any) -> None:
            own(self, timeout)

        return self.patch(epoll, "doIteration", doIteration)  # type: ignore[attr-defined]


def messages(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(event["log_level"].name, formatEvent(event)) for event in events]


def require_epoll() -> None:
    if fastdispatch.EPollReactor is None or not isinstance(reactor, fastdispatch.EPollReactor):
        raise SkipTest("the dispatch shortcut needs Twisted's epoll reactor (Linux)")


class CheckTests(Hiding, SynchronousTestCase):
    def setUp(self) -> None:
        require_epoll()
        self.reactor = fastdispatch.EPollReactor()
        self.addCleanup(self._close_reactor)

    def _close_reactor(self) -> None:
        self.reactor.removeAll()
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()

    def test_this_twisted_passes(self) -> None:
        """The installed Twisted has every name the three parts rely on."""
        self.assertEqual(FastPath().check(self.reactor), [])

    def test_install_turns_all_on_and_uninstall_restores(self) -> None:
        """All three parts on, one info line; uninstall gives the reactor Twisted's poll step back."""
        events = self.capture_log()
        fast = FastPath()
        self.assertEqual(fast.install(self.reactor), ("read", "write", "dispatch"))
        self.assertIn("doIteration", vars(self.reactor))
        [(level, line)] = messages(events)
        self.assertEqual(level, "info")
        self.assertIn("fast path: direct reads, direct writes, dispatch shortcut on (Twisted ", line)
        fast.uninstall()
        self.assertEqual(fast.active, ())
        self.assertNotIn("doIteration", vars(self.reactor))

    def test_missing_temp_data_len_turns_off_writes_only(self) -> None:
        """Without ``_tempDataLen`` the direct writes fall back; reads and dispatch stay."""
        self.hide_temp_data_len()
        events = self.capture_log()
        fast = FastPath()
        [problem] = fast.check(self.reactor)
        self.assertIn("_tempDataLen", problem)
        self.assertEqual(fast.install(self.reactor), ("read", "dispatch"))
        warnings = [line for level, line in messages(events) if level == "warn"]
        self.assertEqual(warnings, [
            "fast path: twisted.internet.abstract.FileDescriptor._tempDataLen: missing, or not an int on a"
            f" TCP transport (Twisted {twisted.__version__}); Twisted's ordinary path is used"
            " for writes (transport.write)"
        ])
        transport = StringTransport()
        self.assertEqual(fast.writer(transport), transport.write)
        fast.uninstall()

    def test_missing_wrapper_turns_off_reads_and_dispatch(self) -> None:
        """Without ``endpoints._WrappingProtocol``, reads and the dispatch serving them fall back."""
        self.hide_wrapping_protocol()
        events = self.capture_log()
        fast = FastPath()
        self.assertEqual(fast.install(self.reactor), ("write",))
        self.assertNotIn("doIteration", vars(self.reactor))
        [warning] = [line for level, line in messages(events) if level == "warn"]
        self.assertIn("twisted.internet.endpoints._WrappingProtocol: missing", warning)
        self.assertIn("ordinary path is used for reads (Twisted's doRead -> dataReceived), event dispatch", warning)

    def test_renamed_reactor_internals_turn_off_dispatch(self) -> None:
        """Reactor internals renamed: one warning per name, dispatch off, reads and writes stay."""
        self.patch(fastdispatch.EPollReactor, "_disconnectSelectable", None)
        self.patch(fastdispatch.EPollReactor, "_POLL_IN", None)
        events = self.capture_log()
        fast = FastPath()
        self.assertEqual(fast.install(self.reactor), ("read", "write"))
        self.assertNotIn("doIteration", vars(self.reactor))
        warnings = [line for level, line in messages(events) if level == "warn"]
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn("EPollReactor._disconnectSelectable: missing", warnings[0])
        self.assertIn("EPollReactor._POLL_IN: missing", warnings[1])
        for warning in warnings:
            self.assertTrue(warning.endswith("ordinary path is used for event dispatch (the reactor's own doPoll)"))

    def test_replaced_poll_step_turns_off_dispatch(self) -> None:
        """A reactor whose poll step is not Twisted's ``doPoll`` keeps it."""
        self.replace_poll_step()
        fast = FastPath()
        self.assertEqual(fast.install(self.reactor), ("read", "write"))
        self.assertNotIn("doIteration", vars(self.reactor))

    def test_other_reactor_is_info_not_warning(self) -> None:
        """A reactor that is not epoll (macOS, the tests' memory reactors) is said at info level."""
        events = self.capture_log()
        self.assertEqual(FastPath().install(MemoryReactorClock()), ("read", "write"))
        self.assertEqual([level for level, _ in messages(events)], ["info", "info"])

    def test_off_checks_and_patches_nothing(self) -> None:
        """``enabled=False``: one line, nothing patched, Twisted's reads and writes handed out."""
        events = self.capture_log()
        fast = FastPath()
        self.assertEqual(fast.install(self.reactor, enabled=False), ())
        self.assertEqual(messages(events), [(
            "info",
            "fast path: off (fast_path: off): Twisted's ordinary path is used for reads, writes and dispatch",
        )])
        self.assertNotIn("doIteration", vars(self.reactor))
        transport = StringTransport()
        self.assertEqual(fast.writer(transport), transport.write)
        self.assertFalse(fast.reader(transport, None, lambda data: None))  # type: ignore[arg-type]

    def test_ordinary_is_never_installed(self) -> None:
        """What splices outside a service use: Twisted's path."""
        self.assertEqual(ORDINARY.active, ())


class ServiceTests(Hiding, TestCase):
    """The service installs the fast path at start-up and honours ``fast_path``."""

    def proxy(self, echo_port: int, fast_path: str = "") -> InProcessProxy:
        return InProcessProxy(
            self,
            fast_path
            + "listeners:\n"
            "  - name: t\n"
            '    listen: "127.0.0.1:0"\n'
            "    cluster: echo\n"
            "clusters:\n"
            "  - name: echo\n"
            f'    endpoints: ["127.0.0.1:{echo_port}"]\n',
        )

    def echo(self) -> int:
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def round_trip(self, proxy: InProcessProxy) -> Any:
        """1 MiB through the proxy and back; the session, checked for exact counts."""
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port("t")), Peer())
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        payload = bytes(range(256)) * 4096
        client.transport.write(payload)
        for _ in range(500):
            if len(client.received) >= len(payload):
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(bytes(client.received), payload)
        [session] = proxy.service.listeners["t"].sessions
        self.assertEqual((session.bytes_received, session.bytes_sent), (len(payload), len(payload)))
        return session

    def assert_ordinary(self, session: Any) -> None:
        for leg, other in ((session.down, session.up), (session.up, session.down)):
            self.assertFalse(hasattr(leg.transport, ATTRIBUTE), "a direct read is in use")
            self.assertEqual(leg.forward, other.transport.write, "a direct write is in use")

    @inline
    async def test_default_is_on(self) -> None:
        """Without the key, the service checks and installs every part (the relay, when it runs, carries splices)."""
        require_epoll()
        events = self.capture_log()
        proxy = self.proxy(self.echo())
        self.assertEqual(proxy.service.fast_path.active, ("read", "write", "dispatch"))
        self.assertEqual([level for level, _ in messages(events)], ["info"])
        session = await self.round_trip(proxy)
        if relay_expected():
            self.assertTrue(session.relayed, "fast_path: auto with the relay built, yet the splice stayed in Python")
        else:
            self.assertTrue(hasattr(session.down.transport, ATTRIBUTE))

    @inline
    async def test_fast_path_false(self) -> None:
        """``fast_path: false``: one line at start-up, and Twisted's ordinary path carries the bytes."""
        events = self.capture_log()
        proxy = self.proxy(self.echo(), "fast_path: false\n")
        self.assertEqual(messages(events), [(
            "info",
            "fast path: off (fast_path: off): Twisted's ordinary path is used for reads, writes and dispatch",
        )])
        self.assertEqual(proxy.service.fast_path.active, ())
        self.assert_ordinary(await self.round_trip(proxy))

    @inline
    async def test_hidden_names_fall_back_and_forward(self) -> None:
        """Every part's private names hidden: the proxy starts, warns once per name and forwards exactly."""
        require_epoll()
        self.assertFalse(hasattr(reactor, fastdispatch.MARK), "an earlier test left the dispatch shortcut installed")
        events = self.capture_log()
        echo = self.echo()
        hidden = [self.hide_temp_data_len(), self.hide_wrapping_protocol(), self.replace_poll_step()]
        proxy = self.proxy(echo, "fast_path: python\n")
        hidden[0].restore()  # Twisted's own writes need it: only the check was to miss it
        self.assertEqual(proxy.service.fast_path.active, ())
        warnings = [line for level, line in messages(events) if level == "warn"]
        self.assertEqual(len(warnings), 3, warnings)
        for name, warning in zip(
            ("FileDescriptor._tempDataLen", "endpoints._WrappingProtocol", "EPollReactor.doIteration"), warnings
        ):
            self.assertIn(name, warning)
            self.assertIn("Twisted's ordinary path is used for", warning)
        self.assertNotIn("doIteration", vars(reactor))
        self.assert_ordinary(await self.round_trip(proxy))

    @inline
    async def test_reload_applies_to_later_splices(self) -> None:
        """A reload that sets ``fast_path: off`` turns the parts off for connections spliced afterwards."""
        require_epoll()
        proxy = self.proxy(self.echo(), "fast_path: python\n")
        session = await self.round_trip(proxy)
        self.assertTrue(hasattr(session.down.transport, ATTRIBUTE))
        session.abort()
        await wait_until(lambda: not proxy.service.listeners["t"].sessions)
        off = attrs.evolve(proxy.service.config, fast_path=False)
        proxy.service._reload_config = lambda: off
        ok, _summary = proxy.service.reload()
        self.assertTrue(ok)
        self.assertEqual(proxy.service.fast_path.active, ())
        self.assert_ordinary(await self.round_trip(proxy))

    @inline
    async def test_stop_uninstalls(self) -> None:
        """Stopping the service gives the reactor its own poll step back."""
        require_epoll()
        self.assertFalse(hasattr(reactor, fastdispatch.MARK), "an earlier test left the dispatch shortcut installed")
        proxy = self.proxy(self.echo())
        self.assertIn("doIteration", vars(reactor))
        await proxy.stop()
        self.assertNotIn("doIteration", vars(reactor))
        self.assertEqual(proxy.service.fast_path.active, ())
