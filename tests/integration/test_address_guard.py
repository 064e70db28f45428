"""The address guard, proved end to end in a network namespace with the test's own DNS.

Every process here runs inside one network namespace that the test makes
and removes (``netns.py``): a real ``twistd egressproxy``, a DNS server
answering from the test's zone (``dnsserver.py``, dnspython) and a canary
(``canary.py``) listening on every address the zone hands out.  The
namespace holds the internal addresses the issue names (10.0.0.5,
192.168.1.10, 172.16.0.9, 100.64.0.5, 169.254.169.254, fd00::5, plus
loopback), so "the canary saw no connection" proves the proxy never dialled
them, and nothing the test sends can leave the namespace: it has no route
anywhere else.

Names under ``partner.example`` resolve to each internal class, and every
listener allowlists ``*.partner.example:*``: the allowlist admits them all,
so only the address check stands between a client and the internal
network.  For every internal name:

- ``http_connect``: ``CONNECT`` (a raw client and ``curl -p -x``) and an
  absolute-form ``GET http://name:8080/`` get ``403`` naming the class,
  never the address;
- ``socks5`` with the domain address type (a raw client and
  ``curl --socks5-hostname``) gets reply ``0x02``;
- a Postgres ``{sni}`` route (psql, ``sslmode=require``) gets the TLS alert
  ``access_denied``;
- the canary sees nothing, the access log flags ``IA``, and
  ``egressproxy_downstream_rejected_total{reason="internal_address"}``
  counts each refusal exactly once.

SOCKS5 IPv4 and IPv6 address types: the client resolved the allowlisted
name itself and sends the address.  An allowlist of names never admits an
address, so on the names-only listener every internal address is refused
by the allowlist already (``0x02``, flag ``NR``) and never dialled.  An
address gets past the allowlist only through an IP/CIDR entry, and that is
the operator's explicit choice, which the guard honours by design (the
module notes of ``addrguard.py``): ``socksip`` admits ``10.0.0.5/32:8080``
and ``[fd00::5/128]:8080`` and those literals are dialled (the canary sees
them).  What no entry can open is the proxy's own sockets: ``socksip`` also
lists ``127.0.0.1/32:19901`` (the admin port, with ``accept_risk``), and
that literal is still refused (``0x02``, flag ``IA``, reason
``own_address``).

The exceptions: ``allow_addresses: ["10.0.0.7/32"]`` lets exactly
``ok.partner.example`` through (and, of a name with 10.0.0.5 and 10.0.0.7,
only 10.0.0.7 is ever dialled); a ``hosts:`` pin is dialled as pinned;
``policy: report`` dials an internal address and flags ``RP``.  The admin
API stays out of reach even on a listener with
``allow_addresses: ["127.0.0.0/8"]``: a ``CONNECT`` to it is refused and a
``POST /drain`` through the proxy never drains it.

The namespace, DNS server, canary and proxy are started once for the class
(by the first test, about 2 s) and removed after its last test (or at exit,
when only some tests run).  Each test compares the access log, the canary's
log and /metrics before and after itself.  Skipped, with the reason printed,
where network namespaces cannot be made (not root, no CAP_SYS_ADMIN).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Callable, ClassVar

from twisted.trial.unittest import SkipTest, TestCase

from tests.integration.netns import NetNS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Addresses the namespace's interface holds (loopback ones are there anyway).
ASSIGNED = ["10.0.0.5", "10.0.0.7", "192.168.1.10", "172.16.0.9", "100.64.0.5", "169.254.169.254", "fd00::5"]
#: Where the canary listens: every assigned address, loopback, and a denied loopback address.
CANARY_HOSTS = ASSIGNED + ["127.0.0.1", "::1", "127.0.0.9"]
CANARY_PORTS = (8080, 443, 5432)

FWD, LOOPOK, REPORT, SOCKS, SOCKSIP, PG = 18080, 18081, 18082, 11080, 11081, 15432
ADMIN, METRICS = 19901, 19902

#: Internal names: their addresses in the zone, and the class a refusal names (None: any).
INTERNAL: dict[str, tuple[list[str], str | None]] = {
    "private10.partner.example": (["10.0.0.5"], "private"),
    "private172.partner.example": (["172.16.0.9"], "private"),
    "rfc1918b.partner.example": (["192.168.1.10"], "private"),
    "cgnat.partner.example": (["100.64.0.5"], "shared (CGNAT)"),
    "meta.partner.example": (["169.254.169.254"], "link-local"),
    "loop.partner.example": (["127.0.0.1"], "loopback"),
    "loop6.partner.example": (["::1"], "loopback"),
    "ula.partner.example": (["fd00::5"], "unique-local"),
    # An IPv4-mapped AAAA record is judged as the IPv4 address it carries.
    "mapped.partner.example": (["::ffff:127.0.0.1"], "loopback"),
    "zero.partner.example": (["0.0.0.0"], "unspecified"),
    "mixed.partner.example": (["10.0.0.5", "192.168.1.10", "127.0.0.1", "fd00::5"], None),
}

ZONE: dict[str, list[str]] = {
    **{name: ips for name, (ips, _) in INTERNAL.items()},
    "admin.partner.example": ["127.0.0.1"],
    "ok.partner.example": ["10.0.0.7"],
    "half.partner.example": ["10.0.0.5", "10.0.0.7"],
    "deny.partner.example": ["127.0.0.9"],
    # The config pins this name to 10.0.0.5; DNS says otherwise, and the pin wins.
    "pinned.partner.example": ["192.168.1.10"],
}

CONFIG = f"""
hosts:
  pinned.partner.example: 10.0.0.5
