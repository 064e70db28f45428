"""The TLS steps: a handshake with the upstream's name as SNI, then chain, name and expiry.

The handshake is made with Twisted's ``startTLS`` on the probe connection
(after ``S`` for Postgres, at once for TLS-first ports), through a
connection creator of our own: it verifies the chain with OpenSSL against
the cluster's ``tls.ca_file`` or OpenSSL's default paths (the system store;
``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` work), but its verify callback only
*records* each error and lets the handshake go on.  So one handshake yields
four checks, each failing on its own with its own hint (see ``certs.py``),
where a verifying client would only have said "certificate verify failed".

What it does not do: client certificates, revocation (OCSP, CRLs), or
policy beyond what OpenSSL's default verification and service-identity do.
"""

from __future__ import annotations

import datetime
import ipaddress
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from egressproxy.doctor.certs import chain_verdict, expiry_verdict, name_verdict
from egressproxy.doctor.conn import Closed, ProbeConnection, TimedOut
from egressproxy.doctor.report import FAIL, OK, Check

HINT_HANDSHAKE = ("the TLS handshake failed: the server may not speak TLS on this port, or accept no TLS version "
                  "or cipher in common with OpenSSL's defaults here")


@implementer(IOpenSSLClientConnectionCreator)
class RecordingCreator:
    """Client TLS connections that send SNI and record, rather than enforce, chain verification."""

    def __init__(self, server_name: str, ca_file: str | None) -> None:
        self.server_name = server_name
        self.ca_file = ca_file
        #: (depth, X509_V_ERR code) for each error OpenSSL reported.
        self.errors: list[tuple[int, int]] = []
        self.context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if ca_file:
            self.context.load_verify_locations(ca_file)
        else:
            self.context.set_default_verify_paths()
        self.context.set_verify(SSL.VERIFY_PEER, self._verify)

    @property
    def trust(self) -> str:
        return f"tls.ca_file {self.ca_file}" if self.ca_file else "the system trust store"

    def _verify(self, _conn: SSL.Connection, _cert: Any, code: int, depth: int, ok: int) -> bool:
        if not ok:
            self.errors.append((depth, code))
        return True

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A connection for one handshake (``IOpenSSLClientConnectionCreator``)."""
        connection = SSL.Connection(self.context, None)
        if not _is_ip(self.server_name):
            connection.set_tlsext_host_name(self.server_name.encode("idna"))
        return connection


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


async def tls_steps(
    reactor: Any, conn: ProbeConnection, subject: str, address: str, server_name: str,
    ca_file: str | None, timeout: float,
) -> tuple[list[Check], bool]:
    """The handshake, chain, name and expiry checks; and whether the connection is fit for a login."""
    started = reactor.seconds()
    try:
        creator = RecordingCreator(server_name, ca_file)
    except SSL.Error as e:
        return [Check(subject, "tls chain", FAIL, f"cannot load tls.ca_file {ca_file}: {e}", 0.0,
                      "tls.ca_file must be a readable PEM file of CA certificates", address)], False
    try:
        await conn.start_tls(creator, timeout)
    except (Closed, TimedOut) as e:
        return [Check(subject, "tls", FAIL, f"handshake with SNI {server_name}: {e}",
                      reactor.seconds() - started, HINT_HANDSHAKE, address)], False
    except Exception as e:  # an SSL.Error from the handshake, or the connection lost during it
        return [Check(subject, "tls", FAIL, f"handshake with SNI {server_name} failed: {_words(e)}",
                      reactor.seconds() - started, HINT_HANDSHAKE, address)], False
    seconds = reactor.seconds() - started
    handle = conn.tls_handle()
    version = handle.get_protocol_version_name()
    cipher = handle.get_cipher_name()
    peer = handle.get_peer_certificate()
    sni = "no SNI (an IP address)" if _is_ip(server_name) else f"SNI {server_name}"
    checks = [Check(subject, "tls", OK, f"{version}, {cipher}, {sni}", seconds, None, address)]
    if peer is None:
        checks.append(Check(subject, "tls chain", FAIL, "the server sent no certificate", 0.0,
                            "the server must present a certificate", address))
        return checks, False
    leaf = peer.to_cryptography()
    for step, (status, detail, hint) in (
        ("tls chain", chain_verdict(creator.errors, creator.trust, ca_file)),
        ("tls name", name_verdict(leaf, server_name)),
        ("tls expiry", expiry_verdict(leaf, datetime.datetime.fromtimestamp(reactor.seconds(), datetime.timezone.utc))),
    ):
        checks.append(Check(subject, step, status, detail, 0.0, hint, address))
    return checks, all(check.ok for check in checks)


def _words(e: BaseException) -> str:
    """An OpenSSL error list or a Twisted failure reason, as one line."""
    if isinstance(e, SSL.Error) and e.args and isinstance(e.args[0], list):
        return "; ".join(str(part[-1]) for part in e.args[0] if part) or str(e)
    return str(e) or type(e).__name__
