"""``mode: tcp``: every accepted connection is spliced to the listener's cluster.

The proxy reads nothing of the stream: TLS, Postgres or anything else passes
through byte for byte, which is what the Envoy TCP proxy it replaces does.
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory

from egressproxy.listener import ListenerRuntime
from egressproxy.session import Session
from egressproxy.splice import DownstreamLeg


class TcpProxyFactory(Factory):
    """Builds one session and its client leg per accepted connection."""

    noisy = False

    def __init__(self, listener: ListenerRuntime) -> None:
        self.listener = listener

    def buildProtocol(self, addr: IAddress) -> DownstreamLeg:
        return DownstreamLeg(Session(self.listener, addr))
