"""``egressproxy doctor``'s command line before any check runs: config errors, a refused --name, flag errors."""

from __future__ import annotations

import io

from twisted.trial.unittest import SynchronousTestCase

from egressproxy.app.cli import main

CONFIG = """
listeners:
  - name: routed
    listen: "[::]:5433"
    mode: postgres
    routes:
      - {sni: "*.pg.example.cloud", upstream: "{sni}:5432"}
admin: false
metrics: false
"""


class DoctorCliTests(SynchronousTestCase):
    def run_cli(self, *argv: str, environ: dict[str, str] | None = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(["doctor", *argv], stdout=out, stderr=err, environ=environ or {})
        return code, out.getvalue(), err.getvalue()

    def config(self) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(CONFIG)
        return path

    def test_name_outside_routes_refused(self) -> None:
        """A --name no route pattern admits exits 2 without dialling anything."""
        code, out, err = self.run_cli("--config", self.config(), "--name", "internal.example.org")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("--name internal.example.org matches no route of a postgres listener (*.pg.example.cloud)", err)

    def test_config_from_environment(self) -> None:
        """Without --config, $EGRESSPROXY_CONFIG is read; its errors exit 1."""
        code, out, err = self.run_cli(environ={"EGRESSPROXY_CONFIG": "/nonexistent/egressproxy.yaml"})
        self.assertEqual((code, out), (1, ""))
        self.assertIn("/nonexistent/egressproxy.yaml: cannot read the config file", err)

    def test_dbname_needs_login(self) -> None:
        """--dbname without --login is a usage error."""
        code, _, err = self.run_cli("--config", self.config(), "--dbname", "app")
        self.assertEqual(code, 2)
        self.assertIn("--dbname needs --login USER", err)
