"""Tests for egressproxy.app.cli: exit codes and what goes to stdout and stderr."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping

from twisted.trial.unittest import SynchronousTestCase

from egressproxy.app.cli import main

GOOD = """\
listeners:
  - name: direct
    listen: ":5432"
    cluster: pg
  - name: local
    listen: "127.0.0.1:6432"
    cluster: pg
clusters:
  - name: pg
    endpoints: ["${PG_HOST}:5432"]
"""

BAD = """\
listeners:
  - name: direct
    listen: "localhost:5432"
    cluster: pg
clusters:
  - name: pg
    endpoints: ["db"]
"""


class CheckConfigTests(SynchronousTestCase):
    """egressproxy check-config FILE."""

    def write(self, text: str) -> str:
        fd, path = tempfile.mkstemp(suffix=".yaml")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        self.addCleanup(os.remove, path)
        return path

    def run_cli(
        self, *argv: str, environ: Mapping[str, str] | None = None
    ) -> tuple[int, str, str]:
        stdout, stderr = io.StringIO(), io.StringIO()
        code = main(list(argv), stdout=stdout, stderr=stderr, environ=environ or {})
        return code, stdout.getvalue(), stderr.getvalue()

    def test_good_file(self) -> None:
        """A valid file prints a one-line summary to stdout and exits 0."""
        path = self.write(GOOD)
        self.assertEqual(
            self.run_cli("check-config", path, environ={"PG_HOST": "db.test"}),
            (0, f"{path}: OK (2 listeners, 1 cluster)\n", ""),
        )

    def test_good_file_with_workers(self) -> None:
        """The summary names the worker count when there is more than one."""
        path = self.write(GOOD + "workers: 3\n")
        self.assertEqual(
            self.run_cli("check-config", path, environ={"PG_HOST": "db.test"}),
            (0, f"{path}: OK (2 listeners, 1 cluster, 3 workers)\n", ""),
        )

    def test_bad_file(self) -> None:
        """An invalid file prints every error to stderr, one per line, and exits 1."""
        path = self.write(BAD)
        self.assertEqual(
            self.run_cli("check-config", path),
            (
                1,
                "",
                f"{path}:3: listeners[0].listen: expected an IP address to listen on, "
                "got host name 'localhost' (use 127.0.0.1:5432, [::1]:5432, or :5432 "
                "for all interfaces)\n"
                f"{path}:7: clusters[0].endpoints[0]: expected HOST:PORT (e.g. "
                "db.example.com:5432 or [2001:db8::1]:5432), got 'db'\n",
            ),
        )

    def test_environment_is_used(self) -> None:
        """Interpolation reads the environment given to main."""
        path = self.write(GOOD)
        code, out, err = self.run_cli("check-config", path, environ={})
        self.assertEqual((code, out), (1, ""))
        self.assertIn("environment variable PG_HOST is not set", err)

    def test_missing_file(self) -> None:
        """A file that does not exist is reported plainly and exits 1."""
        directory = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, directory)
        path = os.path.join(directory, "absent.yaml")
        self.assertEqual(
            self.run_cli("check-config", path),
            (1, "", f"{path}: cannot read the config file: No such file or directory\n"),
        )

    def test_no_command(self) -> None:
        """Running without a subcommand is a usage error, exit 2."""
        code, out, err = self.run_cli()
        self.assertEqual((code, out), (2, ""))
        self.assertIn("usage: egressproxy", err)

    def test_missing_argument(self) -> None:
        """check-config without a file is a usage error, exit 2."""
        code, out, err = self.run_cli("check-config")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("the following arguments are required: FILE", err)

    def test_help(self) -> None:
        """--help prints the subcommands to stdout and exits 0."""
        code, out, err = self.run_cli("--help")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("check-config", out)
