"""
How much memory a peer holds: in its processes, and in the kernel for its sockets.

What this module owns: reading ``/proc`` for the proportional and resident
set sizes of a process tree (from ``smaps_rollup``) and the kernel's socket
slab caches (from ``/proc/slabinfo``). It does not decide when to measure
(run.py does) nor what a figure means per connection (costs.py does).

Why three readings: PSS is what a process tree costs in user space with
shared pages divided fairly, so socat's forked children are not counted
many times over, and its growth per held connection is the per-connection
figure. RSS right after start is the conservative "what the proxy occupies
before any client" that a Machine's RAM must hold first. Neither shows the
kernel's side of each socket, which the slab caches do.
"""

from __future__ import annotations

from procs import process_tree


def _tree_rollup_kib(pid: int, key: str) -> int:
    """The ``key`` line (``Pss:``, ``Rss:``) of smaps_rollup, summed over ``pid``'s tree, in KiB."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup", encoding="ascii") as f:
                for line in f:
                    if line.startswith(key):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue  # exited meanwhile
    return total


def tree_pss_kib(pid: int) -> int:
    """
    Proportional set size of ``pid`` and its descendants, in KiB.

    PSS divides each shared page among the processes mapping it, so summing it
    over socat's forked children counts their shared library and copy-on-write
    pages once, which RSS would not.
    """
    return _tree_rollup_kib(pid, "Pss:")


def tree_rss_kib(pid: int) -> int:
    """
    Resident set size of ``pid`` and its descendants, in KiB (shared pages
    counted once per process that maps them).

    The sizing table starts from it: what a freshly started proxy, all its
    workers together, occupies before the first connection. Summing RSS
    over-counts what the workers share, so it errs on the safe side there.
    """
    return _tree_rollup_kib(pid, "Rss:")


#: The slab caches that grow with each open TCP socket: the socket itself,
#: its inode, its open file and its epoll registration. Caches that other
#: activity moves a lot (dentry, kmalloc-*) are left out, and so is the
#: socket's dentry (192 bytes).
SOCKET_CACHES = ("TCP", "TCPv6", "sock_inode_cache", "filp", "eventpoll_epi", "eventpoll_pwq")


def socket_slab_kib() -> float | None:
    """
    KiB of kernel memory in the socket slab caches, machine-wide (from
    /proc/slabinfo, active objects × object size), or None when
    /proc/slabinfo cannot be read (it needs root).

    None of it shows in any process's PSS. Other processes' sockets move it
    too, so only a difference between peers measured alike means anything.
    """
    total = 0
    try:
        with open("/proc/slabinfo", encoding="ascii") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[0] in SOCKET_CACHES:
                    total += int(fields[1]) * int(fields[3])
    except (OSError, ValueError):
        return None
    return total / 1024
