"""Tests for egressproxy.config: good files become objects, bad files become errors.

Error tests compare whole messages, file name and line included, because the
messages are the product: an operator reads them at 3 a.m.
"""

from __future__ import annotations

import os
import tempfile
import textwrap
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network

import attrs
import yaml
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.config import (
    AccessLogConfig,
    Address,
    ClusterConfig,
    Config,
    ConfigError,
    HealthCheckConfig,
    HttpServiceConfig,
    Keepalive,
    ListenAddress,
    ListenerConfig,
    _Loader,
    load_config,
    parse_config,
    parse_duration,
)

EXAMPLE = """\
listeners:
  - name: direct
    listen: ":5432"
    cluster: pg_direct
    log_prefix: DIRECT
    allow_sources: ["fdaa::/16", "127.0.0.0/8", "::1"]
  - name: pooled
    listen: "[::]:6432"
    cluster: pg_pooled
clusters:
  - name: pg_direct
    endpoints: ["${PG_HOST}:5432"]
    connect_timeout: 5s
  - name: pg_pooled
    endpoints: ["${PG_HOST}:6432", "backup.example.com:6432"]
    idle_timeout: 1h
    keepalive: {idle: 30s}
hosts:
  db.egress.test: 127.0.0.1
access_log: {format: json}
"""

# One listener, one cluster; every other key left to its default.
MINIMAL = """\
listeners:
  - name: main
    listen: "127.0.0.1:0"
    cluster: db
clusters:
  - name: db
    endpoints: ["db.example.com:5432"]
"""


def parse(text: str, environ: Mapping[str, str] | None = None) -> Config:
    return parse_config(textwrap.dedent(text), "egress.yaml", environ or {})


