"""Reading a spliced socket straight into its leg, past Twisted's read chain.

When epoll reports a TCP socket readable, Twisted's path to our code is
``Connection.doRead`` -> ``_dataReceived`` -> ``protocol.dataReceived``, and
for an upstream connection one more hop through the endpoint's
``_WrappingProtocol``.  Each hop is a Python call that only passes the chunk
along.  Once two legs are spliced nothing can change along that chain any
more (TLS, where it is used, has been started by then), so :func:`direct_reader`
gives the transport a ``doRead`` that does the same work in one frame: read,
then hand the chunk to the leg.  It also reads more at a time (see
:data:`READ_SIZE`).

It behaves as ``Connection.doRead`` does in every outcome: a chunk goes to the
leg; ``EWOULDBLOCK`` is nothing; any other error reports ``CONNECTION_LOST``;
an empty read reports ``CONNECTION_DONE``, which the reactor turns into a
half-close or a close exactly as before.  Pausing still works, because a
paused transport is not polled for reading at all.

The same function is also published as the transport's ``egress_read``
attribute, which is what :mod:`egressproxy.datapath.fastdispatch` looks for to skip the
reactor's per-event logging context as well.

Only plain TCP transports whose protocol is the leg (directly or through the
endpoint's wrapper) qualify; a TLS transport, or a protocol we do not know
in between, keeps Twisted's own path.

The private names this relies on (``tcp.Connection.doRead`` settable per
connection, ``TLS``, ``socket``, ``main.CONNECTION_DONE``/``LOST``,
``endpoints._WrappingProtocol._wrappedProtocol``) are checked once, at
start-up, by :class:`egressproxy.datapath.fastpath.FastPath`, which is what calls
:func:`direct_reader`, passing the wrapper class it found.
"""

from __future__ import annotations

from errno import EWOULDBLOCK
from typing import Callable

from twisted.internet import main, tcp
from twisted.internet.interfaces import IProtocol, ITransport

#: Bytes asked for per read once spliced.  Twisted reads 64 KiB at a time;
#: four times that roughly halves the reads and sends per megabyte of bulk
#: traffic (iperf3 through the proxy: 9.7 -> 14.3 Gbit/s with 20% less CPU;
#: 128 KiB gave 11.2, 1 MiB 14.2) and costs small messages nothing, since
#: the unused part of a read is never kept.  A read is transient: what the
#: proxy holds per direction stays bounded by the peer's write buffer
#: (Twisted pauses the reader past 64 KiB) plus one read.
READ_SIZE = 256 * 1024

#: The attribute the dispatch shortcut calls instead of ``doRead``.
ATTRIBUTE = "egress_read"

def _delivers_to(transport: tcp.Connection, protocol: IProtocol, wrapper: type | None) -> bool:
    """Whether chunks read by ``transport`` reach ``protocol`` and nothing else."""
    current = transport.protocol
    if current is protocol:
        return True
    return wrapper is not None and type(current) is wrapper and current._wrappedProtocol is protocol  # type: ignore[attr-defined]


def direct_reader(
    transport: ITransport, protocol: IProtocol, deliver: Callable[[bytes], None], wrapper: type | None = None
) -> bool:
    """Make ``transport`` hand what it reads to ``deliver``; False if it does not qualify.

    ``deliver`` must do what ``protocol.dataReceived`` does (normally it is
    that very method).  ``wrapper``: the client endpoints' wrapper protocol
    class (``endpoints._WrappingProtocol``, as FastPath checked it), through
    which an upstream transport reaches its leg; None: only transports whose
    protocol is the leg itself qualify.
    """
    if type(transport) not in (tcp.Server, tcp.Client) or transport.TLS:  # type: ignore[attr-defined]
        return False
    if not _delivers_to(transport, protocol, wrapper):  # type: ignore[arg-type]
        return False
    recv = transport.socket.recv  # type: ignore[attr-defined]
    size = READ_SIZE
    done = main.CONNECTION_DONE
    lost = main.CONNECTION_LOST

    def read() -> object:
        try:
            data = recv(size)
        except OSError as e:
            return None if e.args[0] == EWOULDBLOCK else lost
        if data:
            deliver(data)
            return None
        return done

    transport.doRead = read  # type: ignore[attr-defined]
    setattr(transport, ATTRIBUTE, read)
    return True
