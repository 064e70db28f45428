"""Forwarding over real loopback sockets: half-close, backpressure, dual-stack, twistd."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer

from tests.integration.proxy import InProcessProxy, inline, run_process, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@implementer(IHalfCloseableProtocol)
class ReplyAfterEOF(protocol.Protocol):
    """Upstream: collects everything until the client's EOF, then answers and closes."""

    def connectionMade(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.transport.write(b"got " + str(len(self.received)).encode() + b" bytes")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class Flood(protocol.Protocol):
    """Upstream: writes up to ``limit`` bytes as fast as the connection takes them.

    It is a streaming producer for its own transport, so it stops when the
    kernel (and so the proxy) stops taking data; ``paused`` records that.
    """

    limit = 64 * 1024 * 1024
    chunk = b"\xa5" * 65536

    def connectionMade(self) -> None:
        self.written = 0
        self.paused = False
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        # Bounded: at most 64 MiB in total, at most 16 chunks per turn.
        for _ in range(16):
            if self.paused or self.written >= self.limit:
                return
            self.transport.write(self.chunk)
            self.written += len(self.chunk)
        reactor.callLater(0, self._again)

    def _again(self) -> None:
        if not self.paused and self.transport.connected:
            self.resumeProducing()


def flood_factory(floods: list[Flood]) -> protocol.Factory:
    """A server factory whose Flood protocols are appended to ``floods``."""

    class Factory(protocol.Factory):
        def buildProtocol(self, addr: object) -> Flood:
            floods.append(Flood())
            return floods[-1]

    return Factory()


@implementer(IHalfCloseableProtocol)
class Client(protocol.Protocol):
    """A test client that records what it receives and when its connection ends."""

    def __init__(self) -> None:
        self.received = b""
        self.closed = defer.Deferred()
        self.eof = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.eof = True
        self.transport.loseConnection()  # Twisted leaves the full close to us

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: object) -> None:
        if not self.closed.called:
            self.closed.callback(None)


class ForwardingIntegrationTests(TestCase):
    def upstream(self, factory: protocol.Factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def proxy(self, upstream_port: int, listen: str = "127.0.0.1:0", extra: str = "") -> InProcessProxy:
        return InProcessProxy(
            self,
            f"""
listeners:
  - name: direct
    listen: "{listen}"
    cluster: up
clusters:
  - name: up
    endpoints: ["127.0.0.1:{upstream_port}"]
    connect_timeout: 2s
{extra}
""",
        )

    async def connect(self, port: int, host: str = "127.0.0.1") -> Client:
        endpoint = (TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint)(reactor, host, port)
        client = await connectProtocol(endpoint, Client())
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        return client

    @inline
    async def test_reply_flows_after_client_eof(self) -> None:
        """A client that shuts its write side still receives the upstream's reply."""
        proxy = self.proxy(self.upstream(protocol.Factory.forProtocol(ReplyAfterEOF)))
        client = await self.connect(proxy.port("direct"))
        client.transport.write(b"x" * 100_000)
        client.transport.loseWriteConnection()
        await client.closed
        self.assertEqual(client.received, b"got 100000 bytes")
        [line] = await proxy.wait_for_lines(1)
        self.assertIn(' 100000 16 ', line)
        self.assertTrue(line.endswith('"-"'), line)

    @inline
    async def test_backpressure_bounds_proxy_buffer(self) -> None:
        """A client that stops reading makes the proxy stop reading its upstream, buffering little."""
        floods: list[Flood] = []
        proxy = self.proxy(self.upstream(flood_factory(floods)))
        client = await self.connect(proxy.port("direct"))
        client.transport.pauseProducing()  # the client stops reading
        await wait_until(lambda: bool(floods) and floods[0].paused, timeout=20)
        # Let the kernel buffers settle, then check twice that nothing more moves.
        await wait_until(lambda: False if not floods else True, timeout=1)
        [session] = proxy.service.listeners["direct"].sessions
        await defer_for(0.5)
        sent_before = session.bytes_sent
        await defer_for(0.5)
        self.assertEqual(session.bytes_sent, sent_before, "the proxy kept reading a paused flow")
        if getattr(session, "relayed", False):  # the compiled relay: what it read and has not sent
            held = session._relay.held(session._handle)[1]
        else:
            down = session.down.transport
            held = len(down.dataBuffer) - down.offset + down._tempDataLen
        self.assertLess(held, 384 * 1024, f"proxy holds {held} bytes for a client that does not read")
        self.assertLess(floods[0].written, Flood.limit, "the upstream was never pushed back")
        # Reading again drains everything that was written, byte for byte.
        client.transport.resumeProducing()
        await wait_until(lambda: len(client.received) >= sent_before, timeout=20)

    @inline
    async def test_forced_close_while_paused(self) -> None:
        """A client reset while its leg is paused by backpressure ends the session and the upstream."""
        floods: list[Flood] = []
        proxy = self.proxy(self.upstream(flood_factory(floods)))
        client = await self.connect(proxy.port("direct"))
        client.transport.pauseProducing()
        await wait_until(lambda: bool(floods) and floods[0].paused, timeout=20)
        client.transport.abortConnection()
        [line] = await proxy.wait_for_lines(1)
        self.assertIn('"DC"', line)
        await wait_until(lambda: not floods[0].transport.connected, timeout=10)

    @inline
    async def test_dual_stack_listener(self) -> None:
        """A listener on ':0' is reachable on 127.0.0.1 and ::1, logging each peer plainly."""
        if not has_ipv6_loopback():
            raise SkipTest("::1 is not available on this machine: cannot test dual-stack listening")
        proxy = self.proxy(self.upstream(protocol.Factory.forProtocol(ReplyAfterEOF)), listen=":0")
        for host in ("127.0.0.1", "::1"):
            client = await self.connect(proxy.port("direct"), host)
            client.transport.write(b"ping")
            client.transport.loseWriteConnection()
            await client.closed
            self.assertEqual(client.received, b"got 4 bytes")
        lines = await proxy.wait_for_lines(2)
        self.assertRegex(lines[0], r"\] DIRECT 127\.0\.0\.1:\d+ 127\.0\.0\.1:\d+ 4 11 \d+ \"-\"$")
        self.assertRegex(lines[1], r"\] DIRECT \[::1\]:\d+ 127\.0\.0\.1:\d+ 4 11 \d+ \"-\"$")


async def defer_for(seconds: float) -> None:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def twistd_argv(config_path: str) -> list[str]:
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "egressproxy", "--config", config_path]


