"""Unit tests of the address checks: the internal ranges, the policy, own sockets, and the guarded dial."""

from __future__ import annotations

from ipaddress import ip_address, ip_network
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IResolutionReceiver
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.upstream.addrguard import AddressPolicy, DialGuard, OwnSockets, is_local_address
from egressproxy.config import Address
from egressproxy.upstream.dial import UpstreamConnectFailed
from egressproxy.upstream.internal import internal_class
from egressproxy.upstream.cluster import UpstreamCluster
from tests.helpers import cluster_config


class InternalClassTests(SynchronousTestCase):
    def test_classes(self) -> None:
        """Each internal class is recognised and named; public addresses are not."""
        cases = {
            "127.0.0.1": "loopback", "::1": "loopback", "0.0.0.0": "unspecified", "::": "unspecified",
            "10.0.0.5": "private", "172.16.0.9": "private", "192.168.1.10": "private",
            "100.64.0.5": "shared (CGNAT)", "169.254.169.254": "link-local",
            "fe80::1": "link-local", "fd00::5": "unique-local", "fdaa:0:1::3": "unique-local",
            "224.0.0.1": "multicast", "ff02::1": "multicast", "255.255.255.255": "broadcast",
            "240.0.0.1": "reserved", "192.0.2.1": "documentation", "2001:db8::1": "documentation",
        }
        for text, label in cases.items():
            self.assertEqual(internal_class(ip_address(text)), label, text)
        for public in ("1.1.1.1", "8.8.8.8", "2606:4700:4700::1111", "2a09:8280:1::1"):
            self.assertIsNone(internal_class(ip_address(public)), public)

    def test_forms_carrying_ipv4_are_refused_whole(self) -> None:
        """IPv6 forms that carry an IPv4 address (NAT64, 6to4, Teredo, compatible) are refused as ranges."""
        for text in ("64:ff9b::a9fe:a9fe", "2002:0a00:0005::1", "::10.0.0.5", "2001:0:4136:e378::1"):
            self.assertIsNotNone(AddressPolicy().refusal(ip_address(text)), text)

    def test_mapped_is_judged_as_ipv4(self) -> None:
        """A mapped answer is judged by the IPv4 address it stands for: loopback stays loopback."""
        self.assertEqual(AddressPolicy().refusal(ip_address("::ffff:127.0.0.1")), "a loopback address")
        self.assertIsNone(AddressPolicy().refusal(ip_address("::ffff:1.1.1.1")))

    @given(st.integers(min_value=0, max_value=2**32 - 1))
    @settings(max_examples=300, deadline=None)
    def test_ipv4_agrees_with_mapped(self, value: int) -> None:
        """An IPv4 address and its mapped form get the same verdict."""
        v4 = ip_address(value)
        self.assertEqual(AddressPolicy().refusal(v4), AddressPolicy().refusal(ip_address(f"::ffff:{v4}")))


class PolicyTests(SynchronousTestCase):
    def test_default_refuses_internal(self) -> None:
        self.assertEqual(AddressPolicy().refusal(ip_address("10.1.2.3")), "a private address")
        self.assertIsNone(AddressPolicy().refusal(ip_address("1.1.1.1")))

    def test_allow_is_an_exception(self) -> None:
        """allow_addresses lets exactly its ranges through."""
        policy = AddressPolicy(allow=(ip_network("10.0.0.7/32"),))
        self.assertIsNone(policy.refusal(ip_address("10.0.0.7")))
        self.assertIsNotNone(policy.refusal(ip_address("10.0.0.5")))

    def test_deny_wins(self) -> None:
        """deny_addresses refuses more, and wins over allow_addresses."""
        policy = AddressPolicy(allow=(ip_network("10.0.0.0/8"),), deny=(ip_network("1.1.1.0/24"), ip_network("10.9.0.0/16")))
        self.assertEqual(policy.refusal(ip_address("1.1.1.1")), "an address this listener denies")
        self.assertEqual(policy.refusal(ip_address("10.9.1.1")), "an address this listener denies")
        self.assertIsNone(policy.refusal(ip_address("10.8.1.1")))

    def test_mapped_peer_matches_ipv4_lists(self) -> None:
        """An IPv4-mapped address is matched against IPv4 allow/deny entries."""
        policy = AddressPolicy(allow=(ip_network("10.0.0.7/32"),))
        self.assertIsNone(policy.refusal(ip_address("::ffff:10.0.0.7")))


