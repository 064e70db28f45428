"""Judging a server certificate, apart from the handshake: chain, name and expiry, each with its own hint.

The TLS step (``tls.py``) lets the handshake finish whatever OpenSSL thinks
of the certificate and records every verification error it reported (code
and depth).  These pure functions turn what was recorded into three
separate verdicts, because each has a different fix:

- **chain**: the errors other than the leaf's validity dates: not issued by
  a trusted CA (wrong ``tls.ca_file`` / ``sslrootcert``, or a private CA
  the system store lacks);
- **name**: service-identity's check of the TLS name against the
  certificate's subjectAltNames (what ``sslmode=verify-full`` checks);
- **expiry**: days left; expired or not yet valid fails, fewer than
  :data:`WARN_DAYS` warns.
"""

from __future__ import annotations

import datetime
import ipaddress

from cryptography import x509
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address

from egressproxy.doctor.report import FAIL, OK, WARN

#: Fewer days than this before expiry is a warning.
WARN_DAYS = 14

#: OpenSSL's X509_V_ERR_* codes the chain check names (others are shown by number).
VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
}
#: Validity-date errors: the leaf's are the expiry check's, not the chain's.
DATE_ERRORS = frozenset({9, 10})

Verdict = tuple[str, str, str | None]  # (status, detail, hint)


def chain_verdict(errors: list[tuple[int, int]], trust: str, ca_file: str | None) -> Verdict:
    """The chain check from OpenSSL's recorded ``(depth, errno)`` pairs; ``trust`` names the store used."""
    relevant = [(depth, code) for depth, code in errors if not (depth == 0 and code in DATE_ERRORS)]
    if not relevant:
        return OK, f"verified against {trust}", None
    words = "; ".join(sorted({f"{VERIFY_ERRORS.get(code, f'verify error {code}')} (depth {depth})"
                              for depth, code in relevant}))
    if ca_file:
        hint = (f"the certificate is not issued by the CA in tls.ca_file ({ca_file}): set tls.ca_file to the "
                f"provider's CA certificate (clients: sslrootcert=<the same file>)")
    else:
        hint = ("the certificate does not chain to the system trust store: set the cluster's tls.ca_file to "
                "the provider's CA certificate (clients: sslrootcert=<that file>), or add the CA to the store "
                "(SSL_CERT_FILE)")
    return FAIL, f"not trusted by {trust}: {words}", hint


def certificate_names(leaf: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses of the certificate's subjectAltName (else its CN)."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        common = leaf.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
        return [f"CN={value.value!s}" for value in common]
    names = [str(name) for name in san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return names


def name_verdict(leaf: x509.Certificate, server_name: str) -> Verdict:
    """Whether the certificate is for ``server_name`` (service-identity, as verify-full checks)."""
    names = certificate_names(leaf)
    shown = ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
    try:
        try:
            ip = ipaddress.ip_address(server_name)
        except ValueError:
            verify_certificate_hostname(leaf, server_name)
        else:
            verify_certificate_ip_address(leaf, str(ip))
    except (VerificationError, CertificateError):
        hint = (f"the certificate is for {shown or 'no name'}, not {server_name}: clients must use "
                f"host=<a name in the certificate> with hostaddr=<the proxy's address>, and the config must "
                f"name the upstream by that name (or set the cluster's tls.server_name)")
        return FAIL, f"{server_name} is not in the certificate ({shown or 'no names'})", hint
    return OK, f"{server_name} matches the certificate ({shown})", None


def expiry_verdict(leaf: x509.Certificate, now: datetime.datetime) -> Verdict:
    """Days left on the certificate: expired or not yet valid fails, under :data:`WARN_DAYS` warns."""
    not_after = leaf.not_valid_after_utc
    not_before = leaf.not_valid_before_utc
    if now < not_before:
        return FAIL, f"not valid before {not_before:%Y-%m-%d %H:%M} UTC", (
            "the certificate is not valid yet: check this Machine's clock, or the provider's certificate")
    left = not_after - now
    if left.total_seconds() <= 0:
        return FAIL, f"expired on {not_after:%Y-%m-%d} ({-left.days} days ago)", (
            "the server's certificate has expired: the provider (or whoever runs the server) must renew it; "
            "clients with sslmode=verify-full refuse it")
    days = left.days
    detail = f"{days} days left (until {not_after:%Y-%m-%d})"
    if days < WARN_DAYS:
        return WARN, detail, "the certificate expires soon: make sure the provider renews it"
    return OK, detail, None
