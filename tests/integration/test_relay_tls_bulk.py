"""The relay's TLS side on its own: a pyOpenSSL client leg against a real TLS server.

Each test sets up what the service hands over for ``tls: originate``: a
loopback client socket (side a) and a TLS client connection made with
pyOpenSSL over memory BIOs, its handshake done in Python (side b), then
gives both to a ``Relay`` with ``tls_b`` (``relaytls.enable`` first, as the
service does).  The server is Python's ``ssl`` module on a thread of its
own (a different OpenSSL binding from the one the relay calls into).
Checked: 50 MB each way at once with exact plaintext counts, bytes the SSL
object already held at the hand-off, the client's half-close (close_notify
then FIN; the server's answer still arrives), the server's close_notify
ending the pair without a flag, and a server that closes without one
(``reset_b``, the access line's UC).
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import socket
import ssl
import tempfile
import threading
import time
from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.datapath import relaytls
from tests.relaykit import pattern, recv_eof, relay_module, tcp_pair, wait_ended
from tests.tlsfixtures import TestCA

MB = 1024 * 1024
NAME = "relay.egress.test"


class Server(threading.Thread):
    """The TLS server: sends ``send``, reads until the client's EOF, then ends as ``ending`` says.

    ``ending``: ``notify`` (close_notify, then close), ``first`` (close_notify
    right after sending, without waiting for the client's EOF) or
    ``truncate`` (close the socket after sending, no close_notify).
    ``answer`` is sent after the client's EOF (a half-close test).
    """

    def __init__(self, sock: ssl.SSLSocket, send: bytes = b"", answer: bytes = b"", ending: str = "notify") -> None:
        super().__init__(daemon=True)
        self.sock, self.send, self.answer, self.ending = sock, send, answer, ending
        self.digest = hashlib.sha256()
        self.received = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # reported by the test
            self.error = e

    def _run(self) -> None:
        s = self.sock
        s.setblocking(False)
        out, answered = memoryview(self.send), False
        eof = self.ending in ("first", "truncate")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            busy = False
            if out:
                try:
                    n = s.send(out[:256 * 1024])
                    out, busy = out[n:], True
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    pass
            if not eof:
                try:
                    chunk = s.recv(256 * 1024)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    chunk = None
                if chunk:
                    self.digest.update(chunk)
                    self.received += len(chunk)
                    busy = True
                elif chunk == b"":
                    eof = True
            if eof and not out:
                if self.answer and not answered:
                    out, answered = memoryview(self.answer), True
                    continue
                break
            if not busy:
                select.select([s], [s] if out else [], [], 0.05)
        if self.ending == "truncate":
            s.close()  # no close_notify
            return
        s.setblocking(True)
        s.settimeout(5)
        try:
            s.unwrap()
        except (OSError, ssl.SSLError):
            pass
        s.close()


class RelayTLSTests(SynchronousTestCase):
    """A relay with pyOpenSSL's OpenSSL, and a CA for the server's certificate."""

    def setUp(self) -> None:
        module = relay_module()
        self.assertEqual(relaytls.enable(module), "")
        self.relay = module.Relay(linger=5.0)
        self.addCleanup(self.relay.close)
        directory = tempfile.mkdtemp(prefix="egress-relay-tls-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.ca = TestCA.create(os.path.join(directory, "ca"))
        self.cert, self.key = self.ca.issue([NAME], directory, "server")

    def pair(self, server_send: bytes = b"", answer: bytes = b"", ending: str = "notify",
             early: bool = False) -> tuple[socket.socket, Server, int]:
        """(client socket, server thread, handle): the client's leg relayed to a TLS server through b."""
        client, a = tcp_pair()
        server_raw, b = tcp_pair()
        self.addCleanup(client.close)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        accepted: list[ssl.SSLSocket] = []
        handshake = threading.Thread(target=lambda: accepted.append(context.wrap_socket(server_raw, server_side=True)))
        handshake.start()
        connection = self.handshake(b)
        handshake.join(10)
        [server_ssl] = accepted
        server = Server(server_ssl, server_send, answer, ending)
        if early:
            # Bytes in b's read BIO that Python has not decrypted: the relay's first SSL_read must find them.
            server_ssl.sendall(b"early bytes")
            b.setblocking(True)
            connection.bio_write(b.recv(65536))
            b.setblocking(False)
        server.start()
        self.addCleanup(server.join, 10)
        tls_b = relaytls.take(_Transport(connection), [])
        self.assertIsNotNone(tls_b)
        handle = self.relay.add(a.fileno(), b.fileno(), "cookie", tls_b=tls_b)
        a.detach()
        b.detach()
        return client, server, handle

    def handshake(self, b: socket.socket) -> SSL.Connection:
        """A verified TLS client handshake over ``b`` with memory BIOs, as Twisted's TLS layer does it."""
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.load_verify_locations(self.ca.ca_path)
        context.set_verify(SSL.VERIFY_PEER, lambda *args: args[-1])
        connection = SSL.Connection(context, None)
        connection.set_tlsext_host_name(NAME.encode())
        connection.set_connect_state()
        b.setblocking(True)
        b.settimeout(10)
        for _ in range(20):
            try:
                connection.do_handshake()
                break
            except SSL.WantReadError:
                b.sendall(_drain(connection))
                connection.bio_write(b.recv(65536))
        b.sendall(_drain(connection))
        b.setblocking(False)
        return connection

    def test_50mb_each_way_exact_counts(self) -> None:
        """50 MB each way at once through TLS: intact, and the counts are plaintext, exact."""
        up, down = pattern(50 * MB, 1), pattern(50 * MB, 2)
        client, server, handle = self.pair(server_send=down)
        at_client = _client_exchange(client, up, len(down))
        server.join(90)
        self.assertIsNone(server.error)
        self.assertEqual(at_client, hashlib.sha256(down).hexdigest())
        self.assertEqual(server.digest.hexdigest(), hashlib.sha256(up).hexdigest())
        [(cookie, a_to_b, b_to_a, reason)] = wait_ended(self.relay, timeout=20)
        self.assertEqual((cookie, a_to_b, b_to_a, reason), ("cookie", len(up), len(down), "eof"))

    def test_bytes_the_ssl_object_held(self) -> None:
        """Ciphertext already in the read BIO at the hand-off reaches the client first."""
        client, server, _handle = self.pair(server_send=b" and later ones", early=True)
        client.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_eof(client), b"early bytes and later ones")
        [(_, a_to_b, b_to_a, reason)] = wait_ended(self.relay)
        self.assertEqual((a_to_b, b_to_a, reason), (0, 26, "eof"))

    def test_client_half_close(self) -> None:
        """The client's EOF becomes close_notify then FIN; the server's answer still reaches it; no flag."""
        answer = pattern(2 * MB, 3)
        client, server, _handle = self.pair(answer=answer)
        client.sendall(b"request")
        client.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_eof(client, timeout=20), answer)
        server.join(10)
        self.assertEqual(server.received, len(b"request"))
        [(_, a_to_b, b_to_a, reason)] = wait_ended(self.relay)
        self.assertEqual((a_to_b, b_to_a, reason), (7, len(answer), "eof"))

    def test_server_close_notify_ends_the_pair(self) -> None:
        """The server's close_notify: the client gets everything, then EOF; reason eof (no UC)."""
        client, server, _handle = self.pair(server_send=b"bye now", ending="first")
        self.assertEqual(recv_eof(client), b"bye now")
        [(_, a_to_b, b_to_a, reason)] = wait_ended(self.relay)
        self.assertEqual((a_to_b, b_to_a, reason), (0, 7, "eof"))

    def test_server_closing_without_close_notify_is_a_reset(self) -> None:
        """A TCP close with no close_notify, first sign of the end: reset_b (UC on the access line)."""
        client, server, _handle = self.pair(server_send=b"truncated", ending="truncate")
        self.assertEqual(recv_eof(client), b"truncated")
        [(_, a_to_b, b_to_a, reason)] = wait_ended(self.relay)
        self.assertEqual((a_to_b, b_to_a, reason), (0, 9, "reset_b"))


