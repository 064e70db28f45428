"""
Processes the benchmark starts, and what /proc says about them.

What this module owns: starting helper processes (each in its own session, so
a Ctrl-C in the terminal reaches only the benchmark, which then stops them in
order), remembering every one, and stopping each by its PID: SIGTERM to the
process, then to whatever it forked (socat forks one child per connection),
SIGKILL for anything still alive after a grace period. Nothing is ever
signalled by name. It also reads /proc: the process tree under a PID, its
CPU time, its open descriptors, and whether a loopback port is listening
(memory is memory.py's).

It does not know what the processes are for; peers.py and run.py do.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def raise_nofile_limit() -> int:
    """
    Raise this process's descriptor soft limit to its hard limit; return it.

    Children inherit it, so every proxy and client started afterwards gets the
    same budget. Without CAP_SYS_RESOURCE the hard limit itself cannot grow.
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
                hard = int(f.read())
        except (OSError, ValueError):
            hard = 1 << 20
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Supervisor:
    """
    Every helper process the benchmark started, and their orderly stop.

    ``start()`` returns a ``subprocess.Popen``; ``stop()`` stops one (and its
    descendants), ``stop_all()`` stops the rest in reverse start order. Both
    are idempotent and bounded in time.
    """

    def __init__(self) -> None:
        self._running: list[subprocess.Popen[bytes]] = []
        self._logs: dict[int, object] = {}

    def start(
        self,
        argv: Sequence[str],
        log_path: str,
        env: Mapping[str, str] | None = None,
        stdout_pipe: bool = False,
        cwd: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """
        Start ``argv`` with stderr (and stdout unless ``stdout_pipe``) to ``log_path``.

        The working directory defaults to the log's directory (the run's), so
        nothing is imported or written relative to the caller's.
        """
        log = open(log_path, "ab")
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                env=dict(env) if env is not None else None,
                cwd=cwd if cwd is not None else os.path.dirname(os.path.abspath(log_path)),
                start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        self._running.append(proc)
        self._logs[proc.pid] = log
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0) -> int | None:
        """
        Stop ``proc`` and its descendants by PID; return its exit status.

        SIGTERM goes to the process first (a forking server stops accepting),
        then to its descendants; whatever is alive after ``grace`` seconds
        gets SIGKILL.
        """
        if proc not in self._running:
            return proc.returncode
        self._running.remove(proc)
        descendants = process_tree(proc.pid)[1:] if proc.poll() is None else []
        _signal(proc.pid, signal.SIGTERM)
        for pid in descendants:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for pid in descendants:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
        if proc.stdout is not None:
            proc.stdout.close()
        log = self._logs.pop(proc.pid, None)
        if log is not None:
            log.close()  # type: ignore[attr-defined]
        return proc.returncode

    def stop_all(self) -> None:
        for proc in reversed(list(self._running)):
            try:
                self.stop(proc)
            except Exception as e:  # keep stopping the others
                print(f"warning: could not stop pid {proc.pid}: {e}")


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    """
    Whether ``pid`` exists and is not a zombie.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def process_tree(pid: int, zombies: bool = False) -> list[int]:
    """
    ``pid`` followed by all its live descendants (breadth first), and with
    ``zombies`` those that have exited but are not reaped yet.
    """
    children = _children_map()
    tree = [pid]
    i = 0
    while i < len(tree):
        tree.extend(children.get(tree[i], []))
        i += 1
    return tree if zombies else [p for p in tree if _alive(p)]


def tree_cpu_seconds(pid: int) -> float:
    """
    CPU time (user + system) of ``pid``, its descendants and reaped children.

    A child that has exited but is not reaped yet (socat's per-connection
    children, just after pgbench closes) is counted from its own entry:
    its time reaches the parent's reaped-children total only once reaped.
    """
    total = 0
    for p in process_tree(pid, zombies=True):
        try:
            with open(f"/proc/{p}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # Fields after the name: state=0 ... utime=11 stime=12 cutime=13 cstime=14.
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / _CLOCK_TICKS


def cpu_snapshot() -> dict[int, tuple[int, int, str, int]]:
    """
    Every process's (start time, own CPU ticks, name, parent PID), by PID.

    Kernel threads are left out: under loopback load most of theirs is
    softirq work caused by the benchmark itself. Children's time is left out
    too: it lands on the parent in one lump when the child is reaped, however
    long ago it was spent.
    """
    snapshot: dict[int, tuple[int, int, str, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                head, tail = f.read().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        fields = tail.split()
        if entry == "2" or fields[1] == "2":
            continue
        name = head.split("(", 1)[-1]
        snapshot[int(entry)] = (int(fields[19]), int(fields[11]) + int(fields[12]), name, int(fields[1]))
    return snapshot


def foreign_cpu(
    before: dict[int, tuple[int, int, str, int]], after: dict[int, tuple[int, int, str, int]], roots: set[int]
) -> dict[str, float]:
    """
    CPU seconds used between two snapshots by processes outside ``roots``' trees, by name.

    Catches other work on the machine (someone's test suite, a build) that
    would slow whichever peer it overlapped. A process that exited before the
    second snapshot is not seen, so this is a lower bound.
    """
    children: dict[int, list[int]] = {}
    for pid, (_start, _cpu, _name, ppid) in after.items():
        children.setdefault(ppid, []).append(pid)
    ours = [r for r in roots if r in after]
    i = 0
    while i < len(ours):
        ours.extend(children.get(ours[i], []))
        i += 1
    mine = set(ours)
    by_name: dict[str, float] = {}
    for pid, (start, cpu, name, _ppid) in after.items():
        if pid in mine:
            continue
        earlier = before.get(pid)
        ticks = cpu - earlier[1] if earlier is not None and earlier[0] == start else cpu
        if ticks:
            by_name[name] = by_name.get(name, 0.0) + ticks / _CLOCK_TICKS
    return by_name


def machine_cpu() -> tuple[int, int]:
    """
    All CPUs' (total, steal) ticks since boot, from /proc/stat.

    Steal is time a virtual CPU wanted to run but the hypervisor ran
    something else: a neighbour on the host.
    """
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is in user).
    total = sum(fields[:8])
    steal = fields[7] if len(fields) > 7 else 0
    return total, steal


def fd_count(pid: int) -> int:
    """
    Open descriptors of ``pid`` alone (not its children).
    """
    return len(os.listdir(f"/proc/{pid}/fd"))


def tree_fd_count(pid: int) -> int:
    """
    Open descriptors of ``pid`` and its descendants (egressproxy's workers).
    """
    total = 0
    for member in process_tree(pid):
        try:
            total += fd_count(member)
        except OSError:
            pass  # exited meanwhile
    return total


def nofile_limit(pid: int) -> int | None:
    """
    The soft descriptor limit of a running process, from /proc/PID/limits.
    """
    try:
        with open(f"/proc/{pid}/limits", encoding="ascii") as f:
            for line in f:
                if line.startswith("Max open files"):
                    value = line.split()[3]
                    return None if value == "unlimited" else int(value)
    except OSError:
        pass
    return None


def listening(port: int) -> bool:
    """
    Whether something listens on 127.0.0.1:``port`` (read from /proc/net/tcp).

    Reading the table, rather than connecting, leaves no connection in a
    proxy's access log and no half-open session at the upstream.
    """
    wanted = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    try:
        with open("/proc/net/tcp", encoding="ascii") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1] in wanted and fields[3] == "0A":
                    return True
    except OSError:
        pass
    return False


def wait_listening(proc: subprocess.Popen[bytes], ports: Sequence[int], timeout: float, what: str) -> None:
    """
    Wait until every port listens; raise if ``proc`` exits or time runs out.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening")
        if all(listening(p) for p in ports):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} was not listening on {list(ports)} after {timeout:.0f}s")
