"""Upstream names for the quick lane: resolved in the background, reused for a few seconds.

The ordinary path resolves a cluster's endpoint name on every connection
(``HostnameEndpoint``: a thread round trip each time), so a provider that
moves its database is followed at once.  The quick lane (``quicklane.py``)
must not wait on a resolver thread at accept, so it keeps each name's last
answer for :data:`NAME_TTL` seconds, as Envoy's ``STRICT_DNS`` clusters do
(their ``dns_refresh_rate`` defaults to 5 s):

- no answer yet: the connection takes the ordinary path, and a lookup
  starts in the background (one at a time per name);
- an answer older than the TTL: it is still used while a new lookup runs,
  but never once it is older than :data:`STALE_LIMIT` (a resolver that
  hangs sends connections back to the ordinary path, which resolves them);
- a lookup that fails or finds nothing forgets the name: its connections
  take the ordinary path, which reports the error as it always has.

Only a name with exactly one address is given to the lane.  With several
(IPv6 and IPv4, or a pool of A records) the ordinary path's
``HostnameEndpoint`` races them (Happy Eyeballs), so a family this machine
cannot reach costs nothing there; the lane dials one address per attempt
and would count each unreachable one as a failed attempt.
"""

from __future__ import annotations

from typing import Any

from twisted.python.failure import Failure

from egressproxy.addresses import IPAddress
from egressproxy.upstream.dial import resolve

#: Seconds a name's answer is used before it is looked up again.
NAME_TTL = 5.0
#: Seconds after which an answer is not used at all, even while a new lookup runs.
STALE_LIMIT = 30.0


class NameCache:
    """Each name's single address, looked up through the reactor's resolver; see the module notes."""

    def __init__(self, reactor: Any, ttl: float = NAME_TTL, stale_limit: float = STALE_LIMIT) -> None:
        self.reactor = reactor
        self.ttl = ttl
        self.stale_limit = stale_limit
        #: name → (when it was looked up, its one address, or None when it has several).
        self._answers: dict[str, tuple[float, IPAddress | None]] = {}
        self._resolving: set[str] = set()

    def address(self, host: str) -> IPAddress | None:
        """The name's one address if known and fresh enough, else None (a lookup may start)."""
        entry = self._answers.get(host)
        if entry is None:
            self._refresh(host)
            return None
        age = self.reactor.seconds() - entry[0]
        if age >= self.ttl:
            self._refresh(host)
            if age >= self.stale_limit:
                return None
        return entry[1]

    def _refresh(self, host: str) -> None:
        if host in self._resolving:
            return
        self._resolving.add(host)
        looking = resolve(self.reactor, host)
        looking.addCallbacks(self._answered, self._failed, callbackArgs=(host,), errbackArgs=(host,))

    def _answered(self, ips: list[IPAddress], host: str) -> None:
        self._resolving.discard(host)
        unique = list(dict.fromkeys(ips))
        if not unique:
            self._answers.pop(host, None)
            return
        self._answers[host] = (self.reactor.seconds(), unique[0] if len(unique) == 1 else None)

    def _failed(self, failure: Failure, host: str) -> None:
        self._resolving.discard(host)
        self._answers.pop(host, None)
