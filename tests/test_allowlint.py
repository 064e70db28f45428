"""Tests for egressproxy.config.allowlint: allowlists open in all but name, and accept_risk.

The messages are compared whole where they are the product (what an operator
reads); elsewhere the tests check which entries are flagged.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.config.allowlint import (
    Entry,
    Finding,
    check_listener,
    lint_allow_addresses,
    lint_allowlist,
)
from egressproxy.modes.forward.parse import parse_destination as _parse_destination
from egressproxy.config.ownsocket import OwnSocket, own_socket_hits
from egressproxy.upstream.internal import (
    INTERNAL_NETWORKS,
    INTERNAL_RANGES,
    internal_class,
    internal_range,
    is_internal,
)

LISTENER = OwnSocket("listener 'fwd'", ":3128", "::", 3128)
ADMIN = OwnSocket("admin service", "127.0.0.1:9901", "127.0.0.1", 9901)
METRICS = OwnSocket("metrics service", "[::]:9091", "::", 9091)
OWN = (LISTENER, ADMIN, METRICS)


def entries(*texts: str) -> list[Entry]:
    return [Entry(text, _parse_destination(text)) for text in texts]


def lint(*texts: str, **kw: object) -> list[tuple[int, str]]:
    kw.setdefault("own_sockets", OWN)
    return lint_allowlist(entries(*texts), **kw)  # type: ignore[arg-type]


def flagged(*texts: str, **kw: object) -> list[int]:
    """The indexes of the flagged entries (once each)."""
    return sorted({index for index, _ in lint(*texts, **kw)})


class NetworkWidthTests(SynchronousTestCase):
    """Networks that alone or together cover more than a /8 or a /32."""

    def test_two_halves(self) -> None:
        """0.0.0.0/1 and 128.0.0.0/1 are the whole IPv4 space: both are named, with the total."""
        findings = lint("0.0.0.0/1:*", "128.0.0.0/1:*", own_sockets=())
        self.assertEqual(
            findings,
            [
                (0, '"0.0.0.0/1:*" with "128.0.0.0/1:*" covers 4,294,967,296 IPv4 '
                    "addresses (all of them), more than a /8 (16,777,216): an allowlist "
                    "that wide is an open proxy in all but name; list the networks "
                    "clients need, or mark them intended with accept_risk: "
                    '["0.0.0.0/1:*", "128.0.0.0/1:*"]'),
                (1, '"128.0.0.0/1:*" with "0.0.0.0/1:*" covers 4,294,967,296 IPv4 '
                    "addresses (all of them), more than a /8 (16,777,216): an allowlist "
                    "that wide is an open proxy in all but name; list the networks "
                    "clients need, or mark them intended with accept_risk: "
                    '["0.0.0.0/1:*", "128.0.0.0/1:*"]'),
            ],
        )

    def test_one_wide_network(self) -> None:
        """A single network wider than a /8."""
        self.assertEqual(
            lint("10.0.0.0/7:443", own_sockets=()),
            [(0, '"10.0.0.0/7:443" covers 33,554,432 IPv4 addresses, more than a /8 '
                 "(16,777,216): an allowlist that wide is an open proxy in all but "
                 "name; list the networks clients need, or mark it intended with "
                 'accept_risk: ["10.0.0.0/7:443"]')],
        )

    def test_exactly_a_slash_8(self) -> None:
        """A /8 (public) and a /32 of IPv6 are the widest accepted."""
        self.assertEqual(lint("11.0.0.0/8:443", "[2a00::/32]:443"), [])

    def test_union_of_small_networks(self) -> None:
        """257 /16s together pass a /8: every one is named; a /24 that adds nothing is not."""
        texts = [f"11.{i}.0.0/16:443" for i in range(256)] + ["12.0.0.0/16:443", "11.0.0.0/24:80"]
        indexes = flagged(*texts)
        self.assertEqual(indexes, list(range(257)))
        first = lint(*texts)[0][1]
        self.assertTrue(first.startswith(
            '"11.0.0.0/16:443" with 256 other entries covers 16,842,752 IPv4 addresses'
        ), first)
        self.assertTrue(first.endswith("or mark each of them intended with accept_risk"), first)

    def test_small_entries_beside_a_wide_one(self) -> None:
        """Only the wide entry is named; hosts inside the allowed space are not."""
        self.assertEqual(flagged("198.51.99.7:443", "0.0.0.0/4:443"), [1])

    def test_ipv6(self) -> None:
        """IPv6 is measured against a /32, with counts as powers of two."""
        self.assertEqual(
            lint("[2a00::/31]:443"),
            [(0, '"[2a00::/31]:443" covers 2^97 IPv6 addresses, more than a /32 '
                 "(2^96): an allowlist that wide is an open proxy in all but name; list "
                 "the networks clients need, or mark it intended with accept_risk: "
                 '["[2a00::/31]:443"]')],
        )

    def test_families_apart(self) -> None:
        """A /8 of IPv4 and a /32 of IPv6 are each within their own limit."""
        self.assertEqual(lint("11.0.0.0/8:443", "[2a00::/32]:443"), [])


class NameTests(SynchronousTestCase):
    """Wildcards under public suffixes, echo DNS services and internal names."""

    def test_public_suffix(self) -> None:
        """*.co.uk is directly under an ICANN public suffix."""
        self.assertEqual(
            lint("*.co.uk:*"),
            [(0, '"*.co.uk:*" is a wildcard directly under the public suffix co.uk: it '
                 "admits every site registered there; list the hosts you need, or mark "
                 'it intended with accept_risk: ["*.co.uk:*"]')],
        )

    def test_private_section(self) -> None:
        """The PSL's private section counts: fly.dev and github.io are shared by strangers."""
        self.assertEqual(flagged("*.fly.dev:443", "*.github.io:443", "*.herokuapp.com:443"), [0, 1, 2])

    def test_wildcard_over_suffixes(self) -> None:
        """*.amazonaws.com spans public suffixes such as s3.amazonaws.com."""
        ((index, message),) = lint("*.amazonaws.com:443")
        self.assertEqual(index, 0)
        self.assertIn("is a wildcard over public suffixes such as ", message)

    def test_nip_io(self) -> None:
        """nip.io is not on the PSL, but a wildcard under it admits every address."""
        self.assertEqual(
            lint("*.nip.io:*"),
            [(0, '"*.nip.io:*" is a wildcard under nip.io, a DNS service that answers '
                 "every name with the IP address written in it (10.0.0.1.nip.io is "
                 "10.0.0.1): it admits every address, internal ones included; list the "
                 'hosts clients need, or mark it intended with accept_risk: ["*.nip.io:*"]')],
        )

    def test_name_spelling_an_internal_address(self) -> None:
        """An exact name under an echo service that spells loopback is flagged; a public one is not."""
        self.assertEqual(flagged("app.127-0-0-1.sslip.io:80", "1.2.3.4.nip.io:80"), [0])

    def test_ordinary_wildcards(self) -> None:
        """A company's own wildcard is fine."""
        self.assertEqual(lint("*.bank.example:443", "*.api.vendor.com:*"), [])

    def test_localhost(self) -> None:
        """localhost names this machine, and with any port it admits the proxy's own ports."""
        self.assertEqual(
            lint("localhost:*"),
            [
                (0, '"localhost:*" names this machine: localhost and the names under it '
                    "resolve to loopback (RFC 6761), where the proxy's own ports and "
                    "other local services listen; list the hosts clients need, or mark "
                    'it intended with accept_risk: ["localhost:*"]'),
                (0, "\"localhost:*\" admits this proxy's own listener 'fwd' (:3128), admin "
                    "service (127.0.0.1:9901) and metrics service ([::]:9091): a client "
                    "could use the admin API (drain, reload) from outside, or make the "
                    "proxy connect to itself in a loop; narrow it so it cannot reach the "
                    'proxy, or mark it intended with accept_risk: ["localhost:*"]'),
            ],
        )

    def test_names_under_localhost(self) -> None:
        """Names under localhost and public names for loopback are this machine too."""
        self.assertEqual(flagged("app.localhost:443", "*.dev.localhost:443", "x.lvh.me:80", "localtest.me:80"), [0, 1, 2, 3])

    def test_private_names(self) -> None:
        """Private-use names are flagged when wildcards or open on every port."""
        self.assertEqual(
            flagged(
                "*.apps.internal:443", "db.internal:*", "my-app.flycast:*",
                "printer.local:*", "*.x.home.arpa:443",
            ),
            [0, 1, 2, 3, 4],
        )
        ((_, message),) = lint("db.internal:*")
        self.assertEqual(
            message,
            "\"db.internal:*\" is an internal name (.internal is private DNS; on Fly it "
            "names the organisation's apps and Machines): the proxy would let clients "
            "reach internal services on every port; list the hosts and ports clients "
            'need, or mark it intended with accept_risk: ["db.internal:*"]',
        )

    def test_one_private_service(self) -> None:
        """One port of one private name is a deliberate choice."""
        self.assertEqual(lint("db.internal:5432", "my-app.flycast:80"), [])


