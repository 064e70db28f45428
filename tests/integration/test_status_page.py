"""The admin status page in a real headless browser, with a live connection through the proxy.

The proxy runs in this test's reactor (``InProcessProxy``), so Debian's
``chromium`` runs as a subprocess from a thread (``deferToThread``): the
reactor keeps serving the page while the browser loads it and while the
page's script fetches it again.  Chromium gets a fresh profile directory and
HOME, no proxy, no background networking, and a resolver rule that fails
every name lookup (the page is at an IP literal), so it sends nothing off
loopback.  Each run is bounded; on a timeout its whole process group (its
own session, started here) is killed.

The screenshot is kept at ``<checkout>/test-artifacts/status-page.png``.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import tempfile
from pathlib import Path

from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.integration.proxy import InProcessProxy, inline, wait_until

CHECKOUT = Path(__file__).resolve().parents[2]
ARTIFACTS = CHECKOUT / "test-artifacts"
#: Seconds one chromium run may take, start to exit, on a busy shared machine.
CHROMIUM_TIMEOUT = 90.0
#: Virtual time the page runs for before the DOM is dumped: past two 2-second refreshes.
VIRTUAL_TIME_MS = 5000


class Echo(protocol.Protocol):
    """The upstream: sends back whatever it receives."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Client(protocol.Protocol):
    """A client that keeps what comes back and stays connected until the test ends."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise SkipTest("chromium not found on PATH: apt-get install chromium (.ci/run installs it when missing)")
    return path


def run_chromium(binary: str, profile: str, args: list[str]) -> tuple[int | None, str, str]:
    """Run chromium headless once (in a thread): (exit code or None on timeout, stdout, stderr)."""
    argv = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions", "--disable-dev-shm-usage", "--no-proxy-server", "--mute-audio",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={profile}", *args,
    ]
    env = dict(os.environ, HOME=profile, XDG_CONFIG_HOME=profile, XDG_CACHE_HOME=profile)
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True,
    )
    code: int | None
    try:
        out, err = process.communicate(timeout=CHROMIUM_TIMEOUT)
        code = process.returncode
    except subprocess.TimeoutExpired:
        code = None
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate(timeout=10)
    finally:
        try:
            # Any helper process (renderer, zygote) left in the group chromium was started in.
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


class StatusPageBrowserTests(TestCase):
    timeout = 4 * CHROMIUM_TIMEOUT

    @inline
    async def test_live_session_in_browser(self) -> None:
        """Chromium renders /, its script refreshes it, and the DOM shows the live session; a screenshot is kept."""
        binary = chromium_path()
        echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        upstream = f"127.0.0.1:{echo.getHost().port}"
        proxy = InProcessProxy(self, f"""
listeners:
  - {{name: status_tcp, listen: "127.0.0.1:0", mode: tcp, cluster: echo_upstream}}
clusters:
  - {{name: echo_upstream, endpoints: ["{upstream}"]}}
""")
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port("status_tcp")), Client())
        self.addCleanup(client.transport.abortConnection)
        client.transport.write(b"hello status page\n")
        await wait_until(lambda: client.received == b"hello status page\n", timeout=10)
        peer = f"127.0.0.1:{client.transport.getHost().port}"
        admin = proxy.service.http_ports["admin"].getHost().port
        url = f"http://127.0.0.1:{admin}/"

        profile = tempfile.mkdtemp(prefix="egressproxy-chromium-")
        self.addCleanup(shutil.rmtree, profile, True)
        code, dom, err = await deferToThread(
            run_chromium, binary, os.path.join(profile, "dom"),
            [f"--virtual-time-budget={VIRTUAL_TIME_MS}", "--dump-dom", url],
        )
        context = f"chromium exit {code}; DOM:\n{dom[:6000]}\nstderr:\n{err[-4000:]}"
        self.assertEqual(code, 0, context)
        self.assertIn("<h1>egressproxy status</h1>", dom, context)
        # The live session's row: peer (its port), listener, upstream dialled, spliced, bytes both ways.
        self.assertIn(f"<td>{peer}</td><td>status_tcp</td><td>{upstream}</td><td>{upstream}</td>", dom, context)
        self.assertIn("<td>spliced</td><td>18 B</td><td>18 B</td>", dom, context)
        self.assertIn("<caption>1 live, newest first</caption>", dom, context)
        # The listener's row, with the address it bound, and the cluster's endpoint.
        self.assertIn(f"<td>status_tcp</td><td>tcp</td><td>echo_upstream</td><td>127.0.0.1:{proxy.port('status_tcp')}</td>",
                      dom, context)
        self.assertIn(f"<td>echo_upstream</td><td>{upstream}</td>", dom, context)
        # The page's script ran under its Content-Security-Policy and swapped in a fresh copy.
        self.assertRegex(dom, r'<main id="status" data-refreshes="[1-9]', context)

        ARTIFACTS.mkdir(exist_ok=True)
        screenshot = ARTIFACTS / "status-page.png"
        if screenshot.exists():
            screenshot.unlink()
        code, _out, err = await deferToThread(
            run_chromium, binary, os.path.join(profile, "shot"),
            [f"--screenshot={screenshot}", "--window-size=1280,900", url],
        )
        self.assertEqual(code, 0, f"chromium exit {code}; stderr:\n{err[-4000:]}")
        self.assertTrue(screenshot.exists(), f"no screenshot written; stderr:\n{err[-4000:]}")
        self.assertEqual(png_size(screenshot), (1280, 900))
        print(f"\nstatus page screenshot: {screenshot}")
        # The session was only looked at: still open, still echoing.
        self.assertEqual(proxy.live_sessions(), 1)
