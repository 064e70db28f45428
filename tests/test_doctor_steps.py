"""The doctor's steps on a memory transport and a fake clock: what each answer means and which hint it gets."""

from __future__ import annotations

import socket
import struct

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.config import ListenAddress, ListenerConfig
from egressproxy.doctor import dns, pgclient
from egressproxy.doctor.conn import ProbeConnection
from egressproxy.doctor.listeners import stack_check
from egressproxy.doctor.login import login_step
from egressproxy.doctor.report import FAIL, OK, SKIP, WARN
from egressproxy.doctor.sslrequest import SSL_REQUEST, sslrequest_step


def connection() -> tuple[Clock, ProbeConnection, StringTransport]:
    clock = Clock()
    conn = ProbeConnection(clock)
    transport = StringTransport()
    conn.makeConnection(transport)
    return clock, conn, transport


def backend(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!i", len(payload) + 4) + payload


def error_response(code: str, message: str) -> bytes:
    fields = b"SFATAL\0VFATAL\0C" + code.encode() + b"\0M" + message.encode() + b"\0\0"
    return backend(b"E", fields)


class SSLRequestTests(SynchronousTestCase):
    def run_step(self, answer: bytes | None, close: bool = False, advance: float = 0.0):  # type: ignore[no-untyped-def]
        clock, conn, transport = connection()
        d = defer.ensureDeferred(sslrequest_step(clock, conn, "db", "192.0.2.1", 5.0, "198.51.100.7"))
        self.assertEqual(transport.value(), SSL_REQUEST)
        if answer is not None:
            conn.dataReceived(answer)
        if close:
            conn.connectionLost(Failure(ConnectionDone()))
        if advance:
            clock.advance(advance)
        return self.successResultOf(d)

    def test_s(self) -> None:
        """``S`` passes: TLS is offered."""
        check = self.run_step(b"S")
        self.assertEqual((check.step, check.status, check.detail), ("sslrequest", OK, "S: TLS offered"))

    def test_n(self) -> None:
        """``N`` fails: the server refuses TLS."""
        check = self.run_step(b"N")
        self.assertEqual(check.status, FAIL)
        self.assertIn("enable ssl", check.hint)

    def test_close_with_zero_bytes_is_the_allowlist_symptom(self) -> None:
        """A close with 0 bytes after accept fails with the allowlist hint naming the egress address."""
        check = self.run_step(None, close=True)
        self.assertEqual(check.status, FAIL)
        self.assertIn("0 bytes", check.detail)
        self.assertIn("allowlist", check.hint)
        self.assertIn("198.51.100.7", check.hint)
        self.assertIn("fly ips allocate-egress", check.hint)

    def test_silence(self) -> None:
        """No answer within the timeout fails as not PostgreSQL."""
        check = self.run_step(None, advance=5.1)
        self.assertEqual(check.status, FAIL)
        self.assertIn("no answer", check.detail)
        self.assertIn("PostgreSQL", check.hint)


class LoginTests(SynchronousTestCase):
    def run_login(self, *messages: bytes, password: str | None = "secret"):  # type: ignore[no-untyped-def]
        clock, conn, transport = connection()
        d = defer.ensureDeferred(login_step(clock, conn, "db", "10.77.0.10", "app", "appdb", password, 5.0, None))
        self.assertTrue(transport.value().endswith(b"user\0app\0database\0appdb\0application_name\0egressproxy-doctor\0\0"))
        for m in messages:
            conn.dataReceived(m)
        return self.successResultOf(d), transport

    def test_no_pg_hba_entry(self) -> None:
        """28000 names the address the server saw: "the database sees you as ..." and the allowlist hint."""
        check, _ = self.run_login(error_response(
            "28000", 'no pg_hba.conf entry for host "10.77.0.30", user "app", database "appdb", SSL encryption'))
        self.assertEqual((check.step, check.status), ("login", FAIL))
        self.assertIn("the database sees you as 10.77.0.30", check.detail)
        self.assertIn("10.77.0.30 is not on the database's allowlist", check.hint)

    def test_wrong_password(self) -> None:
        """28P01 says wrong password and names PGPASSWORD."""
        check, _ = self.run_login(backend(b"R", struct.pack("!i", 3)),
                                  error_response("28P01", 'password authentication failed for user "app"'))
        self.assertEqual(check.status, FAIL)
        self.assertIn("28P01", check.detail)
        self.assertIn("PGPASSWORD", check.hint)

    def test_md5_and_ready(self) -> None:
        """md5 is answered with libpq's hash, and ReadyForQuery is success, closed with Terminate."""
        check, transport = self.run_login(
            backend(b"R", struct.pack("!i", 5) + b"salt"),
            backend(b"R", struct.pack("!i", 0)),
            backend(b"S", b"server_version\x0016.4\0"),
            backend(b"Z", b"I"),
        )
        self.assertEqual(check.status, OK)
        self.assertEqual(check.detail, "logged in as app to appdb (md5; server 16.4)")
        sent = transport.value()
        self.assertIn(pgclient.password_message(pgclient.md5_password("app", "secret", b"salt")), sent)
        self.assertTrue(sent.endswith(pgclient.TERMINATE))
        self.assertNotIn(b"secret", sent)

    def test_no_password(self) -> None:
        """A server asking for a password without PGPASSWORD set fails naming PGPASSWORD."""
        check, _ = self.run_login(backend(b"R", struct.pack("!i", 10) + b"SCRAM-SHA-256\0\0"), password=None)
        self.assertEqual(check.status, FAIL)
        self.assertIn("PGPASSWORD is not set", check.detail)


class DnsTests(SynchronousTestCase):
    def resolve(self, host: str, answers: dict[int, list[str] | Exception], pinned: str | None = None):  # type: ignore[no-untyped-def]
        async def lookup(name: str, family: int) -> list[str]:
            answer = answers[family]
            if isinstance(answer, Exception):
                raise answer
            return answer

        return self.successResultOf(defer.ensureDeferred(dns.resolve(Clock(), "db", host, pinned, lookup, 5.0)))

    def test_pinned(self) -> None:
        """A hosts: pin is used without a lookup."""
        checks, addresses = self.resolve("db.egress.test", {}, pinned="127.0.0.1")
        self.assertEqual(addresses, ["127.0.0.1"])
        self.assertIn("pinned", checks[0].detail)

    def test_families_separately(self) -> None:
        """A and AAAA are reported separately; a family without records is a note, not a failure."""
        nodata = socket.gaierror(socket.EAI_NODATA, "No address associated with hostname")
        checks, addresses = self.resolve("db.example.net", {socket.AF_INET: ["192.0.2.5"], socket.AF_INET6: nodata})
        self.assertEqual(addresses, ["192.0.2.5"])
        self.assertEqual([(c.step, c.status) for c in checks], [("dns A", OK), ("dns AAAA", SKIP)])

    def test_unknown_name(self) -> None:
        """A name with no address in either family fails with the unknown-name hint."""
        nx = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        checks, addresses = self.resolve("missing.example.net", {socket.AF_INET: nx, socket.AF_INET6: nx})
        self.assertEqual(addresses, [])
        [check] = checks
        self.assertEqual((check.step, check.status, check.hint), ("dns", FAIL, dns.HINT_UNKNOWN))
        self.assertIn("Name or service not known", check.detail)

    def test_resolver_silent(self) -> None:
        """A resolver that does not answer gets its own hint."""
        again = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        [check], _ = self.resolve("db.example.net", {socket.AF_INET: again, socket.AF_INET6: again})
        self.assertEqual(check.hint, dns.HINT_NO_ANSWER)


def listener(listen: ListenAddress) -> ListenerConfig:
    return ListenerConfig(name="pg", listen=listen, mode="tcp", cluster="db")


class StackTests(SynchronousTestCase):
    def test_ipv4_only(self) -> None:
        """An IPv4-only bind fails with the dual-stack listen line as the hint."""
        check = stack_check(listener(ListenAddress("0.0.0.0:5432", "0.0.0.0", 5432, False)))
        self.assertEqual(check.status, FAIL)
        self.assertEqual(check.hint, 'listen: "[::]:5432" (dual-stack: IPv6 and IPv4)')

    def test_loopback_only_warns(self) -> None:
        """A loopback bind is deliberate (a sidecar, the demo): a warning saying who cannot reach it."""
        check = stack_check(listener(ListenAddress("127.0.0.1:5432", "127.0.0.1", 5432, False)))
        self.assertEqual(check.status, WARN)
        self.assertIn("loopback only", check.detail)

    def test_dual_stack(self) -> None:
        """``[::]`` passes as dual-stack."""
        check = stack_check(listener(ListenAddress("[::]:5432", "::", 5432, True)))
        self.assertEqual(check.status, OK)
