"""The single-file ``egressproxy-tunnel`` executable: built with PyInstaller, run where there is no Python.

Issue 15: apps without Python (Node, Elixir) copy one file into their image.
This module builds that file from the checkout exactly as the Dockerfile's
``tunnel-build`` stage does (``pyinstaller --onefile`` on
``egressproxy/tunnel/__main__.py``), once per run (about 20-30 s), and runs
it in the tunnel lab's app namespace with an empty environment:
``PATH=/nonexistent``, no ``PYTHONHOME``, no ``PYTHONPATH``, nothing else
but the socks5 password.  It wraps psql, named by absolute path, with the
real name, verify-full and channel binding, and the database (which admits
only the egress Machines) must answer.

PyInstaller comes from the ``tunnel-binary`` extra (``.ci/run`` installs
it); without it the test skips saying so.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from egressproxy import __version__
from tests.integration.tunnellab import M1, PASSWORD_ENV, REPO, ROLE, SOCKS_PASSWORD, SOCKS_PORT, SharedLab, find_psql

SHARED = SharedLab()
_built: dict[str, str] = {}


def _remove_build() -> None:
    """The build directory goes at exit (the executable is used by every test of the run)."""
    path = _built.get("path")
    if path:
        shutil.rmtree(os.path.dirname(os.path.dirname(path)), ignore_errors=True)


atexit.register(_remove_build)


def build_executable() -> str:
    """The executable's path, built on first use (a failure is remembered and repeated)."""
    if "path" in _built:
        return _built["path"]
    if "error" in _built:
        raise AssertionError(_built["error"])
    if importlib.util.find_spec("PyInstaller") is None:
        raise SkipTest("PyInstaller is not installed: pip install '.[tunnel-binary]' (as .ci/run does)")
    directory = tempfile.mkdtemp(prefix="egressproxy-tunnel-binary-")
    done = subprocess.run(
        [sys.executable, "-m", "PyInstaller", "--onefile", "--name", "egressproxy-tunnel", "--noconfirm",
         "--log-level", "WARN", "--distpath", os.path.join(directory, "dist"),
         "--workpath", os.path.join(directory, "work"), "--specpath", directory, "--paths", REPO,
         os.path.join(REPO, "egressproxy", "tunnel", "__main__.py")],
        capture_output=True, text=True, timeout=600, cwd=directory, stdin=subprocess.DEVNULL, check=False,
    )
    path = os.path.join(directory, "dist", "egressproxy-tunnel")
    if done.returncode != 0 or not os.access(path, os.X_OK):
        _built["error"] = f"pyinstaller failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        raise AssertionError(_built["error"])
    _built["path"] = path
    return path


class SingleFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.executable = build_executable()
        self.lab = SHARED.get()
        self.addCleanup(SHARED.done, self, SingleFileTests)

    def test_psql_through_the_executable_without_python(self) -> None:
        """With PATH and PYTHONHOME stripped, the executable tunnels a verify-full, channel-bound psql session."""
        psql = find_psql()
        hosts = self.lab.hosts_copy()
        env = {"PATH": "/nonexistent", PASSWORD_ENV: SOCKS_PASSWORD}
        argv = self.lab.tunnel_argv(hosts, [self.executable], [
            "--transparent", "--via", self.lab.socks(M1, password="${%s}" % PASSWORD_ENV),
            "--dest", f"db.egress.test:{self.lab.db_port}", "--",
            psql, "-X", "-A", "-t", "-d", self.lab.conninfo(), "-c",
            "select inet_client_addr(), ssl from pg_stat_ssl where pid = pg_backend_pid()",
        ])
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL, check=False)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.strip(), f"{M1}|t")
        self.assertIn(f'"-" via=socks5://{ROLE}@{M1}:{SOCKS_PORT}', done.stderr)
        with open(hosts, encoding="utf-8") as f:
            self.assertNotIn("egressproxy tunnel", f.read())

    def test_version_without_anything(self) -> None:
        """The executable starts in an empty environment and names itself."""
        done = subprocess.run([self.executable, "--version"], env={}, capture_output=True, text=True, timeout=60,
                              check=False)
        self.assertEqual((done.returncode, done.stdout.strip()), (0, f"egressproxy-tunnel {__version__}"))