class OwnSocketsTests(SynchronousTestCase):
    def test_specific_bind(self) -> None:
        own = OwnSockets(lambda: [("127.0.0.1", 9901)])
        self.assertTrue(own.includes(ip_address("127.0.0.1"), 9901))
        self.assertTrue(own.includes(ip_address("::ffff:127.0.0.1"), 9901))
        self.assertFalse(own.includes(ip_address("127.0.0.2"), 9901))
        # Connecting to 0.0.0.0 or :: reaches this machine (Linux): always the proxy's own port.
        self.assertTrue(own.includes(ip_address("0.0.0.0"), 9901))
        self.assertTrue(own.includes(ip_address("::"), 9901))
        self.assertFalse(own.includes(ip_address("127.0.0.1"), 9902))

    def test_wildcard_bind_is_every_local_address(self) -> None:
        """[::]:5432 is reached at any loopback address and any address of this machine, on that port."""
        own = OwnSockets(lambda: [("::", 5432)])
        for text in ("127.0.0.1", "127.8.9.10", "::1", "0.0.0.0"):
            self.assertTrue(own.includes(ip_address(text), 5432), text)
        self.assertFalse(own.includes(ip_address("127.0.0.1"), 5433))
        self.assertFalse(own.includes(ip_address("192.0.2.1"), 5432))  # not an address of this machine

    def test_is_local_address(self) -> None:
        self.assertTrue(is_local_address(ip_address("127.0.0.1")))
        self.assertFalse(is_local_address(ip_address("192.0.2.1")))

    def test_guard_refuses_own_even_when_allowed(self) -> None:
        """The proxy's own sockets are refused whatever allow_addresses says, and with no policy at all."""
        own = OwnSockets(lambda: [("127.0.0.1", 9901)])
        allowing = AddressPolicy(allow=(ip_network("127.0.0.0/8"),))
        for policy in (allowing, None):
            refused = DialGuard(policy, own).check(ip_address("127.0.0.1"), 9901)
            assert refused is not None
            self.assertEqual(refused.reason, "own_address")

    def test_filter_keeps_passing_answers_in_order(self) -> None:
        guard = DialGuard(AddressPolicy())
        ips = [ip_address(t) for t in ("10.0.0.5", "1.1.1.1", "fd00::5", "2606:4700::1", "1.1.1.1")]
        passed, refused = guard.filter(ips, 443)
        self.assertEqual([str(ip) for ip in passed], ["1.1.1.1", "2606:4700::1"])
        assert refused is not None
        self.assertEqual(refused.what, "resolves to a private address")

    def test_report_mode_passes_and_remembers(self) -> None:
        guard = DialGuard(AddressPolicy(report=True))
        passed, refused = guard.filter([ip_address("169.254.169.254")], 80)
        self.assertEqual((len(passed), refused), (1, None))
        assert guard.reported is not None
        self.assertEqual(guard.reported.reason, "internal_address")


class ZoneResolver:
    """A resolver with a fixed zone: name -> addresses (answered at once); unknown names get nothing."""

    def __init__(self, zone: dict[str, list[str]]) -> None:
        self.zone = zone
        self.asked: list[str] = []

    def resolveHostName(self, receiver: IResolutionReceiver, hostName: str, portNumber: int = 0,  # type: ignore[no-untyped-def]
                        addressTypes=None, transportSemantics="TCP"):
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        for text in self.zone.get(hostName, []):
            kind = IPv6Address if ":" in text else IPv4Address
            receiver.addressResolved(kind("TCP", text, portNumber))
        receiver.resolutionComplete()


class GuardedDialTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = ZoneResolver({
            "meta.partner.example": ["169.254.169.254"],
            "mixed.partner.example": ["10.0.0.5", "1.1.1.1"],
            "ok.partner.example": ["10.0.0.7"],
        })
        self.reactor.installNameResolver(self.resolver)
        self.pins: dict[str, str] = {"pinned.partner.example": "10.0.0.5"}
        self.cluster = UpstreamCluster(cluster_config(endpoints=()), self.reactor, self.pins.get)

    def dial(self, host: str, port: int = 443, policy: AddressPolicy | None = AddressPolicy()) -> tuple[Any, list[Failure]]:
        failures: list[Failure] = []
        attempt = self.cluster.dial(Protocol(), lambda address: None, [Address(host, port)], policy)
        assert attempt is not None
        attempt.deferred.addErrback(failures.append)
        return attempt, failures

    def test_internal_name_never_dialled(self) -> None:
        """A name whose only answer is internal fails with flag IA; nothing is connected; no retry."""
        _, failures = self.dial("meta.partner.example")
        self.assertEqual(self.reactor.tcpClients, [])
        [failure] = failures
        error = failure.value
        assert isinstance(error, UpstreamConnectFailed)
        self.assertEqual((error.flag, error.reason, error.detail), ("IA", "internal_address", "resolves to a link-local address"))
        self.assertEqual(self.resolver.asked, ["meta.partner.example"])
        self.assertEqual(self.cluster.breaker.pending, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_only_passing_answers_dialled(self) -> None:
        """Of a mixed answer, only the public address is connected to, by address (no second lookup)."""
        self.dial("mixed.partner.example")
        self.assertEqual([c[:2] for c in self.reactor.tcpClients], [("1.1.1.1", 443)])
        self.assertEqual(self.resolver.asked, ["mixed.partner.example"])

    def test_allow_addresses(self) -> None:
        self.dial("ok.partner.example", policy=AddressPolicy(allow=(ip_network("10.0.0.7/32"),)))
        self.assertEqual([c[:2] for c in self.reactor.tcpClients], [("10.0.0.7", 443)])

    def test_pin_is_honoured(self) -> None:
        """A hosts: pin is the operator's choice: dialled without the internal check."""
        self.dial("pinned.partner.example")
        self.assertEqual([c[:2] for c in self.reactor.tcpClients], [("10.0.0.5", 443)])
        self.assertEqual(self.resolver.asked, [])

    def test_literal_checked(self) -> None:
        _, failures = self.dial("192.168.1.10")
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(failures[0].value.flag, "IA")

    def test_unguarded_dial_is_not_resolved_here(self) -> None:
        """Operator-configured endpoints (no policy) go through HostnameEndpoint as before."""
        self.dial("10.0.0.5", policy=None)
        self.assertEqual([c[:2] for c in self.reactor.tcpClients], [("10.0.0.5", 443)])

    def test_report_mode_dials_and_remembers(self) -> None:
        attempt, failures = self.dial("meta.partner.example", policy=AddressPolicy(report=True))
        self.assertEqual([c[:2] for c in self.reactor.tcpClients], [("169.254.169.254", 443)])
        self.assertEqual(attempt.reported.reason, "internal_address")
        attempt.cancel()

    def test_own_socket_refused_before_connecting(self) -> None:
        self.cluster.own = OwnSockets(lambda: [("0.0.0.0", 9091)])
        _, failures = self.dial("127.0.0.1", 9091, policy=None)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual((failures[0].value.flag, failures[0].value.reason), ("IA", "own_address"))

    def test_own_socket_refused_after_resolution_by_hostname_endpoint(self) -> None:
        """An operator's name that resolves to the proxy itself is refused when it connects, before any byte."""
        self.cluster.own = OwnSockets(lambda: [("127.0.0.1", 5432)])
        self.reactor.installNameResolver(ZoneResolver({"db.loop.example": ["127.0.0.1"]}))
        protocol = Protocol()
        attempt = self.cluster.dial(protocol, lambda address: None, [Address("db.loop.example", 5432)])
        failures: list[Failure] = []
        attempt.deferred.addErrback(failures.append)
        self.reactor.advance(0)
        host, port, factory, _, _ = self.reactor.tcpClients[0]
        built = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5432))
        self.assertIsNone(built)
        # Twisted answers a factory's None with NoProtocol and closes the socket.
        factory.clientConnectionFailed(self.reactor.connectors[0], Failure(Exception("closed")))
        self.reactor.advance(1)
        self.assertEqual(len(failures), 1, failures)
        self.assertEqual((failures[0].value.flag, failures[0].value.reason), ("IA", "own_address"))
