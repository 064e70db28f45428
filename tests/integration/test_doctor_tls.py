"""The doctor's TLS steps against a loopback server with a wrong-name or an expired certificate.

The server (``doctorkit.FakePostgresTLS``) answers the SSLRequest with
``S`` and does TLS with a certificate from a test CA given to the config as
``tls.ca_file``, so the chain verifies and only the name or the dates are
wrong: each must fail at its own step with its own hint.
"""

from __future__ import annotations

import datetime
import json

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from egressproxy.config import parse_config
from egressproxy.doctor.report import Report
from egressproxy.doctor.runner import DoctorOptions, run_doctor
from tests.integration.doctorkit import FakePostgresTLS, doctor_yaml, free_dual_stack_port, run_doctor_cli
from tests.integration.proxy import inline
from tests.tlsfixtures import TestCA


class DoctorTLSTests(TestCase):
    timeout = 60

    async def run_against(self, names: tuple[str, ...], **dates: datetime.datetime) -> Report:
        ca = TestCA.create(self.mktemp())
        cert, key = ca.issue(names, self.mktemp(), "server", **dates)
        server = FakePostgresTLS(self, cert, key)
        yaml_text = doctor_yaml(server.number, ca.ca_path, f"[::]:{free_dual_stack_port()}")
        return await run_doctor(reactor, parse_config(yaml_text, "tls-test.yaml", {}), DoctorOptions(timeout=5.0))

    @inline
    async def test_wrong_name(self) -> None:
        """A certificate for another name fails at the name step, naming host + hostaddr."""
        report = await self.run_against(("other.egress.test",))
        self.assertFalse(report.ok)
        failure = report.failures[0]
        self.assertEqual(failure.step, "tls name")
        self.assertIn("db.egress.test is not in the certificate (other.egress.test)", failure.detail)
        self.assertIn("host=<a name in the certificate> with hostaddr=", failure.hint)
        self.assertEqual(len(report.failures), 1)
        statuses = {c.step: c.status for c in report.checks}
        self.assertEqual((statuses["tls"], statuses["tls chain"]), ("ok", "ok"))

    @inline
    async def test_expired(self) -> None:
        """An expired certificate fails at the expiry step (the chain still verifies) with the renew hint."""
        now = datetime.datetime.now(datetime.timezone.utc)
        report = await self.run_against(("db.egress.test",), not_before=now - datetime.timedelta(days=90),
                                        not_after=now - datetime.timedelta(days=3))
        self.assertFalse(report.ok)
        failure = report.failures[0]
        self.assertEqual(failure.step, "tls expiry")
        self.assertIn("expired on", failure.detail)
        self.assertIn("must renew it", failure.hint)
        self.assertEqual(len(report.failures), 1)

    @inline
    async def test_system_store_honours_ssl_cert_file(self) -> None:
        """Without tls.ca_file the chain is checked against OpenSSL's default paths, so SSL_CERT_FILE counts."""
        ca = TestCA.create(self.mktemp())
        cert, key = ca.issue(("db.egress.test",), self.mktemp(), "server")
        server = FakePostgresTLS(self, cert, key)
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(doctor_yaml(server.number, None, f"[::]:{free_dual_stack_port()}"))
        out, err, code = await run_doctor_cli(["--config", path, "--json"], env={"SSL_CERT_FILE": ca.ca_path})
        self.assertEqual(code, 0, out + err)
        [chain] = [c for c in json.loads(out)["checks"] if c["step"] == "tls chain"]
        self.assertEqual((chain["status"], chain["detail"]), ("ok", "verified against the system trust store"))
