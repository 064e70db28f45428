"""What the doctor dials: configured endpoints and route names only, each with its protocol and TLS name."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from egressproxy.config import parse_config
from egressproxy.doctor.targets import POSTGRES, TCP, TLS, NameRefused, plan

CONFIG = """
listeners:
  - name: direct
    listen: "[::]:5432"
    mode: tcp
    cluster: pg_direct
  - name: api
    listen: "[::]:8443"
    mode: tcp
    cluster: vendor
  - name: redis
    listen: "[::]:6379"
    mode: tcp
    cluster: cache
  - name: routed
    listen: "[::]:5433"
    mode: postgres
    routes:
      - {sni: "db.example.com", cluster: named}
      - {sni: "*.pg.example.cloud", upstream: "{sni}:5432"}
clusters:
  - name: pg_direct
    endpoints: ["db1.example.net:5432", "db2.example.net:5432"]
    health_check: {kind: postgres}
    tls: {server_name: db.example.net, ca_file: /etc/ssl/certs/ca-certificates.crt}
  - name: vendor
    endpoints: ["api.vendor.example:443"]
  - name: cache
    endpoints: ["cache.example.net:6379"]
  - name: named
    endpoints: ["10.1.2.3:5432"]
admin: false
metrics: false
"""


def config():  # type: ignore[no-untyped-def]
    return parse_config(CONFIG, "test.yaml", {})


class PlanTests(SynchronousTestCase):
    def test_cluster_endpoints(self) -> None:
        """Every endpoint of a listener's cluster is a target, with the cluster's TLS name and CA file."""
        targets = [t for t in plan(config()).targets if t.subject.startswith("cluster pg_direct")]
        self.assertEqual([(t.host, t.port, t.protocol, t.server_name) for t in targets], [
            ("db1.example.net", 5432, POSTGRES, "db.example.net"),
            ("db2.example.net", 5432, POSTGRES, "db.example.net"),
        ])
        self.assertEqual({t.ca_file for t in targets}, {"/etc/ssl/certs/ca-certificates.crt"})

    def test_protocols(self) -> None:
        """Postgres by health check or listener, TLS on TLS-first ports, plain TCP otherwise."""
        protocols = {t.subject: t.protocol for t in plan(config()).targets}
        self.assertEqual(protocols["cluster vendor endpoint api.vendor.example:443"], TLS)
        self.assertEqual(protocols["cluster cache endpoint cache.example.net:6379"], TCP)

    def test_exact_route(self) -> None:
        """An exact route name is dialled at its cluster's endpoints with the route name as the TLS name."""
        [target] = [t for t in plan(config()).targets if t.subject.startswith("route db.example.com")]
        self.assertEqual((target.host, target.port, target.protocol, target.server_name),
                         ("10.1.2.3", 5432, POSTGRES, "db.example.com"))

    def test_route_only_cluster(self) -> None:
        """A cluster reached only through a route is not checked under its own endpoint names."""
        self.assertFalse([t for t in plan(config()).targets if t.subject.startswith("cluster named")])

    def test_wildcard_skipped(self) -> None:
        """A wildcard route without --name is skipped with a hint naming --name."""
        [skipped] = plan(config()).skipped
        self.assertEqual(skipped.subject, "route *.pg.example.cloud (listener routed)")
        self.assertIn("--name HOST", skipped.hint)

    def test_wildcard_with_name(self) -> None:
        """--name under a wildcard route is dialled at the address its template gives."""
        result = plan(config(), "Abc.PG.example.cloud")
        [target] = [t for t in result.targets if t.subject.startswith("route abc.pg.example.cloud")]
        self.assertEqual((target.host, target.port, target.server_name),
                         ("abc.pg.example.cloud", 5432, "abc.pg.example.cloud"))
        self.assertEqual(result.skipped, ())

    def test_name_outside_patterns_refused(self) -> None:
        """A --name that no route admits is refused: the doctor is no way to probe arbitrary hosts."""
        with self.assertRaises(NameRefused) as caught:
            plan(config(), "evil.example.org")
        self.assertIn("*.pg.example.cloud", str(caught.exception))
        self.assertRaises(NameRefused, plan, config(), "pg.example.cloud")
        self.assertRaises(NameRefused, plan, config(), "127.0.0.1")
