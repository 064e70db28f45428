"""``workers: 2`` as users run it: real twistd processes sharing a port.

One test walks the whole life of a two-worker proxy, since each step needs
the processes the previous one started: both workers serve, /metrics and
/stats count both, a killed worker is restarted and its counts kept, and
SIGTERM ends both processes with exit code 0.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import tempfile

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from tests.integration.proxy import inline, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONNECTIONS = 40


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (a clash makes the start fail loudly, not silently)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Pinger(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"ping")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.closed.callback(None)


class Output(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.text = ""
        self.status: object = None
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.text += data.decode("utf-8", "replace")

    errReceived = outReceived

    def processEnded(self, reason: object) -> None:
        self.status = reason.value  # type: ignore[attr-defined]
        self.ended.callback(None)


class TwoWorkerTests(TestCase):
    async def get(self, port: int, path: str) -> str:
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
        return (await readBody(response)).decode()

    async def metric(self, port: int, name: str) -> float:
        text = await self.get(port, "/metrics")
        match = re.search(rf'^{re.escape(name)} ([0-9.e+]+)$', text, re.MULTILINE)
        return float(match.group(1)) if match else -1.0

    async def ping_all(self, port: int, count: int) -> list[Pinger]:
        """``count`` connections that each got their echo and are still open."""
        clients = []
        for _ in range(count):
            client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Pinger())
            self.addCleanup(client.transport.abortConnection)
            clients.append(client)
        await wait_until(lambda: all(c.received == b"ping" for c in clients), 20)
        return clients

    async def close_all(self, clients: list[Pinger]) -> None:
        for client in clients:
            client.transport.loseConnection()
        await defer.gatherResults([c.closed for c in clients])

    @inline
    async def test_two_workers_serve_count_restart_and_stop(self) -> None:
        """Two workers share the port; metrics add up; a killed worker returns; SIGTERM stops both."""
        upstream = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(upstream.stopListening)
        listen, metrics, admin = free_ports(3)
        handle, path = tempfile.mkstemp(suffix=".yaml")
        self.addCleanup(os.unlink, path)
        with os.fdopen(handle, "w") as f:
            f.write(
                "workers: 2\n"
                f'metrics: {{listen: "127.0.0.1:{metrics}"}}\n'
                f'admin: {{listen: "127.0.0.1:{admin}"}}\n'
                "drain_timeout: 5s\n"
                "listeners:\n"
                f'  - {{name: t, listen: "127.0.0.1:{listen}", cluster: echo}}\n'
                "clusters:\n"
                f'  - {{name: echo, endpoints: ["127.0.0.1:{upstream.getHost().port}"], health_check: false}}\n'
            )
        output = Output()
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "egressproxy", "--config", path]
        main = reactor.spawnProcess(output, sys.executable, argv, env={**os.environ, "PYTHONPATH": REPO})

        def stop_main() -> defer.Deferred[None]:
            if not output.ended.called:
                main.signalProcess("KILL")
            return output.ended

        self.addCleanup(stop_main)
        started = re.compile(r"worker 1 started \(pid (\d+)\)")
        await wait_until(lambda: output.text.count("listener t (tcp) listening on") >= 2 or output.ended.called, 60)
        self.assertFalse(output.ended.called, output.text)
        first_child = int(started.findall(output.text)[0])
        self.addCleanup(lambda: os.kill(first_child, signal.SIGKILL) if alive(first_child) else None)

        child_fds = len(os.listdir(f"/proc/{first_child}/fd"))
        clients = await self.ping_all(listen, CONNECTIONS)
        # Both workers hold some of them (all 40 on one: odds about 1 in 10^12).
        self.assertGreater(len(os.listdir(f"/proc/{first_child}/fd")), child_fds + 1)
        await self.close_all(clients)
        # The child reports once a second: wait until /metrics has all of them.
        total = 'egressproxy_downstream_connections_total{listener="t"}'

        async def counted(expected: float) -> None:
            for _ in range(50):  # bounded: 50 x 0.1 s
                if await self.metric(metrics, total) >= expected:
                    return
                await defer_for(0.1)
            self.fail(f"/metrics never reached {expected}:\n{await self.get(metrics, '/metrics')}")

        await counted(CONNECTIONS)
        self.assertEqual(await self.metric(metrics, total), CONNECTIONS)
        self.assertEqual(await self.metric(metrics, 'egressproxy_bytes_received_total{listener="t"}'), 4 * CONNECTIONS)
        stats = await self.get(admin, "/stats")
        self.assertIn(f"listener.t.downstream_cx_total: {CONNECTIONS}\n", stats)
        await wait_until(lambda: output.text.count(' "-"\n') >= CONNECTIONS, 10)

        # A worker that dies is started again; what it counted stays counted.
        os.kill(first_child, signal.SIGKILL)
        await wait_until(lambda: len(started.findall(output.text)) >= 2, 30)
        second_child = int(started.findall(output.text)[1])
        self.addCleanup(lambda: os.kill(second_child, signal.SIGKILL) if alive(second_child) else None)
        self.assertNotEqual(second_child, first_child)
        self.assertIn("worker 1 (pid %d) exited unexpectedly" % first_child, output.text)
        await wait_until(lambda: output.text.count("listener t (tcp) listening on") >= 3, 60)
        await self.close_all(await self.ping_all(listen, CONNECTIONS))
        await counted(2 * CONNECTIONS)
        self.assertEqual(await self.metric(metrics, total), 2 * CONNECTIONS)

        # SIGTERM drains both; the main worker exits 0 once its child has.
        main.signalProcess("TERM")
        await wait_until(lambda: output.ended.called, 30)
        self.assertEqual(getattr(output.status, "exitCode", None), 0, output.text)
        await wait_until(lambda: not alive(second_child), 10)


async def defer_for(seconds: float) -> None:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d
