"""Tests for egressproxy.addresses: peer IPs, how peers are shown, allow_sources."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from twisted.internet.address import HostnameAddress, IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.addresses import format_peer, peer_ip, source_allowed


class PeerIpTests(SynchronousTestCase):
    """peer_ip: the IP a policy or log should see."""

    def test_ipv4(self) -> None:
        """An IPv4 peer gives its IPv4 address."""
        self.assertEqual(peer_ip(IPv4Address("TCP", "10.1.2.3", 5000)), ip_address("10.1.2.3"))

    def test_ipv6(self) -> None:
        """An IPv6 peer gives its IPv6 address."""
        self.assertEqual(peer_ip(IPv6Address("TCP", "fdaa:0:1::3", 5000)), ip_address("fdaa:0:1::3"))

    def test_unmaps_ipv4_mapped(self) -> None:
        """An IPv4-mapped IPv6 peer, as a dual-stack socket reports it, gives the IPv4 address."""
        ip = peer_ip(IPv6Address("TCP", "::ffff:127.0.0.1", 5000))
        self.assertEqual((ip, ip.version if ip else None), (ip_address("127.0.0.1"), 4))

    def test_drops_zone_index(self) -> None:
        """A zone index such as %eth0 is dropped from a link-local peer."""
        ip = peer_ip(IPv6Address("TCP", "fe80::1%eth0", 5000))
        self.assertEqual((ip, str(ip)), (ip_address("fe80::1"), "fe80::1"))

    def test_unix_peer_is_none(self) -> None:
        """A unix-socket peer has no IP."""
        self.assertIsNone(peer_ip(UNIXAddress("/run/egress.sock")))

    def test_hostname_address_is_none(self) -> None:
        """An address that is not an IPv4 or IPv6 address has no IP."""
        self.assertIsNone(peer_ip(HostnameAddress(b"db.example.test", 5432)))

    def test_unparseable_host_is_none(self) -> None:
        """An IPv4Address whose host is not an IP literal has no IP."""
        self.assertIsNone(peer_ip(IPv4Address("TCP", "localhost", 5000)))


class FormatPeerTests(SynchronousTestCase):
    """format_peer: the downstream field of the access log."""

    def test_ipv4(self) -> None:
        """An IPv4 peer shows as ip:port."""
        self.assertEqual(format_peer(IPv4Address("TCP", "10.1.2.3", 5000)), "10.1.2.3:5000")

    def test_ipv6(self) -> None:
        """An IPv6 peer shows in brackets, then :port."""
        self.assertEqual(format_peer(IPv6Address("TCP", "fdaa:0:1::3", 63276)), "[fdaa:0:1::3]:63276")

    def test_ipv6_compressed(self) -> None:
        """An IPv6 peer is shown in its compressed form."""
        self.assertEqual(format_peer(IPv6Address("TCP", "fdaa:0:1:0:0:0:0:3", 1)), "[fdaa:0:1::3]:1")

    def test_mapped_shows_as_ipv4(self) -> None:
        """An IPv4-mapped IPv6 peer shows as plain ip:port without brackets."""
        self.assertEqual(format_peer(IPv6Address("TCP", "::ffff:127.0.0.1", 5000)), "127.0.0.1:5000")

    def test_unix_path(self) -> None:
        """A unix-socket peer with a path shows the path."""
        self.assertEqual(format_peer(UNIXAddress("/run/egress.sock")), "/run/egress.sock")

    def test_unix_bytes_path(self) -> None:
        """A unix-socket path given as bytes shows decoded."""
        self.assertEqual(format_peer(UNIXAddress(b"/run/egress.sock")), "/run/egress.sock")

    def test_unnamed_unix_peer(self) -> None:
        """An unnamed unix-socket peer shows as "unix"."""
        self.assertEqual(format_peer(UNIXAddress(None)), "unix")

    def test_other_address(self) -> None:
        """Any other kind of address shows as "-"."""
        self.assertEqual(format_peer(HostnameAddress(b"db.example.test", 5432)), "-")


V4_LOOPBACK = (ip_network("127.0.0.0/8"),)
MIXED = (ip_network("fdaa::/16"), ip_network("127.0.0.0/8"), ip_network("::1/128"))


class SourceAllowedTests(SynchronousTestCase):
    """source_allowed: a listener's allow_sources."""

    def test_no_list_allows_ip(self) -> None:
        """Without a list any IP peer is allowed."""
        self.assertTrue(source_allowed(ip_address("203.0.113.9"), None))

    def test_no_list_allows_non_ip(self) -> None:
        """Without a list a peer with no IP is allowed too."""
        self.assertTrue(source_allowed(None, None))

    def test_matching(self) -> None:
        """An IP inside a listed network is allowed."""
        self.assertTrue(source_allowed(ip_address("127.0.0.1"), V4_LOOPBACK))

    def test_not_matching(self) -> None:
        """An IP outside every listed network is refused."""
        self.assertFalse(source_allowed(ip_address("10.0.0.1"), V4_LOOPBACK))

    def test_empty_list_refuses(self) -> None:
        """An empty list refuses every peer."""
        self.assertFalse(source_allowed(ip_address("127.0.0.1"), ()))

    def test_mixed_list_allows_ipv4(self) -> None:
        """An IPv4 peer matches the IPv4 entry of a mixed list."""
        self.assertTrue(source_allowed(ip_address("127.0.0.5"), MIXED))

    def test_mixed_list_allows_ipv6(self) -> None:
        """An IPv6 peer matches an IPv6 entry of a mixed list."""
        self.assertTrue(source_allowed(ip_address("fdaa:0:1::3"), MIXED))

    def test_mixed_list_refuses_ipv6_outside(self) -> None:
        """An IPv6 peer outside the list's IPv6 entries is refused without error."""
        self.assertFalse(source_allowed(ip_address("2001:db8::1"), MIXED))

    def test_mixed_list_refuses_ipv4_outside(self) -> None:
        """An IPv4 peer outside the list's IPv4 entries is refused without error."""
        self.assertFalse(source_allowed(ip_address("192.0.2.1"), MIXED))

    def test_unmapped_peer_matches_ipv4_entry(self) -> None:
        """A dual-stack peer, once unmapped by peer_ip, matches an IPv4 network."""
        ip = peer_ip(IPv6Address("TCP", "::ffff:127.0.0.1", 5000))
        self.assertTrue(source_allowed(ip, V4_LOOPBACK))

    def test_non_ip_peer_with_list_refused(self) -> None:
        """A peer with no IP is refused when a list is set."""
        self.assertFalse(source_allowed(peer_ip(UNIXAddress("/run/egress.sock")), MIXED))
