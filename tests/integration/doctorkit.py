"""What the doctor's integration tests share: configs for a real server, a fake Postgres TLS server, the CLI.

- :func:`doctor_yaml`: a config with one postgres listener in front of one
  cluster whose endpoint is pinned (``hosts:``) to a test address, so no
  name is ever resolved through the system resolver;
- :class:`FakePostgresTLS`: a loopback server that answers the SSLRequest
  with ``S`` and then does TLS with a certificate of the test's choosing
  (wrong name, expired): enough for the TLS steps, no PostgreSQL needed;
- :func:`run_doctor_cli`: the real ``python -m egressproxy.app.cli doctor``
  in a subprocess, without blocking the reactor.
"""

from __future__ import annotations

import os
import socket
import sys

from twisted.internet import reactor, ssl
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.integration.proxy import run_process

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_dual_stack_port() -> int:
    """A TCP port free on ``[::]`` (IPv6 and IPv4) right now."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return int(s.getsockname()[1])


def doctor_yaml(port: int, ca_file: str | None, listen: str, name: str = "db.egress.test",
                pin: str = "127.0.0.1", extra: str = "") -> str:
    """One postgres listener at ``listen`` in front of ``name:port`` pinned to ``pin``."""
    tls = f'    tls: {{ca_file: "{ca_file}"}}\n' if ca_file else ""
    return (
        "listeners:\n"
        "  - name: pg\n"
        f'    listen: "{listen}"\n'
        "    mode: postgres\n"
        "    cluster: db\n"
        "clusters:\n"
        "  - name: db\n"
        f'    endpoints: ["{name}:{port}"]\n'
        "    connect_timeout: 2s\n"
        f"{tls}"
        f'hosts: {{"{name}": "{pin}"}}\n'
        "admin: false\n"
        "metrics: false\n"
        f"{extra}"
    )


class _SSLRequestThenTLS(Protocol):
    """Reads the 8-byte SSLRequest, answers ``S`` and starts TLS as the server; then waits."""

    buffer = b""
    started = False

    def dataReceived(self, data: bytes) -> None:
        if self.started:
            return
        self.buffer += data
        if len(self.buffer) >= 8:
            self.started = True
            self.transport.write(b"S")
            self.transport.startTLS(self.factory.options)  # type: ignore[attr-defined]


class FakePostgresTLS:
    """A loopback server for the TLS steps; stopped at the test's cleanup."""

    def __init__(self, testcase: TestCase, cert_path: str, key_path: str) -> None:
        with open(cert_path, "rb") as f:
            cert = f.read()
        with open(key_path, "rb") as f:
            key = f.read()
        factory = Factory.forProtocol(_SSLRequestThenTLS)
        factory.options = ssl.PrivateCertificate.loadPEM(cert + key).options()  # type: ignore[attr-defined]
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        testcase.addCleanup(self.port.stopListening)

    @property
    def number(self) -> int:
        return int(self.port.getHost().port)


async def run_doctor_cli(args: list[str], env: dict[str, str] | None = None) -> tuple[str, str, int]:
    """``egressproxy doctor ARGS`` as a subprocess of this checkout: (stdout, stderr, exit status)."""
    environment = {"PYTHONPATH": ROOT, **(env or {})}
    return await run_process([sys.executable, "-m", "egressproxy.app.cli", "doctor", *args],
                             env=environment, timeout=120)
