"""The wrapped COMMAND: started once the listeners are up, given our signals, its status ours.

``egressproxy tunnel --transparent -- bin/server`` runs ``bin/server`` as a
child that shares the tunnel's standard input, output and error (a one-off
console stays interactive) and its environment.  The tunnel stays up while
the child runs, including while it shuts down after SIGTERM (it may still
need its database then), and exits with the child's status: its exit code,
or 128 + N when signal N ended it, as a shell reports it.

Signals: SIGTERM and SIGHUP are passed on as they arrive.  SIGINT is passed
on unless the tunnel is in the foreground process group of a terminal: the
child shares our process group, so a Ctrl-C typed there has reached it
already, and a second one would cancel twice (psql would send two cancel
requests).  Fly's init, Docker and ``kill -INT`` signal only us, and then
it is passed on.

Two things this module undoes for the child: the single-file executable
(PyInstaller) points ``LD_LIBRARY_PATH`` at its own unpacked libraries and
keeps the original in ``LD_LIBRARY_PATH_ORIG``; the child gets the original
back, so ``psql`` loads the system's libpq and OpenSSL, not ours.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure


class CommandNotFound(Exception):
    """COMMAND's program is not on PATH (or not executable)."""


def child_environment(environ: Mapping[str, str], frozen: bool | None = None) -> dict[str, str]:
    """The environment for COMMAND: ours, without the single-file executable's library path."""
    env = dict(environ)
    if frozen is None:
        frozen = bool(getattr(sys, "frozen", False))
    if frozen:
        original = env.pop("LD_LIBRARY_PATH_ORIG", None)
        if original is not None:
            env["LD_LIBRARY_PATH"] = original
        else:
            env.pop("LD_LIBRARY_PATH", None)
    return env


def find_program(name: str, environ: Mapping[str, str]) -> str:
    """The path of COMMAND's program: as given when it has a ``/``, else looked up on the child's PATH."""
    if "/" in name:
        if os.access(name, os.X_OK) and not os.path.isdir(name):
            return name
        raise CommandNotFound(f"{name}: no such executable file")
    found = shutil.which(name, path=environ.get("PATH", os.defpath))
    if found is None:
        raise CommandNotFound(f"{name}: not found on PATH ({environ.get('PATH', '')})")
    return found


def shares_terminal() -> bool:
    """Whether a Ctrl-C typed at our terminal reaches the child by itself (see the module notes)."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def exit_status(reason: Failure) -> int:
    """A process's end as a shell reports it: its exit code, or 128 + the signal that ended it."""
    value = reason.value
    signal_number = getattr(value, "signal", None)
    if signal_number:
        return 128 + int(signal_number)
    code = getattr(value, "exitCode", None)
    return int(code) if code is not None else 1


class Child(ProcessProtocol):
    """The running COMMAND; :attr:`ended` fires with its exit status."""

    def __init__(self) -> None:
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.pid: int | None = None

    def processEnded(self, reason: Failure) -> None:  # IProcessProtocol
        if not self.ended.called:
            self.ended.callback(exit_status(reason))

    def signal(self, signal_name: str) -> bool:
        """Pass a signal (``"TERM"``, ``"INT"``, ``"HUP"``); False when the child has already gone."""
        if self.transport is None:
            return False
        try:
            self.transport.signalProcess(signal_name)
        except (ProcessExitedAlready, OSError):
            return False
        return True


def spawn(reactor: Any, argv: tuple[str, ...], environ: Mapping[str, str]) -> Child:
    """Start COMMAND on our standard streams; raise CommandNotFound when its program is missing."""
    env = child_environment(environ)
    program = find_program(argv[0], env)
    child = Child()
    process = reactor.spawnProcess(child, program, list(argv), env=env, childFDs={0: 0, 1: 1, 2: 2})
    child.pid = process.pid
    return child
