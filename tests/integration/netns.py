"""Network namespaces for tests: private hosts with addresses of the test's choosing.

A :class:`NetNS` is one Linux network namespace that the test creates and
removes: its own loopback, an interface holding the addresses the test asks
for (``10.0.0.5/32``, ``fd00::5/128``, ...), and optionally its own
``resolv.conf``.  Inside it those addresses are local, so a test may assign
private, link-local or unique-local addresses and dial them without a packet
ever reaching a real network: nothing in the namespace is routed anywhere
else (it has no default route and no link to the host's namespace).

What it offers:

- ``NetNS.create(addresses, nameserver=...)``: a namespace named
  ``egp-<pid>-<n>`` with ``lo`` up and an interface ``egp0`` holding the
  addresses (IPv4 as /32, IPv6 as /128 with ``nodad``, so they are usable at
  once).  ``egp0`` is a ``dummy`` interface; on a kernel without the dummy
  driver it is one end of a ``veth`` pair whose both ends stay inside the
  namespace, and without either the addresses go on ``lo`` (all three make
  the addresses local, which is all the tests need; ``interface_kind`` says
  which was used).
- ``nameserver``: writes ``/etc/netns/<name>/resolv.conf``, which
  ``ip netns exec`` bind-mounts over ``/etc/resolv.conf`` for the processes
  it runs, so their resolver asks the test's own DNS server.
- ``popen``/``run``: a command inside the namespace (``ip netns exec``,
  which execs the command, so the Popen's pid is the command's own).
  Processes started with ``popen`` are stopped by pid at teardown.
- ``socket``/``connect``: a socket of this (test) process that lives in the
  namespace, made in a short-lived thread that entered it with ``setns``
  (only that thread changes namespace; a socket stays in the namespace it
  was made in).

Teardown (:meth:`NetNS.close`, also registered with ``atexit``): the
namespace's processes are terminated, then killed, by pid; the namespace is
deleted and ``/etc/netns/<name>`` removed.

When the namespace cannot be made (not root, no ``ip``, no CAP_SYS_ADMIN or
no netns support in the kernel) :meth:`NetNS.create` raises
``unittest.SkipTest`` whose message is the exact reason, so trial prints it
as the skip reason; it never passes silently.
"""

from __future__ import annotations

import atexit
import ctypes
import ipaddress
import itertools
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import unittest
from typing import Any, Iterable, Sequence

_CLONE_NEWNET = 0x40000000
_counter = itertools.count(1)
_live: list["NetNS"] = []


def _close_all() -> None:
    for ns in list(_live):
        ns.close()


atexit.register(_close_all)


def _ip(*args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout, check=False)


def _setns(fd: int) -> None:
    """Move the calling thread into the network namespace ``fd`` names."""
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


