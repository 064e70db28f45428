"""Handing a spliced pair to the compiled relay, and what its session becomes.

Once a session's two legs are ready to splice (every handshake done: PROXY
header, routing, SOCKS/CONNECT, Postgres negotiation), :func:`hand_off`
gives both sockets to the relay (``egressproxy._relay``, see
:mod:`egressproxy.datapath.relay`) instead of joining the legs in Python
(``splice.join``).  It only does so when the relay can keep every rule of
the splice (``splice.py``'s notes):

- both transports are TCP (``tcp.Server``/``tcp.Client``), connected, not
  closing, no write side shut yet and no producer registered;
- neither is TLS, except an upstream leg whose TLS this proxy originated
  (``tls: originate``) when the relay was given pyOpenSSL's OpenSSL at
  start-up and the TLS layer is in a state it can take over
  (:mod:`egressproxy.datapath.relaytls`; ``client_tls`` keeps the Python
  path);
- neither leg has a splice filter (note 7) nor a preamble still being read
  (note 6);

otherwise it returns False and the caller joins in Python as before.

The hand-off, all on the reactor thread:

1. What each side is owed, in order: the bytes Twisted still buffers for
   that socket (``dataBuffer`` from ``offset``, then ``_tempDataBuffer``),
   then what the other leg held before the splice (``Leg.pending``, note 5).
   The relay sends these first.  Towards a TLS upstream everything owed is
   made ciphertext first: the client leg's pending bytes are written
   through the TLS layer (``relaytls.take``), so the TCP buffer holds it
   all.  An EOF a leg already read (``read_closed``) is passed on too, so
   it becomes the write-side shutdown after them.
2. The reactor stops polling both sockets, then ``Relay.add`` with the two
   descriptors.  If it raises, the sockets are polled again and the legs
   are joined in Python.
3. Twisted lets go: each socket object is detached (``socket.detach``), so
   the relay alone owns and closes the descriptors; a TLS upstream's
   Twisted TLS layer is made inert (``relaytls.release``).  Each leg's
   transport is then replaced by a :class:`DetachedTransport` holding its
   peer (and the upstream's local address, taken before: the service asks
   it of live upstreams), so Twisted's transport and socket objects are
   freed; and a leg's ``close``/``abort`` become the pair's graceful close
   and abort.
   No attribute is added to any object that stays (see :func:`hand_off`):
   an idle relayed connection is mostly these objects, and a new instance
   attribute costs each one its shared attribute table.
4. The session's class gains :class:`Relayed`: its byte counters become
   what Python counted before the hand-off plus the relay's counts (read at
   the moment they are asked for: scrape, idle check, status page, the
   end), ``abort`` and ``close_downstream`` become ``close_pair``, and
   :meth:`Relayed.relay_ended` ends it with the flags the Python path
   would give (``DC``/``UC`` for a reset that was the first sign of the end).

Rejected: dup'ing the descriptors and leaving Twisted its own.  A close by
the relay would then not close the connection (the other descriptor keeps
it open) until the reactor closed its copy too.

The private names used (``dataBuffer``, ``offset``, ``_tempDataBuffer``,
``_tempDataLen``, ``_writeDisconnecting``, ``TLS``, ``socket``) are checked
once at start-up by :func:`problems`; when one is missing the relay is not
used (``relay.choose`` logs which).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.protocol import Protocol

from egressproxy.datapath import relaytls

#: The relay's reasons that the Python path would flag, and their flags.
RESET_FLAGS = {"reset_a": "DC", "reset_b": "UC"}

#: What the hand-off reads or sets on a TCP transport, and the type it expects.
_TRANSPORT_NAMES = (
    ("dataBuffer", bytes), ("offset", int), ("_tempDataBuffer", list), ("_tempDataLen", int),
    ("_writeDisconnecting", (bool, int)), ("connected", (bool, int)), ("disconnecting", (bool, int)),
    ("disconnected", (bool, int)), ("TLS", bool),
)


def problems(reactor: Any) -> list[str]:
    """What the hand-off needs of Twisted's TCP transports and is missing, one line each."""
    found = []
    for cls in ("Server", "Client"):
        if not isinstance(getattr(tcp, cls, None), type):
            found.append(f"twisted.internet.tcp.{cls}: missing")
    if found:
        return found
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            probe = tcp.Connection(sock, Protocol(), reactor)
        except Exception as e:
            return [f"twisted.internet.tcp.Connection(socket, protocol, reactor): fails: {e!r}"]
        for name, kind in _TRANSPORT_NAMES:
            if not isinstance(getattr(probe, name, None), kind):
                found.append(f"twisted.internet.tcp.Connection.{name}: missing, or not {_kind(kind)}")
        if not callable(getattr(getattr(probe, "socket", None), "detach", None)):
            found.append("twisted.internet.tcp.Connection.socket: missing (a socket.socket)")
        for method in ("stopReading", "stopWriting", "startReading", "startWriting", "getHost", "getPeer"):
            if not callable(getattr(probe, method, None)):
                found.append(f"twisted.internet.tcp.Connection.{method}: missing")
    finally:
        sock.close()
    return found


