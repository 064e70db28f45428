"""The reload summary: one line naming the listeners, clusters and fields a reload changed."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from egressproxy.app.configdiff import changed_fields, describe_changes
from egressproxy.config import Config, HealthCheckConfig, parse_config

BASE = """\
listeners:
  - {name: direct, listen: "[::]:5432", mode: tcp, cluster: pg_direct}
  - {name: pooled, listen: "127.0.0.1:6432", mode: tcp, cluster: pg_direct, max_connections: 100}
  - {name: old, listen: "127.0.0.1:7432", mode: tcp, cluster: y}
clusters:
  - {name: pg_direct, endpoints: ["db.example.cloud:5432"]}
  - {name: y, endpoints: ["y.example.cloud:5432"]}
"""

EVERYTHING = """\
listeners:
  - {name: direct, listen: "[::]:5433", mode: tcp, cluster: pg_direct}
  - name: pooled
    listen: "127.0.0.1:6432"
    mode: tcp
    cluster: pg_direct
    max_connections: 100
    allow_sources: ["10.0.0.0/8"]
    log_prefix: POOL
  - {name: pg2, listen: "127.0.0.1:8432", mode: tcp, cluster: x}
clusters:
  - {name: pg_direct, endpoints: ["db2.example.cloud:5432"], connect_timeout: 3s}
  - {name: x, endpoints: ["x.example.cloud:5432"]}
access_log: {format: json}
"""


def config(text: str) -> Config:
    return parse_config(text, "t.yaml", {})


class DescribeChangesTests(SynchronousTestCase):
    def test_no_changes(self) -> None:
        """The same file twice: 'no changes'."""
        self.assertEqual(describe_changes(config(BASE), config(BASE)), "no changes")

    def test_everything_named_in_one_line(self) -> None:
        """Added, removed, rebound and changed listeners and clusters, and top-level fields, by name."""
        self.assertEqual(
            describe_changes(config(BASE), config(EVERYTHING)),
            "listeners added: pg2; removed: old; rebound: direct ([::]:5432 -> [::]:5433); "
            "changed: pooled (log_prefix, allow_sources); "
            "clusters added: x; changed: pg_direct (endpoints, connect_timeout); removed: y; "
            "top level: access_log",
        )

    def test_several_names_per_kind(self) -> None:
        """Several listeners of one kind are listed together, in file order."""
        new = BASE.replace("- {name: old", "- {name: a, listen: \"127.0.0.1:1\", mode: tcp, cluster: y}\n"
                                           "  - {name: b, listen: \"127.0.0.1:2\", mode: tcp, cluster: y}\n"
                                           "  - {name: old")
        new = new.replace("max_connections: 100", "max_connections: 50").replace("[::]:5432", "[::]:5439")
        self.assertEqual(
            describe_changes(config(BASE), config(new)),
            "listeners added: a, b; rebound: direct ([::]:5432 -> [::]:5439); "
            # The per-source default follows max_connections: both really changed.
            "changed: pooled (max_connections, max_connections_per_source)",
        )

    def test_only_top_level(self) -> None:
        """A top-level change alone is the whole summary, several fields comma-separated."""
        new = BASE + "drain_timeout: 5s\nhosts: {db.example.cloud: 192.0.2.1}\n"
        self.assertEqual(describe_changes(config(BASE), config(new)), "top level: hosts, drain_timeout")

    def test_nested_fields_are_named_one_level_down(self) -> None:
        """A cluster's health_check change names the sub-field that changed."""
        new = BASE.replace('endpoints: ["y.example.cloud:5432"]}',
                           'endpoints: ["y.example.cloud:5432"], health_check: {interval: 3s, timeout: 1s}}')
        self.assertEqual(describe_changes(config(BASE), config(new)),
                         "clusters changed: y (health_check.interval, health_check.timeout)")

    def test_mode_change_names_mode_and_options(self) -> None:
        """A listener whose mode changes names mode and options (their classes differ: not nested)."""
        old = config(BASE)
        new = config(BASE.replace("name: direct, listen: \"[::]:5432\", mode: tcp, cluster: pg_direct",
                                  "name: direct, listen: \"[::]:5432\", mode: http_connect, "
                                  "allow_destinations: [\"api.vendor.com:443\"]"))
        self.assertEqual(describe_changes(old, new), "listeners changed: direct (mode, cluster, options)")

    def test_source_is_not_a_change(self) -> None:
        """The same text read under another name is no change (``source`` labels, it does not configure)."""
        self.assertEqual(describe_changes(config(BASE), parse_config(BASE, "other.yaml", {})), "no changes")

    def test_one_line(self) -> None:
        """However much changed, the summary is one line."""
        summary = describe_changes(config(BASE), config(EVERYTHING))
        self.assertNotIn("\n", summary)
        self.assertEqual(describe_changes(config(EVERYTHING), config(BASE)).count("\n"), 0)


class ChangedFieldsTests(SynchronousTestCase):
    def test_declaration_order_and_skip(self) -> None:
        """Fields come in declaration order; skipped ones are left out."""
        old = HealthCheckConfig()
        new = HealthCheckConfig(kind="postgres", healthy_threshold=3, interval=1.0)
        self.assertEqual(changed_fields(old, new), ["kind", "interval", "healthy_threshold"])
        self.assertEqual(changed_fields(old, new, skip=("kind",)), ["interval", "healthy_threshold"])
        self.assertEqual(changed_fields(old, old), [])
