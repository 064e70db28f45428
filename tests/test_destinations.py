"""Unit tests of forward-proxy policy: destination normal form, allowlist matching, credentials."""

from __future__ import annotations

import base64
import hmac
from ipaddress import IPv4Address, ip_network

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.modes.forward import destinations
from egressproxy.modes.forward.destinations import (
    Destination,
    InvalidDestination,
    allowed,
    authenticate,
    credentials_match,
    destination,
    parse_authority,
    parse_basic,
    rules_for,
)
from egressproxy.modes.forward.rules import DestinationRule, User

RULES = (
    DestinationRule(host="api.vendor.com", port=443),
    DestinationRule(host="*.bank.example", port=443),
    DestinationRule(host="any-port.example", port=None),
    DestinationRule(network=ip_network("10.1.0.0/16"), port=5432),
    DestinationRule(network=ip_network("fd00::/8"), port=None),
)


class DestinationFormTests(SynchronousTestCase):
    def test_name_lower_cased_without_trailing_dot(self) -> None:
        """A name is lower-cased and loses its trailing dot."""
        self.assertEqual(destination("API.Vendor.COM.", 443), Destination("api.vendor.com", 443))

    def test_ipv4_literal(self) -> None:
        """An IPv4 literal keeps its address."""
        self.assertEqual(destination("10.1.2.3", 80), Destination("10.1.2.3", 80, IPv4Address("10.1.2.3")))

    def test_ipv4_mapped_becomes_ipv4(self) -> None:
        """An IPv4-mapped IPv6 address is the IPv4 address it maps."""
        self.assertEqual(destination("::ffff:10.1.2.3", 80).host, "10.1.2.3")

    def test_ipv6_formats_with_brackets(self) -> None:
        """An IPv6 destination prints in brackets, as the access log shows it."""
        self.assertEqual(str(destination("FD00::0001", 443)), "[fd00::1]:443")

    def test_numeric_names_refused(self) -> None:
        """Names a resolver would read as numbers (127.1, 0x7f.1) are refused."""
        for name in ("127.1", "0x7f.1", "2130706433", "a.0x10"):
            with self.subTest(name=name):
                self.assertRaises(InvalidDestination, destination, name, 80)

    def test_bad_names_refused(self) -> None:
        """Empty names, bad characters, over-long labels and zone ids are refused."""
        for name in ("", ".", "a..b", "under_score.example", "a b", "x" * 64 + ".example", "é.example",
                     "-lead.example", "fe80::1%eth0", "a/b"):
            with self.subTest(name=name):
                self.assertRaises(InvalidDestination, destination, name, 80)

    def test_port_zero_refused(self) -> None:
        """Port 0 is not a destination."""
        self.assertRaises(InvalidDestination, destination, "api.vendor.com", 0)


class AuthorityTests(SynchronousTestCase):
    def test_host_port(self) -> None:
        """host:port parses to its normal form."""
        self.assertEqual(parse_authority("Api.Vendor.com:443"), Destination("api.vendor.com", 443))

    def test_bracketed_ipv6(self) -> None:
        """[v6]:port parses to the IPv6 address."""
        self.assertEqual(parse_authority("[::1]:8443").host, "::1")

    def test_port_required_without_default(self) -> None:
        """CONNECT's authority needs a port."""
        for text in ("api.vendor.com", "[::1]", "api.vendor.com:"):
            with self.subTest(text=text):
                self.assertRaises(InvalidDestination, parse_authority, text)

    def test_default_port(self) -> None:
        """With a default, a missing or empty port means the default."""
        self.assertEqual(parse_authority("api.vendor.com", default_port=80).port, 80)
        self.assertEqual(parse_authority("api.vendor.com:", default_port=80).port, 80)
        self.assertEqual(parse_authority("[::1]", default_port=80).port, 80)

    def test_malformed(self) -> None:
        """Userinfo, unbracketed IPv6, junk ports and brackets around names are refused."""
        for text in ("user:pw@api.vendor.com:443", "::1:443", "api.vendor.com:https", "api.vendor.com:+443",
                     "api.vendor.com:65536", "[api.vendor.com]:443", "[::1]x:443", "api.vendor.com:0443x"):
            with self.subTest(text=text):
                self.assertRaises(InvalidDestination, parse_authority, text)