class AddressTests(SynchronousTestCase):
    """IP literals and networks in internal ranges, and allow_addresses."""

    def test_metadata(self) -> None:
        """169.254.169.254 is link-local, where cloud metadata services answer."""
        self.assertEqual(
            lint("169.254.169.254:80"),
            [(0, '"169.254.169.254:80" is in 169.254.0.0/16 (link-local, where cloud '
                 "metadata services answer): the proxy would let clients reach internal "
                 "addresses; remove it, list the range in allow_addresses if they "
                 'should, or mark it intended with accept_risk: ["169.254.169.254:80"]')],
        )

    def test_local_ranges(self) -> None:
        """Loopback, unspecified, link-local and multicast of both families are always flagged."""
        self.assertEqual(
            flagged(
                "127.0.0.2:443", "0.0.0.0:443", "[::1]:443", "[::]:443",
                "[fe80::1]:443", "224.0.0.1:443", "[ff02::1]:443",
            ),
            list(range(7)),
        )

    def test_private_ranges_every_port(self) -> None:
        """RFC 1918, CGNAT and unique-local (Fly's fdaa::/16) on every port are flagged."""
        self.assertEqual(
            flagged("10.1.2.0/24:*", "172.16.0.1:*", "192.168.1.1:*", "100.64.0.1:*", "[fdaa::3]:*"),
            [0, 1, 2, 3, 4],
        )
        ((_, message),) = lint("10.1.2.0/24:*")
        self.assertEqual(
            message,
            '"10.1.2.0/24:*" is in 10.0.0.0/8 (private, RFC 1918) and admits every port: '
            "the proxy would let clients reach any internal service there; name the "
            "ports clients need, list the range in allow_addresses if they should reach "
            'all of it, or mark it intended with accept_risk: ["10.1.2.0/24:*"]',
        )

    def test_one_private_service(self) -> None:
        """One port of a private network is a deliberate choice; documentation ranges expose nothing."""
        self.assertEqual(lint("10.1.2.0/24:443", "[fdaa:0:1::5]:5432", "203.0.113.7:*", "[2001:db8::7]:443"), [])

    def test_ipv4_mapped(self) -> None:
        """::ffff:127.0.0.1 is loopback in disguise (and never matches as written)."""
        self.assertEqual(
            lint("[::ffff:127.0.0.1]:80"),
            [(0, '"[::ffff:127.0.0.1]:80" is an IPv4-mapped IPv6 address, standing for '
                 "127.0.0.1, in 127.0.0.0/8 (loopback): the proxy reads such destinations "
                 "as IPv4, so the entry never matches as written and hides what it "
                 "admits; write 127.0.0.1 instead, or mark it intended with accept_risk: "
                 '["[::ffff:127.0.0.1]:80"]')],
        )

    def test_network_including_internal_ranges(self) -> None:
        """A network that holds internal ranges names them."""
        self.assertEqual(lint("100.0.0.0/8:443"), [])  # one port of a private range
        ((_, message),) = lint("100.0.0.0/8:*")
        self.assertTrue(message.startswith(
            '"100.0.0.0/8:*" includes 100.64.0.0/10 (CGNAT shared address space) and admits every port:'
        ), message)
        ((_, message),) = lint("169.254.0.0/15:443")
        self.assertTrue(message.startswith(
            '"169.254.0.0/15:443" includes 169.254.0.0/16 (link-local, where cloud metadata services answer):'
        ), message)

    def test_allow_addresses_exception(self) -> None:
        """An entry inside allow_addresses is the operator's exception, not flagged as internal."""
        allow = [ip_network("169.254.169.0/24"), ip_network("10.0.0.0/8")]
        self.assertEqual(lint("169.254.169.254:80", "10.9.0.0/16:*", allow_addresses=allow), [])
        # Partly covered is still flagged.
        self.assertEqual(flagged("169.254.0.0/16:80", allow_addresses=allow), [0])

    def test_allow_addresses_too_wide(self) -> None:
        """allow_addresses wider than a /8 or a /32 is flagged; a /8 is not."""
        self.assertEqual(
            lint_allow_addresses([
                ("10.0.0.0/8", ip_network("10.0.0.0/8")),
                ("fdaa::/16", ip_network("fdaa::/16")),
                ("fdaa:0:1::/48", ip_network("fdaa:0:1::/48")),
            ]),
            [(1, '"fdaa::/16" exempts 2^112 IPv6 addresses from the internal-address '
                 "check, more than a /32 (2^96): an exception that wide all but turns the "
                 "check off; list the ranges clients need, or mark it intended with "
                 'accept_risk: ["fdaa::/16"]')],
        )


