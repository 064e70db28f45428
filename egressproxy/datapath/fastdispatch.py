"""A shorter way from epoll to a spliced socket's read.

Twisted's epoll reactor hands every event to ``log.callWithLogger``, which
asks the selectable for its log prefix and pushes a fresh logging context (a
dict copy, a push and a pop) around ``_doReadOrWrite``, which then checks the
descriptor, decodes the event mask and calls ``doRead``.  For a proxy that
is most of the Python run per relayed message: measured with pgbench at 32
clients, this module and :mod:`egressproxy.datapath.fastread` together took the
proxy's CPU per transaction from about 23 to 18 microseconds (see the
README's Performance section).

:func:`install` replaces the reactor's poll step with one that does what
Twisted's does, except for one case: an event that is exactly "readable"
(no hang-up, no error, no writability) on a selectable that carries a
:data:`~egressproxy.datapath.fastread.ATTRIBUTE` reader, which only spliced plain-TCP
transports do.  That reader is called directly; what it returns, or raises,
is handled as ``_doReadOrWrite`` handles it (``_disconnectSelectable`` with
the read flag; an exception is logged and disconnects).  Every other event,
and every other selectable (listening ports, the waker, TLS, connections not
yet spliced), takes Twisted's path unchanged, except the data path's own
descriptors that carry a :data:`DIRECT` method (the relay's notification
descriptor, a quick-lane dial; ``quicklane.py``): any event on those calls
it directly.

The poll step uses private parts of ``EPollReactor`` (``_poller``,
``_selectables``, ``_doReadOrWrite``, ``_disconnectSelectable``,
``_POLL_IN``).  :class:`egressproxy.datapath.fastpath.FastPath` checks each of them
(and that the reactor's poll step is Twisted's own ``doPoll``) before it
calls :func:`install`, and calls :func:`uninstall` to give the reactor its
own step back; nothing else should call either.  Installs are counted per
reactor, so two services sharing one reactor (tests) share the shortcut and
the last one out removes it.  For anything it does not shortcut, the
installed step is Twisted's code.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.python import log

from egressproxy.datapath.fastread import ATTRIBUTE

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # not Linux
    EPollReactor = None  # type: ignore[assignment,misc]

#: A method of the data path's own descriptors (the relay's notifications, a
#: quick-lane dial) that handles any event on them and never disconnects:
#: called directly, without Twisted's logging context.
DIRECT = "egress_event"

#: On a reactor whose poll step is ours: how many installs it has.
MARK = "_egress_fast_dispatch"


def install(reactor: Any) -> None:
    """Shortcut spliced reads on ``reactor`` (checked by FastPath first)."""
    count = getattr(reactor, MARK, 0)
    setattr(reactor, MARK, count + 1)
    if count:
        return
    poller = reactor._poller
    selectables = reactor._selectables
    lookup = selectables.get
    handle = reactor._doReadOrWrite
    disconnect = reactor._disconnectSelectable
    readable = reactor._POLL_IN
    call_with_logger = log.callWithLogger

    def do_poll(timeout: float | None) -> None:
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            events = poller.poll(timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        for fd, event in events:
            selectable = lookup(fd)
            if selectable is None:
                continue
            if event == readable:
                read = getattr(selectable, ATTRIBUTE, None)
                if read is not None:
                    try:
                        why = read()
                    except BaseException as e:  # as _doReadOrWrite: log, then disconnect
                        why = e
                        log.err()
                    if why:
                        call_with_logger(selectable, disconnect, selectable, why, True)
                    continue
            direct = getattr(selectable, DIRECT, None)
            if direct is not None:
                try:
                    direct()
                except BaseException:
                    log.err()
                continue
            call_with_logger(selectable, handle, selectable, fd, event)

    reactor.doIteration = do_poll


def uninstall(reactor: Any) -> None:
    """Undo one :func:`install`; the last one gives the reactor Twisted's poll step back."""
    count = getattr(reactor, MARK, 0)
    if count > 1:
        setattr(reactor, MARK, count - 1)
        return
    if count:
        delattr(reactor, MARK)
        vars(reactor).pop("doIteration", None)  # the class's own (EPollReactor.doPoll) again
