"""Shared helpers for unit tests: transports, config builders, fake upstreams."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet._resolver import HostResolution
from twisted.internet.interfaces import IHostnameResolver
from zope.interface import implementer

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger

from egressproxy.config import Address, ClusterConfig, Keepalive, ListenAddress, ListenerConfig
from egressproxy.datapath.listener import ListenerFactory, ListenerRuntime
from egressproxy.upstream.cluster import UpstreamCluster


@implementer(IHostnameResolver)
class LiteralResolver:
    """Resolves IP literals to themselves and every name to 127.0.0.1, at once.

    MemoryReactorClock's own resolver maps everything (literals too) to
    127.0.0.1, which would hide which endpoint or pinned address was dialled.
    """

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):  # type: ignore[no-untyped-def]
        try:
            ip = ipaddress.ip_address(hostName)
        except ValueError:
            ip = ipaddress.ip_address("127.0.0.1")
        resolution = HostResolution(hostName)
        receiver.resolutionBegan(resolution)
        kind = IPv6Address if ip.version == 6 else IPv4Address
        receiver.addressResolved(kind("TCP", str(ip), portNumber))
        receiver.resolutionComplete()
        return resolution


class HalfCloseTransport(StringTransport):
    """A StringTransport that also records ``loseWriteConnection``."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


def cluster_config(**overrides: Any) -> ClusterConfig:
    values: dict[str, Any] = dict(
        name="pg",
        endpoints=(Address("db.egress.test", 5432),),
        connect_timeout=5.0,
        max_connect_attempts=1,
        idle_timeout=None,
        max_connections=1024,
        max_pending=128,
        keepalive=Keepalive(),
    )
    values.update(overrides)
    return ClusterConfig(**values)


def listener_config(**overrides: Any) -> ListenerConfig:
    values: dict[str, Any] = dict(
        name="direct",
        listen=ListenAddress(text="127.0.0.1:0", host="127.0.0.1", port=0, dual_stack=False, description=None),
        mode="tcp",
        cluster="pg",
        log_prefix="DIRECT",
        allow_sources=None,
        max_connections=10000,
    )
    values.update(overrides)
    return ListenerConfig(**values)


class Harness:
    """A tcp-mode listener on a MemoryReactorClock, with its access events."""

    def __init__(self, cluster: ClusterConfig | None = None, listener: ListenerConfig | None = None,
                 pins: dict[str, str] | None = None) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.installNameResolver(LiteralResolver())
        self.events: list[dict] = []
        pins = pins or {}
        self.cluster = UpstreamCluster(cluster or cluster_config(), self.reactor, pins.get)
        self.listener = ListenerRuntime(
            listener or listener_config(), self.cluster, self.reactor, Logger(observer=self.events.append)
        )
        self.factory = ListenerFactory(self.listener)

    def connect_client(self, peer: IPv4Address | IPv6Address | None = None):  # type: ignore[no-untyped-def]
        """Accept a client; returns (client leg, its transport)."""
        peer = peer or IPv4Address("TCP", "127.0.0.1", 50000)
        protocol = self.factory.buildProtocol(peer)
        transport = HalfCloseTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        return protocol, transport

    def accept_upstream(self, peer: IPv4Address | IPv6Address | None = None):  # type: ignore[no-untyped-def]
        """Answer the newest dial the reactor recorded; returns (upstream leg, its transport).

        ``peer`` is what the upstream transport's ``getPeer()`` says (StringTransport's default if None).
        """
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
        wrapper = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = HalfCloseTransport(peerAddress=peer)
        wrapper.makeConnection(transport)
        transport.protocol = wrapper
        return wrapper._wrappedProtocol, transport

    def records(self) -> list[Any]:
        return [event["record"] for event in self.events if "record" in event]