class TwistdTests(TestCase):
    """The plugin as users run it: ``twistd -n egressproxy --config FILE``."""

    def write_config(self, text: str) -> str:
        handle, path = tempfile.mkstemp(suffix=".yaml")
        with os.fdopen(handle, "w") as f:
            f.write(text)
        self.addCleanup(os.unlink, path)
        return path

    @inline
    async def test_port_taken_exits_nonzero(self) -> None:
        """twistd exits 1 with a message naming the listener when its port is taken."""
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        path = self.write_config(f"""
listeners:
  - {{name: direct, listen: "127.0.0.1:{port}", cluster: up}}
clusters:
  - {{name: up, endpoints: ["127.0.0.1:9"]}}
""")
        out, err, code = await run_process(twistd_argv(path), env={"PYTHONPATH": REPO}, timeout=60)
        self.assertEqual(code, 1, out + err)
        self.assertIn(f"listener 'direct': cannot listen on 127.0.0.1:{port}: Address already in use", out + err)

    @inline
    async def test_bad_config_exits_nonzero(self) -> None:
        """twistd refuses a bad config file, printing the offending key."""
        path = self.write_config("""
listeners:
  - {name: direct, listen: "127.0.0.1:0", cluster: missing}
clusters:
  - {name: up, endpoints: ["127.0.0.1:9"]}
""")
        out, err, code = await run_process(twistd_argv(path), env={"PYTHONPATH": REPO}, timeout=60)
        self.assertNotEqual(code, 0)
        self.assertIn("listeners[0].cluster", out + err)

    @inline
    async def test_twistd_forwards_and_logs(self) -> None:
        """twistd runs the plugin: a connection is forwarded and its access line printed on stdout."""
        upstream = reactor.listenTCP(0, protocol.Factory.forProtocol(ReplyAfterEOF), interface="127.0.0.1")
        self.addCleanup(upstream.stopListening)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            listen_port = s.getsockname()[1]
        path = self.write_config(f"""
listeners:
  - {{name: direct, listen: "127.0.0.1:{listen_port}", cluster: up, log_prefix: DIRECT}}
clusters:
  - {{name: up, endpoints: ["127.0.0.1:{upstream.getHost().port}"]}}
""")
        output = ProcessOutput()
        process = reactor.spawnProcess(output, sys.executable, twistd_argv(path),
                                       env={**os.environ, "PYTHONPATH": REPO})
        self.addCleanup(output.stop, process)
        await wait_until(lambda: "listening on" in output.text or output.ended.called, timeout=30)
        self.assertFalse(output.ended.called, output.text)
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", listen_port), Client())
        client.transport.write(b"hello")
        client.transport.loseWriteConnection()
        await client.closed
        self.assertEqual(client.received, b"got 5 bytes")
        await wait_until(lambda: "] DIRECT 127.0.0.1:" in output.text, timeout=10)
        self.assertRegex(output.text, r"\] DIRECT 127\.0\.0\.1:\d+ 127\.0\.0\.1:\d+ 5 11 \d+ \"-\"\n")


class ProcessOutput(protocol.ProcessProtocol):
    """Collects a child's stdout and stderr; ``stop`` sends SIGTERM and waits for its end."""

    def __init__(self) -> None:
        self.text = ""
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.text += data.decode("utf-8", "replace")

    errReceived = outReceived

    def processEnded(self, reason: object) -> None:
        self.ended.callback(None)

    def stop(self, process: Any) -> defer.Deferred[None]:
        if not self.ended.called:
            process.signalProcess("TERM")
        return self.ended
