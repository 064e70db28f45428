"""``expected_egress_ips`` against a real reflexive address, in a network namespace of the test's own.

``test_egress_ready.py`` tells its STUN server which address to report.
Here nothing is told: a namespace holds two candidate egress addresses
(198.51.100.7, the wrong one, and 203.0.113.50, the expected one) and the
STUN server's own address (192.0.2.80); the STUN responder answers each
Binding request with the source address the kernel actually put on it; and
a real ``twistd -n egressproxy`` runs inside the namespace.  Which source
the kernel picks is set with the route's preferred source, as an operator
would pin egress: first 198.51.100.7, then 203.0.113.50.

Why the ``local`` table: the STUN server's address is local to the
namespace, and for a local destination the kernel's route lookup matches
the ``local`` table's entry before any route in ``main``, so
``ip route replace 192.0.2.80/32 dev egp0 src ...`` in ``main`` would change
nothing (checked: ``ip route get`` keeps ``src 192.0.2.80``).  The ``local``
entry's ``src`` is the preferred source for packets to that address, so
that entry is the one replaced (``ip route replace local 192.0.2.80 dev egp0
table local src ...``).

The responder is a thread of this test process with a UDP socket made
inside the namespace (``NetNS.socket``); ``/ready`` and ``/metrics`` are read
over TCP connections made inside it (``NetNS.connect``).  Every wait is
bounded; the proxy and the namespace are stopped by pid and removed at
cleanup.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Callable

from aioice import stun
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.netns import NetNS
from tests.integration.test_forwarding import REPO, twistd_argv
from tests.test_egressip import response

WRONG = "198.51.100.7"
EXPECTED = "203.0.113.50"
STUN_ADDRESS = "192.0.2.80"
STUN_PORT = 3478
METRICS_PORT = 9091
INTERVAL = 1.0
#: How much later than one interval /ready may turn 200 (a loaded CI machine, two processes).
SLACK = 2.0

CONFIG = f"""\
expected_egress_ips: ["{EXPECTED}"]
egress_ip_check: {{stun: ["{STUN_ADDRESS}:{STUN_PORT}"], interval: {INTERVAL:g}s}}
metrics: {{listen: "127.0.0.1:{METRICS_PORT}"}}
admin: false
shutdown_delay: 0s
drain_timeout: 5s
listeners:
  - {{name: direct, listen: "127.0.0.1:5432", mode: tcp, cluster: db}}
clusters:
  - {{name: db, endpoints: ["127.0.0.1:1"], health_check: {{kind: none}}}}
"""


class ReflectingStun:
    """A STUN Binding responder that reports the source address each request really came from."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(0.1)
        #: Source addresses of the requests answered, in order.
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="reflecting-stun", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():  # bounded by stop(): every recv waits at most 0.1 s
            try:
                data, addr = self.sock.recvfrom(2048)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                request = stun.parse_message(data)
            except Exception:  # not STUN: nothing to answer
                continue
            self.seen.append(addr[0])
            self.sock.sendto(response(request.transaction_id, addr[0], port=addr[1]), addr)


class EgressReadyNetnsTests(SynchronousTestCase):
    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> float:
        """Poll ``predicate`` until true, at most ``timeout`` seconds (else fail); how long it took."""
        started = time.monotonic()
        for _ in range(int(timeout / step) + 1):
            if predicate():
                return time.monotonic() - started
            time.sleep(step)
        self.fail(f"{what} not met within {timeout}s; proxy output:\n{self.proxy_output()}")

    def setUp(self) -> None:
        self.ns = NetNS.create([WRONG, EXPECTED, STUN_ADDRESS])  # SkipTest naming why, where impossible
        self.addCleanup(self.ns.close)
        self.prefer_source(WRONG)
        sock = self.ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((STUN_ADDRESS, STUN_PORT))
        self.stun = ReflectingStun(sock)
        self.stun.start()
        self.addCleanup(self.stun.stop)
        self.directory = tempfile.mkdtemp(prefix="egp-egress-")
        self.addCleanup(shutil.rmtree, self.directory, True)

    def prefer_source(self, address: str) -> None:
        """Make the kernel pick ``address`` as the source of packets to the STUN server."""
        self.ns._in("route", "replace", "local", STUN_ADDRESS, "dev", self.ns.interface, "table", "local",
                    "proto", "kernel", "scope", "host", "src", address)
        done = self.ns.run(["ip", "route", "get", STUN_ADDRESS], timeout=10)
        self.assertIn(f"src {address}", done.stdout, done.stdout + done.stderr)

    def start_proxy(self) -> subprocess.Popen[bytes]:
        config = os.path.join(self.directory, "egressproxy.yaml")
        with open(config, "w", encoding="utf-8") as f:
            f.write(CONFIG)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["PYTHONPATH"] = REPO
        self.output = os.path.join(self.directory, "proxy.out")
        with open(self.output, "wb") as out:
            proxy = self.ns.popen(twistd_argv(config), stdout=out, stderr=subprocess.STDOUT, env=env,
                                  cwd=self.directory)
        try:
            self.ns.wait_for_port("127.0.0.1", METRICS_PORT, 30, proxy)
        except RuntimeError as e:
            raise AssertionError(f"{e}\nproxy output:\n{self.proxy_output()}") from None
        return proxy

    def proxy_output(self) -> str:
        with open(self.output, encoding="utf-8", errors="replace") as f:
            return f.read()

    def get(self, path: str) -> tuple[int, str]:
        """GET ``path`` from the metrics service, over a connection made inside the namespace."""
        with self.ns.connect("127.0.0.1", METRICS_PORT, timeout=5.0) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
            chunks = []
            for _ in range(1000):  # HTTP/1.0: the server closes after the body
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        status = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
        self.assertIsNotNone(status, head)
        return int(status.group(1)), body.decode("utf-8", "replace")  # type: ignore[union-attr]

    def test_ready_follows_the_kernels_source_address(self) -> None:
        """503 naming 198.51.100.7 while the kernel egresses from it; 200 within one interval of the route change."""
        proxy = self.start_proxy()
        reason = f"egress address {WRONG} is not in expected_egress_ips ({EXPECTED})"
        self.wait_for(lambda: reason in self.get("/ready")[1], 10, "/ready naming the wrong address")
        self.assertEqual(self.get("/ready"), (503, reason + "\n"))
        self.assertEqual(set(self.stun.seen), {WRONG})
        metrics = self.get("/metrics")[1]
        self.assertIn(f'egressproxy_egress_ip_expected{{address="{WRONG}"}} 0.0', metrics)

        self.prefer_source(EXPECTED)
        took = self.wait_for(lambda: self.get("/ready")[0] == 200, INTERVAL + SLACK, "/ready turning 200")
        self.assertLessEqual(took, INTERVAL + SLACK)
        self.assertEqual(self.get("/ready"), (200, "ready\n"))
        self.assertEqual(self.stun.seen[-1], EXPECTED)
        metrics = self.get("/metrics")[1]
        self.assertIn(f'egressproxy_egress_ip_expected{{address="{EXPECTED}"}} 1.0', metrics)
        self.assertNotIn(f'egressproxy_egress_ip_expected{{address="{WRONG}"}}', metrics)

        self.assertEqual(NetNS.stop(proxy, signal.SIGTERM, 15), 0, self.proxy_output())
        output = self.proxy_output()
        self.assertIn(f"egress address {WRONG} is not in expected_egress_ips: not ready", output)
        self.assertIn(f"egress address {EXPECTED} is expected: ready", output)
