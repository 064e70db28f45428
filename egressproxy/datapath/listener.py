"""Runtime state of one configured listener: admission and its counters.

Counters are plain integers updated by sessions and read by the metrics
collector at scrape time.  Byte totals are the sum of finished sessions plus
the live ones, so a long-lived connection's traffic shows up while it flows.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from egressproxy.observe.accesslog import AccessRecord
from egressproxy.upstream.addrguard import AddressPolicy
from egressproxy.addresses import IPAddress, peer_ip, source_allowed
from egressproxy.config import ListenerConfig
from egressproxy.datapath.fastpath import ORDINARY, FastPath
from egressproxy.datapath.quicklane import LaneAccept, QuickLane
from egressproxy.datapath.sockopts import NOT_TUNED
from egressproxy.modes import registry
from egressproxy.datapath.splice import DownstreamLeg
from egressproxy.upstream.cluster import UpstreamCluster

#: A listener's session (``session.Session``), imported only where one is made: the session reads its listener.
Session = Any


#: How many refused or failed connections each listener remembers for the status page.
RECENT_PROBLEMS = 20

#: Flags that end a connection without anything having gone wrong: not kept among the problems.
QUIET_FLAGS = frozenset({"NB", "DI", "DT"})

#: The access-log flag of each refusal at admission.
_REFUSAL_FLAGS = {"source": "RBAC", "max_connections": "OM", "max_connections_per_source": "OM"}

#: Why a connection may be refused before anything is dialled.
REJECT_REASONS = (
    "source", "max_connections", "max_connections_per_source", "proxy_protocol", "proxy_protocol_untrusted",
    "internal_address", "own_address",
)


class ListenerRuntime:
    """One listener's config, cluster, live sessions and totals."""

    log = Logger()

    def __init__(
        self, config: ListenerConfig, cluster: UpstreamCluster, reactor: IReactorTime, access_log: Logger
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.reactor = reactor
        self.access_log = access_log
        self.sessions: set[Session] = set()
        #: Connections not admitted yet: waiting for their PROXY header.  A
        #: drain waits for them and an abort reaches them like the others.
        self.awaiting: set[Session] = set()
        #: Admitted sessions per source address (the PROXY header's on such
        #: listeners): +1 at admission, -1 when the session ends; no zeros kept.
        self.per_source: dict[IPAddress, int] = {}
        self.connections_total = 0
        # Known reasons (and the mode's) start at zero, so their series exist before the first event.
        self.rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS + registry.spec(config.mode).reject_reasons, 0)
        self.last_refusal = ""
        #: The newest refused or failed connections' access records (any flag
        #: but the quiet ones), oldest first; for the status page.  Appended
        #: only when a connection ends with such a flag, never per chunk.
        self.recent_problems: deque[AccessRecord] = deque(maxlen=RECENT_PROBLEMS)
        #: Postgres logins the server refused, by SQLSTATE (28P01, 28000, ...).
        self.login_refused: dict[str, int] = {}
        #: Connections ``policy: report`` let through that enforce would refuse,
        #: by reason (``destination``: outside allow_destinations).
        self.reported: dict[str, int] = {}
        self.finished_bytes_received = 0
        self.finished_bytes_sent = 0
        #: The service's configured clusters by name (a front routing to a
        #: named cluster, e.g. a Postgres route's ``cluster:``); set by the service.
        self.named_cluster: Callable[[str], UpstreamCluster | None] = lambda name: None
        #: The mode's own per-listener state (e.g. Postgres cancel keys), made by
        #: its spec on first use (:meth:`state`) and kept across reloads.
        self.mode_state: object | None = None
        #: The data path's shortcuts its splices use (see fastpath.py); set by the service.
        self.fast_path: FastPath = ORDINARY
        #: The keepalive its listening socket passes on to accepted sockets
        #: (with TCP_NODELAY), or ``sockopts.NOT_TUNED``; set by the service.
        self.socket_options: object = NOT_TUNED

    def state(self) -> object | None:
        """The mode's per-listener state (None if it keeps none), made by its spec on first use."""
        if self.mode_state is None:
            factory = registry.spec(self.config.mode).state
            if factory is not None:
                self.mode_state = factory()
        return self.mode_state

    def admit(self, session: Session) -> str | None:
        """Count a new connection; the refusal flag if it may not proceed, else None.

        Refusals happen before any upstream is dialled.  A peer without an
        IP address (a unix socket) is not counted per source: every such
        client would look like the same one.
        """
        self.connections_total += 1
        source = peer_ip(session.peer_address)
        reason = self._refusal(source)
        if reason is not None:
            self._reject(reason)
            return _REFUSAL_FLAGS[reason]
        if source is not None:
            self.per_source[source] = self.per_source.get(source, 0) + 1
            session.counted_source = source
        self.sessions.add(session)
        return None

    def refusal(self, peer: IAddress) -> str | None:
        """Why :meth:`admit` would refuse a client at ``peer`` now (a ``REJECT_REASONS`` entry), else None.

        Counts nothing: the quick lane asks it before taking a connection,
        so a refusal is left to the ordinary path, which counts it once.
        """
        return self._refusal(peer_ip(peer))

    def _refusal(self, source: IPAddress | None) -> str | None:
        if not source_allowed(source, self.config.allow_sources):
            return "source"
        if len(self.sessions) >= self.config.max_connections:
            return "max_connections"
        if source is not None and self.per_source.get(source, 0) >= self.config.max_connections_per_source:
            return "max_connections_per_source"
        return None

    def _reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        #: Why the newest connection was refused (read by the session refusing it, at once).
        self.last_refusal = reason

    def address_policy(self) -> AddressPolicy:
        """The address rules for destinations this listener's clients choose (``addrguard``)."""
        config = self.config
        return AddressPolicy(config.allow_addresses, config.deny_addresses, report=config.policy == "report")

    def count_rejected(self, reason: str) -> None:
        """Count an admitted connection its front refused before dialling (e.g. ``no_route``)."""
        self._reject(reason)

    def count_login_refused(self, sqlstate: str) -> None:
        """Count a Postgres login the server refused, by its SQLSTATE."""
        self.login_refused[sqlstate] = self.login_refused.get(sqlstate, 0) + 1

    def count_reported(self, reason: str) -> None:
        """Count a connection ``policy: report`` allowed although enforce would refuse it."""
        self.reported[reason] = self.reported.get(reason, 0) + 1

    def count_unadmitted(self, reason: str | None) -> None:
        """Count a connection that ended before admission (``admit`` counts the others)."""
        self.connections_total += 1
        if reason is not None:
            self._reject(reason)

    @property
    def active(self) -> int:
        return len(self.sessions)

    @property
    def bytes_received(self) -> int:
        return self.finished_bytes_received + sum(s.bytes_received for s in self.sessions)

    @property
    def bytes_sent(self) -> int:
        return self.finished_bytes_sent + sum(s.bytes_sent for s in self.sessions)

    def session_finished(self, session: Session, record: AccessRecord) -> None:
        self.sessions.discard(session)
        source = session.counted_source
        if source is not None:
            session.counted_source = None
            left = self.per_source[source] - 1
            if left:
                self.per_source[source] = left
            else:
                del self.per_source[source]
        self.finished_bytes_received += session.bytes_received
        self.finished_bytes_sent += session.bytes_sent
        if record.flags and not QUIET_FLAGS.issuperset(record.flags):
            self.recent_problems.append(record)
        self.access_log.info("{record}", record=record)


class ListenerFactory(Factory):
    """Builds one session and its client leg per accepted connection, whatever the mode."""

    noisy = False

    def __init__(self, listener: ListenerRuntime, lane: QuickLane | None = None) -> None:
        self.listener = listener
        #: The listener's quick lane (``quicklane.py``), when its port hands sockets to it.
        self.lane = lane

    def buildProtocol(self, addr: IAddress) -> DownstreamLeg | LaneAccept:
        lane = self.lane
        if lane is not None and lane.wanted():
            return LaneAccept(addr)
        from egressproxy.datapath.session import Session

        return DownstreamLeg(Session(self.listener, addr))
