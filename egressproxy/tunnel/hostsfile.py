"""The ``/etc/hosts`` entries of ``--transparent``: added at start, removed on the way out.

Each destination host gets one line, marked with the tunnel's PID::

    127.77.0.1 db.example.com  # egressproxy tunnel 4242

so the app's resolver (``files`` before ``dns`` in nsswitch.conf, as in
every Debian, Node and Elixir image) sends it to the tunnel's listener,
while TLS still checks the real name's certificate end to end.

Rules:

- **A name already there is an error, not an overwrite.**  Someone put it
  there on purpose (or another tunnel serves it: the message says which
  PID).  Every conflict is reported at once and nothing is written.
- **Stale lines of our own are removed.**  A line with our marker whose
  PID no longer runs (a tunnel that was killed with SIGKILL) is dropped,
  and the caller is told, so a restart in the same machine works.
- **Rewritten in place.**  Docker and Fly bind-mount ``/etc/hosts`` into the
  container, so renaming a new file over it fails (``EBUSY``) or detaches
  it; the file is opened ``r+``, locked (``flock``, so two tunnels starting
  at once take turns), rewritten from offset 0, truncated and fsynced.
- **Removal takes only our own PID's lines**, and leaves every other byte
  of the file as it was.

The text functions (:func:`add_entries`, :func:`remove_entries`) are pure;
:class:`HostsFile` does the file I/O.
"""

from __future__ import annotations

import fcntl
import os
import re
from typing import Callable

MARKER = "# egressproxy tunnel"
_OURS = re.compile(r"#\s*egressproxy tunnel (\d+)\s*$")


class HostsFileError(Exception):
    """The hosts file cannot be edited as asked; the message names the fix."""


def entry(address: str, name: str, pid: int) -> str:
    """One line (without newline) pointing ``name`` at ``address``, marked as ours."""
    return f"{address} {name}  {MARKER} {pid}"


def owner(line: str) -> int | None:
    """The PID of the tunnel that wrote ``line``, or None when it is not ours."""
    found = _OURS.search(line)
    return int(found.group(1)) if found else None


def names_in(text: str) -> dict[str, tuple[int, str]]:
    """Every host name the file maps (lowercased) -> (line number, the line), first mention."""
    names: dict[str, tuple[int, str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        for name in fields[1:]:
            names.setdefault(name.lower().rstrip("."), (number, line.strip()))
    return names


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (signal 0 probes without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def add_entries(text: str, entries: list[tuple[str, str]], pid: int,
                alive: Callable[[int], bool] = pid_alive) -> tuple[str, list[str]]:
    """``text`` with one line per (address, name) appended; also the stale lines dropped.

    Raises HostsFileError naming every name already mapped (by a line that is
    not a stale one of ours).
    """
    lines = text.splitlines(keepends=True)
    stale = [line for line in lines if (o := owner(line)) is not None and o != pid and not alive(o)]
    kept = "".join(line for line in lines if line not in stale)
    present = names_in(kept)
    conflicts = []
    for _, name in entries:
        found = present.get(name.lower().rstrip("."))
        if found is not None:
            number, line = found
            by = owner(line)
            whose = f", added by egressproxy tunnel PID {by}, which still runs and serves it" if by is not None else ""
            conflicts.append(f"{name} is already in the hosts file (line {number}: {line!r}{whose})")
    if conflicts:
        raise HostsFileError(
            "; ".join(conflicts) + ". --transparent does not overwrite entries: remove the line, "
            "or run without --transparent (a running tunnel's names already lead to its listeners)"
        )
    if kept and not kept.endswith("\n"):
        kept += "\n"
    kept += "".join(entry(address, name, pid) + "\n" for address, name in entries)
    return kept, [line.rstrip("\r\n") for line in stale]


def remove_entries(text: str, pid: int) -> str:
    """``text`` without the lines this PID added; every other line as it was."""
    lines = text.splitlines(keepends=True)
    return "".join(line for line in lines if owner(line) != pid)


class HostsFile:
    """One hosts file edited in place; see the module notes."""

    def __init__(self, path: str = "/etc/hosts", pid: int | None = None) -> None:
        self.path = path
        self.pid = os.getpid() if pid is None else pid
        #: Whether we wrote entries that are still there.
        self.added = False

    def _edit(self, change: Callable[[str], str]) -> None:
        try:
            with open(self.path, "r+", encoding="utf-8") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    text = f.read()
                    new = change(text)
                    if new != text:
                        f.seek(0)
                        f.write(new)
                        f.truncate()
                        f.flush()
                        os.fsync(f.fileno())
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        except PermissionError as e:
            raise HostsFileError(
                f"cannot edit {self.path}: {e.strerror}; --transparent edits it, so run the tunnel as root "
                "(or without --transparent)"
            ) from None
        except OSError as e:
            raise HostsFileError(f"cannot edit {self.path}: {e.strerror or e}") from None

    def add(self, entries: list[tuple[str, str]]) -> list[str]:
        """Add our lines (all or none); return the stale lines of dead tunnels that were dropped."""
        dropped: list[str] = []

        def change(text: str) -> str:
            new, stale = add_entries(text, entries, self.pid)
            dropped.extend(stale)
            return new

        self._edit(change)
        self.added = True
        return dropped

    def remove(self) -> None:
        """Remove our lines (idempotent)."""
        if not self.added:
            return
        self._edit(lambda text: remove_entries(text, self.pid))
        self.added = False
