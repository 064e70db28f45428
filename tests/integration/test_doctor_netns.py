"""The doctor (the real CLI) in network namespaces: an unknown name, and a database that allowlists one host.

- **DNS**: a namespace whose ``resolv.conf`` names the test's own DNS
  server (``dnsserver.py``, answering NXDOMAIN for anything outside its
  zone): an endpoint with an unknown name fails at the DNS step.
- **Allowlist**: a :class:`~tests.integration.netlab.Lab` with a database
  host (10.77.0.10), the proxy's egress host (10.77.0.20) and a host
  outside the allowlist (10.77.0.30).  PostgreSQL runs inside the database
  host and its pg_hba admits only the egress host: doctor passes from
  there and, from the outside host, fails at the login step with "the
  database sees you as 10.77.0.30" and the allowlist hint.
- **Close-on-accept**: the same lab with ``closegate.py`` in front of the
  database (closing at once what it does not admit): from the outside host
  doctor fails at the SSLRequest step with the allowlist hint.

Nothing leaves the namespaces; each test removes what it made.
"""

from __future__ import annotations

import json
import os
import sys

from twisted.trial.unittest import TestCase

from tests.integration.doctorkit import ROOT, doctor_yaml
from tests.integration.netlab import Lab
from tests.integration.netns import NetNS
from tests.integration.pgserver import SUPERUSER, SUPERUSER_PASSWORD, PostgresServer
from tests.integration.proxy import inline, run_process

DB, EGRESS, OUTSIDE = "10.77.0.10", "10.77.0.20", "10.77.0.30"
GATE_PORT = 6432


class DoctorNamespaceTests(TestCase):
    timeout = 180

    def write(self, text: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    async def doctor(self, host: NetNS, *args: str) -> tuple[dict, str, int]:  # type: ignore[type-arg]
        """``egressproxy doctor --json ARGS`` run inside ``host``: (report, stderr, exit status)."""
        argv = host.argv([sys.executable, "-m", "egressproxy.app.cli", "doctor", "--json", "--timeout", "3", *args])
        out, err, code = await run_process(argv, env={"PYTHONPATH": ROOT, "PGPASSWORD": SUPERUSER_PASSWORD})
        self.assertTrue(out.strip(), f"no report (exit {code}): {err}")
        return json.loads(out), err, code

    def lab(self, *admitted: str) -> tuple[Lab, PostgresServer, NetNS, NetNS, NetNS]:
        """The three hosts, PostgreSQL in the database host admitting ``admitted`` (CIDRs) only."""
        lab = Lab.create()
        self.addCleanup(lab.close)
        db, egress, outside = lab.host([DB]), lab.host([EGRESS]), lab.host([OUTSIDE])
        server = PostgresServer.start(netns=db.name, listen=[DB], hba_sources=list(admitted))
        self.addCleanup(server.stop)
        return lab, server, db, egress, outside

    @staticmethod
    def failures(report: dict) -> list[dict]:  # type: ignore[type-arg]
        return [check for check in report["checks"] if check["status"] == "fail"]

    @inline
    async def test_unresolvable_name(self) -> None:
        """A name the namespace's DNS server answers NXDOMAIN for fails at the DNS step with its hint."""
        ns = NetNS.create(["10.0.0.5"], nameserver="127.0.0.1")
        self.addCleanup(ns.close)
        zone = self.write(json.dumps({"db.partner.test": ["10.0.0.5"]}))
        dns = ns.popen([sys.executable, "-m", "tests.integration.dnsserver", "--zone", zone,
                        "--listen", "127.0.0.1:53", "--max-seconds", "120"],
                       stdout=-1, env={**os.environ, "PYTHONPATH": ROOT})
        self.assertTrue(NetNS.read_line(dns).startswith("ready"))
        yaml_text = doctor_yaml(5432, None, "[::]:15432", name="db.partner.test", pin="10.0.0.5").replace(
            'hosts: {"db.partner.test": "10.0.0.5"}\n', "").replace(
            'endpoints: ["db.partner.test:5432"]', 'endpoints: ["missing.partner.test:5432"]')
        report, err, code = await self.doctor(ns, "--config", self.write(yaml_text))
        self.assertEqual(code, 1, err)
        [failure] = self.failures(report)
        self.assertEqual((failure["subject"], failure["step"]),
                         ("cluster db endpoint missing.partner.test:5432", "dns"))
        self.assertIn("missing.partner.test does not resolve", failure["detail"])
        self.assertIn("Name or service not known", failure["detail"])
        self.assertIn("check its spelling", failure["hint"])

    @inline
    async def test_allowlist_admits_only_the_egress_host(self) -> None:
        """Doctor passes from the egress host; from outside it fails at login: "the database sees you as 10.77.0.30"."""
        _lab, server, _db, egress, outside = self.lab(f"{EGRESS}/32")
        config = self.write(doctor_yaml(server.port, server.ca_path, "[::]:15432", pin=DB))
        login = ("--config", config, "--login", SUPERUSER, "--dbname", "postgres")
        report, err, code = await self.doctor(egress, *login)
        self.assertEqual(code, 0, json.dumps(report, indent=1) + err)
        self.assertEqual([c["status"] for c in report["checks"] if c["step"] == "login"], ["ok"])
        report, err, code = await self.doctor(outside, *login)
        self.assertEqual(code, 1, err)
        [failure] = self.failures(report)
        self.assertEqual((failure["step"], failure["address"]), ("login", DB))
        self.assertIn("28000", failure["detail"])
        self.assertIn(f"the database sees you as {OUTSIDE}", failure["detail"])
        self.assertIn(f"{OUTSIDE} is not on the database's allowlist", failure["hint"])
        self.assertIn("fly ips allocate-egress", failure["hint"])

    @inline
    async def test_close_on_accept_gate(self) -> None:
        """Behind a gate that closes non-allowlisted sources at accept, outside fails at the SSLRequest step."""
        # The gate relays from its own address: the database admits the gate, the gate admits the egress host.
        _lab, server, db, egress, outside = self.lab(f"{DB}/32")
        gate = db.popen([sys.executable, "-m", "tests.integration.closegate", "--listen", f"{DB}:{GATE_PORT}",
                         "--to", f"{DB}:{server.port}", "--allow", EGRESS, "--max-seconds", "120"],
                        stdout=-1, env={**os.environ, "PYTHONPATH": ROOT})
        self.assertTrue(NetNS.read_line(gate).startswith("ready"))
        config = self.write(doctor_yaml(GATE_PORT, server.ca_path, "[::]:15432", pin=DB))
        report, err, code = await self.doctor(egress, "--config", config, "--login", SUPERUSER)
        self.assertEqual(code, 0, json.dumps(report, indent=1) + err)
        report, err, code = await self.doctor(outside, "--config", config, "--login", SUPERUSER)
        self.assertEqual(code, 1, err)
        [failure] = self.failures(report)
        self.assertEqual(failure["step"], "sslrequest")
        self.assertIn("0 bytes right after accept", failure["detail"])
        self.assertIn("allowlist", failure["hint"])
        self.assertIn("fly ips allocate-egress", failure["hint"])
        NetNS.stop(gate)
        assert gate.stdout is not None
        self.assertEqual(gate.stdout.read().decode().split("\n"), [f"relayed {EGRESS}", f"closed {OUTSIDE}", ""])