class AllowedTests(SynchronousTestCase):
    def check(self, host: str, port: int) -> bool:
        return allowed(RULES, destination(host, port))

    def test_exact_name_and_port(self) -> None:
        """An exact rule matches its name on its port only."""
        self.assertTrue(self.check("api.vendor.com", 443))
        self.assertFalse(self.check("api.vendor.com", 80))
        self.assertFalse(self.check("evil.api.vendor.com", 443))

    def test_wildcard_needs_a_label(self) -> None:
        """*.suffix matches names below the suffix, not the suffix itself or look-alikes."""
        self.assertTrue(self.check("www.bank.example", 443))
        self.assertTrue(self.check("a.b.bank.example", 443))
        self.assertFalse(self.check("bank.example", 443))
        self.assertFalse(self.check("evilbank.example", 443))

    def test_any_port(self) -> None:
        """A rule with port * matches every port."""
        self.assertTrue(self.check("any-port.example", 1))
        self.assertTrue(self.check("any-port.example", 65535))

    def test_ip_literals_match_networks_only(self) -> None:
        """IP literals match CIDR rules, never name rules."""
        self.assertTrue(self.check("10.1.255.255", 5432))
        self.assertFalse(self.check("10.2.0.1", 5432))
        self.assertTrue(self.check("fd12::1", 22))
        self.assertFalse(allowed((DestinationRule(host="api.vendor.com", port=None),), destination("127.0.0.1", 443)))

    def test_mapped_address_matches_ipv4_network(self) -> None:
        """An IPv4-mapped destination matches the IPv4 network it falls in."""
        self.assertTrue(self.check("::ffff:10.1.0.1", 5432))

    def test_no_rules_allow_nothing(self) -> None:
        """An empty allowlist allows nothing."""
        self.assertFalse(allowed((), destination("api.vendor.com", 443)))

    @given(st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True), st.integers(1, 65535))
    def test_names_outside_rules_refused(self, name: str, port: int) -> None:
        """No generated name outside the rules' domains is ever allowed."""
        try:
            dest = destination(name, port)
        except InvalidDestination:
            return
        self.assertFalse(allowed(RULES, dest))


class CredentialTests(SynchronousTestCase):
    users = (User("alice", "s3cret"), User("bob", "p:w:d"))

    def test_match(self) -> None:
        """A configured name with its password matches."""
        self.assertTrue(credentials_match(self.users, b"alice", b"s3cret"))
        self.assertTrue(credentials_match(self.users, b"bob", b"p:w:d"))

    def test_mismatch(self) -> None:
        """A wrong password, another user's password, or an unknown name does not."""
        self.assertFalse(credentials_match(self.users, b"alice", b"s3cre"))
        self.assertFalse(credentials_match(self.users, b"alice", b"p:w:d"))
        self.assertFalse(credentials_match(self.users, b"carol", b"s3cret"))
        self.assertFalse(credentials_match((), b"alice", b"s3cret"))

    def test_utf8_passwords(self) -> None:
        """Passwords compare as UTF-8 bytes."""
        users = (User("zoë", "pässword"),)
        self.assertTrue(credentials_match(users, "zoë".encode(), "pässword".encode()))

    def test_compares_in_constant_time(self) -> None:
        """Every comparison goes through hmac.compare_digest, for every user."""
        calls = []
        compare = hmac.compare_digest

        def spy(a: bytes, b: bytes) -> bool:
            calls.append((len(a), len(b)))
            return compare(a, b)

        self.patch(destinations.hmac, "compare_digest", spy)
        credentials_match(self.users, b"alice", b"s3cret")
        # Name and password for each user, all over equal-length digests.
        self.assertEqual(calls, [(32, 32)] * 4)

    def test_authenticate_names_the_user(self) -> None:
        """authenticate gives the user the credentials belong to, None for no one."""
        self.assertIs(authenticate(self.users, b"bob", b"p:w:d"), self.users[1])
        self.assertIs(authenticate(self.users, b"alice", b"s3cret"), self.users[0])
        self.assertIsNone(authenticate(self.users, b"bob", b"s3cret"))

    def test_authenticate_compares_every_user(self) -> None:
        """A match on the first user does not stop the loop: every user is compared."""
        calls = []
        compare = hmac.compare_digest

        def spy(a: bytes, b: bytes) -> bool:
            calls.append((len(a), len(b)))
            return compare(a, b)

        self.patch(destinations.hmac, "compare_digest", spy)
        users = self.users + (User("carol", "x"),)
        self.assertIs(authenticate(users, b"alice", b"s3cret"), users[0])
        self.assertEqual(calls, [(32, 32)] * 6)

    def test_rules_for(self) -> None:
        """A user's own list replaces the listener's; without one, the listener's applies."""
        own = (DestinationRule(host="own.example", port=443),)
        listener = (DestinationRule(host="api.vendor.com", port=443),)
        self.assertIs(rules_for(listener, None), listener)
        self.assertIs(rules_for(listener, User("a", "p")), listener)
        self.assertIs(rules_for(listener, User("b", "p", allow_destinations=own)), own)

    def test_basic(self) -> None:
        """A Basic credential decodes to name and password; the password may hold colons."""
        token = base64.b64encode(b"bob:p:w:d")
        self.assertEqual(parse_basic(b"Basic " + token), (b"bob", b"p:w:d"))
        self.assertEqual(parse_basic(b"basic  " + token), (b"bob", b"p:w:d"))

    def test_basic_malformed(self) -> None:
        """Other schemes, bad base64 and a missing colon give None."""
        for value in (b"Bearer abc", b"Basic !!!", b"Basic " + base64.b64encode(b"nocolon"), b"Basic", b""):
            with self.subTest(value=value):
                self.assertIsNone(parse_basic(value))
