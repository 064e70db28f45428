"""Raising the process's file-descriptor limit at start-up.

Every proxied connection holds two descriptors (client and upstream), and a
listener's default ``max_connections`` is 10,000; the usual soft limit of
1,024 would refuse connections long before any configured limit.  Like
HAProxy and Envoy, the proxy raises its soft limit to the hard limit the
system allows, and says so.
"""

from __future__ import annotations

import resource


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or (soft != resource.RLIM_INFINITY and soft >= target):
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target
