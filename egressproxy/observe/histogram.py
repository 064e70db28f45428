"""A histogram of plain integers, exported to Prometheus at scrape time.

``observe`` is a bisect and three additions: cheap enough to call once per
upstream connect.  prometheus_client's own Histogram takes a lock per call
and would put registry objects on the connection path.
"""

from __future__ import annotations

from bisect import bisect_left

#: Upstream connect time buckets, in seconds: loopback to a slow cross-region dial.
CONNECT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Counts of observations per bucket (``value <= bound``), plus sum and count."""

    def __init__(self, bounds: tuple[float, ...] = CONNECT_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, cumulative count)`` pairs as Prometheus buckets, ending with ``+Inf``."""
        total = 0
        buckets = []
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return buckets
