"""The quick lane: a plain tcp listener's connections straight from accept to the relay.

Why: a connection per request (serverless clients, ``pgbench -C``, PHP)
makes new-connection cost the figure users feel, and on the ordinary path
most of it is the interpreter's: a Twisted transport per socket, a
Deferred chain per dial, the mode's machine, the hand-off that then
detaches both transports again.  For the simplest and commonest listener,
``mode: tcp`` dialling at once, none of that does anything the relay does
not redo, so this lane skips it:

1. Twisted's listening port accepts as always (it keeps bind, drain,
   reload and the egress gate working unchanged), and the listener's
   factory hands the lane the address (:class:`LaneAccept`).  The port
   then asks for a transport (``Port.transport``, replaced by
   :meth:`QuickLane.transport`), and the lane takes the raw socket instead.
2. The lane admits the session exactly as the ordinary path would
   (``ListenerRuntime.admit``), reserves a breaker slot, and connects a
   non-blocking socket to the next endpoint in the cluster's rotation
   (``quickdial.Dialing``; the reactor watches it for writability unless
   the connect finished at once, as it does on the same host).
3. Connected: both descriptors go to the compiled relay, and the session
   becomes a relayed one (``relayjoin.Relayed``), with the same access
   line, counters, flags and idle check as a relayed session of the
   ordinary path.
4. A failed attempt counts and tries the next endpoint, up to
   ``max_connect_attempts``, each under ``connect_timeout``; the last
   failure closes the client with flag ``UF`` or ``UT`` and the same log
   line as the ordinary path.  A session aborted while dialling (a drain's
   ``DT``, shutdown) closes both sockets and frees the breaker slot.

The lane only takes a connection when nothing it skips could matter, and
otherwise lets the port build Twisted's transport and the ordinary path
run (:meth:`QuickLane.take` returns False before changing anything):

- the listener is ``mode: tcp`` with ``upstream_connect: immediate``, no
  ``proxy_protocol``, and the compiled relay runs and takes new pairs;
- every endpoint of the cluster is an IP address, a name ``hosts:`` pins
  to one, or a name whose last lookup found exactly one address, at most a
  few seconds ago (``lanenames.py``; the ordinary path resolves a name per
  connection and races several addresses);
- the client would be admitted (a refusal takes the ordinary path, whose
  machine gives it its flag and answer), the breaker has room, and no
  endpoint is one of the proxy's own listening sockets (flag ``IA`` there).
"""

from __future__ import annotations

import inspect
import ipaddress
import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address

from egressproxy.datapath.lanenames import NameCache
from egressproxy.datapath.quickdial import Dialing
from egressproxy.datapath.relayjoin import DetachedTransport
from egressproxy.datapath.sockopts import set_socket_options
from egressproxy.datapath.splice import DownstreamLeg, UpstreamLeg
from egressproxy.modes.tcp.options import IMMEDIATE, TcpOptions

#: A listener's runtime and session, not imported (the listener makes the lane).
ListenerRuntime = Any
Session = Any

def port_supported(port: object) -> bool:
    """Whether ``port`` is a Twisted TCP port that makes its transports through ``Port.transport``.

    The lane stands in for that attribute; a Twisted whose ``Port.doRead``
    no longer calls it would hand a :class:`LaneAccept` to a real transport,
    so the lane is only installed when the source says it does (checked
    once; no source, as in a frozen build: no lane).
    """
    global _SUPPORTED
    if not isinstance(port, tcp.Port):
        return False
    if _SUPPORTED is None:
        try:
            source = inspect.getsource(tcp.Port.doRead)
        except (OSError, TypeError):
            source = ""
        _SUPPORTED = getattr(tcp.Port, "transport", None) is tcp.Server and "self.transport(" in source
    return _SUPPORTED


#: :func:`port_supported`'s finding about Twisted, once made.
_SUPPORTED: bool | None = None


class LaneAccept:
    """What the listener's factory gives the port for a connection the lane may take.

    Twisted's port calls ``buildProtocol`` and then ``makeConnection`` on its
    result with the transport it made: when the lane took the socket there
    is no transport and nothing to do; when it declined, ``leg`` is the
    ordinary path's client leg, which gets the transport as usual.
    """

    __slots__ = ("address", "leg")

    def __init__(self, address: Any) -> None:
        self.address = address
        self.leg: DownstreamLeg | None = None

    def makeConnection(self, transport: Any) -> None:
        if self.leg is not None:
            self.leg.makeConnection(transport)


