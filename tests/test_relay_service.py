"""The service and the compiled relay: which data path is chosen, the fallback, and the session's end.

What the relay itself does to bytes is tested in ``tests/test_relay.py`` and
through the splice contract (``tests/test_splice.py``); here: ``fast_path``
(auto, relay, python) with the extension importable or not (an import
blocked through ``sys.modules``), the log line saying which data path
carries spliced connections, a reload that leaves live relayed connections
on their relay, the drain deadline's abort, the service's questions to a
relayed upstream (its counters, its local address), the ``fast_path`` key
itself, and one relay thread per worker process under ``workers: 2``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import sys
import tempfile
from typing import Any

import attrs
from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from egressproxy.config import ConfigError, parse_config
from egressproxy.datapath import relay as relay_path
from egressproxy.datapath.fastread import ATTRIBUTE
from tests.integration.proxy import InProcessProxy, inline, wait_until
from tests.integration.test_worker_processes import REPO, Output, alive
from tests.relaykit import relay_module
from tests.splicerig import Peer


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class RelayServiceTests(TestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.patch(relay_path, "log", Logger(observer=self.events.append))
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.echo_port = port.getHost().port

    def lines(self) -> list[tuple[str, str]]:
        return [(e["log_level"].name, formatEvent(e)) for e in self.events]

    def block_import(self) -> None:
        """``import egressproxy._relay`` fails from now on, as when it was never built."""
        self.patch(sys, "modules", {**sys.modules, relay_path.MODULE: None})

    def proxy(self, fast_path: str) -> InProcessProxy:
        return InProcessProxy(
            self,
            f"fast_path: {fast_path}\n"
            "drain_timeout: 1s\n"
            "listeners:\n"
            "  - name: t\n"
            '    listen: "127.0.0.1:0"\n'
            "    cluster: echo\n"
            "clusters:\n"
            "  - name: echo\n"
            f'    endpoints: ["127.0.0.1:{self.echo_port}"]\n',
        )

    async def session(self, proxy: InProcessProxy, payload: bytes = b"ping" * 1000) -> tuple[Peer, Any]:
        """A client whose payload came back through the proxy, and its session."""
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port("t")), Peer())
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        client.transport.write(payload)
        await wait_until(lambda: len(client.received) >= len(payload), timeout=20)
        self.assertEqual(bytes(client.received), payload)
        sessions = [s for s in proxy.service.listeners["t"].sessions if s.bytes_received == len(payload)]
        self.assertEqual(len(sessions), 1)
        return client, sessions[0]

    # -- choosing the data path ------------------------------------------------------

    @inline
    async def test_auto_hands_splices_to_the_relay(self) -> None:
        """auto with the extension: one info line names the relay; a splice is relayed and counted exactly."""
        relay_module()
        proxy = self.proxy("auto")
        self.assertIsNotNone(proxy.service.fast_path.relay)
        [(level, line)] = self.lines()
        self.assertEqual(level, "info")
        self.assertIn("data path: compiled relay (egressproxy._relay, 64 KiB per direction", line)
        payload = b"x" * (3 * 1024 * 1024)
        client, session = await self.session(proxy, payload)
        self.assertTrue(session.relayed)
        self.assertEqual((session.bytes_received, session.bytes_sent), (len(payload), len(payload)))
        listener = proxy.service.listeners["t"]
        self.assertEqual((listener.bytes_received, listener.bytes_sent), (len(payload), len(payload)))
        client.transport.loseConnection()
        [line] = await proxy.wait_for_lines(1)
        self.assertIn(f" {len(payload)} {len(payload)} ", line)
        self.assertTrue(line.endswith('"-"'), line)
        self.assertFalse(session.relayed)
        self.assertTrue(session.down.lost and session.up.lost)
        self.assertEqual(proxy.service.listeners["t"].cluster.breaker.active, 0)

    @inline
    async def test_blocked_import_falls_back_with_a_warning(self) -> None:
        """auto without the extension: a warning says why, and the Python fast path carries the splice."""
        self.block_import()
        proxy = self.proxy("auto")
        self.assertIsNone(proxy.service.fast_path.relay)
        [(level, line)] = self.lines()
        self.assertEqual(level, "warn")
        self.assertIn("data path: the compiled relay cannot be used (egressproxy._relay cannot be imported:", line)
        self.assertIn("spliced connections take the Python fast path (fast_path: auto)", line)
        _client, session = await self.session(proxy)
        self.assertFalse(getattr(session, "relayed", False))
        self.assertTrue(hasattr(session.down.transport, ATTRIBUTE), "not on the Python fast path")

    @inline
    async def test_forced_relay_that_cannot_load_is_an_error(self) -> None:
        """fast_path: relay without the extension: an error line, and the proxy still serves (Python fast path)."""
        self.block_import()
        proxy = self.proxy("relay")
        self.assertIsNone(proxy.service.fast_path.relay)
        [(level, line)] = self.lines()
        self.assertEqual(level, "error")
        self.assertIn("data path: fast_path: relay, but the compiled relay cannot be used", line)
        _client, session = await self.session(proxy)
        self.assertTrue(hasattr(session.down.transport, ATTRIBUTE))

    @inline
    async def test_python_forces_python(self) -> None:
        """fast_path: python keeps splices in Python even though the extension loads."""
        relay_module()
        proxy = self.proxy("python")
        self.assertIsNone(proxy.service.fast_path.relay)
        self.assertEqual(self.lines(), [(
            "info",
            "data path: the compiled relay is not used (fast_path: python); spliced connections take the Python fast path",
        )])
        _client, session = await self.session(proxy)
        self.assertFalse(getattr(session, "relayed", False))
        self.assertTrue(hasattr(session.down.transport, ATTRIBUTE))

    # -- live sessions -------------------------------------------------------------------

    @inline
    async def test_reload_keeps_live_relayed_connections(self) -> None:
        """A reload to python: the live relayed connection keeps flowing; the old relay stops once it ends."""
        relay_module()
        proxy = self.proxy("auto")
        old = proxy.service.fast_path.relay
        client, session = await self.session(proxy)
        proxy.service._reload_config = lambda: attrs.evolve(proxy.service.config, fast_path="python")
        ok, _summary = proxy.service.reload()
        self.assertTrue(ok)
        self.assertIsNone(proxy.service.fast_path.relay)
        self.assertFalse(old.closed, "retired with a live pair: must keep running")
        client.transport.write(b"after reload")
        await wait_until(lambda: bytes(client.received).endswith(b"after reload"), timeout=10)
        self.assertTrue(session.relayed)
        _second, later = await self.session(proxy, b"pong" * 100)
        self.assertFalse(getattr(later, "relayed", False))
        client.transport.loseConnection()
        await wait_until(lambda: session.finished, timeout=10)
        await wait_until(lambda: old.closed, timeout=5)
        self.assertTrue(old.relay.closed)

    @inline
    async def test_drain_deadline_aborts_with_dt(self) -> None:
        """The drain's abort reaches a relayed connection: flag DT, and the client is reset."""
        relay_module()
        proxy = self.proxy("auto")
        client, session = await self.session(proxy)
        self.assertTrue(session.relayed)
        proxy.service.abort_sessions(flag="DT")
        [line] = await proxy.wait_for_lines(1)
        self.assertTrue(line.endswith('"DT"'), line)
        await wait_until(lambda: client.lost is not None, timeout=5)

    @inline
    async def test_idle_timeout_reads_relay_counters(self) -> None:
        """The idle check reads the relay's counters: traffic postpones it, silence ends it with DI."""
        relay_module()
        proxy = InProcessProxy(
            self,
            "fast_path: auto\n"
            "listeners:\n"
            "  - {name: t, listen: '127.0.0.1:0', cluster: echo}\n"
            "clusters:\n"
            f"  - {{name: echo, endpoints: ['127.0.0.1:{self.echo_port}'], idle_timeout: 400ms}}\n",
        )
        client, session = await self.session(proxy)
        self.assertTrue(session.relayed)
        for i in range(5):  # 1 s of traffic every 0.2 s: longer than the timeout, never idle for it
            await deferLater(reactor, 0.2, lambda: None)
            client.transport.write(b"k")
        self.assertFalse(session.finished)
        await wait_until(lambda: session.finished, timeout=3)
        [line] = proxy.access_lines()
        self.assertTrue(line.endswith('"DI"'), line)
        self.assertIn(" 4005 4005 ", line)

    @inline
    async def test_own_upstream_seen_while_relayed(self) -> None:
        """The service still knows a relayed upstream's local address (requests through the proxy itself)."""
        relay_module()
        proxy = self.proxy("auto")
        _client, session = await self.session(proxy)
        # The socket is the relay's now: the address was kept at the hand-off.
        local = session.relayed_local
        self.assertIsNotNone(local)
        self.assertTrue(proxy.service.is_own_upstream(local))


    @inline
    async def test_client_reset_flags_dc(self) -> None:
        """A client reset mid-transfer ends a relayed session with DC, as on the Python path."""
        relay_module()
        proxy = self.proxy("auto")
        client, session = await self.session(proxy)
        handle = client.transport.getHandle()
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.transport.abortConnection()
        [line] = await proxy.wait_for_lines(1)
        self.assertTrue(line.endswith('"DC"'), line)


