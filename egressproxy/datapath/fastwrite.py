"""Writing a spliced chunk straight to the socket when nothing is queued.

Twisted's ``transport.write`` never sends at once: it appends the chunk to
a buffer and registers the socket for writability; on the next reactor turn
``doWrite`` sends it and unregisters.  For a proxy, where every chunk is a
request or reply someone waits for, that costs two ``epoll_ctl`` calls and
one reactor turn per message: measurable latency, and CPU under many
clients (see the README's Performance section).

:func:`direct_writer` returns a ``write`` for one transport that sends
immediately when the transport has nothing buffered, and hands whatever the
kernel did not take (or everything, on any error) to ``transport.write``.
So ordering holds (a direct send only happens with an empty buffer), flow
control holds (a partial send buffers the rest through Twisted, which
pauses the producer past its high-water mark), and errors are found by
Twisted's own write path, which closes the connection as usual.

Only plain TCP transports qualify; TLS transports (Postgres origination)
and anything else keep ``transport.write``.  The private names it reads
(``dataBuffer``, ``_tempDataLen``, ``connected``, ``disconnecting``,
``socket``) are checked once, at start-up, by
:class:`egressproxy.datapath.fastpath.FastPath`, which is what calls
:func:`direct_writer`.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import tcp
from twisted.internet.interfaces import ITransport


def direct_writer(transport: ITransport) -> Callable[[bytes], None]:
    """A ``write`` for ``transport`` that sends at once when nothing is queued."""
    if not isinstance(transport, tcp.Connection) or transport.TLS:
        return transport.write
    send = transport.socket.send
    write = transport.write

    def write_now(data: bytes) -> None:
        # Anything buffered, or a close under way: keep Twisted's order.
        if transport.dataBuffer or transport._tempDataLen or transport.disconnecting or not transport.connected:
            write(data)
            return
        try:
            sent = send(data)
        except OSError:
            # Would block, or a broken connection: Twisted's path handles both.
            write(data)
            return
        if sent < len(data):
            write(data[sent:])

    return write_now