def _kind(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _qualifies(leg: Any, tls: bool = False) -> bool:
    """Whether the relay can take this leg's socket and keep the splice's rules (``tls``: a TLS leg may do)."""
    transport = leg.transport
    if type(transport) not in (tcp.Server, tcp.Client):
        return False
    if transport.TLS and not (tls and relaytls.qualifies(transport)):
        return False
    if leg.filter is not None or leg._preamble_eof is not None or leg.lost or leg.write_closed:
        return False
    if not transport.connected or transport.disconnecting or transport.disconnected:
        return False
    return not transport._writeDisconnecting and getattr(transport, "producer", None) is None


def _owed(transport: Any) -> bytes:
    """What Twisted still holds to write on ``transport``, in order."""
    buffered = transport.dataBuffer[transport.offset:] if transport.offset else transport.dataBuffer
    return bytes(buffered) + b"".join(transport._tempDataBuffer)


def hand_off(session: Any, relay: Any, tls: bool = False) -> bool:
    """Give a session's two legs to ``relay`` (a ``_relay.Relay``); False: join them in Python.

    ``tls``: the relay was given pyOpenSSL's OpenSSL (``relaytls.enable``),
    so an originated TLS upstream leg may go too.  See the module notes for
    when it declines and what it changes.
    """
    down, up = session.down, session.up
    if down is None or up is None or not (_qualifies(down) and _qualifies(up, tls)):
        return False
    down_t, up_t = down.transport, up.transport
    tls_b = None
    if up_t.TLS:
        tls_b = relaytls.take(up_t, down.pending)
        down.pending.clear()  # written through the TLS layer, either way
        down.pending_size = 0
        if tls_b is None:
            return False
    to_down = _owed(down_t) + b"".join(up.pending)
    to_up = _owed(up_t) + b"".join(down.pending)
    # The reactor stops polling both sockets before the relay has them: once
    # added, the relay may end the pair and close the descriptors at once (a
    # quick client, a reset), and a number closed while still registered
    # here could be reused by the next connection.
    for transport in (down_t, up_t):
        transport.stopReading()
        transport.stopWriting()
    try:
        # Asked later of live upstreams (the admin's own-upstream check), when
        # the socket is no longer Twisted's to ask; kept in a slot the session
        # already has, so its attribute table stays shared (memory per session).
        session.relayed_local = up_t.getHost()
        handle = relay.add(
            down_t.socket.fileno(), up_t.socket.fileno(), session,
            to_a=to_down, to_b=to_up, eof_a=down.read_closed, eof_b=up.read_closed, tls_b=tls_b,
        )
    except (OSError, ValueError, MemoryError):
        for leg, transport in ((down, down_t), (up, up_t)):  # Twisted keeps them: polled again
            if not leg.read_closed:
                transport.startReading()
            if transport.dataBuffer or transport._tempDataBuffer:
                transport.startWriting()
        return False
    if tls_b is not None:
        relaytls.release(up_t)  # first: from here on the SSL object is the relay thread's alone
    # The relay owns both descriptors from here on: Twisted lets go of them.
    # Only attributes the objects already have are set, and classes swapped
    # rather than methods stored per instance: a new instance attribute would
    # give each object its own attribute table, about 1 KiB per relayed
    # connection (an idle connection is mostly these objects).
    for leg, transport in ((down, down_t), (up, up_t)):
        leg.pending.clear()
        leg.pending_size = 0
        if transport.dataBuffer:  # else still the class's empty default: leave it so
            transport.dataBuffer = b""
        if transport.offset:
            transport.offset = 0
        transport._tempDataBuffer.clear()
        transport._tempDataLen = 0
        transport.socket.detach()
        RelayedLeg.become(leg)
        # Twisted's transport (and its socket object) would stay alive for
        # the connection's life doing nothing: a small stand-in answers the
        # few questions still asked, and the transport is freed.
        leg.transport = DetachedTransport(transport.getPeer(), session.relayed_local if leg is up else None)
    down.peer, up.peer = up, down
    if tls_b is not None:
        up.transport.relayed_tls = True
    Relayed.become(session, relay, handle)
    return True


class DetachedTransport:
    """A relayed leg's transport: its addresses and state, no socket (the relay has it).

    Asked after the hand-off: ``getPeer``/``getHost`` (status page, the
    admin's own-upstream check), ``connected``/``disconnecting``/
    ``disconnected`` (set by :meth:`Relayed.relay_ended`), ``TLS``.  Writes
    and closes never reach it: the leg's own closes go to the relay
    (:class:`RelayedLeg`) and nothing writes to a relayed leg.
    """

    __slots__ = ("_peer", "_host", "connected", "disconnecting", "disconnected", "relayed_tls")
    TLS = False
    producer = None

    def __init__(self, peer: Any, host: Any) -> None:
        self._peer = peer
        self._host = host
        self.connected = True
        self.disconnecting = False
        self.disconnected = False
        #: The relay carries this leg's TLS (an originated upstream), not Twisted.
        self.relayed_tls = False

    def getPeer(self) -> Any:
        return self._peer

    def getHost(self) -> Any:
        """The local address kept at the hand-off (the upstream's), else None."""
        return self._host

    def getHandle(self) -> None:
        return None

    def write(self, data: bytes) -> None:
        raise RuntimeError("a relayed leg is written by the relay only")

    def loseConnection(self) -> None:
        """Nothing to do: the relay closes the socket."""

    abortConnection = loseConnection
    pauseProducing = resumeProducing = stopProducing = loseConnection
    unregisterProducer = loseConnection


class RelayedLeg:
    """Mixed into a leg's class at the hand-off: its own closes go to the pair in the relay.

    A leg's ``close``/``abort`` would otherwise reach a transport that no
    longer has a socket.
    """

    _made: dict[type, type] = {}

    @classmethod
    def become(cls, leg: Any) -> None:
        base = type(leg)
        made = cls._made.get(base)
        if made is None:
            made = cls._made[base] = type(f"Relayed{base.__name__}", (cls, base), {"__doc__": base.__doc__})
        leg.__class__ = made

    def close(self) -> None:
        self.session.close_downstream()  # type: ignore[attr-defined]

    def abort(self) -> None:
        self.session.abort()  # type: ignore[attr-defined]


class Relayed:
    """Mixed into a session's class at the hand-off: counters and closes go through the relay.

    A mixin made into a subclass of the session's own class (:meth:`become`)
    rather than a subclass imported here: the session module is what hands
    off (through its listener's fast path), so it cannot be imported back.
    """

    _relay: Any
    #: The pair's handle in the relay; None once it has ended.
    _handle: int | None
    _base_received: int
    _base_sent: int

    #: Subclasses made so far, by the session class they extend.
    _made: dict[type, type] = {}

    @classmethod
    def become(cls, session: Any, relay: Any, handle: int) -> None:
        """Turn ``session`` into a relayed one, keeping what it counted so far."""
        base = type(session)
        made = cls._made.get(base)
        if made is None:
            made = cls._made[base] = type(f"Relayed{base.__name__}", (cls, base), {"__doc__": base.__doc__})
        # The plain counters stay in the instance's table, shadowed by the
        # properties below: removing them would unshare the table (see hand_off).
        received, sent = session.bytes_received, session.bytes_sent
        session.__class__ = made
        session._relay = relay
        session._handle = handle
        session._base_received = received
        session._base_sent = sent

    def _count(self, direction: int) -> int:
        handle = self._handle
        return 0 if handle is None else self._relay.counts(handle)[direction]

    @property
    def bytes_received(self) -> int:
        """Bytes from the client: counted in Python before the hand-off, then by the relay (a to b)."""
        return self._base_received + self._count(0)

    @bytes_received.setter
    def bytes_received(self, value: int) -> None:
        self._base_received = value - self._count(0)

    @property
    def bytes_sent(self) -> int:
        """Bytes to the client: counted in Python before the hand-off, then by the relay (b to a)."""
        return self._base_sent + self._count(1)

    @bytes_sent.setter
    def bytes_sent(self, value: int) -> None:
        self._base_sent = value - self._count(1)

    @property
    def relayed(self) -> bool:
        """Whether the relay still carries this session's bytes."""
        return self._handle is not None

    def abort(self) -> None:
        """Drop both connections now (RST), as ``abortConnection`` does on the Python path."""
        if self._handle is not None:
            self._relay.close_pair(self._handle, False)

    def close_downstream(self) -> None:
        """Flush and close both connections (the relay's linger bounds it)."""
        if self._handle is not None:
            self._relay.close_pair(self._handle, True)

    def relay_ended(self, a_to_b: int, b_to_a: int, reason: str) -> None:
        """The relay closed both sockets: count, flag, release the upstream and finish."""
        if self._handle is None:
            return
        self._handle = None
        self._base_received += a_to_b
        self._base_sent += b_to_a
        flag = RESET_FLAGS.get(reason)
        if flag is not None:
            self.flag(flag)  # type: ignore[attr-defined]
        for leg in (self.down, self.up):  # type: ignore[attr-defined]
            leg.lost = True
            transport = leg.transport
            transport.connected = False
            transport.disconnected = True
        self.cluster.released(self.upstream_address)  # type: ignore[attr-defined]
        self.finish()  # type: ignore[attr-defined]