class FastPathSettingTests(SynchronousTestCase):
    """The ``fast_path`` key: its four values and the two old booleans."""

    def load(self, value: str | None) -> Any:
        text = (f"fast_path: {value}\n" if value is not None else "") + (
            "listeners:\n  - {name: t, listen: '127.0.0.1:0', cluster: c}\n"
            "clusters:\n  - {name: c, endpoints: ['127.0.0.1:1']}\n"
        )
        return parse_config(text, "t.yaml", {})

    def test_values(self) -> None:
        """auto is the default; true and false mean auto and off; the others are taken as written."""
        self.assertEqual(self.load(None).fast_path, "auto")
        for written, meant in (("true", "auto"), ("false", "off"), ("auto", "auto"), ("relay", "relay"),
                               ("python", "python"), ("off", "off")):
            self.assertEqual(self.load(written).fast_path, meant, written)
        self.assertEqual(attrs.evolve(self.load(None), fast_path=False).fast_path, "off")

    def test_unknown_value(self) -> None:
        """Anything else is a config error naming the choices."""
        with self.assertRaises(ConfigError) as caught:
            self.load("fast")
        self.assertIn("fast_path: expected auto, relay, python or off (or true/false), got 'fast'", str(caught.exception))


def relay_threads(pid: int) -> int:
    """How many threads of process ``pid`` are relay threads (named ``egress-relay``)."""
    count = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm", encoding="utf-8") as f:
                count += f.read().strip() == "egress-relay"
        except OSError:
            pass  # a thread that just ended
    return count