class OwnSocketTests(SynchronousTestCase):
    """Entries that would let a client reach the proxy's own ports."""

    def test_admin_port(self) -> None:
        """127.0.0.1:9901 is the admin API (and loopback)."""
        self.assertEqual(
            lint("127.0.0.1:9901"),
            [
                (0, '"127.0.0.1:9901" is in 127.0.0.0/8 (loopback): the proxy would let '
                    "clients reach internal addresses; remove it, list the range in "
                    "allow_addresses if they should, or mark it intended with "
                    'accept_risk: ["127.0.0.1:9901"]'),
                (0, "\"127.0.0.1:9901\" admits this proxy's own admin service "
                    "(127.0.0.1:9901): a client could use the admin API (drain, reload) "
                    "from outside, or make the proxy connect to itself in a loop; narrow "
                    "it so it cannot reach the proxy, or mark it intended with "
                    'accept_risk: ["127.0.0.1:9901"]'),
            ],
        )

    def test_allow_addresses_does_not_excuse_own_sockets(self) -> None:
        """Loopback in allow_addresses drops the internal finding, not the own-socket one."""
        ((_, message),) = lint("127.0.0.1:9901", allow_addresses=[ip_network("127.0.0.0/8")])
        self.assertIn("admits this proxy's own admin service", message)

    def test_wildcard_bind(self) -> None:
        """A wildcard listener is reached on loopback and the unspecified address, of its families."""
        rule = _parse_destination
        self.assertEqual(own_socket_hits(rule("127.0.0.9:3128"), OWN), [LISTENER])
        self.assertEqual(own_socket_hits(rule("[::1]:3128"), OWN), [LISTENER])
        self.assertEqual(own_socket_hits(rule("0.0.0.0:3128"), OWN), [LISTENER])
        self.assertEqual(own_socket_hits(rule("127.0.0.1:3129"), OWN), [])
        v4_only = OwnSocket("listener 'x'", "0.0.0.0:80", "0.0.0.0", 80)
        self.assertEqual(own_socket_hits(rule("[::1]:80"), [v4_only]), [])
        self.assertEqual(own_socket_hits(rule("127.0.0.1:80"), [v4_only]), [v4_only])

    def test_specific_bind(self) -> None:
        """A socket bound to one address is reached there only (and at 0.0.0.0 for loopback)."""
        rule = _parse_destination
        self.assertEqual(own_socket_hits(rule("127.0.0.2:9901"), OWN), [])
        self.assertEqual(own_socket_hits(rule("0.0.0.0:9901"), OWN), [ADMIN])

    def test_pinned_name(self) -> None:
        """A hosts: pin to loopback makes a name the proxy's own socket."""
        self.assertEqual(
            flagged("api.egress.test:3128", hosts={"api.egress.test": "127.0.0.1"}), [0]
        )
        self.assertEqual(flagged("api.egress.test:3128"), [])


