"""The data path: two TCP legs joined so that bytes, pressure and EOF cross.

Design notes (read before changing anything here)
-------------------------------------------------

A *splice* joins a downstream leg (the client's connection, accepted by a
listener) with an upstream leg (our connection to the cluster).  Each leg is a
``Protocol`` whose ``dataReceived`` counts the chunk on the session and writes
it to the other leg's transport.  That is all the per-chunk work there is: one
integer addition and one ``write``.  No logging, no metric call, no timer
reset, no allocation of our own (the idle timer compares byte counters on its
own schedule instead of being reset per chunk).

Invariants:

1. **Backpressure.**  Each transport is registered as the other's streaming
   producer: when the client stops reading and our write buffer towards it
   passes Twisted's high-water mark (64 KiB), the upstream transport is paused,
   so the kernel's receive window pushes back on the upstream.  What the proxy
   holds per connection and direction is bounded by that buffer plus one read
   (64 KiB before the splice, ``fastread.READ_SIZE`` after it on the fast
   path, note 8).

2. **Half-close.**  Both legs provide ``IHalfCloseableProtocol``.  When leg A
   reads EOF, A will produce nothing more, so it is unregistered as B's
   producer and B's write side is shut (``loseWriteConnection``: FIN after the
   buffered bytes).  B keeps reading, and its replies still reach A.  Once both
   legs have read EOF there is nothing left to carry and both are closed.

3. **Order of closing.**  A transport's producer is unregistered before
   ``loseConnection()``: with a paused producer still registered, Twisted waits
   for it forever and the leg stays "disconnecting".

4. **Full loss.**  When either leg is lost (reset, or closed after both EOFs),
   the other is closed gracefully (its buffered bytes still flush), and if it
   has not gone within ``LINGER`` seconds it is aborted, so a peer that never
   reads cannot pin a session forever.

5. **Before the upstream exists.**  The client leg is paused while the
   upstream connects, so the kernel holds what the client sends; anything
   delivered anyway (a mode's handshake leftovers) is kept, up to
   ``PENDING_LIMIT`` bytes, and written upstream first.  An EOF seen before
   the upstream exists is replayed as a write-side shutdown right after.

6. **A preamble before admission.**  A listener with ``proxy_protocol``
   must read the client's PROXY header before it knows who the client is, so
   before the session admits it or dials.  Its client leg is therefore *not*
   paused at first: ``read_preamble`` points ``forward`` at the session's
   header reader (bounded by the header's size cap and a timeout) and routes
   an EOF there; ``end_preamble`` goes back to holding, starting with the
   bytes that followed the header, and the rules above apply from then on.
   Other listeners never call it, so their per-chunk path is unchanged.
   Rejected: a wrapping protocol that strips the header (Twisted's
   ``HAProxyWrappingFactory``); it stays in the path of every later chunk.

7. **Splice filters.**  A mode that must still look at one leg's bytes
   after the splice (plain ``http://`` in ``http_connect``: forward the
   request body up to its end, drop what follows) registers a *splice
   filter* on that leg with :meth:`Leg.set_filter`: a callable given each
   chunk the leg reads, returning the bytes to forward (``b""`` for none).
   It sees every chunk from the moment it is set, the bytes held before the
   splice included, and nothing else about the splice changes: the leg's
   byte counter still counts what was read (before the filter), and EOF,
   pressure and closing follow the rules above.  A leg without a filter
   forwards through the bare ``write`` (no per-chunk test for a filter: the
   filter's wrapper is put in place of the write only when one is set), so
   filters cost the other legs nothing.

8. **The fast path.**  Once joined, each leg forwards through
   ``FastPath.writer`` (a direct send when nothing is queued) and each
   transport reads through ``FastPath.reader`` (straight into the leg); see
   :mod:`egressproxy.datapath.fastpath`.  When the fast path is off (``fast_path:
   off``) or a Twisted name it needs is missing, these are
   ``transport.write`` and Twisted's own ``doRead`` -> ``dataReceived``, and
   every rule above holds the same way.  A splice made outside a service
   (unit tests) uses :data:`~egressproxy.datapath.fastpath.ORDINARY`.

9. **The compiled relay.**  With ``fast_path: auto`` (the default), a
   session hands its two legs to the compiled relay instead of calling
   :func:`join` when both are plain TCP and neither has a filter or an
   unfinished preamble (:mod:`egressproxy.datapath.relayjoin`).  The relay
   keeps rules 1 to 5 in C, on its own thread (its buffer bound is one
   64 KiB read per direction); the legs stay the session's, but Twisted no
   longer reads or writes their sockets.

Rejected alternative: resetting a ``TimeoutMixin`` timer per chunk for the
idle timeout.  It costs a ``DelayedCall.reset`` on every read; comparing the
byte counters every quarter of the timeout costs nothing per chunk and fires
between 1x and 1.25x the configured idle time.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, ISSLTransport, ITransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from egressproxy.datapath.fastpath import ORDINARY, FastPath
from egressproxy.datapath.sockopts import tune_tcp

#: A leg's session (``session.Session``), not imported: the session imports this module.
Session = Any

#: How long a leg may take to flush and close once its partner is gone.
LINGER = 30.0

#: Bytes a client may deliver before its upstream is connected (the client
#: leg is paused meanwhile, so this is only ever one read's worth).
PENDING_LIMIT = 256 * 1024

#: A splice filter (note 7): given a chunk one leg read, the bytes to forward (``b""``: none).
SpliceFilter = Callable[[bytes], bytes]


def unregister_producer(transport: ITransport) -> None:
    """Unregister a transport's producer, if it has one."""
    if getattr(transport, "producer", None) is not None:
        transport.unregisterProducer()  # type: ignore[attr-defined]


