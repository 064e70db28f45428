"""
Tests for the integration fixtures: the test CA and the PostgreSQL server.

These check the ground the proxy tests stand on: that a direct verify-full
connection to the fixture server works (so a failure through the proxy is the
proxy's), and that a wrong name really fails (so a pass is not vacuous). They
block on subprocesses and do not use the reactor.
"""

from __future__ import annotations

import ipaddress
import os
import stat

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.integration.pgserver import PostgresServer, shared_server
from tests.tlsfixtures import TestCA

SSL_IN_USE = "select ssl from pg_stat_ssl where pid = pg_backend_pid()"


class PostgresServerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = shared_server()

    def test_verify_full_over_ipv4(self) -> None:
        """psql connects with verify-full to db.egress.test at 127.0.0.1 over TLS."""
        result = self.server.psql(SSL_IN_USE, dsn=self.server.dsn(hostaddr="127.0.0.1"))
        self.assertEqual(result.stdout.strip(), "t")

    def test_verify_full_over_ipv6(self) -> None:
        """psql connects with verify-full to db.egress.test at ::1 over TLS."""
        if not self.server.has_ipv6:
            raise SkipTest(
                "::1 cannot be bound on this machine, so the server listens on 127.0.0.1 only"
            )
        result = self.server.psql(SSL_IN_USE, dsn=self.server.dsn(hostaddr="::1"))
        self.assertEqual(result.stdout.strip(), "t")

    def test_verify_full_rejects_wrong_name(self) -> None:
        """psql with verify-full refuses a host name the certificate does not cover."""
        result = self.server.psql(
            "select 1", dsn=self.server.dsn(host="wrong.egress.test"), check=False
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn('server certificate for "db.egress.test"', result.stderr)
        self.assertIn('does not match host name "wrong.egress.test"', result.stderr)

    def test_superuser_sql_uses_unix_socket(self) -> None:
        """superuser_sql connects over the unix socket in the data directory."""
        result = self.server.superuser_sql(
            "select current_setting('unix_socket_directories'), inet_server_addr() is null"
        )
        self.assertEqual(result.stdout.strip(), f"{self.server.datadir}|t")

    def test_dsn_adds_root_cert_for_verify_full(self) -> None:
        """dsn names the CA as sslrootcert and the server's port under verify-full."""
        dsn = self.server.dsn()
        self.assertIn(f"sslrootcert={self.server.ca_path}", dsn.split())
        self.assertIn(f"port={self.server.port}", dsn.split())
        self.assertIn("host=db.egress.test", dsn.split())

    def test_dsn_omits_root_cert_below_verify_ca(self) -> None:
        """dsn leaves sslrootcert out when sslmode does not verify the certificate."""
        self.assertNotIn("sslrootcert", self.server.dsn(sslmode="require"))


class PrivateServerTests(SynchronousTestCase):
    def test_stop_is_idempotent_and_removes_the_directory(self) -> None:
        """stop shuts the server down, deletes its directory, and may be called again."""
        server = PostgresServer.start(names=("other.egress.test",))
        self.addCleanup(server.stop)
        server.psql(SSL_IN_USE)
        server.stop()
        server.stop()
        self.assertFalse(os.path.exists(server.datadir))
        result = server.psql("select 1", dsn=server.dsn(sslmode="disable"), check=False)
        self.assertIn("Connection refused", result.stderr)


class TestCATests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        self.ca = TestCA.create(self.directory)

    def load(self, path: str) -> x509.Certificate:
        with open(path, "rb") as f:
            return x509.load_pem_x509_certificate(f.read())

    def test_issue_puts_names_in_subject_alt_name(self) -> None:
        """issue lists every DNS name and IP literal given in the SubjectAltName."""
        cert_path, _ = self.ca.issue(
            ["db.egress.test", "alt.egress.test", "127.0.0.1", "::1"], self.directory, "leaf"
        )
        san = self.load(cert_path).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        self.assertEqual(
            san.get_values_for_type(x509.DNSName), ["db.egress.test", "alt.egress.test"]
        )
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )

    def test_issue_uses_first_name_as_common_name(self) -> None:
        """issue makes the first name the subject common name."""
        cert_path, _ = self.ca.issue(["db.egress.test", "alt.egress.test"], self.directory, "leaf")
        common_names = self.load(cert_path).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.assertEqual([a.value for a in common_names], ["db.egress.test"])

    def test_issue_signs_with_the_ca_for_server_auth(self) -> None:
        """issue returns a serverAuth certificate signed by the CA in ca.pem."""
        cert_path, _ = self.ca.issue(["db.egress.test"], self.directory, "leaf")
        leaf = self.load(cert_path)
        leaf.verify_directly_issued_by(self.load(self.ca.ca_path))
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(usages), [ExtendedKeyUsageOID.SERVER_AUTH])

    def test_issue_writes_key_owner_only(self) -> None:
        """issue writes the private key readable and writable by its owner only."""
        _, key_path = self.ca.issue(["db.egress.test"], self.directory, "leaf")
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)

    def test_ca_is_a_certificate_authority(self) -> None:
        """create writes a CA certificate allowed to sign certificates."""
        ca = self.load(self.ca.ca_path)
        self.assertTrue(ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertTrue(ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign)