class WorkerRelayTests(TestCase):
    """``workers: 2`` under twistd: each worker process runs a relay thread of its own."""

    @inline
    async def test_each_worker_has_its_own_relay(self) -> None:
        """Both processes say the relay carries their splices and each has one relay thread; SIGTERM still exits 0."""
        relay_module()
        upstream = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(upstream.stopListening)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            listen = s.getsockname()[1]
        handle, path = tempfile.mkstemp(suffix=".yaml")
        self.addCleanup(os.unlink, path)
        with os.fdopen(handle, "w") as f:
            f.write(
                "workers: 2\nadmin: false\nmetrics: false\ndrain_timeout: 2s\n"
                f"listeners:\n  - {{name: t, listen: '127.0.0.1:{listen}', cluster: echo}}\n"
                f"clusters:\n  - {{name: echo, endpoints: ['127.0.0.1:{upstream.getHost().port}'], health_check: false}}\n"
            )
        output = Output()
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "egressproxy", "--config", path]
        main = reactor.spawnProcess(output, sys.executable, argv, env={**os.environ, "PYTHONPATH": REPO})

        def stop() -> Any:
            if not output.ended.called:
                main.signalProcess("KILL")
            return output.ended

        self.addCleanup(stop)
        await wait_until(lambda: output.text.count("listening on") >= 2 or output.ended.called, 60)
        self.assertFalse(output.ended.called, output.text)
        self.assertEqual(output.text.count("data path: compiled relay (egressproxy._relay"), 2, output.text)
        [child] = [int(pid) for pid in re.findall(r"worker 1 started \(pid (\d+)\)", output.text)]
        self.addCleanup(lambda: os.kill(child, signal.SIGKILL) if alive(child) else None)
        self.assertEqual((relay_threads(main.pid), relay_threads(child)), (1, 1))
        main.signalProcess("TERM")
        await wait_until(lambda: output.ended.called, 30)
        self.assertEqual(getattr(output.status, "exitCode", None), 0, output.text)