def shut_write(transport: ITransport) -> None:
    """Half-close: FIN after the buffered bytes (its producer already unregistered).

    A TLS transport (Postgres origination, ``client_tls``) is closed with a
    TLS close_notify instead, which still lets the peer's last bytes in: a
    bare FIN under TLS leaves Twisted's TLS layer to crash when the peer's
    close_notify arrives (its shutdown then runs ``connectionLost`` re-entrantly).
    """
    if ISSLTransport.providedBy(transport):
        transport.loseConnection()
    else:
        transport.loseWriteConnection()  # type: ignore[attr-defined]


@implementer(IHalfCloseableProtocol)
class Leg(Protocol):
    """One side of a splice; see the module notes for the rules it follows."""

    #: The leg at the other end, once both exist.
    peer: Leg | None = None
    #: This leg has read EOF: it will deliver no more bytes.
    read_closed = False
    #: Our FIN went out on this leg: we will write no more bytes.
    write_closed = False
    #: This leg's connection is gone.
    lost = False
    #: While a preamble is read (note 6): told of an EOF instead of the peer.
    _preamble_eof: Callable[[], None] | None = None
    #: This leg's splice filter (note 7); None: chunks are forwarded untouched.
    filter: SpliceFilter | None = None
    #: Once joined: the write that forwards to the other leg (direct or ``transport.write``).
    _write: Callable[[bytes], None] | None = None

    def __init__(self, session: Session) -> None:
        self.session = session
        self.pending: list[bytes] = []
        self.pending_size = 0
        # Until the splice exists, chunks are held; afterwards this is the
        # other leg's transport's bound ``write``.
        self.forward: Callable[[bytes], None] = self._hold

    def _hold(self, data: bytes) -> None:
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > PENDING_LIMIT:
            self.session.refuse_overlong_preamble()

    def read_preamble(self, reader: Callable[[bytes], None], eof: Callable[[], None]) -> None:
        """Give chunks to ``reader`` and an EOF to ``eof`` until ``end_preamble`` (note 6)."""
        self.forward = reader
        self._preamble_eof = eof

    def end_preamble(self, rest: bytes) -> None:
        """The preamble is complete: hold ``rest`` and later chunks for the splice."""
        self._preamble_eof = None
        self.forward = self._hold
        if rest:
            self._hold(rest)

    def set_filter(self, filter: SpliceFilter | None) -> None:
        """Pass this leg's chunks through ``filter`` from now on (note 7); None: untouched again."""
        self.filter = filter
        if self._write is not None:
            self.forward = self._write if filter is None else self._filtered

    def _filtered(self, data: bytes) -> None:
        """``forward`` while a splice filter is set."""
        out = self.filter(data)  # type: ignore[misc]
        if out:
            self._write(out)  # type: ignore[misc]

    def readConnectionLost(self) -> None:
        """EOF from this leg's peer socket: pass it on as a write-side shutdown."""
        self.read_closed = True
        if self._preamble_eof is not None:
            self._preamble_eof()
            return
        peer = self.peer
        if peer is None or peer.lost:
            return
        unregister_producer(peer.transport)
        if peer.read_closed:
            # Both directions have ended: nothing more can flow.
            self.close()
            peer.close()
        else:
            shut_write(peer.transport)

    def writeConnectionLost(self) -> None:
        """Our FIN went out; bookkeeping only (TCP calls this after loseWriteConnection)."""
        self.write_closed = True

    def close(self) -> None:
        """Flush and close this leg, in the order that cannot hang (note 3)."""
        if self.lost:
            return
        unregister_producer(self.transport)
        self.transport.loseConnection()

    def abort(self) -> None:
        """Drop this leg now, discarding buffered bytes (forced closes only)."""
        if not self.lost:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:  # type: ignore[assignment]
        if self.lost:
            return
        self.lost = True
        self.session.leg_lost(self, reason)


class DownstreamLeg(Leg):
    """The client's connection: counts bytes received from downstream."""

    def connectionMade(self) -> None:
        self.session.downstream_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.session.bytes_received += len(data)
        self.forward(data)


class UpstreamLeg(Leg):
    """Our connection to the cluster: counts bytes sent to downstream."""

    def connectionMade(self) -> None:
        tune_tcp(self.transport, self.session.keepalive)

    def dataReceived(self, data: bytes) -> None:
        self.session.bytes_sent += len(data)
        self.forward(data)


def join(down: DownstreamLeg, up: UpstreamLeg, fast_path: FastPath = ORDINARY) -> None:
    """Splice two connected legs: producers, pending bytes, early EOF, then resume.

    Called once the upstream is connected.  The client leg was paused while
    the upstream connected; it is resumed here, after everything it already
    delivered has been written upstream in order.  ``fast_path`` hands out
    the writes and reads (note 8).
    """
    down.peer, up.peer = up, down
    down_transport, up_transport = down.transport, up.transport
    down_transport.registerProducer(up_transport, True)
    up_transport.registerProducer(down_transport, True)
    for leg, transport in ((down, up_transport), (up, down_transport)):
        for chunk in leg.pending:
            transport.write(chunk if leg.filter is None else leg.filter(chunk))
        leg.pending = []
        leg.pending_size = 0
        leg._write = fast_path.writer(transport)
        leg.forward = leg._write if leg.filter is None else leg._filtered
    # From here on each chunk's route is fixed: let the transports hand
    # what they read straight to their legs.
    fast_path.reader(down_transport, down, down.dataReceived)
    fast_path.reader(up_transport, up, up.dataReceived)
    if down.read_closed:
        # The client already sent EOF: it reads no more input from us
        # beyond what the upstream replies, so shut upstream's write side.
        up_transport.unregisterProducer()
        shut_write(up_transport)
    else:
        down_transport.resumeProducing()
