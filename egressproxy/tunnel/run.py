"""The tunnel process: set-up in order, serve, and undo on every way out.

Design notes
------------

**Order.**  Bind every listener (``listeners.py``) before anything else is
touched, so a port that cannot be had fails the start with nothing to undo;
then, with ``--transparent``, add the ``/etc/hosts`` lines (``hostsfile.py``);
print the map; run the reactor, whose first call takes the signals over and
starts COMMAND (``child.py``).  COMMAND thus never starts before its names
lead somewhere.

**Undo.**  The hosts lines are removed on every way out: COMMAND ended, a
signal in foreground mode, a failure half way through set-up, a signal
during set-up (SIGTERM and SIGHUP raise :class:`Interrupted` until the
reactor runs, SIGINT ``KeyboardInterrupt``), and an exception.  Only
SIGKILL skips it; the next tunnel drops such stale lines (their PID is gone).

**Signals while running.**  With COMMAND: SIGTERM, SIGHUP and SIGINT are
passed to it (SIGINT not when a terminal delivered it to both, see
``child.py``), and the tunnel keeps serving until it exits, since an app
shutting down gracefully may still need its database.  Without COMMAND:
SIGTERM and SIGINT stop the tunnel (status 0); SIGHUP is noted and ignored.

**Exit status.**  COMMAND's (128 + N when signal N ended it); 0 after a
signal in foreground mode; 1 when set-up failed; 127 when COMMAND's program
cannot be found (as a shell says).

This is a process entry point: it alone uses the global reactor (imported
inside :func:`run_tunnel`) and the process's signal handlers.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import Any, Callable, TextIO

from twisted.internet import defer

from egressproxy.tunnel.check import check_all
from egressproxy.tunnel.child import Child, CommandNotFound, shares_terminal, spawn
from egressproxy.tunnel.connection import TunnelFactory, TunnelSite
from egressproxy.tunnel.failover import PathOrder
from egressproxy.tunnel.hostsfile import HostsFile, HostsFileError
from egressproxy.tunnel.listeners import TunnelStartError, host_addresses, listen_all, plan
from egressproxy.tunnel.logline import TunnelLog
from egressproxy.tunnel.options import TunnelOptions

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
HOSTS_FILE = "/etc/hosts"
#: Seconds the aborted connections get to end (and write their TUNNEL lines) before the process exits.
QUIET_WAIT = 1.0


class Interrupted(Exception):
    """SIGTERM or SIGHUP arrived during set-up."""


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run_tunnel(options: TunnelOptions, stdout: TextIO, stderr: TextIO, environ: Mapping[str, str]) -> int:
    """Run the tunnel (or ``--check``) to its end; the exit status."""
    from twisted.internet import reactor  # noqa: PLC0415 - the process's entry point

    log = TunnelLog(stderr)
    if options.check:
        return _run_check(reactor, options, stdout)
    return Tunnel(reactor, options, log, environ).run()


def _run_check(reactor: Any, options: TunnelOptions, stdout: TextIO) -> int:
    status = [1]

    def done(code: int) -> None:
        status[0] = code

    def start() -> None:
        d = defer.ensureDeferred(check_all(reactor, options, stdout))
        d.addCallback(done)
        d.addErrback(lambda failure: print(f"egressproxy tunnel: --check failed: {failure.getErrorMessage()}", file=stdout))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    return status[0]


class Tunnel:
    """One run of the tunnel; see the module notes."""

    def __init__(self, reactor: Any, options: TunnelOptions, log: TunnelLog, environ: Mapping[str, str],
                 hosts_path: str = HOSTS_FILE) -> None:
        self.reactor = reactor
        self.options = options
        self.log = log
        self.environ = environ
        self.hosts = HostsFile(hosts_path)
        self.order = PathOrder(options.paths, reactor)
        self.sites: list[TunnelSite] = []
        self.ports: list[Any] = []
        self.child: Child | None = None
        self.status = 0
        self.stopping = False
        #: Whether a Ctrl-C at our terminal reaches COMMAND by itself (``child.shares_terminal``).
        self.terminal_shared: Callable[[], bool] = shares_terminal

    def run(self) -> int:
        previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGHUP, _interrupt)
        try:
            try:
                self.start()
            except (TunnelStartError, HostsFileError) as e:
                self.log.note(f"cannot start: {e}")
                return 1
            except (Interrupted, KeyboardInterrupt) as e:
                self.log.note(f"interrupted during start-up ({e or 'SIGINT'})")
                return 1
            self.reactor.callWhenRunning(self._running)
            self.reactor.run()
            return self.status
        finally:
            for signum in _SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
            self.undo()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def start(self) -> None:
        """Bind the listeners, add the hosts lines, print the map (see the module notes)."""
        options = self.options
        bindings = plan(options.destinations, options.transparent)

        def factory_for(destination: Any) -> TunnelFactory:
            site = TunnelSite(self.reactor, destination, self.order, self.log, options.connect_timeout)
            self.sites.append(site)
            return TunnelFactory(site)

        bound = listen_all(self.reactor, bindings, factory_for, options.transparent)
        self.ports = [port for _, port in bound]
        self.log.note(f"paths, in order: {', '.join(str(p) for p in options.paths)}")
        if options.transparent:
            entries = [(address, host) for host, address in host_addresses(options.destinations).items()]
            for line in self.hosts.add(entries):
                self.log.note(f"removed a stale line of a tunnel that no longer runs from {self.hosts.path}: {line}")
        for binding, port in bound:
            where = port.getHost()
            note = f"{binding.destination} on {where.host}:{where.port}"
            if options.transparent:
                note += f" ({self.hosts.path}: {binding.destination.host} -> {where.host})"
            elif where.port != binding.destination.port:
                note += f" (port {binding.destination.port} was taken)"
            self.log.note(note)

    def _running(self) -> None:
        """First call on the running reactor: take the signals over, start COMMAND."""
        for signum in _SIGNALS:
            signal.signal(signum, self._on_signal(signum))
        if not self.options.command:
            self.log.note(f"ready (PID {os.getpid()}); SIGTERM or SIGINT stops it")
            return
        try:
            self.child = spawn(self.reactor, self.options.command, self.environ)
        except CommandNotFound as e:
            self.log.note(f"cannot run COMMAND: {e}")
            self._stop(127)
            return
        except OSError as e:
            self.log.note(f"cannot run COMMAND {self.options.command[0]}: {e.strerror or e}")
            self._stop(126)
            return
        self.child.ended.addCallback(self._child_ended)

    def _on_signal(self, signum: int) -> Callable[[int, object], None]:
        name = signal.Signals(signum).name
        return lambda *_: self.reactor.callFromThread(self._signalled, name)

    def _signalled(self, name: str) -> None:
        if self.child is not None:
            if name == "SIGINT" and self.terminal_shared():
                return  # the terminal sent it to COMMAND too
            self.child.signal(name[3:])
            return
        if name == "SIGHUP":
            self.log.note("SIGHUP ignored (there is nothing to reload); SIGTERM or SIGINT stops the tunnel")
            return
        self.log.note(f"{name}: stopping")
        self._stop(0)

    def _child_ended(self, status: int) -> None:
        self._stop(status)

    def _stop(self, status: int) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.status = status
        for port in self.ports:
            port.stopListening()
        self.ports = []
        for site in self.sites:
            site.abort_all()
        self._stop_when_quiet(self.reactor.seconds() + QUIET_WAIT)

    def _stop_when_quiet(self, deadline: float) -> None:
        """Stop the reactor once every aborted connection has ended (and written its line), or at ``deadline``."""
        if any(site.live for site in self.sites) and self.reactor.seconds() < deadline:
            self.reactor.callLater(0.01, self._stop_when_quiet, deadline)
            return
        self.reactor.stop()

    def undo(self) -> None:
        """Remove the hosts lines and stop listening; safe to call at any point, more than once."""
        for port in self.ports:
            port.stopListening()
        self.ports = []
        try:
            self.hosts.remove()
        except HostsFileError as e:
            self.log.note(f"could not remove our lines from {self.hosts.path}: {e}")
