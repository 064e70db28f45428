"""The demo's certificates: a fresh CA and one server certificate, made at run time.

Why: the demo shows clients keeping ``sslmode=verify-full`` through the
proxy, so the database needs a certificate for a name that clients check.
The name is made up (``db.demo.egress.test``; ``.test`` is reserved by
RFC 2606), so no public CA would sign it: each run mints its own CA, writes
only the CA certificate where the user's ``psql`` can read it, and hands the
server certificate and key (PEM bytes) to the PostgreSQL set-up.

Owns key generation and the two certificates.  Does not write the server's
files (``pgcluster`` installs them with the right owner and mode) and knows
nothing of Twisted.

Limits: EC P-256 keys, no intermediates, no CRLs; the CA key lives in memory
only and dies with the process; the leaf is valid for a week (plus an hour of
clock skew backwards), far longer than any demo runs.
"""

from __future__ import annotations

import datetime
import os

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_SKEW = datetime.timedelta(hours=1)
_LIFETIME = datetime.timedelta(days=90)


@attrs.frozen
class DemoTLS:
    """What the run needs: the CA file for clients, the server's certificate and key (PEM)."""

    ca_path: str
    server_cert_pem: bytes
    server_key_pem: bytes = attrs.field(repr=False)


def _key_usage(*, sign_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not sign_certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=sign_certificates,
        crl_sign=sign_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def make_demo_tls(directory: str, server_name: str) -> DemoTLS:
    """Make a CA, write its certificate to ``directory/ca.pem`` (0644), issue one for ``server_name``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "egressproxy demo"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"egressproxy demo CA {os.urandom(4).hex()}"),
    ])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + _LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(sign_certificates=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + _LIFETIME)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(sign_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = os.path.join(directory, "ca.pem")
    with open(ca_path, "wb") as f:
        f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(ca_path, 0o644)
    return DemoTLS(
        ca_path=ca_path,
        server_cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        server_key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
