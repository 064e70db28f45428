"""
A throwaway certificate authority for tests.

Why: the proxy's promise is that clients keep ``sslmode=verify-full`` while
their packets leave through it, so the tests must check certificates against a
name, and the names they use are made up (``db.egress.test``, ``.test`` being
reserved for exactly this by RFC 2606). No public CA signs those, and a
self-signed leaf would only exercise ``verify-ca``-style pinning, so each test
run mints its own CA and issues leaf certificates for whatever names it needs.

What this module owns: key generation, the CA certificate, leaf certificates
and writing them as PEM files. It does not start servers, build TLS contexts,
or know about Twisted; callers hand the paths to whatever needs them
(PostgreSQL's ``ssl_cert_file``, libpq's ``sslrootcert``, the proxy's config).

Limits: keys are EC P-256 (fast to generate, accepted by OpenSSL, libpq and
PostgreSQL); there are no CRLs, no intermediates and no client-auth
certificates. The CA key lives only in memory and dies with the object.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_CLOCK_SKEW = datetime.timedelta(hours=1)
_LEAF_LIFETIME = datetime.timedelta(days=30)
_CA_LIFETIME = datetime.timedelta(days=365)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_private(path: str, data: bytes) -> None:
    """
    Write ``data`` to ``path`` readable by its owner only.

    The mode is set at creation and again afterwards, so an existing file with
    looser permissions is tightened too (PostgreSQL refuses a group- or
    world-readable key).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_public(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o644)


def _general_name(name: str) -> x509.GeneralName:
    """
    A SubjectAltName entry: an IP address for an IP literal, else a DNS name.
    """
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class TestCA:
    """
    A self-signed certificate authority that issues server certificates.

    Build one with ``TestCA.create(directory)``; ``ca_path`` is the PEM file
    of the CA certificate to give verifiers (libpq's ``sslrootcert``).
    """

    # Not a test case, whatever the name says (pytest collects ``Test*``).
    __test__ = False

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        ca_path: str,
    ) -> None:
        self._key = key
        self.certificate = certificate
        self.ca_path = ca_path

    @classmethod
    def create(cls, directory: str) -> TestCA:
        """
        Make a new CA and write its certificate to ``directory/ca.pem``.

        ``directory`` is created if missing. The key is kept in memory only.
        """
        os.makedirs(directory, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "egressproxy tests"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME,
                    f"egressproxy test CA {os.urandom(4).hex()}",
                ),
            ]
        )
        now = _now()
        public_key = key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + _CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        ca_path = os.path.join(directory, "ca.pem")
        _write_public(ca_path, certificate.public_bytes(serialization.Encoding.PEM))
        return cls(key, certificate, ca_path)

    def issue(
        self,
        names: Sequence[str],
        directory: str,
        basename: str,
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> tuple[str, str]:
        """
        Issue a server certificate for ``names`` and write it with its key.

        Every name becomes a SubjectAltName (IP literals as IP addresses, the
        rest as DNS names) and the first is also the subject CN. The
        certificate is valid from an hour ago (clock skew) for 30 days, for
        serverAuth only; ``not_before`` and ``not_after`` (aware datetimes)
        replace those dates, e.g. for an expired certificate. Writes ``directory/basename.crt`` and, mode 0600 and
        unencrypted, ``directory/basename.key``; returns both paths.
        """
        if isinstance(names, str) or not names:
            raise ValueError("names must be a non-empty sequence of names")
        os.makedirs(directory, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        public_key = key.public_key()
        ca_ski = self.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW if not_before is None else not_before)
            .not_valid_after(now + _LEAF_LIFETIME if not_after is None else not_after)
            .add_extension(
                x509.SubjectAlternativeName([_general_name(n) for n in names]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        cert_path = os.path.join(directory, basename + ".crt")
        key_path = os.path.join(directory, basename + ".key")
        _write_public(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
        _write_private(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        return cert_path, key_path
