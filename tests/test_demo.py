"""The demo's pure parts: its config, ports, printed commands, certificates and the missing-initdb message.

The demo run end to end (a real PostgreSQL, real psql and curl) is in
``tests/integration/test_demo.py``; these need no server and no reactor.
"""

from __future__ import annotations

import io
import os
import shlex

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.app.cli import main
from egressproxy.app.demo.banner import READY, REFUSED_URL, DemoFacts, curl_command, psql_command, render_banner
from egressproxy.app.demo.certs import make_demo_tls
from egressproxy.app.demo.configtext import SERVER_NAME, DemoPorts, choose_ports, render_config
from egressproxy.app.demo.pgcluster import DemoError, find_bindir
from egressproxy.config import parse_config
from egressproxy.config.model import Address
from egressproxy.modes.forward.destinations import allowed, destination

PORTS = DemoPorts(direct=15432, routed=15433, connect=15434, admin=15435)


def facts(**changes: object) -> DemoFacts:
    values: dict[str, object] = dict(
        ports=PORTS, pg_port=40001, pg_pid=4242, pg_version="16.4", workdir="/tmp/egressproxy-demo-x",
        config_path="/tmp/egressproxy-demo-x/egressproxy-demo.yaml", ca_path="/tmp/egressproxy-demo-x/ca.pem",
        password="pw-1_2", admin_token="tok", psql="psql", startup_seconds=2.345,
    )
    values.update(changes)
    return DemoFacts(**values)  # type: ignore[arg-type]


class ConfigTextTests(SynchronousTestCase):
    def config(self):  # type: ignore[no-untyped-def]
        ca = self.mktemp()
        with open(ca, "w") as f:
            f.write("the loader only checks that the file exists\n")
        config = parse_config(render_config(PORTS, 40001, ca), "demo.yaml", {})
        self.assertEqual(config.clusters[0].tls.ca_file, ca)
        return config

    def test_loads(self) -> None:
        """The rendered config loads with the ordinary loader: three listeners and admin on loopback, no metrics service."""
        config = self.config()
        self.assertEqual(
            [(l.name, l.mode, l.listen.host, l.listen.port) for l in config.listeners],
            [("direct", "tcp", "127.0.0.1", 15432), ("routed", "postgres", "127.0.0.1", 15433),
             ("connect", "http_connect", "127.0.0.1", 15434)],
        )
        self.assertEqual((config.admin.listen.host, config.admin.listen.port), ("127.0.0.1", 15435))
        self.assertIsNone(config.metrics)

    def test_database_pinned(self) -> None:
        """The made-up name is pinned to 127.0.0.1 and is the one cluster's endpoint, on the database port."""
        config = self.config()
        self.assertEqual(dict(config.hosts)[SERVER_NAME], "127.0.0.1")
        [cluster] = config.clusters
        self.assertEqual(cluster.endpoints, (Address(SERVER_NAME, 40001),))

    def test_routes_by_sni(self) -> None:
        """The postgres listener routes exactly the database's name to the cluster."""
        routed = self.config().listeners[1]
        self.assertEqual([(r.sni, r.cluster) for r in routed.options.routes], [(SERVER_NAME, "demo_db")])

    def test_allowlist_is_the_database_only(self) -> None:
        """The http_connect allowlist admits the database's name and port and nothing else."""
        rules = self.config().listeners[2].options.allow_destinations
        self.assertTrue(allowed(rules, destination(SERVER_NAME, 40001)))
        self.assertFalse(allowed(rules, destination(SERVER_NAME, 40002)))
        self.assertFalse(allowed(rules, destination("example.com", 443)))