class AcceptRiskTests(SynchronousTestCase):
    """accept_risk marks findings as intended; stale marks are errors."""

    def test_marked(self) -> None:
        """A marked entry's findings are accepted, not errors."""
        report = check_listener(
            [(("allow_destinations",), entries("api.vendor.example:443", "*.co.uk:*", "localhost:*"))],
            accept_risk=["*.co.uk:*", "localhost:*"],
            own_sockets=OWN,
        )
        self.assertEqual(report.errors, ())
        self.assertEqual([(f.index, f.entry) for f in report.accepted], [(1, "*.co.uk:*"), (2, "localhost:*"), (2, "localhost:*")])

    def test_unmarked(self) -> None:
        """Findings not marked are errors, with the caller's key and the index."""
        report = check_listener(
            [(("allow_destinations",), entries("a.example:443", "*.co.uk:*"))],
        )
        self.assertEqual(
            [(f.key, f.index, f.entry) for f in report.errors],
            [(("allow_destinations",), 1, "*.co.uk:*")],
        )

    def test_stale_mark(self) -> None:
        """A mark that matches no risky entry is an error of its own."""
        report = check_listener(
            [(("allow_destinations",), entries("a.example:443"))],
            accept_risk=["a.example:443", "*.gone.example:*"],
            accept_risk_key="accept_risk",
        )
        self.assertEqual(
            report.errors,
            (
                Finding("accept_risk", 0, "a.example:443",
                        'accept_risk entry "a.example:443" matches no risky allowlist entry; remove it'),
                Finding("accept_risk", 1, "*.gone.example:*",
                        'accept_risk entry "*.gone.example:*" matches no risky allowlist entry; remove it'),
            ),
        )

    def test_users_lists(self) -> None:
        """A user's own list is judged too, and the listener's accept_risk covers it."""
        lists = [
            (("allow_destinations",), entries("a.example:443")),
            (("users", 0, "allow_destinations"), entries("*.nip.io:443", "*.co.uk:443")),
        ]
        report = check_listener(lists, accept_risk=["*.co.uk:443"])
        self.assertEqual(
            [(f.key, f.index) for f in report.errors], [(("users", 0, "allow_destinations"), 0)]
        )
        self.assertEqual([f.entry for f in report.accepted], ["*.co.uk:443"])

    def test_width_is_per_list(self) -> None:
        """Each list is what one client may reach: widths do not add up across lists."""
        lists = [
            (("allow_destinations",), entries("11.0.0.0/8:443")),
            (("users", 0, "allow_destinations"), entries("12.0.0.0/8:443")),
        ]
        self.assertEqual(check_listener(lists).errors, ())

    def test_allow_addresses_marked(self) -> None:
        """A wide allow_addresses entry can be marked too."""
        allow = [("0.0.0.0/0", ip_network("0.0.0.0/0"))]
        report = check_listener([], allow_addresses=allow)
        self.assertEqual([(f.key, f.index) for f in report.errors], [("allow_addresses", 0)])
        self.assertEqual(check_listener([], allow_addresses=allow, accept_risk=["0.0.0.0/0"]).errors, ())


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_SUFFIXES = ("com", "net", "org", "co.uk", "example", "io", "dev", "fly.dev", "vendor.example")


