"""Envoy-style circuit breakers for one upstream cluster: pure arithmetic.

Two limits, both checked when a new downstream connection wants an upstream:

- ``max_pending``: connects in progress.  A slow or black-holed upstream
  makes connects pile up; past this many, new clients are refused at once
  instead of queueing without bound.
- ``max_connections``: established upstream connections.

A refusal is an *overflow* (access-log flag ``UO``).  There is no queue: the
client is closed immediately, which is what a connection pool in the client
app copes with best (it retries or reports), and what keeps the proxy's
memory flat under a storm.  No clock and no I/O here, so the rules are tested
with plain numbers.
"""

from __future__ import annotations


class CircuitBreaker:
    """Counts pending and active upstream connections against two limits."""

    def __init__(self, max_connections: int, max_pending: int) -> None:
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.pending = 0
        self.active = 0
        self.overflows = 0

    def try_acquire_pending(self) -> bool:
        """Reserve a slot for a new connect; False (and one overflow counted) when full.

        Pending connects count against ``max_connections`` too: otherwise a
        burst of connects could overshoot the active limit once they land.
        """
        if self.pending >= self.max_pending or self.pending + self.active >= self.max_connections:
            self.overflows += 1
            return False
        self.pending += 1
        return True

    def connected(self) -> None:
        """A pending connect succeeded: it becomes an active connection."""
        self.pending -= 1
        self.active += 1

    def connect_failed(self) -> None:
        """A pending connect failed or was cancelled: its slot is free again."""
        self.pending -= 1

    def released(self) -> None:
        """An active upstream connection closed."""
        self.active -= 1

    @property
    def open(self) -> bool:
        """True while a new connect would be refused (the breaker has tripped)."""
        return self.pending >= self.max_pending or self.pending + self.active >= self.max_connections
