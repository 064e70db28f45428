"""Judging a server certificate: chain errors, name and expiry each give their own verdict and hint."""

from __future__ import annotations

import datetime

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.doctor.certs import chain_verdict, expiry_verdict, name_verdict
from egressproxy.doctor.report import FAIL, OK, WARN
from tests.tlsfixtures import TestCA

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.timezone.utc)


class CertTests(SynchronousTestCase):
    def leaf(self, names: tuple[str, ...] = ("db.egress.test",), days: float = 30) -> x509.Certificate:
        ca = TestCA.create(self.mktemp())
        cert_path, _ = ca.issue(names, self.mktemp(), "server",
                                not_before=NOW - datetime.timedelta(days=60),
                                not_after=NOW + datetime.timedelta(days=days))
        with open(cert_path, "rb") as f:
            return x509.load_pem_x509_certificate(f.read())

    def test_chain_trusted(self) -> None:
        """No verification errors: verified against the store named."""
        self.assertEqual(chain_verdict([], "the system trust store", None),
                         (OK, "verified against the system trust store", None))

    def test_chain_unknown_issuer(self) -> None:
        """An unknown issuer fails, and the hint names tls.ca_file and sslrootcert."""
        status, detail, hint = chain_verdict([(0, 20), (0, 21)], "tls.ca_file /x.pem", "/x.pem")
        self.assertEqual(status, FAIL)
        self.assertIn("unable to get local issuer certificate", detail)
        self.assertIn("tls.ca_file (/x.pem)", hint)
        self.assertIn("sslrootcert", hint)

    def test_chain_ignores_leaf_dates(self) -> None:
        """The leaf's expiry is the expiry check's business, not the chain's."""
        self.assertEqual(chain_verdict([(0, 10)], "the system trust store", None)[0], OK)

    def test_name_match(self) -> None:
        """The TLS name in the certificate's subjectAltName passes."""
        self.assertEqual(name_verdict(self.leaf(), "db.egress.test")[0], OK)

    def test_wrong_name(self) -> None:
        """Another name fails, showing the certificate's names and the host + hostaddr fix."""
        status, detail, hint = name_verdict(self.leaf(("other.egress.test",)), "db.egress.test")
        self.assertEqual(status, FAIL)
        self.assertIn("other.egress.test", detail)
        self.assertIn("hostaddr=", hint)

    def test_expiry(self) -> None:
        """Over 14 days passes, under warns, past fails with its own hint."""
        self.assertEqual(expiry_verdict(self.leaf(days=30), NOW)[0], OK)
        self.assertEqual(expiry_verdict(self.leaf(days=5), NOW)[0], WARN)
        status, detail, hint = expiry_verdict(self.leaf(days=-2), NOW)
        self.assertEqual(status, FAIL)
        self.assertIn("expired on", detail)
        self.assertIn("renew", hint)
