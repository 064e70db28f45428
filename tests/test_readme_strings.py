"""The README's per-driver connection strings are the ones the driver matrix runs.

The matrix (``tests/integration/test_driver_matrix.py``) proves the strings
its scripts build; this test proves the README shows those same strings: for
libpq (psql, pgbench, psycopg) key by key, and for the drivers whose
settings are code (asyncpg, node-postgres, pgjdbc) by the options the
scripts use.  A README edit that drifts from what was tested fails here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVERS = os.path.join(ROOT, "tests", "integration", "drivers")
NAME = "your-db.pg.example.cloud"
ADDRESS = "<proxy address>"


def readme_table() -> dict[str, tuple[str, str]]:
    """Driver -> (passthrough cell, originate cell) from the README's Connection strings table."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("### Connection strings", 1)[1].split("Notes per driver", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def code(cell: str) -> str:
    """The first `code` span of a cell."""
    found = re.search(r"`([^`]+)`", cell)
    assert found is not None, cell
    return found.group(1)


def keywords(conninfo: str) -> dict[str, str]:
    """A libpq key=value string as a dict (values unquoted)."""
    return dict(part.split("=", 1) for part in shlex.split(conninfo))


def script_module(name: str):  # type: ignore[no-untyped-def]
    sys.path.insert(0, DRIVERS)
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise SkipTest(f"{name} cannot be imported here: {e}") from None
    finally:
        sys.path.remove(DRIVERS)


def script_args(tls: str) -> argparse.Namespace:
    return argparse.Namespace(
        host=NAME, addr="PROXYADDR", port=5432, tls=tls, ca="/etc/ssl/certs/ca-certificates.crt",
        dbname="mydb", user="app", password="pw", checks=None,
    )


class LibpqStringTests(SynchronousTestCase):
    def check(self, readme: str, script: str) -> None:
        """The README string's keys are the script's, with the same values for names and modes."""
        written = keywords(readme.replace(ADDRESS, "PROXYADDR"))
        built = keywords(script)
        for key in ("host", "hostaddr", "sslmode", "sslrootcert"):
            self.assertEqual(written.get(key), built.get(key), f"{key}: README {readme!r} vs script {script!r}")
        for key in ("port", "dbname", "user"):
            self.assertIn(key, written, readme)
            self.assertIn(key, built, script)

    def test_psql(self) -> None:
        """psql's strings, both shapes, match libpq_cli_check's conninfo."""
        passthrough, originate = readme_table()["psql, pgbench (libpq)"]
        cli = script_module("libpq_cli_check")
        for cell, tls in ((passthrough, "verify-full"), (originate, "disable")):
            self.check(code(cell), cli.Checks(script_args(tls), self.mktemp()).conninfo())

    def test_psycopg(self) -> None:
        """psycopg's strings, both shapes, match psycopg_check's conninfo."""
        passthrough, originate = readme_table()["psycopg 3"]
        module = script_module("psycopg_check")
        for cell, tls in ((passthrough, "verify-full"), (originate, "disable")):
            inner = re.search(r'psycopg\.connect\("([^"]+)"\)', code(cell))
            assert inner is not None, cell
            self.check(inner.group(1), module.Checks(script_args(tls)).conninfo())


class CodeDriverTests(SynchronousTestCase):
    def source(self, *path: str) -> str:
        with open(os.path.join(DRIVERS, *path), encoding="utf-8") as f:
            return f.read()

    def both(self, cell: str, source: str, *tokens: str) -> None:
        for token in tokens:
            self.assertIn(token, cell)
            self.assertIn(token, source)

    def test_asyncpg(self) -> None:
        """asyncpg: ServerNameContext.verifying for TLS end to end, ssl=False for originate."""
        passthrough, originate = readme_table()["asyncpg"]
        source = self.source("asyncpg_check.py")
        self.both(passthrough, source, "ServerNameContext.verifying(")
        self.assertIn("ssl=False", originate)
        self.assertIn("else False", source)

    def test_node(self) -> None:
        """node-postgres: host is the address, servername and checkServerIdentity name the database."""
        passthrough, originate = readme_table()["node-postgres"]
        source = self.source("node", "pg_check.js")
        self.both(passthrough, source, "servername", "checkServerIdentity", "tls.checkServerIdentity(")
        self.both(originate, source, "ssl: false")

    def test_pgjdbc(self) -> None:
        """pgjdbc: verify-full with sslrootcert and the name mapped to the proxy; originate with sslmode=disable."""
        passthrough, originate = readme_table()["pgjdbc"]
        source = self.source("java", "PgCheck.java")
        self.both(passthrough, source, "jdbc:postgresql://", "?sslmode=verify-full&sslrootcert=", "jdk.net.hosts.file")
        self.both(originate, source, "?sslmode=disable")