admin: {{listen: "127.0.0.1:{ADMIN}"}}
metrics: {{listen: "127.0.0.1:{METRICS}"}}
drain_timeout: 2s
listeners:
  - name: fwd
    listen: "127.0.0.1:{FWD}"
    mode: http_connect
    allow_destinations: ["*.partner.example:*"]
    allow_addresses: ["10.0.0.7/32"]
  - name: loopok
    listen: "127.0.0.1:{LOOPOK}"
    mode: http_connect
    allow_destinations: ["*.partner.example:*"]
    allow_addresses: ["127.0.0.0/8"]
    deny_addresses: ["127.0.0.9/32"]
  - name: report
    listen: "127.0.0.1:{REPORT}"
    mode: http_connect
    policy: report
    allow_destinations: ["*.partner.example:*"]
  - name: socks
    listen: "127.0.0.1:{SOCKS}"
    mode: socks5
    allow_destinations: ["*.partner.example:*"]
  - name: socksip
    listen: "127.0.0.1:{SOCKSIP}"
    mode: socks5
    allow_destinations: ["10.0.0.5/32:8080", "[fd00::5/128]:8080", "127.0.0.1/32:{ADMIN}", "0.0.0.0/32:{ADMIN}"]
    accept_risk: ["127.0.0.1/32:{ADMIN}", "0.0.0.0/32:{ADMIN}"]
  - name: pg
    listen: "127.0.0.1:{PG}"
    mode: postgres
    routes: [{{sni: "*.partner.example", upstream: "{{sni}}:5432"}}]
    allow_addresses: ["10.0.0.7/32"]