class PropertyTests(SynchronousTestCase):
    """A single host on a single port is never flagged."""

    @given(
        st.lists(_LABEL, min_size=1, max_size=3),
        st.sampled_from(_SUFFIXES),
        st.integers(1, 65535),
    )
    def test_single_host(self, labels: list[str], suffix: str, port: int) -> None:
        """``api.vendor.example:443`` and its like: one public name, one port."""
        text = f"{'.'.join(labels)}.{suffix}:{port}"
        self.assertEqual(lint(text), [], text)

    @given(st.integers(1, 2**32 - 1), st.integers(1, 65535))
    def test_single_public_address(self, value: int, port: int) -> None:
        """One public IPv4 address on one port is never flagged."""
        address = ip_address(value)
        if is_internal(address) or any(
            address in s.reached_from()[0] for s in OWN if s.port == port
        ):
            return
        self.assertEqual(lint(f"{address}:{port}"), [])


class InternalRangesTests(SynchronousTestCase):
    """The one list of internal ranges other modules import."""

    def test_complete(self) -> None:
        """Every range the design names is on the list."""
        for cidr in (
            "127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128", "169.254.0.0/16", "fe80::/10",
            "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7",
            "224.0.0.0/4", "ff00::/8", "255.255.255.255/32", "240.0.0.0/4", "192.0.2.0/24",
            "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32", "198.18.0.0/15",
            "192.0.0.0/24", "192.88.99.0/24", "100::/64", "64:ff9b::/96", "64:ff9b:1::/48",
            "::ffff:0:0/96", "::/96", "2001::/32",
        ):
            self.assertIn(ip_network(cidr), INTERNAL_NETWORKS, cidr)
        self.assertEqual(len(INTERNAL_NETWORKS), len(INTERNAL_RANGES))

    def test_classes(self) -> None:
        """The narrowest range names an address."""
        self.assertEqual(internal_class(ip_address("169.254.169.254")), "link-local")
        self.assertEqual(internal_class(ip_address("255.255.255.255")), "broadcast")
        self.assertEqual(internal_class(ip_address("fdaa::3")), "unique-local")
        self.assertEqual(internal_class(ip_address("::ffff:127.0.0.1")), "IPv4-mapped")
        self.assertIsNone(internal_class(ip_address("8.8.8.8")))
        self.assertIsNone(internal_range(ip_address("2a00:1450::1")))
        self.assertTrue(is_internal(ip_address("::1")))
