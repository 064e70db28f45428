"""``expected_egress_ips`` and ``egress_ip_check`` as read from the file: the list form and the per-region form."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.test_config import errors, parse

BASE = """\
listeners:
  - {name: d, listen: "127.0.0.1:5432", mode: tcp, cluster: c}
clusters:
  - {name: c, endpoints: ["db.example.com:5432"]}
egress_ip_check: {stun: ["stun.example.net:3478"], interval: 30s}
"""


class EgressListTests(SynchronousTestCase):
    def test_list(self) -> None:
        """A plain list applies in every region; interval and servers are read."""
        config = parse(BASE + 'expected_egress_ips: ["203.0.113.7", "2a09:8280:1::5"]\n', {"FLY_REGION": "ams"})
        self.assertEqual(config.expected_egress_ips, ("203.0.113.7", "2a09:8280:1::5"))
        assert config.egress_ip_check is not None
        self.assertEqual(config.egress_ip_check.interval, 30.0)

    def test_absent(self) -> None:
        """Without the key there is no check."""
        self.assertIsNone(parse(BASE).expected_egress_ips)

    def test_not_an_address(self) -> None:
        """A name where an IP literal belongs is refused with an example."""
        (error,) = errors(BASE + 'expected_egress_ips: ["egress.example.com"]\n')
        self.assertIn("expected_egress_ips[0]: expected an IP address", error)

    def test_empty(self) -> None:
        (error,) = errors(BASE + "expected_egress_ips: []\n")
        self.assertIn("would never be ready", error)

    def test_needs_a_check(self) -> None:
        """The addresses alone cannot be checked: the error names the missing key."""
        text = BASE.replace('egress_ip_check: {stun: ["stun.example.net:3478"], interval: 30s}\n', "")
        (error,) = errors(text + 'expected_egress_ips: ["203.0.113.7"]\n')
        self.assertIn("needs egress_ip_check", error)


REGIONAL = BASE + """\
expected_egress_ips:
  ams: ["203.0.113.7"]
  iad: ["198.51.100.9", "2a09:8280:1::5"]
"""


class EgressRegionTests(SynchronousTestCase):
    def test_this_region(self) -> None:
        """With FLY_REGION set, only that region's addresses are expected."""
        self.assertEqual(parse(REGIONAL, {"FLY_REGION": "iad"}).expected_egress_ips, ("198.51.100.9", "2a09:8280:1::5"))
        self.assertEqual(parse(REGIONAL, {"FLY_REGION": "ams"}).expected_egress_ips, ("203.0.113.7",))

    def test_outside_fly(self) -> None:
        """Without FLY_REGION (a laptop, CI) any listed address counts."""
        self.assertEqual(
            parse(REGIONAL, {}).expected_egress_ips, ("203.0.113.7", "198.51.100.9", "2a09:8280:1::5")
        )

    def test_region_missing(self) -> None:
        """A Machine in a region the file does not list fails to load, naming the region and the fix."""
        (error,) = errors(REGIONAL, {"FLY_REGION": "syd"})
        self.assertIn("expected_egress_ips: no entry for this Machine's region FLY_REGION='syd'", error)
        self.assertIn("listed: ams, iad", error)
        self.assertIn("add `syd: [<its egress IPs>]`", error)

    def test_bad_address_in_a_region(self) -> None:
        """Errors inside a region's list carry the region in their path."""
        (error,) = errors(BASE + 'expected_egress_ips: {ams: ["nope"]}\n', {"FLY_REGION": "ams"})
        self.assertIn("expected_egress_ips.ams[0]: expected an IP address", error)

    def test_empty_mapping(self) -> None:
        (error,) = errors(BASE + "expected_egress_ips: {}\n")
        self.assertIn("expected_egress_ips: an empty mapping would never be ready", error)