class ChoosePortsTests(SynchronousTestCase):
    def test_base_when_free(self) -> None:
        """A free base gives N, N+1, N+2, N+3."""
        self.assertEqual(choose_ports(20000, is_free=lambda p: True, ephemeral=lambda: 1), DemoPorts(20000, 20001, 20002, 20003))

    def test_busy_port_replaced(self) -> None:
        """A taken port is replaced by a free one; the others keep their place."""
        spare = iter([31000, 31001])
        ports = choose_ports(20000, is_free=lambda p: p != 20001, ephemeral=lambda: next(spare))
        self.assertEqual(ports, DemoPorts(20000, 31000, 20002, 20003))

    def test_zero_means_free_ports(self) -> None:
        """Base 0 asks for a free port for each, never the same one twice."""
        spare = iter([31000, 31000, 31001, 31002, 31003])
        ports = choose_ports(0, is_free=lambda p: self.fail("no probe expected"), ephemeral=lambda: next(spare))
        self.assertEqual(ports, DemoPorts(31000, 31001, 31002, 31003))

    def test_out_of_range(self) -> None:
        """A base whose four ports do not fit below 65536 is refused."""
        self.assertRaises(ValueError, choose_ports, 65533)


class BannerTests(SynchronousTestCase):
    def test_psql_command_runs_as_printed(self) -> None:
        """The psql line splits into PGPASSWORD, psql and a verify-full conninfo through the given port."""
        words = shlex.split(psql_command(facts(password="it's"), 15433))
        self.assertEqual(words[:2], ["PGPASSWORD=it's", "psql"])
        conninfo = dict(part.split("=", 1) for part in words[2].split())
        self.assertEqual(conninfo, {
            "host": SERVER_NAME, "hostaddr": "127.0.0.1", "port": "15433", "sslmode": "verify-full",
            "sslrootcert": "/tmp/egressproxy-demo-x/ca.pem", "user": "demo", "dbname": "demo",
        })

    def test_curl_command(self) -> None:
        """The curl line tunnels through the http_connect listener."""
        self.assertEqual(
            shlex.split(curl_command(facts(), REFUSED_URL)),
            ["curl", "-sv", "-p", "-x", "http://127.0.0.1:15434", REFUSED_URL],
        )

    def test_banner_names_everything(self) -> None:
        """The banner starts with the ready line and shows both psql ports, both curls, doctor and admin."""
        text = render_banner(facts())
        self.assertIn(READY + " (started in 2.3 s).", text)
        for needle in ("port=15432", "port=15433", f"https://{SERVER_NAME}:40001/", REFUSED_URL,
                       "egressproxy doctor --config /tmp/egressproxy-demo-x/egressproxy-demo.yaml --login demo",
                       "http://127.0.0.1:15435/ (status page)", "pid 4242"):
            self.assertIn(needle, text)


class CertificateTests(SynchronousTestCase):
    def test_server_certificate_from_the_ca(self) -> None:
        """The server certificate names the database and is signed by the CA written to ca.pem."""
        directory = self.mktemp()
        os.makedirs(directory)
        tls = make_demo_tls(directory, SERVER_NAME)
        with open(tls.ca_path, "rb") as f:
            ca = x509.load_pem_x509_certificate(f.read())
        server = x509.load_pem_x509_certificate(tls.server_cert_pem)
        server.verify_directly_issued_by(ca)
        names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), [SERVER_NAME])
        self.assertIn(b"PRIVATE KEY", tls.server_key_pem)
        self.assertEqual(os.stat(tls.ca_path).st_mode & 0o777, 0o644)


class MissingPostgresTests(SynchronousTestCase):
    def test_names_the_packages(self) -> None:
        """A directory without initdb is refused with the packages to install, for Debian/Ubuntu and macOS."""
        with self.assertRaises(DemoError) as caught:
            find_bindir(self.mktemp())
        message = str(caught.exception)
        self.assertIn("apt-get install postgresql", message)
        self.assertIn("brew install postgresql", message)

    def test_cli_help(self) -> None:
        """``egressproxy demo --help`` describes the command and its options."""
        out = io.StringIO()
        self.assertEqual(main(["demo", "--help"], stdout=out, stderr=io.StringIO(), environ={}), 0)
        self.assertIn("--port-base", out.getvalue())
        self.assertIn("--pg-bindir", out.getvalue())
