"""The doctor against a real PostgreSQL on loopback (hostssl + SCRAM): all pass, and each cause failing at its own step.

The server is ``pgserver.shared_server()`` with a certificate for
``db.egress.test``; the config pins that name to 127.0.0.1 (``hosts:``), so
nothing is resolved.  One test runs the real CLI (``--json``, exit status);
the others run the same runner in the test's reactor.
"""

from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from egressproxy.config import parse_config
from egressproxy.doctor.report import Report
from egressproxy.doctor.runner import DoctorOptions, run_doctor
from tests.integration.doctorkit import doctor_yaml, free_dual_stack_port, run_doctor_cli
from tests.integration.pgserver import SUPERUSER, SUPERUSER_PASSWORD, shared_server
from tests.integration.proxy import inline
from tests.tlsfixtures import TestCA


def login(password: str = SUPERUSER_PASSWORD) -> DoctorOptions:
    return DoctorOptions(login=SUPERUSER, dbname="postgres", password=password, timeout=5.0)


class DoctorLoopbackTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.server = shared_server()

    async def doctor(self, yaml_text: str, options: DoctorOptions) -> Report:
        config = parse_config(yaml_text, "doctor-test.yaml", {})
        return await run_doctor(reactor, config, options)

    def first_failure(self, report: Report):  # type: ignore[no-untyped-def]
        self.assertFalse(report.ok, "the run should fail")
        return report.failures[0]

    @inline
    async def test_all_pass_with_login(self) -> None:
        """The CLI passes every step (listener, DNS pin, TCP, SSLRequest, TLS, login) and exits 0."""
        path = os.path.join(self.mktemp())
        with open(path, "w", encoding="utf-8") as f:
            f.write(doctor_yaml(self.server.port, self.server.ca_path, f"[::]:{free_dual_stack_port()}"))
        out, err, code = await run_doctor_cli(
            ["--config", path, "--json", "--login", SUPERUSER, "--dbname", "postgres"],
            env={"PGPASSWORD": SUPERUSER_PASSWORD},
        )
        self.assertEqual(code, 0, out + err)
        report = json.loads(out)
        self.assertTrue(report["ok"])
        steps = {check["step"]: check for check in report["checks"]}
        for step in ("listen", "dual-stack", "dns", "tcp", "sslrequest", "tls", "tls chain", "tls name",
                     "tls expiry", "login"):
            self.assertEqual(steps[step]["status"], "ok", steps[step])
        self.assertIn("SCRAM-SHA-256", steps["login"]["detail"])
        self.assertIn("TLSv1.3", steps["tls"]["detail"])
        self.assertNotIn(SUPERUSER_PASSWORD, out + err)

    @inline
    async def test_wrong_password(self) -> None:
        """A wrong password fails at the login step with 28P01 and the PGPASSWORD hint."""
        yaml_text = doctor_yaml(self.server.port, self.server.ca_path, f"[::]:{free_dual_stack_port()}")
        failure = self.first_failure(await self.doctor(yaml_text, login("not-the-password")))
        self.assertEqual(failure.step, "login")
        self.assertIn("28P01", failure.detail)
        self.assertIn("wrong password", failure.hint)

    @inline
    async def test_wrong_ca(self) -> None:
        """A ca_file of another CA fails at the chain step, with the tls.ca_file / sslrootcert hint."""
        other = TestCA.create(self.mktemp())
        yaml_text = doctor_yaml(self.server.port, other.ca_path, f"[::]:{free_dual_stack_port()}")
        report = await self.doctor(yaml_text, login())
        failure = self.first_failure(report)
        self.assertEqual(failure.step, "tls chain")
        self.assertIn("unable to get local issuer certificate", failure.detail)
        self.assertIn(f"tls.ca_file ({other.ca_path})", failure.hint)
        self.assertEqual([c.status for c in report.checks if c.step == "login"], ["skip"])

    @inline
    async def test_ipv4_only_listener(self) -> None:
        """An IPv4-only listener fails at the dual-stack step with the [::] hint; the upstream still passes."""
        port = free_dual_stack_port()
        # 0.0.0.0, not 127.0.0.1: a loopback bind is only a warning (see StackTests).
        yaml_text = doctor_yaml(self.server.port, self.server.ca_path, f"0.0.0.0:{port}")
        report = await self.doctor(yaml_text, login())
        failure = self.first_failure(report)
        self.assertEqual((failure.subject, failure.step), ("listener pg", "dual-stack"))
        self.assertEqual(failure.hint, f'listen: "[::]:{port}" (dual-stack: IPv6 and IPv4)')
        self.assertEqual(len(report.failures), 1)