class _Transport:
    """What ``relaytls.take`` reads of a Twisted TLS transport, around a bare ``Connection``."""

    def __init__(self, connection: SSL.Connection) -> None:
        self.protocol = _Protocol(connection)


class _Protocol:
    """A TLS layer in the state the service hands over: handshake done, nothing buffered."""

    _appSendBuffer: list[bytes] = []
    _lostTLSConnection = False

    def __init__(self, connection: SSL.Connection) -> None:
        self._tlsConnection = connection

    def write(self, data: bytes) -> None:
        """The tests hand over no pending plaintext."""
        raise AssertionError("nothing to write in these tests")


def _drain(connection: SSL.Connection) -> bytes:
    """Everything the client's write BIO holds (handshake records to send)."""
    out = b""
    for _ in range(1000):
        try:
            out += connection.bio_read(65536)
        except SSL.WantReadError:
            break
    return out


def _client_exchange(client: socket.socket, payload: bytes, expected: int, timeout: float = 90.0) -> str:
    """Send ``payload`` then EOF while reading ``expected`` bytes and then EOF; the SHA-256 read."""
    client.setblocking(False)
    out, digest, got, eof = memoryview(payload), hashlib.sha256(), 0, False
    shut = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (eof and shut):
        readable, writable, _ = select.select([client], [client] if out else [], [], 0.1)
        if writable:
            try:
                out = out[client.send(out[:1 << 20]):]
            except BlockingIOError:
                pass
        if not out and not shut:
            client.shutdown(socket.SHUT_WR)
            shut = True
        if readable:
            chunk = client.recv(1 << 20)
            if not chunk:
                eof = True
            digest.update(chunk)
            got += len(chunk)
    if not (eof and shut):
        raise AssertionError(f"exchange unfinished after {timeout}s: {got} of {expected} bytes read")
    return digest.hexdigest()
