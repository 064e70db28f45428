"""Runs ``egressproxy demo``: set-up in order, serve until a signal, clean up on every way out.

Design notes
------------

**Order.**  Find PostgreSQL's programs first (a missing ``initdb`` is
reported before anything is made), then make the work directory, the CA and
the database certificate (``certs``), initdb and start PostgreSQL with the
demo role (``pgcluster``), write the config (``configtext``), load it with
the ordinary loader and bind every listener (``EgressService``, as
``twistd egressproxy`` does).  Only then does the reactor run; its first
call starts the service and prints the banner (``banner``).

**Clean-up.**  Each step that leaves something behind registers its undo on
one ``ExitStack`` as soon as it exists, so a failure half way (or a signal)
undoes exactly what was done, newest first: the server is stopped (by
``pg_ctl stop``, then by PID) before its directory is removed.  While the
stack unwinds, SIGINT, SIGTERM and SIGHUP are ignored, so a second Ctrl-C
cannot cut the clean-up short (every step of it is bounded in time).

**Signals.**  Before the reactor runs, SIGINT raises ``KeyboardInterrupt``
(Python's default) and SIGTERM and SIGHUP raise :class:`Interrupted`, so the
set-up unwinds through the stack.  Once it runs, all three drain the proxy
(``drain_timeout`` in the demo config: live sessions get 2 s), stop the
reactor, and the stack then stops PostgreSQL and removes the directory.  The
exit status is 0 when a signal ended the demo, 1 when set-up failed.
SIGHUP is there because a closed terminal sends it: without it the server
would outlive the demo.

**Logs.**  The access log goes to stdout (one line per finished
connection, as under twistd); the proxy's own log goes to stderr from level
``warn`` up, so the banner is not buried under start-up chatter.

This is a process entry point, like ``tap.makeService``: it alone may use
the global reactor (imported inside :func:`run_demo`) and the process's
signal handlers and global log.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import time
from typing import Any, Callable, Mapping, TextIO

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from egressproxy.app.demo.banner import DATABASE, ROLE, DemoFacts, render_banner
from egressproxy.app.demo.certs import make_demo_tls
from egressproxy.app.demo.configtext import SERVER_NAME, choose_ports, render_config
from egressproxy.app.demo.pgcluster import DemoError, PgCluster, find_bindir, server_owner
from egressproxy.app.service import EgressService
from egressproxy.config import ConfigError, load_config
from egressproxy.observe.admin import ADMIN_TOKEN_ENV

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
CONFIG_NAME = "egressproxy-demo.yaml"


class Interrupted(Exception):
    """SIGTERM or SIGHUP arrived during set-up (SIGINT raises ``KeyboardInterrupt``)."""


def _interrupt(signum: int, _frame: object) -> None:
    """During set-up, SIGTERM and SIGHUP unwind it as Ctrl-C does, so the clean-up stack runs."""
    raise Interrupted(signal.Signals(signum).name)


def run_demo(
    port_base: int, pg_bindir: str | None, stdout: TextIO, stderr: TextIO, environ: Mapping[str, str]
) -> int:
    """Run the demo until a signal; the exit status (0 after a signal, 1 when set-up failed)."""
    from twisted.internet import reactor  # noqa: PLC0415 - the process's entry point

    return Demo(reactor, stdout, stderr, environ).run(port_base, pg_bindir)


class Demo:
    """One run of the demo: the clean-up stack, the service, and the signals; see the module notes."""

    def __init__(self, reactor: Any, stdout: TextIO, stderr: TextIO, environ: Mapping[str, str]) -> None:
        self.reactor = reactor
        self.stdout = stdout
        self.stderr = stderr
        self.environ = environ
        self.workdir: str | None = None
        self.service: EgressService | None = None
        self._stopping = False

    def say(self, text: str) -> None:
        """One line of progress to stdout, flushed (stdout may be a pipe)."""
        with contextlib.suppress(OSError, ValueError):
            print(text, file=self.stdout, flush=True)

    def run(self, port_base: int, pg_bindir: str | None) -> int:
        """Set up, serve until a signal, clean up; 0 after a signal, 1 when set-up failed."""
        started = time.monotonic()  # only for the "started in" figure shown to the user
        previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
        # Ctrl-C must stop the demo even when it was started with SIGINT
        # ignored (a background job of a non-interactive shell inherits that),
        # so the default handler is put in explicitly rather than inherited.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGHUP, _interrupt)
        stack = contextlib.ExitStack()
        code = 0
        try:
            facts = self._set_up(stack, port_base, pg_bindir, started)
            self._serve(facts)
        except DemoError as e:
            print(e, file=self.stderr, flush=True)
            code = 1
        except (KeyboardInterrupt, Interrupted) as e:
            self.say(f"egressproxy demo: interrupted during start-up ({str(e) or 'SIGINT'}); cleaning up")
        finally:
            for signum in _SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
            stack.close()
            for signum, handler in previous.items():
                if handler is not None:  # None: a handler not set from Python, which cannot be put back
                    signal.signal(signum, handler)
        if self.workdir is not None:
            self.say(f"egressproxy demo: stopped; PostgreSQL is stopped and {self.workdir} removed")
        return code

    # -- set-up -------------------------------------------------------------

    def _set_up(self, stack: contextlib.ExitStack, port_base: int, pg_bindir: str | None, started: float) -> DemoFacts:
        """Everything up to bound listeners, each undo on ``stack`` as soon as there is something to undo."""
        bindir = find_bindir(pg_bindir)
        owner = server_owner()
        try:
            ports = choose_ports(port_base)
        except ValueError as e:
            raise DemoError(f"egressproxy demo: {e}") from None
        # As root the server runs as ``postgres``, which must reach its own
        # directory inside ours: /tmp, whatever TMPDIR says.
        workdir = tempfile.mkdtemp(prefix="egressproxy-demo-", dir="/tmp" if owner is not None else None)
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        self.workdir = workdir
        os.chmod(workdir, 0o755)  # the CA and the config stay readable to any local user's psql
        self.say(f"egressproxy demo: work directory {workdir} (removed on exit)")
        tls = make_demo_tls(workdir, SERVER_NAME)
        os.mkdir(os.path.join(workdir, "pg"))
        cluster = PgCluster(bindir, os.path.join(workdir, "pg"), owner)
        stack.callback(cluster.stop)
        version = cluster.version()
        self.say(f"egressproxy demo: starting PostgreSQL {version} from {bindir} (initdb, TLS, role {ROLE!r})")
        cluster.initdb()
        cluster.install_tls(tls.server_cert_pem, tls.server_key_pem)
        cluster.start()
        password = secrets.token_urlsafe(12)
        cluster.create_login(ROLE, password, DATABASE)
        config_path = os.path.join(workdir, CONFIG_NAME)
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(render_config(ports, cluster.port, tls.ca_path))
        self.say(f"egressproxy demo: starting the proxy with {config_path}")
        token = self.environ.get(ADMIN_TOKEN_ENV) or secrets.token_urlsafe(16)
        self._bind(config_path, {**self.environ, ADMIN_TOKEN_ENV: token})
        # Debian's psql wrapper on PATH when there is one, else the one beside the server.
        psql = "psql" if shutil.which("psql") else os.path.join(bindir, "psql")
        return DemoFacts(
            ports=ports, pg_port=cluster.port, pg_pid=cluster.pid, pg_version=version, workdir=workdir,
            config_path=config_path, ca_path=tls.ca_path, password=password, admin_token=token,
            psql=psql, startup_seconds=time.monotonic() - started,
        )

    def _bind(self, config_path: str, environ: Mapping[str, str]) -> None:
        """Load the written config as ``twistd egressproxy`` would and bind every listener now."""
        try:
            config = load_config(config_path, environ)
        except ConfigError as e:  # a bug in configtext: say so plainly
            raise DemoError(f"egressproxy demo: its own config is invalid (a bug):\n{e}") from None
        globalLogBeginner.beginLoggingTo(
            [FilteringLogObserver(
                textFileLogObserver(self.stderr), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)]
            )],
            redirectStandardIO=False,
        )
        self.service = EgressService(config, self.reactor, access_stream=self.stdout, environ=environ)
        try:
            self.service.privilegedStartService()
        except SystemExit as e:  # a listener's port was taken since it was chosen
            raise DemoError(f"{e.code} (try another --port-base)") from None

    # -- serving ------------------------------------------------------------

    def _serve(self, facts: DemoFacts) -> None:
        """Run the reactor until a signal has drained the proxy."""
        service = self.service
        assert service is not None
        self.reactor.callWhenRunning(self._started, facts)
        self.reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        self.reactor.run()

    def _started(self, facts: DemoFacts) -> None:
        """First call on the running reactor: start the service, take the signals over, print the banner."""
        assert self.service is not None
        self.service.startService()
        # After the reactor's own handlers (installed as it starts), so these win.
        for signum in _SIGNALS:
            signal.signal(signum, self._on_signal(signum))
        with contextlib.suppress(OSError, ValueError):
            self.stdout.write(render_banner(facts))
            self.stdout.flush()

    def _on_signal(self, signum: int) -> Callable[[int, object], None]:
        """A handler that only hands the stop to the reactor thread (nothing else is safe in one)."""
        name = signal.Signals(signum).name
        return lambda *_: self.reactor.callFromThread(self._stop, name)

    def _stop(self, why: str) -> None:
        """Drain the proxy, then stop the reactor (the clean-up stack does the rest)."""
        if self._stopping:
            return
        self._stopping = True
        assert self.service is not None
        self.say(f"\negressproxy demo: {why}: stopping the proxy, then PostgreSQL")
        self.service.drain().addBoth(lambda _: self.reactor.stop())
