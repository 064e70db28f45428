"""``egressproxy tunnel --check``: can every destination be reached through the paths?

For a release command's preflight (``release_command = "egressproxy-tunnel
--check"``): each destination is dialled once, the way a connection of the
tunnel would be (the paths in order, failing over), and the leg is closed
as soon as it is ready.  For a ``socks5`` path, ready means the egress app
answered the CONNECT with success, so its allowlist admitted the
destination and its own TCP connect to it succeeded; for a ``tcp`` path,
that the egress listener accepted (what lies behind it is not dialled).

One line per destination on stdout, in the order given, then exit 0 when
all passed, 1 otherwise::

    ok   db.example.com:5432 via socks5://app@my-egress.flycast:1080 (14 ms)
    ok   api.vendor.example:443 via socks5://app@my-egress.internal:1080 (2011 ms; socks5://app@my-egress.flycast:1080 failed: no TCP connection within 2s)
    FAIL api.evil.example:443: refused by the egress proxy's allowlist (socks5://app@my-egress.flycast:1080)

Every destination is dialled at once; each is bounded by the paths'
connect timeouts, so the whole check is too.
"""

from __future__ import annotations

from typing import Any, TextIO

from twisted.internet import defer
from twisted.python.failure import Failure

from egressproxy.tunnel.dial import PathAttempt, PathFailed, PathLeg
from egressproxy.tunnel.failover import Attempts, PathOrder
from egressproxy.tunnel.options import TunnelOptions
from egressproxy.tunnel.parse import Destination


class _Probe:
    """The session a probe's leg reports to: it counts nothing and closes at once."""

    keepalive = None
    bytes_received = 0
    bytes_sent = 0

    def leg_lost(self, leg: object, reason: Failure) -> None:
        pass

    def refuse_overlong_preamble(self) -> None:
        pass


def _failed_paths(failures: list[PathFailed]) -> str:
    return "; ".join(f"{f.path} failed: {f.reason}" for f in failures)


def check_one(reactor: Any, order: PathOrder, destination: Destination, timeout: float) -> defer.Deferred[tuple[bool, str]]:
    """Dial ``destination`` through the paths: (passed, its line)."""
    started = reactor.seconds()
    probe = _Probe()
    attempts = Attempts(order, lambda path: PathAttempt(reactor, path, destination, probe, timeout), lambda *_: None)

    def ready(leg: PathLeg) -> tuple[bool, str]:
        leg.close()
        elapsed = int(round((reactor.seconds() - started) * 1000))
        earlier = f"; {_failed_paths(attempts.failures)}" if attempts.failures else ""
        return True, f"ok   {destination} via {leg.path} ({elapsed} ms{earlier})"

    def failed(failure: Failure) -> tuple[bool, str]:
        if failure.check(PathFailed) and failure.value.final:
            return False, f"FAIL {destination}: refused by the egress proxy's allowlist ({failure.value.path})"
        return False, f"FAIL {destination}: {_failed_paths(attempts.failures) or failure.getErrorMessage()}"

    return attempts.start().addCallbacks(ready, failed)


async def check_all(reactor: Any, options: TunnelOptions, out: TextIO) -> int:
    """Dial every destination; print a line each, in order; 0 if all passed, else 1."""
    # Every path is tried in its configured order: the check reports on them, not around them.
    order = PathOrder(options.paths, reactor, holdoff=0.0)
    results = await defer.gatherResults(
        [check_one(reactor, order, destination, options.connect_timeout) for destination in options.destinations]
    )
    for _, line in results:
        print(line, file=out, flush=True)
    return 0 if all(passed for passed, _ in results) else 1