class NetNS:
    """One network namespace; see the module notes.  Make it with :meth:`create`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.interface = "egp0"
        #: ``dummy``, ``veth`` or ``lo``: what holds the addresses.
        self.interface_kind = ""
        self.addresses: list[str] = []
        self.processes: list[subprocess.Popen[Any]] = []
        self.closed = False

    # -- making one ---------------------------------------------------------

    @classmethod
    def create(cls, addresses: Iterable[str] = (), nameserver: str | None = None) -> "NetNS":
        """A new namespace with ``addresses`` (IP addresses, no prefix) and optionally a resolver.

        Raises ``unittest.SkipTest`` with the exact reason when this machine
        cannot make one.
        """
        if not hasattr(os, "geteuid") or not os.path.isdir("/proc/self/ns"):
            raise unittest.SkipTest("network namespaces need Linux")
        if os.geteuid() != 0:
            raise unittest.SkipTest(
                f"network namespaces need root (CAP_SYS_ADMIN); this test runs as uid {os.geteuid()}"
            )
        if shutil.which("ip") is None:
            raise unittest.SkipTest("the ip command (iproute2) is not on PATH: apt-get install iproute2")
        name = f"egp-{os.getpid()}-{next(_counter)}"
        made = _ip("netns", "add", name)
        if made.returncode != 0:
            raise unittest.SkipTest(
                f"'ip netns add {name}' failed (exit {made.returncode}): {made.stderr.strip() or made.stdout.strip()}"
            )
        ns = cls(name)
        _live.append(ns)
        try:
            ns._set_up(list(addresses), nameserver)
        except BaseException:
            ns.close()
            raise
        return ns

    def _in(self, *args: str) -> None:
        """Run ``ip ARGS`` inside the namespace; raise with its message on failure."""
        done = _ip("-n", self.name, *args)
        if done.returncode != 0:
            raise RuntimeError(f"ip -n {self.name} {' '.join(args)}: {done.stderr.strip()}")

    def _set_up(self, addresses: list[str], nameserver: str | None) -> None:
        self._in("link", "set", "lo", "up")
        if addresses:
            if _ip("-n", self.name, "link", "add", self.interface, "type", "dummy").returncode == 0:
                self.interface_kind = "dummy"
            elif _ip(
                "-n", self.name, "link", "add", self.interface, "type", "veth", "peer", "name", f"{self.interface}p"
            ).returncode == 0:
                self.interface_kind = "veth"
                self._in("link", "set", f"{self.interface}p", "up")
            else:
                self.interface_kind = "lo"
                self.interface = "lo"
            if self.interface != "lo":
                self._in("link", "set", self.interface, "up")
            for address in addresses:
                self.add_address(address)
        if nameserver is not None:
            self.write_etc("resolv.conf", f"nameserver {nameserver}\noptions timeout:2 attempts:1\n")

    def add_address(self, address: str) -> None:
        """Assign ``address`` (/32 or /128) to the namespace's interface."""
        ip = ipaddress.ip_address(address)
        if ip.version == 4:
            self._in("addr", "add", f"{ip}/32", "dev", self.interface)
        else:
            self._in("-6", "addr", "add", f"{ip}/128", "dev", self.interface, "nodad")
        self.addresses.append(str(ip))

    @property
    def etc(self) -> str:
        return f"/etc/netns/{self.name}"

    def write_etc(self, filename: str, text: str) -> str:
        """Write ``/etc/netns/NAME/FILENAME``: ``ip netns exec`` mounts it over ``/etc/FILENAME``."""
        os.makedirs(self.etc, exist_ok=True)
        path = os.path.join(self.etc, filename)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    # -- running things inside ----------------------------------------------

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace; it is stopped (by pid) at teardown."""
        process = subprocess.Popen(self.argv(argv), **kwargs)
        self.processes.append(process)
        return process

    def run(self, argv: Sequence[str], timeout: float = 30.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace to its end (text output captured), within ``timeout``."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.argv(argv), timeout=timeout, check=False, **kwargs)

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket of this process that lives inside the namespace."""
        made: list[socket.socket] = []
        failed: list[BaseException] = []

        def inside() -> None:
            try:
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
                try:
                    _setns(fd)
                finally:
                    os.close(fd)
                made.append(socket.socket(family, kind))
            except BaseException as e:  # reported in the caller's thread
                failed.append(e)

        thread = threading.Thread(target=inside, name=f"setns-{self.name}", daemon=True)
        thread.start()
        thread.join(10)
        if failed:
            raise failed[0]
        if not made:
            raise RuntimeError(f"could not make a socket in {self.name} within 10 s")
        return made[0]

    def connect(self, host: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP connection made from inside the namespace to ``host:port`` (an IP literal)."""
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        sock = self.socket(family)
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def wait_for_port(self, host: str, port: int, timeout: float = 20.0, process: subprocess.Popen[Any] | None = None) -> None:
        """Wait until ``host:port`` accepts inside the namespace (and ``process``, if given, still runs)."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process {process.args!r} exited with {process.returncode} before {host}:{port} opened")
            try:
                self.connect(host, port, timeout=1.0).close()
                return
            except OSError as e:
                last = e
            time.sleep(0.05)
        raise RuntimeError(f"{host}:{port} in {self.name} did not accept within {timeout}s: {last}")

    @staticmethod
    def read_line(process: subprocess.Popen[Any], timeout: float = 20.0) -> str:
        """The next line of ``process``'s stdout (a pipe), within ``timeout``; '' at EOF."""
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"no output from {process.args!r} within {timeout}s")
        line = process.stdout.readline()
        return line.decode() if isinstance(line, bytes) else line

    @staticmethod
    def stop(process: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal ``process`` (by its pid), wait up to ``timeout``, then kill it; its exit code."""
        if process.poll() is None:
            try:
                os.kill(process.pid, sig)
                return process.wait(timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                return process.wait(5)
        return process.poll()

    # -- teardown -------------------------------------------------------------

    def pids(self) -> list[int]:
        """Every process still running in the namespace (ours, and anything started inside)."""
        done = _ip("netns", "pids", self.name)
        return [int(p) for p in done.stdout.split() if p.isdigit()] if done.returncode == 0 else []

    def close(self) -> None:
        """Stop this namespace's processes by pid, delete it and its /etc/netns folder.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        for process in self.processes:
            try:
                self.stop(process, timeout=5)
            except (OSError, subprocess.SubprocessError):
                pass
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        # Anything our processes started inside the namespace (ip netns pids
        # lists exactly this namespace's processes).
        for pid in self.pids():
            if pid != os.getpid():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        _ip("netns", "del", self.name)
        shutil.rmtree(self.etc, ignore_errors=True)
        try:
            os.rmdir("/etc/netns")  # only when empty: another namespace may still use it
        except OSError:
            pass
        if self in _live:
            _live.remove(self)

    def __enter__(self) -> "NetNS":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