def errors(text: str, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The errors parsing ``text`` raises; fails the test if it parses."""
    try:
        config = parse(text, environ)
    except ConfigError as e:
        return e.errors
    raise AssertionError(f"expected a ConfigError, got {config!r}")


def with_listener(**fields: str) -> str:
    """MINIMAL with the listener's keys replaced or added (values as YAML)."""
    listener = {"name": "main", "listen": '"127.0.0.1:0"', "cluster": "db", **fields}
    lines = ["listeners:"]
    for index, (key, value) in enumerate(listener.items()):
        lines.append(f"  {'- ' if index == 0 else '  '}{key}: {value}")
    lines += ["clusters:", "  - name: db", '    endpoints: ["db.example.com:5432"]']
    return "\n".join(lines) + "\n"


def with_cluster(**fields: str) -> str:
    """MINIMAL with the cluster's keys replaced or added (values as YAML).

    The listener takes lines 1-4, so the cluster's keys start at line 6 in the
    order given (``name`` first, then ``endpoints``, then the extra keys).
    """
    cluster = {"name": "db", "endpoints": '["db.example.com:5432"]', **fields}
    lines = [
        "listeners:",
        "  - name: main",
        '    listen: "127.0.0.1:0"',
        "    cluster: db",
        "clusters:",
    ]
    for index, (key, value) in enumerate(cluster.items()):
        lines.append(f"  {'- ' if index == 0 else '  '}{key}: {value}")
    return "\n".join(lines) + "\n"


class ExampleTests(SynchronousTestCase):
    """The documented example file, read in full."""

    def setUp(self) -> None:
        self.config = parse(EXAMPLE, {"PG_HOST": "db.example.cloud"})

    def test_source(self) -> None:
        """The config remembers the label it was read from."""
        self.assertEqual(self.config.source, "egress.yaml")

    def test_direct_listener(self) -> None:
        """The first listener keeps every value written and defaults the rest."""
        self.assertEqual(
            self.config.listeners[0],
            ListenerConfig(
                name="direct",
                listen=ListenAddress(
                    text=":5432", host="::", port=5432, dual_stack=True, description=None
                ),
                mode="tcp",
                cluster="pg_direct",
                log_prefix="DIRECT",
                allow_sources=(
                    IPv6Network("fdaa::/16"),
                    IPv4Network("127.0.0.0/8"),
                    IPv6Network("::1/128"),
                ),
                max_connections=10000,
            ),
        )

    def test_pooled_listener(self) -> None:
        """The second listener gets the upper-cased name as its log prefix."""
        self.assertEqual(
            self.config.listeners[1],
            ListenerConfig(
                name="pooled",
                listen=ListenAddress(
                    text="[::]:6432", host="::", port=6432, dual_stack=True
                ),
                mode="tcp",
                cluster="pg_pooled",
                log_prefix="POOLED",
                allow_sources=None,
                max_connections=10000,
            ),
        )

    def test_direct_cluster(self) -> None:
        """The first cluster expands ${PG_HOST} and keeps every default."""
        self.assertEqual(
            self.config.clusters[0],
            ClusterConfig(
                name="pg_direct",
                endpoints=(Address("db.example.cloud", 5432),),
                connect_timeout=5.0,
                max_connect_attempts=3,
                idle_timeout=None,
                max_connections=1024,
                max_pending=128,
                keepalive=Keepalive(idle=60.0, interval=15.0, count=4),
            ),
        )

    def test_pooled_cluster(self) -> None:
        """The second cluster has two endpoints, an idle timeout and a partial keepalive."""
        self.assertEqual(
            self.config.clusters[1],
            ClusterConfig(
                name="pg_pooled",
                endpoints=(
                    Address("db.example.cloud", 6432),
                    Address("backup.example.com", 6432),
                ),
                idle_timeout=3600.0,
                keepalive=Keepalive(idle=30.0, interval=15.0, count=4),
            ),
        )

    def test_hosts_and_access_log(self) -> None:
        """The hosts pin and the JSON access log format are read."""
        self.assertEqual(self.config.hosts, (("db.egress.test", "127.0.0.1"),))
        self.assertEqual(self.config.access_log, AccessLogConfig(format="json"))

    def test_cluster_lookup(self) -> None:
        """cluster() finds a cluster by name."""
        self.assertIs(self.config.cluster("pg_pooled"), self.config.clusters[1])

    def test_cluster_lookup_missing(self) -> None:
        """cluster() raises KeyError for a name that is not defined."""
        self.assertRaises(KeyError, self.config.cluster, "nope")

    def test_pinned_address(self) -> None:
        """pinned_address() ignores case and returns None for unpinned names."""
        self.assertEqual(self.config.pinned_address("DB.Egress.Test"), "127.0.0.1")
        self.assertIsNone(self.config.pinned_address("other.test"))

    def test_everything_is_immutable(self) -> None:
        """Every object is frozen and every collection is a tuple."""
        self.assertRaises(
            attrs.exceptions.FrozenInstanceError,
            setattr, self.config, "listeners", (),
        )
        self.assertRaises(
            attrs.exceptions.FrozenInstanceError,
            setattr, self.config.clusters[0], "endpoints", (),
        )
        self.assertIsInstance(self.config.listeners, tuple)
        self.assertIsInstance(self.config.clusters[1].endpoints, tuple)
        self.assertIsInstance(self.config.listeners[0].allow_sources, tuple)


class DefaultsTests(SynchronousTestCase):
    """A file with only the required keys."""

    def test_defaults(self) -> None:
        """Every optional key takes its documented default."""
        config = parse(MINIMAL)
        self.assertEqual(
            config,
            Config(
                source="egress.yaml",
                listeners=(
                    ListenerConfig(
                        name="main",
                        listen=ListenAddress(
                            text="127.0.0.1:0", host="127.0.0.1", port=0,
                            dual_stack=False, description=None,
                        ),
                        mode="tcp",
                        cluster="db",
                        log_prefix="MAIN",
                        allow_sources=None,
                        max_connections=10000,
                        proxy_protocol=False,
                    ),
                ),
                clusters=(
                    ClusterConfig(
                        name="db",
                        endpoints=(Address("db.example.com", 5432),),
                        connect_timeout=5.0,
                        max_connect_attempts=3,
                        idle_timeout=None,
                        max_connections=1024,
                        max_pending=128,
                        keepalive=Keepalive(60.0, 15.0, 4),
                        health_check=HealthCheckConfig(
                            kind="tcp", interval=10.0, timeout=2.0,
                            unhealthy_threshold=2, healthy_threshold=1,
                        ),
                    ),
                ),
                hosts=(),
                access_log=AccessLogConfig(format="text"),
                admin=HttpServiceConfig(
                    ListenAddress("127.0.0.1:9901", "127.0.0.1", 9901, False, None)
                ),
                metrics=HttpServiceConfig(
                    ListenAddress("[::]:9091", "::", 9091, True, None)
                ),
                drain_timeout=25.0,
                shutdown_delay=0.0,
            ),
        )

    def test_every_value_set(self) -> None:
        """Explicit values for every cluster and listener key are kept."""
        config = parse(
            with_cluster(
                connect_timeout="250ms",
                max_connect_attempts="5",
                idle_timeout="2m",
                max_connections="10",
                max_pending="2",
                keepalive="{idle: 2m, interval: 5s, count: 9}",
                health_check=(
                    "{kind: postgres, interval: 30s, timeout: 1500ms, "
                    "unhealthy_threshold: 5, healthy_threshold: 3}"
                ),
            )
        )
        self.assertEqual(
            config.clusters[0],
            ClusterConfig(
                name="db",
                endpoints=(Address("db.example.com", 5432),),
                connect_timeout=0.25,
                max_connect_attempts=5,
                idle_timeout=120.0,
                max_connections=10,
                max_pending=2,
                keepalive=Keepalive(idle=120.0, interval=5.0, count=9),
                health_check=HealthCheckConfig(
                    kind="postgres", interval=30.0, timeout=1.5,
                    unhealthy_threshold=5, healthy_threshold=3,
                ),
            ),
        )
        listener = parse(
            with_listener(
                mode="tcp", log_prefix="PG-1", max_connections="7", proxy_protocol="true"
            )
        ).listeners[0]
        self.assertEqual(
            (
                listener.mode,
                listener.log_prefix,
                listener.max_connections,
                listener.proxy_protocol,
            ),
            ("tcp", "PG-1", 7, True),
        )

    def test_keepalive_off(self) -> None:
        """keepalive: false turns keepalive off."""
        self.assertIsNone(parse(with_cluster(keepalive="false")).clusters[0].keepalive)

    def test_keepalive_on(self) -> None:
        """keepalive: true keeps the default keepalive."""
        self.assertEqual(
            parse(with_cluster(keepalive="true")).clusters[0].keepalive, Keepalive()
        )

    def test_idle_timeout_zero(self) -> None:
        """idle_timeout: 0 means no idle timeout."""
        self.assertIsNone(parse(with_cluster(idle_timeout="0")).clusters[0].idle_timeout)

    def test_idle_timeout_null(self) -> None:
        """idle_timeout: null means no idle timeout."""
        self.assertIsNone(
            parse(with_cluster(idle_timeout="null")).clusters[0].idle_timeout
        )

    def test_endpoint_forms(self) -> None:
        """Endpoints may be names, IPv4 literals or bracketed IPv6 literals."""
        config = parse(
            with_cluster(endpoints='["a-b.c.example:1", "10.1.2.3:65535", "[2001:db8::1]:5432"]')
        )
        endpoints = config.clusters[0].endpoints
        self.assertEqual(
            endpoints,
            (
                Address("a-b.c.example", 1),
                Address("10.1.2.3", 65535),
                Address("2001:db8::1", 5432),
            ),
        )
        self.assertEqual(
            [str(e) for e in endpoints],
            ["a-b.c.example:1", "10.1.2.3:65535", "[2001:db8::1]:5432"],
        )

    def test_hosts_lower_cased_in_order(self) -> None:
        """hosts names are lower-cased and kept in file order."""
        config = parse(MINIMAL + "hosts:\n  Z.Example: 10.0.0.1\n  a.example: '::1'\n")
        self.assertEqual(config.hosts, (("z.example", "10.0.0.1"), ("a.example", "::1")))

    def test_allow_sources_bare_addresses(self) -> None:
        """Bare IP addresses in allow_sources become /32 and /128 networks."""
        config = parse(with_listener(allow_sources='["10.1.2.3", "fdaa::3"]'))
        self.assertEqual(
            config.listeners[0].allow_sources,
            (IPv4Network("10.1.2.3/32"), IPv6Network("fdaa::3/128")),
        )

    def test_two_ephemeral_listeners(self) -> None:
        """Two listeners on port 0 of one address do not clash."""
        config = parse(
            """\
            listeners:
              - {name: a, listen: "127.0.0.1:0", cluster: db}
              - {name: b, listen: "127.0.0.1:0", cluster: db}
            clusters:
              - {name: db, endpoints: ["db.example.com:5432"]}
            """
        )
        self.assertEqual(len(config.listeners), 2)


class ListenFormTests(SynchronousTestCase):
    """Every accepted form of a listener's listen value."""

    def listen(self, text: str) -> ListenAddress:
        return parse(with_listener(listen=f"'{text}'")).listeners[0].listen

    def test_port_only(self) -> None:
        """:PORT listens on every interface with one dual-stack socket."""
        self.assertEqual(
            self.listen(":5432"), ListenAddress(":5432", "::", 5432, True, None)
        )

    def test_ipv6_any(self) -> None:
        """[::]:PORT is dual-stack too."""
        self.assertEqual(
            self.listen("[::]:5432"), ListenAddress("[::]:5432", "::", 5432, True, None)
        )

    def test_ipv4_any(self) -> None:
        """0.0.0.0:PORT listens on every IPv4 interface only."""
        self.assertEqual(
            self.listen("0.0.0.0:5432"),
            ListenAddress("0.0.0.0:5432", "0.0.0.0", 5432, False, None),
        )

    def test_ipv4_loopback(self) -> None:
        """An IPv4 literal binds that address."""
        self.assertEqual(
            self.listen("127.0.0.1:9"),
            ListenAddress("127.0.0.1:9", "127.0.0.1", 9, False, None),
        )

    def test_ipv6_loopback(self) -> None:
        """A bracketed IPv6 literal binds that address, IPv6 only."""
        self.assertEqual(
            self.listen("[::1]:5432"),
            ListenAddress("[::1]:5432", "::1", 5432, False, None),
        )

    def test_highest_port(self) -> None:
        """Port 65535 is accepted."""
        self.assertEqual(self.listen(":65535").port, 65535)

    def test_tcp6_description(self) -> None:
        """A tcp6: description is kept as a raw Twisted description."""
        text = r"tcp6:port=5432:interface=\:\:1"
        self.assertEqual(
            self.listen(text),
            ListenAddress(text, None, None, False, description=text),
        )

    def test_unix_description(self) -> None:
        """A unix: description is kept as a raw Twisted description."""
        self.assertEqual(
            self.listen("unix:/run/egress.sock").description, "unix:/run/egress.sock"
        )

    def test_interpolated(self) -> None:
        """The listen value is interpolated before it is parsed."""
        config = parse(with_listener(listen='":${PORT}"'), {"PORT": "7000"})
        self.assertEqual(
            config.listeners[0].listen, ListenAddress(":7000", "::", 7000, True, None)
        )

    def test_str(self) -> None:
        """A listen address prints as written."""
        self.assertEqual(str(self.listen("[::1]:5432")), "[::1]:5432")


class OperationsTests(SynchronousTestCase):
    """The admin and metrics services, drain timing, health checks and PROXY protocol."""

    def test_services_set(self) -> None:
        """admin and metrics listen where they are told, in any listen form."""
        config = parse(
            MINIMAL + "admin: {listen: 'unix:/run/admin.sock'}\nmetrics: {listen: ':9100'}\n"
        )
        self.assertEqual(
            (config.admin, config.metrics),
            (
                HttpServiceConfig(
                    ListenAddress(
                        "unix:/run/admin.sock", None, None, False,
                        description="unix:/run/admin.sock",
                    )
                ),
                HttpServiceConfig(ListenAddress(":9100", "::", 9100, True, None)),
            ),
        )

    def test_services_off(self) -> None:
        """admin: false and metrics: false turn the services off."""
        config = parse(MINIMAL + "admin: false\nmetrics: false\n")
        self.assertEqual((config.admin, config.metrics), (None, None))

    def test_service_null(self) -> None:
        """metrics: null keeps the default metrics service."""
        self.assertEqual(
            parse(MINIMAL + "metrics: null\n").metrics,
            HttpServiceConfig(ListenAddress("[::]:9091", "::", 9091, True, None)),
        )

    def test_service_empty_mapping(self) -> None:
        """admin: {} keeps the default admin address."""
        self.assertEqual(
            parse(MINIMAL + "admin: {}\n").admin,
            HttpServiceConfig(
                ListenAddress("127.0.0.1:9901", "127.0.0.1", 9901, False, None)
            ),
        )

    def test_service_off_from_variable(self) -> None:
        """metrics accepts the text false from a variable."""
        config = parse(MINIMAL + "metrics: ${METRICS}\n", {"METRICS": "false"})
        self.assertIsNone(config.metrics)

    def test_listener_on_moved_metrics_port(self) -> None:
        """A listener may take the default metrics port once metrics is off."""
        config = parse(with_listener(listen='":9091"') + "metrics: false\n")
        self.assertEqual(config.listeners[0].listen.port, 9091)

    def test_drain_and_delay_set(self) -> None:
        """drain_timeout and shutdown_delay are read as durations."""
        config = parse(MINIMAL + "drain_timeout: 1m30s\nshutdown_delay: 5s\n")
        self.assertEqual((config.drain_timeout, config.shutdown_delay), (90.0, 5.0))

    def test_drain_zero(self) -> None:
        """drain_timeout: 0 is allowed and means close at once."""
        self.assertEqual(parse(MINIMAL + "drain_timeout: 0s\n").drain_timeout, 0.0)

    def test_health_check_partial(self) -> None:
        """A health_check mapping with some keys defaults the others."""
        self.assertEqual(
            parse(with_cluster(health_check="{kind: postgres, interval: 30s}"))
            .clusters[0].health_check,
            HealthCheckConfig(
                kind="postgres", interval=30.0, timeout=2.0,
                unhealthy_threshold=2, healthy_threshold=1,
            ),
        )

    def test_health_check_off(self) -> None:
        """health_check: false runs no checks."""
        self.assertEqual(
            parse(with_cluster(health_check="false")).clusters[0].health_check,
            HealthCheckConfig(kind="none"),
        )

    def test_health_check_null(self) -> None:
        """health_check: null keeps the default TCP check."""
        self.assertEqual(
            parse(with_cluster(health_check="null")).clusters[0].health_check,
            HealthCheckConfig(kind="tcp"),
        )

    def test_proxy_protocol_from_variable(self) -> None:
        """proxy_protocol accepts the text true from a variable."""
        config = parse(with_listener(proxy_protocol="${PP}"), {"PP": "true"})
        self.assertIs(config.listeners[0].proxy_protocol, True)


class DurationTests(SynchronousTestCase):
    """parse_duration, the one reader of durations."""

    GOOD = [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1h2m3s", 3723.0),
        ("1.5s", 1.5),
        ("0", 0.0),
        ("0s", 0.0),
        ("10", 10.0),
        ("2.5", 2.5),
        (7, 7.0),
        (0.5, 0.5),
        (0, 0.0),
    ]
    HINT = (
        "expected a duration such as 250ms, 5s, 2m, 1h or 1m30s "
        "(a plain number means seconds)"
    )
    BAD = [
        ("abc", f"{HINT}, got 'abc'"),
        ("5 s", f"{HINT}, got '5 s'"),
        ("1d", f"{HINT}, got '1d'"),
        ("s", f"{HINT}, got 's'"),
        ("1h2", f"{HINT}, got '1h2'"),
        ("", f"{HINT}, got ''"),
        (True, f"{HINT}, got true"),
        (None, f"{HINT}, got null"),
        (float("inf"), f"{HINT}, got inf"),
        ("-5s", "a duration cannot be negative, got '-5s'"),
        ("-1", "a duration cannot be negative, got '-1'"),
        (-3, "a duration cannot be negative, got -3"),
    ]

    def test_good(self) -> None:
        """Each accepted spelling converts to the expected number of seconds."""
        for text, seconds in self.GOOD:
            self.assertEqual((text, parse_duration(text)), (text, seconds))

    def test_bad(self) -> None:
        """Each rejected spelling raises ValueError with a readable message."""
        for value, message in self.BAD:
            with self.assertRaises(ValueError) as raised:
                parse_duration(value)
            self.assertEqual(str(raised.exception), message)


class InterpolationTests(SynchronousTestCase):
    """${VAR}, ${VAR:-default} and $$ in string values."""

    def endpoint(self, text: str, environ: Mapping[str, str]) -> str:
        config = parse(with_cluster(endpoints=f"['{text}']"), environ)
        return str(config.clusters[0].endpoints[0])

    def test_variable(self) -> None:
        """${VAR} is replaced by the variable's value."""
        self.assertEqual(self.endpoint("${H}:${P}", {"H": "db.test", "P": "5"}), "db.test:5")

    def test_default_when_unset(self) -> None:
        """${VAR:-default} uses the default when the variable is unset."""
        self.assertEqual(self.endpoint("${H:-fallback.test}:5", {}), "fallback.test:5")

    def test_default_when_empty(self) -> None:
        """${VAR:-default} uses the default when the variable is empty."""
        self.assertEqual(self.endpoint("${H:-fallback.test}:5", {"H": ""}), "fallback.test:5")

    def test_set_beats_default(self) -> None:
        """${VAR:-default} uses the variable when it is set and non-empty."""
        self.assertEqual(self.endpoint("${H:-fallback.test}:5", {"H": "set.test"}), "set.test:5")

    def test_dollar_escape(self) -> None:
        """$$ is a literal dollar sign and is not expanded further."""
        config = parse(with_listener(log_prefix="'A$$${X}$$'"), {"X": "b"})
        self.assertEqual(config.listeners[0].log_prefix, "A$b$")

    def test_lone_dollar(self) -> None:
        """A dollar sign not followed by { or $ is kept as written."""
        config = parse(with_listener(log_prefix="'A$B'"))
        self.assertEqual(config.listeners[0].log_prefix, "A$B")

    def test_integer_from_variable(self) -> None:
        """An integer field accepts the digit string a variable expands to."""
        config = parse(with_cluster(max_pending="${PENDING}"), {"PENDING": "12"})
        self.assertEqual(config.clusters[0].max_pending, 12)

    def test_boolean_from_variable(self) -> None:
        """keepalive accepts the text false from a variable."""
        config = parse(with_cluster(keepalive="${KA}"), {"KA": "false"})
        self.assertIsNone(config.clusters[0].keepalive)

    def test_duration_from_variable(self) -> None:
        """A duration field accepts an expanded value."""
        config = parse(with_cluster(connect_timeout="${T:-3s}"), {})
        self.assertEqual(config.clusters[0].connect_timeout, 3.0)

    def test_default_is_not_expanded(self) -> None:
        """The environment is only read for the names written in the file."""
        config = parse(with_listener(log_prefix="'${P:-X}'"), {"X": "nope"})
        self.assertEqual(config.listeners[0].log_prefix, "X")


class ErrorTests(SynchronousTestCase):
    """Bad files: every message names file, line, key path, value and expectation."""

    def test_unknown_key_with_suggestion(self) -> None:
        """An unknown key near a real one gets a suggestion and no missing-key error."""
        self.assertEqual(
            errors(
                """\
                listeners:
                  - {name: main, listen: ":5432", cluster: db}
                clusters:
                  - name: db
                    endpoint: ["db.example.com:5432"]
                """
            ),
            ("egress.yaml:5: clusters[0]: unknown key 'endpoint'; did you mean 'endpoints'?",),
        )

    def test_unknown_key_without_suggestion(self) -> None:
        """An unknown key far from any real one lists the allowed keys."""
        self.assertEqual(
            errors(MINIMAL + "zzz: 1\n"),
            (
                "egress.yaml:8: unknown key 'zzz' (expected one of: listeners, "
                "clusters, hosts, access_log, admin, metrics, drain_timeout, "
                "shutdown_delay)",
            ),
        )

    def test_future_key_rejected(self) -> None:
        """A key from a later version, such as tls, is rejected, not ignored."""
        (error,) = errors(with_cluster(tls="{server_name: db.example.com}"))
        self.assertTrue(
            error.startswith("egress.yaml:8: clusters[0]: unknown key 'tls'"),
            error,
        )

    def test_duplicate_key(self) -> None:
        """A key written twice in one mapping is an error on the second."""
        self.assertEqual(
            errors(
                """\
                listeners:
                  - name: main
                    listen: ":5432"
                    cluster: db
                    listen: ":6432"
                clusters:
                  - {name: db, endpoints: ["db.example.com:5432"]}
                """
            ),
            ("egress.yaml:5: listeners[0].listen: duplicate key 'listen' (first at line 3)",),
        )

    def test_duplicate_top_level_key(self) -> None:
        """A repeated top-level section is an error, not a silent override."""
        self.assertEqual(
            errors(MINIMAL + "clusters: []\n"),
            ("egress.yaml:8: clusters: duplicate key 'clusters' (first at line 5)",),
        )

    def test_missing_required_keys(self) -> None:
        """Missing required keys are reported at the line of their mapping."""
        self.assertEqual(
            errors(
                """\
                listeners:
                  - name: main
                clusters:
                  - name: db
                """
            ),
            (
                "egress.yaml:2: listeners[0]: missing required key 'listen'",
                "egress.yaml:2: listeners[0]: missing required key 'cluster'",
                "egress.yaml:4: clusters[0]: missing required key 'endpoints'",
            ),
        )

    def test_missing_sections(self) -> None:
        """A file without listeners and clusters says so."""
        self.assertEqual(
            errors("access_log: {format: text}\n"),
            (
                "egress.yaml:1: missing required key 'listeners'",
                "egress.yaml:1: missing required key 'clusters'",
            ),
        )

    def test_empty_lists(self) -> None:
        """Empty listeners and clusters lists are errors."""
        self.assertEqual(
            errors("listeners: []\nclusters: []\n"),
            (
                "egress.yaml:1: listeners: expected at least one entry in listeners, got []",
                "egress.yaml:2: clusters: expected at least one entry in clusters, got []",
            ),
        )

    def test_bad_endpoint(self) -> None:
        """An endpoint without a port names the value and the expected form."""
        self.assertEqual(
            errors(with_cluster(endpoints='["db.example.com:5432", "db"]')),
            (
                "egress.yaml:7: clusters[0].endpoints[1]: expected HOST:PORT "
                "(e.g. db.example.com:5432 or [2001:db8::1]:5432), got 'db'",
            ),
        )

    def test_bad_endpoint_host(self) -> None:
        """An endpoint host that is neither a DNS name nor an IP is rejected."""
        self.assertEqual(
            errors(with_cluster(endpoints='["bad_host.example:5432"]')),
            (
                "egress.yaml:7: clusters[0].endpoints[0]: 'bad_host.example' is not "
                "a valid host name (letters, digits and '-' in dot-separated labels "
                "of 1-63 characters, at most 253 in all)",
            ),
        )

    def test_unbracketed_ipv6_endpoint(self) -> None:
        """An IPv6 endpoint without brackets gets the bracketed spelling as a fix."""
        self.assertEqual(
            errors(with_cluster(endpoints="['2001:db8::1:5432']")),
            (
                "egress.yaml:7: clusters[0].endpoints[0]: an IPv6 address needs "
                "brackets: write [2001:db8::1]:5432, got '2001:db8::1:5432'",
            ),
        )

    def test_bad_endpoint_port(self) -> None:
        """Endpoint ports outside 1..65535 or not numeric are rejected."""
        self.assertEqual(
            errors(with_cluster(endpoints='["a.example:0", "a.example:65536", "a.example:pg"]')),
            (
                "egress.yaml:7: clusters[0].endpoints[0]: port 0 is out of range (1-65535)",
                "egress.yaml:7: clusters[0].endpoints[1]: port 65536 is out of range (1-65535)",
                "egress.yaml:7: clusters[0].endpoints[2]: expected a port number 1-65535 "
                "after the host, got 'pg'",
            ),
        )

    def test_bad_listen_port(self) -> None:
        """A listen port above 65535 is rejected."""
        self.assertEqual(
            errors(with_listener(listen='":70000"')),
            ("egress.yaml:3: listeners[0].listen: port 70000 is out of range (0-65535)",),
        )

    def test_listen_hostname(self) -> None:
        """A host name in listen is rejected with IP spellings to use instead."""
        self.assertEqual(
            errors(with_listener(listen="localhost:5432")),
            (
                "egress.yaml:3: listeners[0].listen: expected an IP address to listen "
                "on, got host name 'localhost' (use 127.0.0.1:5432, [::1]:5432, or "
                ":5432 for all interfaces)",
            ),
        )

    def test_listen_bare_number(self) -> None:
        """A bare port number in listen suggests the :PORT spelling."""
        (error,) = errors(with_listener(listen="5432"))
        self.assertTrue(error.startswith("egress.yaml:3: listeners[0].listen: expected IP:PORT"), error)
        self.assertTrue(error.endswith(', got 5432; write ":5432" for all interfaces'), error)

    def test_listen_garbage(self) -> None:
        """A listen value of no known shape lists the accepted shapes."""
        self.assertEqual(
            errors(with_listener(listen="nowhere")),
            (
                "egress.yaml:3: listeners[0].listen: expected IP:PORT, [IPV6]:PORT, "
                ":PORT for all interfaces (e.g. :5432, [::]:5432, 127.0.0.1:5432) or "
                "a Twisted endpoint description (e.g. tcp6:5432), got 'nowhere'",
            ),
        )

    def test_listen_bad_description(self) -> None:
        """Twisted's own complaint about a description is reported with the path."""
        self.assertEqual(
            errors(with_listener(listen="tcp:pg")),
            (
                "egress.yaml:3: listeners[0].listen: invalid endpoint description "
                "'tcp:pg': invalid literal for int() with base 10: 'pg'",
            ),
        )

    def test_listen_description_port_range(self) -> None:
        """A tcp: description with a port above 65535 is rejected."""
        self.assertEqual(
            errors(with_listener(listen="tcp:99999")),
            ("egress.yaml:3: listeners[0].listen: port 99999 is out of range (0-65535)",),
        )

    def test_listen_unknown_endpoint_type(self) -> None:
        """An unknown endpoint type is reported with Twisted's words."""
        (error,) = errors(with_listener(listen="bogus:1:2"))
        self.assertTrue(
            error.endswith("got 'bogus:1:2' (Unknown endpoint type: 'bogus')"), error
        )

    def test_listen_unbracketed_ipv6(self) -> None:
        """An IPv6 listen address without brackets gets the bracketed spelling."""
        self.assertEqual(
            errors(with_listener(listen="'::1:5432'")),
            (
                "egress.yaml:3: listeners[0].listen: an IPv6 address needs brackets: "
                "write [::1]:5432, got '::1:5432'",
            ),
        )

    def test_bad_cidr_host_bits(self) -> None:
        """A CIDR with host bits set suggests the network it probably meant."""
        self.assertEqual(
            errors(with_listener(allow_sources='["127.0.0.0/8", "10.0.0.1/8", "fdaa::1/16"]')),
            (
                "egress.yaml:5: listeners[0].allow_sources[1]: '10.0.0.1/8' has host "
                "bits set; did you mean '10.0.0.0/8'?",
                "egress.yaml:5: listeners[0].allow_sources[2]: 'fdaa::1/16' has host "
                "bits set; did you mean 'fdaa::/16'?",
            ),
        )

    def test_bad_cidr_garbage(self) -> None:
        """A value that is not a network at all names the expected forms."""
        self.assertEqual(
            errors(with_listener(allow_sources='["everyone"]')),
            (
                "egress.yaml:5: listeners[0].allow_sources[0]: expected a CIDR such as "
                "10.0.0.0/8 or fdaa::/16, or a single IP address, got 'everyone'",
            ),
        )

    def test_empty_allow_sources(self) -> None:
        """An empty allow_sources list is refused rather than locking everyone out."""
        self.assertEqual(
            errors(with_listener(allow_sources="[]")),
            (
                "egress.yaml:5: listeners[0].allow_sources: an empty list would refuse "
                "every client; remove the key to allow any source",
            ),
        )

    def test_unknown_cluster_reference(self) -> None:
        """A listener naming an undefined cluster lists the defined ones."""
        self.assertEqual(
            errors(with_listener(cluster="dbb")),
            (
                "egress.yaml:4: listeners[0].cluster: unknown cluster 'dbb' "
                "(defined clusters: db); did you mean 'db'?",
            ),
        )

    def test_duplicate_names(self) -> None:
        """A second listener or cluster with a taken name is an error on the second."""
        self.assertEqual(
            errors(
                """\
                listeners:
                  - {name: main, listen: ":5432", cluster: db}
                  - {name: main, listen: ":6432", cluster: db}
                clusters:
                  - {name: db, endpoints: ["a.example:5432"]}
                  - {name: db, endpoints: ["b.example:5432"]}
                """
            ),
            (
                "egress.yaml:3: listeners[1].name: duplicate listener name 'main' "
                "(first at listeners[0].name, line 2)",
                "egress.yaml:6: clusters[1].name: duplicate cluster name 'db' "
                "(first at clusters[0].name, line 5)",
            ),
        )

    def test_duplicate_listen_address(self) -> None:
        """Two listeners on the same address and port clash."""
        self.assertEqual(
            errors(
                """\
                listeners:
                  - {name: a, listen: "127.0.0.1:5432", cluster: db}
                  - {name: b, listen: "127.0.0.1:5432", cluster: db}
                clusters:
                  - {name: db, endpoints: ["a.example:5432"]}
                """
            ),
            (
                "egress.yaml:3: listeners[1].listen: '127.0.0.1:5432' overlaps "
                "listeners[0].listen '127.0.0.1:5432' (line 2); each listener needs "
                "its own address",
            ),
        )

    def test_dual_stack_overlaps_ipv4(self) -> None:
        """A dual-stack listener clashes with an IPv4 listener on the same port."""
        (error,) = errors(
            """\
            listeners:
              - {name: a, listen: ":5432", cluster: db}
              - {name: b, listen: "0.0.0.0:5432", cluster: db}
            clusters:
              - {name: db, endpoints: ["a.example:5432"]}
            """
        )
        self.assertTrue(
            error.startswith(
                "egress.yaml:3: listeners[1].listen: '0.0.0.0:5432' overlaps "
                "listeners[0].listen ':5432'"
            ),
            error,
        )

    def test_bad_names(self) -> None:
        """Names outside [a-z0-9_-] are rejected."""
        self.assertEqual(
            errors(with_listener(name="Main")),
            (
                "egress.yaml:2: listeners[0].name: expected a name of lower-case "
                "letters, digits, '_' and '-', got 'Main'",
            ),
        )

    def test_bad_log_prefix(self) -> None:
        """A log prefix with whitespace is rejected."""
        self.assertEqual(
            errors(with_listener(log_prefix="'PG 1'")),
            (
                "egress.yaml:5: listeners[0].log_prefix: expected a non-empty prefix "
                "without whitespace, got 'PG 1'",
            ),
        )

    def test_bad_duration(self) -> None:
        """An unparseable duration names the accepted spellings."""
        self.assertEqual(
            errors(with_cluster(connect_timeout="5 seconds")),
            (
                "egress.yaml:8: clusters[0].connect_timeout: expected a duration such "
                "as 250ms, 5s, 2m, 1h or 1m30s (a plain number means seconds), got "
                "'5 seconds'",
            ),
        )

    def test_negative_duration(self) -> None:
        """A negative duration is rejected."""
        self.assertEqual(
            errors(with_cluster(idle_timeout="-1h")),
            ("egress.yaml:8: clusters[0].idle_timeout: a duration cannot be negative, got '-1h'",),
        )

    def test_zero_connect_timeout(self) -> None:
        """connect_timeout must be greater than zero."""
        self.assertEqual(
            errors(with_cluster(connect_timeout="0s")),
            ("egress.yaml:8: clusters[0].connect_timeout: must be greater than 0 (e.g. 5s)",),
        )

    def test_keepalive_below_one_second(self) -> None:
        """Keepalive times under a second are rejected because the kernel counts seconds."""
        self.assertEqual(
            errors(with_cluster(keepalive="{idle: 500ms, interval: 1500ms, count: 128}")),
            (
                "egress.yaml:8: clusters[0].keepalive.idle: expected whole seconds from "
                "1s to 32767s (the kernel counts keepalive time in whole seconds), got "
                "'500ms'",
                "egress.yaml:8: clusters[0].keepalive.interval: expected whole seconds "
                "from 1s to 32767s (the kernel counts keepalive time in whole seconds), "
                "got '1500ms'",
                "egress.yaml:8: clusters[0].keepalive.count: expected a whole number "
                "1-127, got 128",
            ),
        )

    def test_keepalive_bad_value(self) -> None:
        """keepalive must be a mapping or a boolean."""
        self.assertEqual(
            errors(with_cluster(keepalive="sometimes")),
            (
                "egress.yaml:8: clusters[0].keepalive: expected a mapping with idle, "
                "interval and count, or false to turn keepalive off, got 'sometimes'",
            ),
        )

    def test_non_positive_integers(self) -> None:
        """Limits must be whole numbers of at least one."""
        self.assertEqual(
            errors(with_cluster(max_pending="0", max_connections="1.5", max_connect_attempts="true")),
            (
                "egress.yaml:8: clusters[0].max_pending: expected a whole number >= 1, got 0",
                "egress.yaml:9: clusters[0].max_connections: expected a whole number >= 1, "
                "got 1.5",
                "egress.yaml:10: clusters[0].max_connect_attempts: expected a whole "
                "number >= 1, got true",
            ),
        )

    def test_unset_variable(self) -> None:
        """An unset variable without a default names the path, the variable and the fix."""
        self.assertEqual(
            errors(with_cluster(endpoints='["${PG_HOST}:5432"]')),
            (
                "egress.yaml:7: clusters[0].endpoints[0]: environment variable PG_HOST "
                "is not set; set PG_HOST or write ${PG_HOST:-default}",
            ),
        )

    def test_bad_reference(self) -> None:
        """A malformed ${...} reference is an error, not literal text."""
        self.assertEqual(
            errors(with_listener(log_prefix="'${PG HOST}'")),
            (
                "egress.yaml:5: listeners[0].log_prefix: invalid reference "
                "'${PG HOST}': expected ${NAME} or ${NAME:-default} (NAME is letters, "
                "digits and _); write $$ for a literal $",
            ),
        )

    def test_unterminated_reference(self) -> None:
        """A ${ without its closing brace is an error."""
        self.assertEqual(
            errors(with_listener(log_prefix="'A${B'")),
            (
                "egress.yaml:5: listeners[0].log_prefix: unterminated '${' in 'A${B'; "
                "write $$ for a literal $",
            ),
        )

    def test_bad_mode(self) -> None:
        """A mode other than tcp says which modes this version lacks."""
        self.assertEqual(
            errors(with_listener(mode="postgres")),
            (
                "egress.yaml:5: listeners[0].mode: expected tcp, got 'postgres' (the "
                "postgres, http_connect and socks5 modes are not available in this "
                "version)",
            ),
        )

    def test_bad_hosts(self) -> None:
        """hosts entries need a valid name and an IP literal, unique ignoring case."""
        self.assertEqual(
            errors(
                MINIMAL
                + "hosts:\n"
                + "  db.test: 10.0.0.1\n"
                + "  DB.test: 10.0.0.2\n"
                + "  bad_name: 10.0.0.3\n"
                + "  ok.test: db.example.com\n"
            ),
            (
                "egress.yaml:10: hosts.DB.test: duplicate host 'DB.test' (names "
                "ignore case; first at line 9)",
                "egress.yaml:11: hosts.bad_name: 'bad_name' is not a valid host name "
                "(letters, digits and '-' in dot-separated labels of 1-63 characters, "
                "at most 253 in all)",
                "egress.yaml:12: hosts.ok.test: expected an IP address (e.g. 127.0.0.1 "
                "or fdaa::3), got 'db.example.com'",
            ),
        )

    def test_bad_access_log_format(self) -> None:
        """access_log.format must be text or json."""
        self.assertEqual(
            errors(MINIMAL + "access_log: {format: xml}\n"),
            ("egress.yaml:8: access_log.format: expected text or json, got 'xml'",),
        )

    def test_wrong_type_for_section(self) -> None:
        """A section of the wrong YAML type says what it expected."""
        self.assertEqual(
            errors("listeners: {name: a}\nclusters: nope\n"),
            (
                "egress.yaml:1: listeners: expected a list of listeners, got a mapping",
                "egress.yaml:2: clusters: expected a list of clusters, got 'nope'",
            ),
        )

    def test_yaml_syntax_error(self) -> None:
        """A YAML syntax error is one error with its line, column and PyYAML's problem."""
        self.assertEqual(
            errors("listeners:\n  - name: a\n   cluster: b\nclusters: []\n"),
            (
                "egress.yaml:3: invalid YAML: expected <block end>, but found "
                "'<block mapping start>' (column 4), while parsing a block collection "
                "that starts at line 2",
            ),
        )

    def test_yaml_syntax_error_at_end(self) -> None:
        """A YAML error at the end of the file points at the last line and the opening."""
        self.assertEqual(
            errors("listeners:\n  - [a,\nclusters: []\n"),
            (
                "egress.yaml:3: invalid YAML: expected ',' or ']', but got "
                "'<stream end>' (at the end of the file), while parsing a flow "
                "sequence that starts at line 2",
            ),
        )

    def test_two_documents(self) -> None:
        """A second YAML document in the file is an error."""
        self.assertEqual(
            errors(MINIMAL + "---\nlisteners: []\n"),
            (
                "egress.yaml:8: invalid YAML: expected a single document in the "
                "stream, but found another document (column 1)",
            ),
        )

    def test_empty_file(self) -> None:
        """An empty file says what it should contain."""
        self.assertEqual(
            errors("# nothing yet\n"),
            (
                "egress.yaml:1: the file is empty; expected a mapping with "
                "'listeners' and 'clusters'",
            ),
        )

    def test_top_level_not_a_mapping(self) -> None:
        """A top level that is a list is rejected with the expected keys."""
        self.assertEqual(
            errors("- listeners\n"),
            (
                "egress.yaml:1: expected a mapping with keys listeners, clusters, "
                "hosts, access_log, admin, metrics, drain_timeout, shutdown_delay, "
                "got a list",
            ),
        )

    def test_many_errors_at_once(self) -> None:
        """Every problem in a file is reported in one error, in line order."""
        self.assertEqual(
            errors(
                """\
                listeners:
                  - name: direct
                    listen: "localhost:5432"
                    cluster: pg_drect
                    allow_sources: ["10.0.0.1/8"]
                clusters:
                  - name: pg_direct
                    endpoints: ["${PG_HOST}:5432", "db"]
                    connect_timeout: soon
                    keepalive: {idle: 30s, intervl: 5s}
                """
            ),
            (
                "egress.yaml:3: listeners[0].listen: expected an IP address to listen "
                "on, got host name 'localhost' (use 127.0.0.1:5432, [::1]:5432, or "
                ":5432 for all interfaces)",
                "egress.yaml:4: listeners[0].cluster: unknown cluster 'pg_drect' "
                "(defined clusters: pg_direct); did you mean 'pg_direct'?",
                "egress.yaml:5: listeners[0].allow_sources[0]: '10.0.0.1/8' has host "
                "bits set; did you mean '10.0.0.0/8'?",
                "egress.yaml:8: clusters[0].endpoints[0]: environment variable PG_HOST "
                "is not set; set PG_HOST or write ${PG_HOST:-default}",
                "egress.yaml:8: clusters[0].endpoints[1]: expected HOST:PORT (e.g. "
                "db.example.com:5432 or [2001:db8::1]:5432), got 'db'",
                "egress.yaml:9: clusters[0].connect_timeout: expected a duration such "
                "as 250ms, 5s, 2m, 1h or 1m30s (a plain number means seconds), got "
                "'soon'",
                "egress.yaml:10: clusters[0].keepalive: unknown key 'intervl'; did you "
                "mean 'interval'?",
            ),
        )

    def test_bad_drain_timeout(self) -> None:
        """An unparseable drain_timeout names the accepted spellings."""
        self.assertEqual(
            errors(MINIMAL + "drain_timeout: soon\n"),
            (
                "egress.yaml:8: drain_timeout: expected a duration such as 250ms, 5s, "
                "2m, 1h or 1m30s (a plain number means seconds), got 'soon'",
            ),
        )

    def test_negative_drain_timeout(self) -> None:
        """A negative drain_timeout is rejected."""
        self.assertEqual(
            errors(MINIMAL + "drain_timeout: -5s\n"),
            ("egress.yaml:8: drain_timeout: a duration cannot be negative, got '-5s'",),
        )

    def test_negative_shutdown_delay(self) -> None:
        """A negative shutdown_delay is rejected."""
        self.assertEqual(
            errors(MINIMAL + "shutdown_delay: -1\n"),
            ("egress.yaml:8: shutdown_delay: a duration cannot be negative, got -1",),
        )

    def test_unknown_key_in_metrics(self) -> None:
        """An unknown key inside metrics gets a suggestion."""
        self.assertEqual(
            errors(MINIMAL + "metrics: {listn: ':9100'}\n"),
            ("egress.yaml:8: metrics: unknown key 'listn'; did you mean 'listen'?",),
        )

    def test_bad_service_value(self) -> None:
        """admin must be a mapping or a boolean."""
        self.assertEqual(
            errors(MINIMAL + "admin: loopback\n"),
            (
                "egress.yaml:8: admin: expected a mapping with listen, or false to "
                "turn admin off, got 'loopback'",
            ),
        )

    def test_bad_service_listen(self) -> None:
        """A service's listen value is checked like a listener's."""
        self.assertEqual(
            errors(MINIMAL + "admin: {listen: 'localhost:9901'}\n"),
            (
                "egress.yaml:8: admin.listen: expected an IP address to listen on, "
                "got host name 'localhost' (use 127.0.0.1:9901, [::1]:9901, or "
                ":9901 for all interfaces)",
            ),
        )

    def test_metrics_listen_overlaps_listener(self) -> None:
        """metrics.listen on a listener's address and port clashes with it."""
        self.assertEqual(
            errors(with_listener(listen='":9091"') + "metrics: {listen: ':9091'}\n"),
            (
                "egress.yaml:8: metrics.listen: ':9091' overlaps listeners[0].listen "
                "':9091' (line 3); listeners, admin and metrics each need their own "
                "address",
            ),
        )

    def test_listener_overlaps_default_metrics(self) -> None:
        """A listener on the default metrics port says how to move or turn off metrics."""
        self.assertEqual(
            errors(with_listener(listen='"0.0.0.0:9091"')),
            (
                "egress.yaml:3: listeners[0].listen: '0.0.0.0:9091' overlaps the "
                "default metrics.listen '[::]:9091'; give metrics another address "
                "(metrics: {listen: ...}) or turn it off (metrics: false)",
            ),
        )

    def test_admin_overlaps_default_metrics(self) -> None:
        """admin moved onto the default metrics port clashes with metrics."""
        self.assertEqual(
            errors(MINIMAL + "admin: {listen: '[::1]:9091'}\n"),
            (
                "egress.yaml:8: admin.listen: '[::1]:9091' overlaps the default "
                "metrics.listen '[::]:9091'; give metrics another address (metrics: "
                "{listen: ...}) or turn it off (metrics: false)",
            ),
        )

    def test_bad_health_check_kind(self) -> None:
        """health_check.kind must be tcp, postgres or none."""
        self.assertEqual(
            errors(with_cluster(health_check="{kind: http}")),
            (
                "egress.yaml:8: clusters[0].health_check.kind: expected tcp, postgres "
                "or none, got 'http'",
            ),
        )

    def test_health_check_timeout_not_below_interval(self) -> None:
        """A health check timeout equal to its interval is rejected, naming both."""
        self.assertEqual(
            errors(with_cluster(health_check="{interval: 5s, timeout: 5s}")),
            (
                "egress.yaml:8: clusters[0].health_check: timeout (5s) must be less "
                "than interval (5s)",
            ),
        )

    def test_health_check_interval_below_default_timeout(self) -> None:
        """An interval at or under the default timeout says the timeout is the default."""
        self.assertEqual(
            errors(with_cluster(health_check="{interval: 1s}")),
            (
                "egress.yaml:8: clusters[0].health_check: timeout (2s, the default) "
                "must be less than interval (1s)",
            ),
        )

    def test_health_check_bad_numbers(self) -> None:
        """Health check durations must be above zero and thresholds at least one."""
        self.assertEqual(
            errors(
                with_cluster(
                    health_check="{interval: 0s, timeout: 0, unhealthy_threshold: 0, "
                    "healthy_threshold: 1.5}"
                )
            ),
            (
                "egress.yaml:8: clusters[0].health_check.interval: must be greater "
                "than 0 (e.g. 10s)",
                "egress.yaml:8: clusters[0].health_check.timeout: must be greater "
                "than 0 (e.g. 2s)",
                "egress.yaml:8: clusters[0].health_check.unhealthy_threshold: expected "
                "a whole number >= 1, got 0",
                "egress.yaml:8: clusters[0].health_check.healthy_threshold: expected "
                "a whole number >= 1, got 1.5",
            ),
        )

    def test_unknown_key_in_health_check(self) -> None:
        """An unknown key inside health_check gets a suggestion."""
        self.assertEqual(
            errors(with_cluster(health_check="{kind: tcp, intervall: 5s}")),
            (
                "egress.yaml:8: clusters[0].health_check: unknown key 'intervall'; "
                "did you mean 'interval'?",
            ),
        )

    def test_bad_health_check_value(self) -> None:
        """health_check must be a mapping or a boolean."""
        self.assertEqual(
            errors(with_cluster(health_check="tcp")),
            (
                "egress.yaml:8: clusters[0].health_check: expected a mapping with "
                "kind, interval, timeout, unhealthy_threshold and healthy_threshold, "
                "or false to turn health checks off, got 'tcp'",
            ),
        )

    def test_proxy_protocol_not_a_bool(self) -> None:
        """proxy_protocol must be true or false."""
        self.assertEqual(
            errors(with_listener(proxy_protocol="v2")),
            ("egress.yaml:5: listeners[0].proxy_protocol: expected true or false, got 'v2'",),
        )

    def test_str_joins_errors(self) -> None:
        """str() of a ConfigError is its errors, one per line."""
        error = ConfigError(["a.yaml:1: one", "a.yaml:2: two"])
        self.assertEqual(str(error), "a.yaml:1: one\na.yaml:2: two")
        self.assertEqual(error.errors, ("a.yaml:1: one", "a.yaml:2: two"))


class LoadConfigTests(SynchronousTestCase):
    """load_config reads the named file."""

    def write(self, text: str) -> str:
        fd, path = tempfile.mkstemp(suffix=".yaml")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        self.addCleanup(os.remove, path)
        return path

    def test_reads_file(self) -> None:
        """A file is parsed and the config's source is its path."""
        path = self.write(EXAMPLE)
        config = load_config(path, {"PG_HOST": "db.test"})
        self.assertEqual(config.source, path)
        self.assertEqual(len(config.listeners), 2)

    def test_errors_name_the_file(self) -> None:
        """Errors start with the path of the file."""
        path = self.write(MINIMAL.replace("db.example.com:5432", "db"))
        with self.assertRaises(ConfigError) as raised:
            load_config(path, {})
        (error,) = raised.exception.errors
        self.assertTrue(error.startswith(f"{path}:7: clusters[0].endpoints[0]: "), error)

    def test_missing_file(self) -> None:
        """A missing file is a ConfigError that says it cannot be read."""
        path = os.path.join(tempfile.mkdtemp(), "absent.yaml")
        self.addCleanup(os.rmdir, os.path.dirname(path))
        with self.assertRaises(ConfigError) as raised:
            load_config(path, {})
        self.assertEqual(
            raised.exception.errors,
            (f"{path}: cannot read the config file: No such file or directory",),
        )


class ObjectTests(SynchronousTestCase):
    """The attrs validators, the second line of defence behind the loader."""

    def test_address_str(self) -> None:
        """An address prints as host:port, with brackets for IPv6."""
        self.assertEqual(str(Address("db.test", 5432)), "db.test:5432")
        self.assertEqual(str(Address("::1", 5432)), "[::1]:5432")

    def test_address_port_range(self) -> None:
        """An address port must be 1..65535."""
        self.assertRaises(ValueError, Address, "db.test", 0)
        self.assertRaises(ValueError, Address, "db.test", 65536)

    def test_address_host(self) -> None:
        """An address host must be a DNS name or IP literal."""
        self.assertRaises(ValueError, Address, "bad host", 1)

    def test_cluster_without_endpoints_only_in_code(self) -> None:
        """A cluster object may have no endpoints (the service's dynamic ones), but a file may not."""
        self.assertEqual(ClusterConfig(name="db", endpoints=()).endpoints, ())

    def test_cluster_needs_tuple(self) -> None:
        """A cluster refuses a list of endpoints."""
        self.assertRaises(
            TypeError, ClusterConfig, name="db", endpoints=[Address("a.test", 1)]
        )

    def test_keepalive_limits(self) -> None:
        """Keepalive refuses fractions of a second and more than 127 probes."""
        self.assertRaises(ValueError, Keepalive, idle=0.5)
        self.assertRaises(ValueError, Keepalive, count=128)

    def test_listener_mode(self) -> None:
        """A listener refuses modes this version does not have."""
        listen = ListenAddress(":1", "::", 1, True)
        self.assertRaises(
            ValueError, ListenerConfig, name="a", listen=listen, mode="socks5", cluster="db"
        )

    def test_listener_default_prefix(self) -> None:
        """A listener built in code defaults its log prefix to the upper-cased name."""
        listen = ListenAddress(":1", "::", 1, True)
        listener = ListenerConfig(name="pg-a", listen=listen, mode="tcp", cluster="db")
        self.assertEqual(listener.log_prefix, "PG-A")

    def test_listen_address_dual_stack_only_for_any(self) -> None:
        """Only the IPv6 any-address can be dual-stack."""
        self.assertRaises(ValueError, ListenAddress, "[::1]:1", "::1", 1, True)

    def test_config_checks_references(self) -> None:
        """A config whose listener names a missing cluster cannot exist."""
        listen = ListenAddress(":1", "::", 1, True)
        self.assertRaises(
            ValueError,
            Config,
            source="x",
            listeners=(ListenerConfig(name="a", listen=listen, mode="tcp", cluster="nope"),),
            clusters=(ClusterConfig(name="db", endpoints=(Address("a.test", 1),)),),
        )


class LoaderTests(SynchronousTestCase):
    """The YAML loader class used for the file."""

    def test_rejects_duplicate_keys(self) -> None:
        """Plain yaml.load with the loader refuses a duplicate key."""
        with self.assertRaises(yaml.constructor.ConstructorError) as raised:
            yaml.load("a: 1\nb: 2\na: 3\n", Loader=_Loader)
        self.assertIn("found duplicate key 'a' (first at line 1)", str(raised.exception))

    def test_loads_plain_mapping(self) -> None:
        """Without duplicates the loader behaves like SafeLoader."""
        self.assertEqual(yaml.load("a: 1\nb: [x]\n", Loader=_Loader), {"a": 1, "b": ["x"]})