"""

#: An access-log line: Envoy's eight fields, then (forward listeners) user= and dialled=.
ACCESS_LINE = re.compile(
    r'^\[[^\]]+\] (?P<prefix>\S+) (?P<peer>\S+) (?P<upstream>\S+) \d+ \d+ \d+ "(?P<flags>[^"]*)"'
    r"(?: user=(?P<user>\S+) dialled=(?P<dialled>\S+))?$"
)


def show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 20 ms, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    if not predicate():
        raise AssertionError(f"{what} not met within {timeout}s")


class Environment:
    """The namespace and what runs in it: DNS server, canary, proxy."""

    def __init__(self, ns: NetNS, directory: str) -> None:
        self.ns = ns
        self.directory = directory
        self.canary_log = os.path.join(directory, "canary.log")
        self.dns_log = os.path.join(directory, "dns.log")
        self.proxy_out = os.path.join(directory, "proxy.out")
        self.proxy: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(cls) -> "Environment":
        require_dnspython()
        ns = NetNS.create(ASSIGNED, nameserver="127.0.0.1")
        directory = tempfile.mkdtemp(prefix="egp-guard-")
        env = cls(ns, directory)
        atexit.register(env.close)  # when only some of the class's tests ran
        try:
            env._start()
        except BaseException:
            env.close()
            raise
        return env

    def _start(self) -> None:
        ns, d = self.ns, self.directory
        python_env = {**os.environ, "PYTHONPATH": REPO}
        for key in [k for k in python_env if k.lower().endswith("_proxy")]:
            del python_env[key]
        zone = os.path.join(d, "zone.json")
        with open(zone, "w", encoding="utf-8") as f:
            json.dump(ZONE, f)
        dns = ns.popen(
            [sys.executable, "-m", "tests.integration.dnsserver", "--zone", zone, "--listen", "127.0.0.1:53",
             "--log", self.dns_log, "--max-seconds", "900"],
            stdout=subprocess.PIPE, env=python_env, cwd=REPO,
        )
        listen = [f"--listen={show(h, p)}" for h in CANARY_HOSTS for p in CANARY_PORTS]
        canary = ns.popen(
            [sys.executable, "-m", "tests.integration.canary", "--log", self.canary_log, *listen,
             "--max-seconds", "900"],
            stdout=subprocess.PIPE, env=python_env, cwd=REPO,
        )
        for process in (dns, canary):
            line = ns.read_line(process, 20)
            if not line.startswith("ready"):
                raise RuntimeError(f"{process.args!r} did not start: {line!r} (exit {process.poll()})")
        open(self.canary_log, "a").close()
        config = os.path.join(d, "egressproxy.yaml")
        with open(config, "w", encoding="utf-8") as f:
            f.write(CONFIG)
        # As test_worker_processes.py does: twistd from the checkout, whose
        # twisted/plugins/ holds the plugin an editable install hides.
        with open(self.proxy_out, "wb") as out:
            self.proxy = ns.popen(
                [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                 "-n", "--pidfile=", "egressproxy", "--config", config],
                stdout=out, stderr=subprocess.STDOUT, env=python_env, cwd=d,
            )
        for port in (FWD, LOOPOK, REPORT, SOCKS, SOCKSIP, PG, ADMIN, METRICS):
            try:
                ns.wait_for_port("127.0.0.1", port, 30, self.proxy)
            except RuntimeError as e:
                raise RuntimeError(f"{e}\nproxy output:\n{self.output()}") from None
        # Each listener logs the probe connection of wait_for_port; let those
        # lines land before the first test takes its marks.
        listeners = 6
        wait_for(lambda: sum(1 for line in self.output().splitlines() if ACCESS_LINE.match(line)) >= listeners,
                 10, "the start-up probes' access lines")

    def output(self) -> str:
        with open(self.proxy_out, encoding="utf-8", errors="replace") as f:
            return f.read()

    def canary_lines(self) -> list[str]:
        with open(self.canary_log, encoding="utf-8") as f:
            return f.read().splitlines()

    def dns_lines(self) -> list[str]:
        if not os.path.exists(self.dns_log):
            return []
        with open(self.dns_log, encoding="utf-8") as f:
            return f.read().splitlines()

    def close(self) -> None:
        """Stop the proxy (SIGTERM, by pid), then the namespace and all in it.  Idempotent."""
        if self.proxy is not None:
            NetNS.stop(self.proxy, signal.SIGTERM, 10)
            self.proxy = None
        self.ns.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class AddressGuardTests(TestCase):
    """The issue's proof: every internal class, reached through an allowlisted name, is refused."""

    timeout = 120
    env: ClassVar[Environment | None] = None
    failed_start: ClassVar[BaseException | None] = None
    #: Tests still to run; the environment is removed after the last.
    remaining: ClassVar[set[str] | None] = None

    # -- the shared environment and per-test marks -----------------------------

    def setUp(self) -> None:
        cls = AddressGuardTests
        if cls.remaining is None:
            cls.remaining = {name for name in dir(cls) if name.startswith("test_")}
        if cls.failed_start is not None:
            raise cls.failed_start
        if cls.env is None:
            try:
                cls.env = Environment.start()
            except SkipTest as e:
                cls.failed_start = e
                raise
            except BaseException as e:
                cls.failed_start = RuntimeError(f"the namespace or the proxy did not start: {e}")
                raise
        self.env = cls.env
        self.ns = cls.env.ns
        self.canary_mark = len(self.env.canary_lines())
        self.log_mark = len(self.access_lines_all())
        self.dns_mark = len(self.env.dns_lines())

    def tearDown(self) -> None:
        cls = AddressGuardTests
        assert cls.remaining is not None
        cls.remaining.discard(self._testMethodName)
        if not cls.remaining and cls.env is not None:
            cls.env.close()
            cls.env = None

    def proxy_alive(self) -> bool:
        assert self.env.proxy is not None
        return self.env.proxy.poll() is None

    def new_canary(self) -> list[str]:
        """Connections the canary accepted during this test."""
        return self.env.canary_lines()[self.canary_mark:]

    def new_dns(self) -> list[str]:
        return self.env.dns_lines()[self.dns_mark:]

    def access_lines_all(self) -> list[str]:
        return [line for line in self.env.output().splitlines() if ACCESS_LINE.match(line)]

    def new_access(self, prefix: str, count: int) -> list[re.Match[str]]:
        """This test's access lines of listener ``prefix``, once there are ``count`` (bounded wait)."""
        def lines() -> list[re.Match[str]]:
            found = [ACCESS_LINE.match(line) for line in self.access_lines_all()[self.log_mark:]]
            return [m for m in found if m is not None and m["prefix"] == prefix]

        try:
            wait_for(lambda: len(lines()) >= count, 5, f"{count} access lines for {prefix}")
        except AssertionError:
            self.fail(f"expected {count} {prefix} access lines, got:\n" + "\n".join(m[0] for m in lines()))
        return lines()

    def metric(self, name: str, **labels: str) -> float:
        """One series of /metrics (0 when absent: a reason not seen yet has no series)."""
        text = self.http_get(METRICS, "/metrics")[1]
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        match = re.search(rf"^{re.escape(name)}\{{{re.escape(wanted)}\}} ([0-9.e+]+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def rejected(self, listener: str, reason: str) -> float:
        return self.metric("egressproxy_downstream_rejected_total", listener=listener, reason=reason)

    # -- clients (all inside the namespace) -------------------------------------

    def exchange(self, port: int, data: bytes, timeout: float = 10.0) -> bytes:
        """Send ``data`` to the proxy's ``port``, read until it closes."""
        sock = self.ns.connect("127.0.0.1", port, timeout)
        try:
            sock.sendall(data)
            chunks = []
            for _ in range(1000):  # bounded: the peer closes long before
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            sock.close()

    def http_get(self, port: int, path: str, method: str = "GET") -> tuple[int, str]:
        """A request straight to one of the proxy's HTTP services: (status, body)."""
        raw = self.exchange(port, f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        return parse_response(raw)

    def connect_raw(self, port: int, target: str, then: bytes = b"") -> tuple[int, str, bytes]:
        """``CONNECT target``; (status, body of a refusal, what came through a tunnel after ``then``)."""
        sock = self.ns.connect("127.0.0.1", port, 10)
        try:
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head = b""
            for _ in range(100):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
                if b"\r\n\r\n" in head:
                    break
            status, body = parse_response(head)
            if status != 200:
                # The refusal: read its body to the end.
                head += read_to_eof(sock)
                return status, parse_response(head)[1], b""
            tunnelled = b""
            if then:
                sock.sendall(then)
                tunnelled = read_to_eof(sock)
            return status, body, tunnelled
        finally:
            sock.close()

    def socks5(self, port: int, host: str, dest_port: int, kind: str = "domain", then: bytes = b"") -> tuple[int, bytes]:
        """A SOCKS5 CONNECT (no auth) with address type ``domain``, ``ipv4`` or ``ipv6``: (reply code, tunnelled)."""
        sock = self.ns.connect("127.0.0.1", port, 10)
        try:
            sock.sendall(b"\x05\x01\x00")
            if recv_exactly(sock, 2) != b"\x05\x00":
                raise AssertionError("SOCKS5 method negotiation failed")
            if kind == "domain":
                address = b"\x03" + bytes([len(host)]) + host.encode()
            elif kind == "ipv4":
                address = b"\x01" + socket.inet_pton(socket.AF_INET, host)
            else:
                address = b"\x04" + socket.inet_pton(socket.AF_INET6, host)
            sock.sendall(b"\x05\x01\x00" + address + struct.pack("!H", dest_port))
            reply = recv_exactly(sock, 4)
            code = reply[1]
            if code != 0:
                return code, b""
            # Skip the bound address and port of a success reply.
            if reply[3] == 3:
                recv_exactly(sock, recv_exactly(sock, 1)[0] + 2)
            else:
                recv_exactly(sock, (16 if reply[3] == 4 else 4) + 2)
            tunnelled = b""
            if then:
                sock.sendall(then)
                tunnelled = read_to_eof(sock)
            return code, tunnelled
        finally:
            sock.close()

    def curl(self, *args: str) -> subprocess.CompletedProcess[str]:
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl not found on PATH: install Debian's curl")
        return self.ns.run([curl, "-sS", "--max-time", "10", *args], timeout=30, env=clean_env())

    # -- assertions --------------------------------------------------------------

    def assertRefusalBody(self, body: str, name: str, label: str | None, ips: list[str]) -> None:
        """A refusal names the destination and the class, never an address."""
        expected = rf"resolves to an? {re.escape(label)} address" if label else r"resolves to an? "
        self.assertRegex(body, expected, f"{name}: {body!r}")
        for ip in ips:
            self.assertNotIn(ip, body, f"{name}: the refusal shows the address: {body!r}")

    def assertNothingDialled(self) -> None:
        self.assertEqual(self.new_canary(), [], "an internal address was dialled")

    def assertFlags(self, lines: list[re.Match[str]], flag: str) -> None:
        for m in lines:
            self.assertIn(flag, m["flags"].split(","), m[0])

    # -- the tests ---------------------------------------------------------------

    def test_connect_refuses_every_internal_name(self) -> None:
        """``CONNECT name:8080`` (raw and curl -p) is 403 for every internal class; nothing dialled; IA."""
        before = self.rejected("fwd", "internal_address")
        for name, (ips, label) in INTERNAL.items():
            status, body, _ = self.connect_raw(FWD, f"{name}:8080")
            self.assertEqual(status, 403, f"{name}: {body!r}")
            self.assertRefusalBody(body, name, label, ips)
            done = self.curl("-p", "-x", f"http://127.0.0.1:{FWD}", f"http://{name}:8080/")
            self.assertEqual(done.returncode, 56, f"{name}: {done.stderr}")
            self.assertIn("CONNECT tunnel failed, response 403", done.stderr)
        self.assertNothingDialled()
        lines = self.new_access("FWD", 2 * len(INTERNAL))
        self.assertEqual(sorted({m["upstream"] for m in lines}), sorted(f"{n}:8080" for n in INTERNAL))
        self.assertFlags(lines, "IA")
        self.assertTrue(all(m["dialled"] == "-" for m in lines), [m[0] for m in lines])
        self.assertEqual(self.rejected("fwd", "internal_address") - before, 2 * len(INTERNAL))
        # The proxy asked DNS for each name: it judged the answers, not the names.
        asked = {line.split()[2].rstrip(".") for line in self.new_dns() if line.split()[1] in ("A", "AAAA")}
        self.assertTrue(set(INTERNAL) <= asked, sorted(set(INTERNAL) - asked))

    def test_absolute_form_refuses_every_internal_name(self) -> None:
        """``GET http://name:8080/`` through the proxy is 403 naming the class; nothing dialled; IA."""
        before = self.rejected("fwd", "internal_address")
        for name, (ips, label) in INTERNAL.items():
            done = self.curl("-x", f"http://127.0.0.1:{FWD}", "-w", "\n%{http_code}", f"http://{name}:8080/")
            body, _, code = done.stdout.rpartition("\n")
            self.assertEqual(code, "403", f"{name}: {done.stdout!r} {done.stderr}")
            self.assertRefusalBody(body, name, label, ips)
        self.assertNothingDialled()
        lines = self.new_access("FWD", len(INTERNAL))
        self.assertFlags(lines, "IA")
        self.assertEqual(self.rejected("fwd", "internal_address") - before, len(INTERNAL))

    def test_socks5_domain_type_refuses_every_internal_name(self) -> None:
        """SOCKS5 with a domain name (raw, and curl --socks5-hostname) gets reply 2 for every internal class."""
        before = self.rejected("socks", "internal_address")
        for name in INTERNAL:
            code, _ = self.socks5(SOCKS, name, 8080)
            self.assertEqual(code, 2, name)
            done = self.curl("--socks5-hostname", f"127.0.0.1:{SOCKS}", f"http://{name}:8080/")
            self.assertNotEqual(done.returncode, 0, name)
            self.assertIn(f"Can't complete SOCKS5 connection to {name}. (2)", done.stderr)
        self.assertNothingDialled()
        lines = self.new_access("SOCKS", 2 * len(INTERNAL))
        self.assertFlags(lines, "IA")
        self.assertEqual(self.rejected("socks", "internal_address") - before, 2 * len(INTERNAL))

    def test_socks5_address_types(self) -> None:
        """IPv4/IPv6 address types: refused by a names-only allowlist; a CIDR entry is honoured, own sockets never.

        The client resolved the allowlisted name itself and sends the
        address; see the module notes for why this is the whole story.
        """
        literals = sorted({ip for ips, _ in INTERNAL.values() for ip in ips})
        for ip in literals:
            kind = "ipv6" if ":" in ip else "ipv4"
            code, _ = self.socks5(SOCKS, ip, 8080, kind)
            self.assertEqual(code, 2, ip)
        self.assertNothingDialled()
        lines = self.new_access("SOCKS", len(literals))
        self.assertFlags(lines, "NR")

        # socksip's CIDR entries are the operator's choice: dialled.
        request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        code, tunnelled = self.socks5(SOCKSIP, "10.0.0.5", 8080, "ipv4", then=request)
        self.assertEqual(code, 0)
        self.assertIn(b"canary 10.0.0.5:8080", tunnelled)
        code, tunnelled = self.socks5(SOCKSIP, "fd00::5", 8080, "ipv6", then=request)
        self.assertEqual(code, 0)
        self.assertIn(b"canary [fd00::5]:8080", tunnelled)
        self.assertEqual([line.split(" <- ")[0] for line in self.new_canary()], ["10.0.0.5:8080", "[fd00::5]:8080"])
        # ... but not the proxy's own admin port, whatever the entry says.
        before = self.rejected("socksip", "own_address")
        code, _ = self.socks5(SOCKSIP, "127.0.0.1", ADMIN, "ipv4", then=b"POST /drain HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(code, 2)
        self.assertEqual(self.rejected("socksip", "own_address") - before, 1)
        lines = self.new_access("SOCKSIP", 3)
        self.assertEqual([m["dialled"] for m in lines], ["10.0.0.5:8080", "[fd00::5]:8080", "-"])
        self.assertFlags(lines[2:], "IA")
        self.assertTrue(self.proxy_alive())

    def test_postgres_sni_route_refuses_every_internal_name(self) -> None:
        """psql to a ``{sni}`` route: TLS alert access_denied for every internal class; nothing dialled."""
        psql = shutil.which("psql")
        if psql is None:
            raise SkipTest("psql not found on PATH: install Debian's postgresql-client, as .ci/run does")
        before = self.rejected("pg", "internal_address")
        for name in INTERNAL:
            done = self.ns.run(
                [psql, "-w", "-X", f"host={name} hostaddr=127.0.0.1 port={PG} sslmode=require "
                 "connect_timeout=10 user=app dbname=app", "-c", "select 1"],
                timeout=30, env={**clean_env(), "PGAPPNAME": "guard"},
            )
            self.assertEqual(done.returncode, 2, f"{name}: {done.stdout} {done.stderr}")
            self.assertIn("alert access denied", done.stderr, name)
        self.assertNothingDialled()
        lines = self.new_access("PG", len(INTERNAL))
        self.assertEqual(sorted(m["upstream"] for m in lines), sorted(f"{n}:5432" for n in INTERNAL))
        self.assertFlags(lines, "IA")
        self.assertEqual(self.rejected("pg", "internal_address") - before, len(INTERNAL))

        # The listener's allow_addresses and the hosts: pin are dialled (the
        # canary is no Postgres server, so psql fails after the connect).
        for name in ("ok.partner.example", "pinned.partner.example"):
            self.ns.run(
                [psql, "-w", "-X", f"host={name} hostaddr=127.0.0.1 port={PG} sslmode=require "
                 "connect_timeout=10 user=app dbname=app", "-c", "select 1"],
                timeout=30, env=clean_env(),
            )
        wait_for(lambda: len(self.new_canary()) >= 2, 5, "two canary connections")
        self.assertEqual([line.split(" <- ")[0] for line in self.new_canary()], ["10.0.0.7:5432", "10.0.0.5:5432"])

    def test_allow_addresses_admits_exactly_the_listed_range(self) -> None:
        """``allow_addresses: [10.0.0.7/32]``: ok.partner.example is reached; 10.0.0.5 never is."""
        request = b"GET /x HTTP/1.1\r\nHost: ok.partner.example\r\nConnection: close\r\n\r\n"
        status, _, tunnelled = self.connect_raw(FWD, "ok.partner.example:8080", then=request)
        self.assertEqual(status, 200)
        self.assertIn(b"canary 10.0.0.7:8080", tunnelled)
        done = self.curl("-x", f"http://127.0.0.1:{FWD}", "http://ok.partner.example:443/")
        self.assertEqual((done.returncode, done.stdout), (0, "canary 10.0.0.7:443\n"), done.stderr)
        # A name with a refused and an allowed answer: only the allowed one is ever dialled.
        for _ in range(4):
            done = self.curl("-x", f"http://127.0.0.1:{FWD}", "http://half.partner.example:8080/")
            self.assertEqual((done.returncode, done.stdout), (0, "canary 10.0.0.7:8080\n"), done.stderr)
        status, body, _ = self.connect_raw(FWD, "private10.partner.example:8080")
        self.assertEqual(status, 403, body)
        self.assertEqual(
            [line.split(" <- ")[0] for line in self.new_canary()],
            ["10.0.0.7:8080", "10.0.0.7:443"] + ["10.0.0.7:8080"] * 4,
        )
        lines = self.new_access("FWD", 7)
        self.assertEqual([m["dialled"] for m in lines[:6]], ["10.0.0.7:8080", "10.0.0.7:443"] + ["10.0.0.7:8080"] * 4)
        self.assertEqual(lines[6]["dialled"], "-")
        self.assertFlags(lines[6:], "IA")
        for m in lines[:6]:
            self.assertNotIn("IA", m["flags"], m[0])

    def test_hosts_pin_is_dialled(self) -> None:
        """A ``hosts:`` pin to 10.0.0.5 is the operator's: dialled, unchecked, and DNS is not asked."""
        done = self.curl("-x", f"http://127.0.0.1:{FWD}", "http://pinned.partner.example:8080/")
        self.assertEqual((done.returncode, done.stdout), (0, "canary 10.0.0.5:8080\n"), done.stderr)
        done = self.curl("--socks5-hostname", f"127.0.0.1:{SOCKS}", "http://pinned.partner.example:443/")
        self.assertEqual((done.returncode, done.stdout), (0, "canary 10.0.0.5:443\n"), done.stderr)
        self.assertEqual([line.split(" <- ")[0] for line in self.new_canary()], ["10.0.0.5:8080", "10.0.0.5:443"])
        self.assertEqual([line for line in self.new_dns() if "pinned" in line], [])

    def test_admin_unreachable_through_the_proxy(self) -> None:
        """Even with ``allow_addresses: [127.0.0.0/8]``, the admin, metrics and listener ports are refused.

        The same listener reaches the canary on 127.0.0.1:8080 (the exception
        works) and refuses ``deny_addresses``; ``POST /drain`` through it
        never reaches the admin API: the proxy keeps running and ready.
        """
        status, _, tunnelled = self.connect_raw(
            LOOPOK, "loop.partner.example:8080", then=b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(status, 200)
        self.assertIn(b"canary 127.0.0.1:8080", tunnelled)
        self.assertEqual([line.split(" <- ")[0] for line in self.new_canary()], ["127.0.0.1:8080"])
        status, body, _ = self.connect_raw(LOOPOK, "deny.partner.example:8080")
        self.assertEqual(status, 403, body)
        self.assertIn("resolves to an address this listener denies", body)

        own_before = self.rejected("loopok", "own_address")
        for port in (ADMIN, METRICS, LOOPOK, FWD):
            status, body, _ = self.connect_raw(LOOPOK, f"admin.partner.example:{port}")
            self.assertEqual(status, 403, f"{port}: {body!r}")
            self.assertIn("one of this proxy's own listening sockets", body)
            self.assertNotIn("127.0.0.1", body)
        # Absolute form, the way a confused client or an attacker would send it.
        for name in ("admin.partner.example", "loop.partner.example", "mapped.partner.example"):
            raw = self.exchange(
                LOOPOK,
                f"POST http://{name}:{ADMIN}/drain HTTP/1.1\r\nHost: {name}:{ADMIN}\r\n"
                "Content-Length: 0\r\nConnection: close\r\n\r\n".encode(),
            )
            status, body = parse_response(raw)
            self.assertEqual(status, 403, f"{name}: {raw!r}")
        self.assertEqual(self.rejected("loopok", "own_address") - own_before, 4 + 3)
        # policy: report never dials the proxy's own sockets either.
        status, body, _ = self.connect_raw(REPORT, f"admin.partner.example:{ADMIN}")
        self.assertEqual(status, 403, body)

        time.sleep(0.3)  # a drain would have turned /ready 503 by now
        self.assertTrue(self.proxy_alive(), self.env.output())
        self.assertEqual(self.http_get(ADMIN, "/ready")[0], 200)
        self.assertNotIn("draining:", self.env.output())
        lines = self.new_access("LOOPOK", 1 + 1 + 4 + 3)
        self.assertFlags(lines[1:], "IA")
        self.assertEqual(len(self.new_canary()), 1)

    def test_report_mode_dials_and_flags(self) -> None:
        """``policy: report`` dials an internal address it would refuse, flags RP and counts it."""
        before = self.metric("egressproxy_policy_reported_total", listener="report", reason="internal_address")
        status, _, tunnelled = self.connect_raw(
            REPORT, "private10.partner.example:8080", then=b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(status, 200)
        self.assertIn(b"canary 10.0.0.5:8080", tunnelled)
        self.assertEqual([line.split(" <- ")[0] for line in self.new_canary()], ["10.0.0.5:8080"])
        lines = self.new_access("REPORT", 1)
        self.assertFlags(lines, "RP")
        self.assertEqual(lines[0]["dialled"], "10.0.0.5:8080")
        after = self.metric("egressproxy_policy_reported_total", listener="report", reason="internal_address")
        self.assertEqual(after - before, 1)
        self.assertIn("enforce would refuse it", self.env.output())

    def test_unspecified_address_never_reaches_own_sockets(self) -> None:
        """0.0.0.0 is the proxy's own sockets too: Linux sends a connect to 0.0.0.0 to 127.0.0.1.

        Three ways a client can get 0.0.0.0 dialled without the internal-range
        check: ``policy: report`` (an internal answer is dialled), and an
        operator's IP entry (``socksip`` lists ``0.0.0.0/32:19901`` with
        ``accept_risk``, as it lists ``127.0.0.1/32:19901``, which is
        refused).  The proxy's own sockets must be refused in all of them.
        Probed with ``GET /ready`` and a request for ok.partner.example
        only, so a miss cannot drain the proxy or loop.
        """
        problems = []
        ready = b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        for port in (ADMIN, METRICS):
            status, body, tunnelled = self.connect_raw(REPORT, f"zero.partner.example:{port}", then=ready)
            if status != 403 or "one of this proxy's own listening sockets" not in body:
                problems.append(
                    f"report listener, CONNECT zero.partner.example:{port} (0.0.0.0): {status} {body!r}; "
                    f"through the tunnel: {tunnelled[:200]!r}"
                )
        # The listener's own port: one hop back into the proxy (it then
        # forwards a request for ok.partner.example, so no loop).
        inner = b"GET http://ok.partner.example:8080/ HTTP/1.1\r\nHost: ok.partner.example:8080\r\nConnection: close\r\n\r\n"
        status, body, tunnelled = self.connect_raw(REPORT, f"zero.partner.example:{REPORT}", then=inner)
        if status != 403:
            problems.append(
                f"report listener, CONNECT zero.partner.example:{REPORT} (its own port via 0.0.0.0): {status}; "
                f"through the tunnel: {tunnelled[:200]!r}"
            )
        code, tunnelled = self.socks5(SOCKSIP, "0.0.0.0", ADMIN, "ipv4", then=ready)
        if code != 2:
            problems.append(f"socksip, SOCKS5 IPv4 0.0.0.0:{ADMIN} (a CIDR entry): reply {code}; through it: {tunnelled[:200]!r}")
        self.assertTrue(self.proxy_alive())
        self.assertEqual(self.http_get(ADMIN, "/ready")[0], 200)
        if problems:
            self.fail("the proxy's own sockets were reached through 0.0.0.0:\n" + "\n".join(problems))


    def test_dns_server_answers_udp_and_tcp_and_nothing_else(self) -> None:
        """The namespace's DNS server: A and AAAA from the zone over UDP and TCP; NXDOMAIN outside it."""
        import dns.message
        import dns.query
        import dns.rcode
        import dns.rdatatype

        def ask(name: str, rdtype: str, tcp: bool = False) -> dns.message.Message:
            query = dns.message.make_query(name, rdtype)
            if tcp:
                sock = self.ns.connect("127.0.0.1", 53, 5)
                with sock:
                    return dns.query.tcp(query, "127.0.0.1", timeout=5, sock=sock)
            sock = self.ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with sock:
                return dns.query.udp(query, "127.0.0.1", timeout=5, sock=sock)

        def addresses(response: dns.message.Message) -> list[str]:
            return sorted(item.address for rrset in response.answer for item in rrset)

        for tcp in (False, True):
            self.assertEqual(addresses(ask("mixed.partner.example", "A", tcp)), ["10.0.0.5", "127.0.0.1", "192.168.1.10"])
            self.assertEqual(addresses(ask("mixed.partner.example", "AAAA", tcp)), ["fd00::5"])
            self.assertEqual(addresses(ask("mapped.partner.example", "AAAA", tcp)), ["::ffff:127.0.0.1"])
            nodata = ask("ok.partner.example", "AAAA", tcp)
            self.assertEqual((nodata.rcode(), nodata.answer), (dns.rcode.NOERROR, []))
            for outside in ("nope.partner.example", "example.com", "metadata.google.internal"):
                response = ask(outside, "A", tcp)
                self.assertEqual(response.rcode(), dns.rcode.NXDOMAIN, outside)


class ZoneTests(TestCase):
    """``dnsserver.answer`` without a namespace: exact names, wildcards, NODATA, NXDOMAIN."""

    def setUp(self) -> None:
        require_dnspython()

    def test_answers(self) -> None:
        import dns.message
        import dns.rcode

        from tests.integration.dnsserver import Zone, answer

        zone = Zone({
            "a.partner.example": ["10.0.0.5", "fd00::5"],
            "*.partner.example": ["192.0.2.1"],
            "*.deep.partner.example": ["192.0.2.2"],
        })

        def ask(name: str, rdtype: str) -> dns.message.Message:
            wire, _ = answer(zone, dns.message.make_query(name, rdtype).to_wire())
            assert wire is not None
            return dns.message.from_wire(wire)

        def addresses(response: dns.message.Message) -> list[str]:
            return sorted(item.address for rrset in response.answer for item in rrset)

        self.assertEqual(addresses(ask("a.partner.example", "A")), ["10.0.0.5"])
        self.assertEqual(addresses(ask("A.Partner.Example.", "AAAA")), ["fd00::5"])
        self.assertEqual(addresses(ask("x.y.partner.example", "A")), ["192.0.2.1"])
        self.assertEqual(addresses(ask("x.deep.partner.example", "A")), ["192.0.2.2"])
        self.assertEqual(ask("x.partner.example", "AAAA").rcode(), dns.rcode.NOERROR)
        self.assertEqual(ask("partner.example", "A").rcode(), dns.rcode.NXDOMAIN)
        self.assertEqual(ask("example.com", "A").rcode(), dns.rcode.NXDOMAIN)
        self.assertEqual(answer(zone, b"garbage")[0], None)


def read_to_eof(sock: socket.socket, chunks: int = 100) -> bytes:
    """What ``sock`` sends until it closes (at most ``chunks`` reads, each bounded by the socket's timeout)."""
    data = b""
    for _ in range(chunks):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def require_dnspython() -> None:
    try:
        import dns.message  # noqa: F401
    except ImportError:
        raise SkipTest("dnspython is not installed: pip install '.[test]' (setup.cfg's test extra has it)") from None


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    for _ in range(count + 1):
        if len(data) >= count:
            break
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def parse_response(raw: bytes) -> tuple[int, str]:
    """(status, body) of an HTTP/1.x response; (0, raw) for anything else."""
    head, _, body = raw.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    if match is None:
        return 0, raw.decode("latin-1")
    return int(match.group(1)), body.decode("utf-8", "replace")


def clean_env() -> dict[str, str]:
    """PATH and locale only: no *_proxy or PG* variables from the developer's shell."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "HOME": os.environ.get("HOME", "/")}
