"""A quick-lane connection's dial: a non-blocking connect per attempt, then the relay.

:class:`Dialing` is what ``quicklane.QuickLane.take`` starts for each
connection it takes (see that module's notes): one attempt per endpoint in
the cluster's rotation, up to ``max_connect_attempts``, each under
``connect_timeout``, counted on the cluster as the ordinary dial
(``upstream/dial.py``) counts them; once connected, both descriptors go to
the compiled relay and the session becomes a relayed one.
"""

from __future__ import annotations

import errno
import select
import socket
from typing import Any

from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from egressproxy.addresses import format_peer
from egressproxy.datapath.relayjoin import DetachedTransport, Relayed, RelayedLeg
from egressproxy.datapath.sockopts import set_socket_options
from egressproxy.upstream.dial import classify_connect_failure

#: The lane and its session (``quicklane.QuickLane``, ``session.Session``), not imported: the lane makes dials.
QuickLane = Any
Session = Any
Target = Any

#: What a non-blocking connect answers while the handshake is under way.
_IN_PROGRESS = (errno.EINPROGRESS, errno.EAGAIN)


@implementer(IWriteDescriptor)
class Dialing:
    """One lane connection's dial: a non-blocking connect per attempt, watched by the reactor."""

    __slots__ = ("lane", "session", "client", "order", "targets", "tried", "left", "sock", "started", "deadline", "timed_out")

    def __init__(
        self, lane: QuickLane, session: Session, client: socket.socket, order: list[Any], targets: dict[Any, Target]
    ) -> None:
        self.lane = lane
        self.session = session
        self.client = client
        self.order = order
        self.targets = targets
        self.tried = 0
        self.left = session.cluster.config.max_connect_attempts
        self.sock: socket.socket | None = None
        self.started = 0.0
        self.deadline: Any = None
        self.timed_out = False

    def attempt(self) -> None:
        """Connect to the next endpoint in the rotation."""
        session = self.session
        address = self.order[self.tried % len(self.order)]
        self.tried += 1
        self.left -= 1
        session._attempting(address)
        target = self.targets[address]
        reactor = self.lane.reactor
        self.started = reactor.seconds()
        try:
            sock = socket.socket(target.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as e:
            self._failed(Failure(error.getConnectError((e.errno, e.strerror))))
            return
        self.sock = sock
        try:
            set_socket_options(sock, session.keepalive)
        except OSError:
            pass
        code = sock.connect_ex(target.sockaddr)
        if code in _IN_PROGRESS and _settled(sock.fileno()):
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code == 0:
            self._connected()
        elif code in _IN_PROGRESS:
            self.timed_out = False
            self.deadline = reactor.callLater(session.cluster.config.connect_timeout, self._timed_out)
            reactor.addWriter(self)
        else:
            self._failed(Failure(error.getConnectError((code, errno.errorcode.get(code, str(code))))))

    # -- IWriteDescriptor --------------------------------------------------------------

    def fileno(self) -> int:
        sock = self.sock
        return -1 if sock is None else sock.fileno()

    def doWrite(self) -> None:
        """The connect finished, one way or the other."""
        self._unwatch()
        sock = self.sock
        assert sock is not None
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._failed(Failure(error.getConnectError((code, errno.errorcode.get(code, str(code))))))
        else:
            self._connected()

    #: Called directly by the fast dispatch (``fastdispatch.DIRECT``).
    egress_event = doWrite

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped the descriptor (it is stopping): give up as a cancel would."""
        self.cancel()

    def logPrefix(self) -> str:
        return "quicklane"

    # -- outcomes ------------------------------------------------------------------------

    def _unwatch(self) -> None:
        self.lane.reactor.removeWriter(self)
        deadline, self.deadline = self.deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _timed_out(self) -> None:
        self.deadline = None
        self.timed_out = True
        self.lane.reactor.removeWriter(self)
        timeout = self.session.cluster.config.connect_timeout
        self._failed(Failure(error.TimeoutError(f"no connection within {timeout:g}s")))

    def _connected(self) -> None:
        session = self.session
        cluster = session.cluster
        sock, client = self.sock, self.client
        assert sock is not None
        session._dial = None
        address = session.upstream_address
        cluster.connected(address, self.lane.reactor.seconds() - self.started)
        runtime = self.lane.listener.fast_path.relay
        try:
            if runtime is None or runtime.closed:
                raise ValueError("the relay is closed")
            local = _address(sock.getsockname())
            handle = runtime.relay.add(client.fileno(), sock.fileno(), session)
        except (OSError, ValueError, MemoryError) as e:
            # A reload stopped the relay between accept and connect (or the
            # client is gone): nothing was relayed; close both, say why.
            session.flag("UF")
            session.listener.log.info(
                "{listener}: {peer} closed before relaying: {error}",
                listener=session.listener.config.name, peer=format_peer(session.peer_address), error=e,
            )
            _close(sock, abort=True)
            _close(client, abort=True)
            session.up = None
            cluster.released(address)
            session.finish()
            return
        session.relayed_local = local
        sock.detach()
        client.detach()
        self.sock = None
        down = session.down
        up = session.up
        up.transport = DetachedTransport(self.targets[address].peer, local)  # type: ignore[assignment]
        up.connected = 1
        RelayedLeg.become(down)
        RelayedLeg.become(up)
        down.peer, up.peer = up, down
        Relayed.become(session, runtime.relay, handle)
        session._start_idle_timer()

    def _failed(self, failure: Failure) -> None:
        session = self.session
        cluster = session.cluster
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
        reason, flag = classify_connect_failure(failure)
        cluster.attempt_failed(session.upstream_address, reason)
        if self.left > 0 and session._dial is self:
            self.attempt()
            return
        session._dial = None
        session.up = None
        cluster.breaker.connect_failed()
        session.flag(flag)
        session.listener.log.info(
            "{listener}: upstream {upstream} failed for {peer}: {reason}",
            listener=session.listener.config.name, upstream=session.upstream_name,
            peer=format_peer(session.peer_address), reason=failure.getErrorMessage(),
        )
        _close(self.client, abort=False)
        session.finish()

    def cancel(self) -> None:
        """The session was aborted while dialling (drain timeout, shutdown): drop both sockets."""
        session = self.session
        if session._dial is self:
            session._dial = None
        if self.sock is None and session.finished:
            return
        if self.sock is not None:
            self._unwatch()
            _close(self.sock, abort=True)
            self.sock = None
        session.up = None
        session.cluster.breaker.connect_failed()
        _close(self.client, abort=True)
        session.finish()


#: One poll set, for :func:`_settled` (the reactor's thread only).
_PROBE = select.poll()


def _settled(fd: int) -> bool:
    """Whether a non-blocking connect has already finished, one way or the other.

    An upstream on the same host (loopback, a sidecar) completes the TCP
    handshake inside ``connect`` itself, though the call still answers
    "in progress"; one ``poll`` with no wait then saves the reactor turn
    that would only report it (HAProxy's speculative I/O does the same).
    A distant upstream costs this one extra syscall and is waited for.
    """
    _PROBE.register(fd, select.POLLOUT)
    try:
        return bool(_PROBE.poll(0))
    finally:
        _PROBE.unregister(fd)


def _address(sockaddr: tuple[Any, ...]) -> Any:
    """Twisted's address object for a socket address."""
    if len(sockaddr) == 4:
        return IPv6Address("TCP", sockaddr[0], sockaddr[1])
    return IPv4Address("TCP", sockaddr[0], sockaddr[1])


def _close(sock: socket.socket, abort: bool) -> None:
    """Close a socket: with a FIN, or (``abort``) with a reset, as ``abortConnection`` does."""
    try:
        if abort:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()