class Target:
    """One endpoint as the lane dials it: family, socket address, and Twisted's address object."""

    __slots__ = ("family", "sockaddr", "ip", "peer")

    def __init__(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
        self.ip = ip
        if ip.version == 6:
            self.family = socket.AF_INET6
            self.sockaddr: tuple[Any, ...] = (str(ip), port, 0, 0)
            self.peer: Any = IPv6Address("TCP", str(ip), port)
        else:
            self.family = socket.AF_INET
            self.sockaddr = (str(ip), port)
            self.peer = IPv4Address("TCP", str(ip), port)


class QuickLane:
    """One listener's quick lane; see the module notes."""

    def __init__(self, listener: ListenerRuntime, reactor: Any) -> None:
        self.listener = listener
        self.reactor = reactor
        self._config: object = None
        self._config_ok = False
        self._cluster_key: tuple[object, object] | None = None
        self._targets: dict[Any, Target] | None = None
        #: The cluster's endpoints that are names, and their last targets.
        self._names: list[Any] = []
        self._named: dict[Any, Target] = {}
        #: Those names' addresses, looked up in the background.
        self.names = NameCache(reactor)
        #: The port's own transport class, for connections the lane leaves to the ordinary path.
        self.ordinary: Any = tcp.Server
        #: Connections the lane took (the rest took the ordinary path).
        self.taken = 0

    # -- what the port and the factory call -------------------------------------------

    def wanted(self) -> bool:
        """Whether a new connection on this listener may take the lane (checked per accept, cheaply)."""
        listener = self.listener
        relay = listener.fast_path.relay
        if relay is None or not relay.accepting:
            return False
        config = listener.config
        if config is not self._config:
            options = config.options
            self._config = config
            self._config_ok = (
                config.mode == "tcp" and not config.proxy_protocol
                and isinstance(options, TcpOptions) and options.upstream_connect == IMMEDIATE
            )
        return self._config_ok

    def transport(self, skt: socket.socket, protocol: Any, addr: Any, port: Any, sessionno: int, reactor: Any) -> Any:
        """Stands in for ``Port.transport``: take the socket, or make Twisted's transport as usual."""
        if type(protocol) is not LaneAccept:
            return self.ordinary(skt, protocol, addr, port, sessionno, reactor)
        if self.take(skt, protocol.address):
            return None
        from egressproxy.datapath.session import Session

        protocol.leg = DownstreamLeg(Session(self.listener, protocol.address))
        return self.ordinary(skt, protocol.leg, addr, port, sessionno, reactor)

    # -- taking a connection ----------------------------------------------------------------

    def targets(self, cluster: Any) -> dict[Any, Target] | None:
        """Each endpoint's :class:`Target`, or None when a name has no usable answer yet (``lanenames.py``)."""
        key = (cluster.config, cluster.pinned)
        if key != self._cluster_key:
            literal: dict[Any, Target] = {}
            names = []
            for address in cluster.config.endpoints:
                host = cluster.pinned(address.host) or address.host
                try:
                    literal[address] = Target(ipaddress.ip_address(host), address.port)
                except ValueError:
                    names.append(address)
            self._cluster_key = key
            self._targets = literal
            self._names = names
        if not self._names:
            return self._targets
        targets = dict(self._targets)  # type: ignore[arg-type]
        for address in self._names:
            ip = self.names.address(address.host)
            if ip is None:
                return None
            target = self._named.get(address)
            if target is None or target.ip != ip:
                target = self._named[address] = Target(ip, address.port)
            targets[address] = target
        return targets

    def take(self, skt: socket.socket, peer: Any) -> bool:
        """Admit, reserve and start dialling; False (nothing changed): the ordinary path takes it."""
        listener = self.listener
        cluster = listener.cluster
        targets = self.targets(cluster)
        if targets is None or listener.refusal(peer) is not None or cluster.breaker.open:
            return False
        order = cluster.endpoint_order()
        own = cluster.own
        for address in order:
            target = targets.get(address)
            if target is None or own.includes(target.ip, address.port):
                return False
        from egressproxy.datapath.session import Session

        self.taken += 1
        session = Session(listener, peer, driven=False)
        listener.admit(session)
        cluster.breaker.try_acquire_pending()
        if cluster.panicking():
            cluster.panic_total += 1
        session.cluster = cluster
        try:
            skt.setblocking(False)
            if listener.socket_options != session.keepalive:  # else inherited from the listening socket
                set_socket_options(skt, session.keepalive)
        except OSError:
            pass  # the client is already gone: the relay will see it
        down = DownstreamLeg(session)
        down.transport = DetachedTransport(peer, None)  # type: ignore[assignment]
        down.connected = 1
        session.down = down
        session.up = UpstreamLeg(session)  # no transport yet: the status page says "dialling"
        dialing = Dialing(self, session, skt, order, targets)
        session._dial = dialing
        dialing.attempt()
        return True
