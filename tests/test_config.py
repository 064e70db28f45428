"""Tests for egressproxy.config: good files become objects, bad files become errors.

Error tests compare whole messages, file name and line included, because the
messages are the product: an operator reads them at 3 a.m.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network

import attrs
import yaml
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.config.yamlnodes import Loader as _Loader
from egressproxy.config import (
    AccessLogConfig,
    Address,
    ClusterConfig,
    ClusterTLS,
    Config,
    ConfigError,
    HealthCheckConfig,
    HttpServiceConfig,
    Keepalive,
    ListenAddress,
    ListenerConfig,
    load_config,
    parse_config,
    parse_duration,
)
from egressproxy.modes.forward.options import ForwardOptions
from egressproxy.modes.forward.rules import DestinationRule, User
from egressproxy.modes.postgres.options import ClientTLS, PostgresOptions, PostgresRoute

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


def with_mode(mode: str, **fields: str) -> str:
    """A file with one listener of ``mode`` and the cluster db (values as YAML).

    The listener has no cluster unless one is given: its name, listen and mode
    take lines 2-4 and the keys given follow from line 5, in order.
    """
    lines = [
        "listeners:",
        "  - name: main",
        '    listen: "127.0.0.1:0"',
        f"    mode: {mode}",
    ]
    lines += [f"    {key}: {value}" for key, value in fields.items()]
    lines += ["clusters:", "  - name: db", '    endpoints: ["db.example.com:5432"]']
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
                workers=1,
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


# Listener on a named port, the only kind several workers can share; any
# top-level key appended after it lands on line 8.
SHARED = with_listener(listen='"127.0.0.1:5432"')


def auto_workers() -> int:
    """What workers: auto should come to here: the usable CPUs, clamped to 1-64."""
    return max(1, min(64, len(os.sched_getaffinity(0))))


class WorkersConfigTests(SynchronousTestCase):
    """workers: how many processes share the listeners, and which listeners they can share."""

    EXPECTED = "expected a whole number 1-64 or auto"
    BAD = [
        ("0", f"{EXPECTED}, got 0"),
        ("65", f"{EXPECTED}, got 65"),
        ("-1", f"{EXPECTED}, got -1"),
        ("x", f"{EXPECTED}, got 'x'"),
        ("Auto", f"{EXPECTED}, got 'Auto'"),
        ("''", f"{EXPECTED}, got ''"),
        ("2.5", f"{EXPECTED}, got 2.5"),
        ("true", f"{EXPECTED}, got true"),
        ("null", f"{EXPECTED}, got null"),
        ("[2]", f"{EXPECTED}, got a list"),
        ("{count: 2}", f"{EXPECTED}, got a mapping"),
    ]

    def cpus(self, count: int) -> None:
        """Make os.sched_getaffinity report ``count`` usable CPUs."""
        self.patch(os, "sched_getaffinity", lambda pid: set(range(count)))

    def test_default_one(self) -> None:
        """Without workers the proxy runs one process."""
        self.assertEqual(parse(MINIMAL).workers, 1)

    def test_number(self) -> None:
        """A whole number is the number of workers."""
        self.assertEqual(parse(SHARED + "workers: 4\n").workers, 4)

    def test_bounds(self) -> None:
        """1 and 64, the ends of the range, are accepted."""
        self.assertEqual(
            (parse(SHARED + "workers: 1\n").workers, parse(SHARED + "workers: 64\n").workers),
            (1, 64),
        )

    def test_quoted_number(self) -> None:
        """A digit string counts as the number it spells."""
        self.assertEqual(parse(SHARED + "workers: '3'\n").workers, 3)

    def test_from_variable(self) -> None:
        """workers accepts the digit string a variable expands to."""
        config = parse(SHARED + "workers: ${W}\n", {"W": "8"})
        self.assertEqual(config.workers, 8)

    def test_variable_default(self) -> None:
        """${W:-2} gives 2 workers when W is unset."""
        self.assertEqual(parse(SHARED + "workers: ${W:-2}\n").workers, 2)

    def test_unset_variable(self) -> None:
        """An unset variable in workers is reported like anywhere else."""
        self.assertEqual(
            errors(SHARED + "workers: ${W}\n"),
            (
                "egress.yaml:8: workers: environment variable W is not set; "
                "set W or write ${W:-default}",
            ),
        )

    def test_auto(self) -> None:
        """auto is the number of CPUs this process may run on, clamped to 1-64."""
        self.assertEqual(parse(SHARED + "workers: auto\n").workers, auto_workers())

    def test_auto_from_variable(self) -> None:
        """workers accepts the text auto from a variable."""
        config = parse(SHARED + "workers: ${W}\n", {"W": "auto"})
        self.assertEqual(config.workers, auto_workers())

    def test_auto_clamped(self) -> None:
        """auto gives at most 64 workers however many CPUs there are."""
        self.cpus(200)
        self.assertEqual(parse(SHARED + "workers: auto\n").workers, 64)

    def test_auto_counts_affinity(self) -> None:
        """auto follows the CPU affinity mask, not the machine's CPU count."""
        self.cpus(3)
        self.assertEqual(parse(SHARED + "workers: auto\n").workers, 3)

    def test_bad(self) -> None:
        """Each value that is neither 1-64 nor auto names itself and the expected forms."""
        for value, message in self.BAD:
            self.assertEqual(
                (value, errors(SHARED + f"workers: {value}\n")),
                (value, (f"egress.yaml:8: workers: {message}",)),
            )

    def test_bad_from_variable(self) -> None:
        """A variable expanding to a bad count is refused like one written in the file."""
        for value, shown in (("0", "0"), ("65", "65"), ("two", "'two'"), (" 2", "' 2'")):
            self.assertEqual(
                (value, errors(SHARED + "workers: ${W}\n", {"W": value})),
                (value, (f"egress.yaml:8: workers: {self.EXPECTED}, got {shown}",)),
            )

    def test_port_zero_refused(self) -> None:
        """Several workers cannot share a listener on port 0."""
        self.assertEqual(
            errors(MINIMAL + "workers: 2\n"),
            (
                "egress.yaml:3: listeners[0].listen: port 0 cannot be shared by 2 "
                "workers (each would get a different port); name a port or set workers: 1",
            ),
        )

    def test_description_refused(self) -> None:
        """Several workers cannot share a listener given as a Twisted endpoint description."""
        self.assertEqual(
            errors(with_listener(listen="'unix:/tmp/x.sock'") + "workers: 3\n"),
            (
                "egress.yaml:3: listeners[0].listen: 'unix:/tmp/x.sock' cannot be shared "
                "by 3 workers (each binds its own socket with SO_REUSEPORT); use a "
                "host:port address or set workers: 1",
            ),
        )

    def test_tcp_description_refused(self) -> None:
        """A tcp: description is refused too, though it names a port."""
        self.assertEqual(
            errors(with_listener(listen="'tcp:6432'") + "workers: 2\n"),
            (
                "egress.yaml:3: listeners[0].listen: 'tcp:6432' cannot be shared "
                "by 2 workers (each binds its own socket with SO_REUSEPORT); use a "
                "host:port address or set workers: 1",
            ),
        )

    def test_every_listener_checked(self) -> None:
        """Each listener that cannot be shared gets its own error, in line order."""
        self.assertEqual(
            errors(
                """\
                listeners:
                  - {name: a, listen: "127.0.0.1:5432", cluster: db}
                  - {name: b, listen: "127.0.0.1:0", cluster: db}
                  - {name: c, listen: "unix:/tmp/x.sock", cluster: db}
                  - {name: d, listen: ":6432", cluster: db}
                clusters:
                  - {name: db, endpoints: ["db.example.com:5432"]}
                workers: 4
                """
            ),
            (
                "egress.yaml:3: listeners[1].listen: port 0 cannot be shared by 4 "
                "workers (each would get a different port); name a port or set workers: 1",
                "egress.yaml:4: listeners[2].listen: 'unix:/tmp/x.sock' cannot be shared "
                "by 4 workers (each binds its own socket with SO_REUSEPORT); use a "
                "host:port address or set workers: 1",
            ),
        )

    def test_named_ports_shared(self) -> None:
        """Listeners on named ports, IPv4, IPv6 or all interfaces, can be shared."""
        config = parse(
            """\
            listeners:
              - {name: a, listen: "127.0.0.1:5432", cluster: db}
              - {name: b, listen: "[::1]:5433", cluster: db}
              - {name: c, listen: ":6432", cluster: db}
            clusters:
              - {name: db, endpoints: ["db.example.com:5432"]}
            workers: 2
            """
        )
        self.assertEqual(
            (config.workers, [listener.listen.port for listener in config.listeners]),
            (2, [5432, 5433, 6432]),
        )

    def test_one_worker_allows_any_listen(self) -> None:
        """workers: 1 allows port 0 and endpoint descriptions."""
        config = parse(
            """\
            listeners:
              - {name: a, listen: "127.0.0.1:0", cluster: db}
              - {name: b, listen: "unix:/tmp/x.sock", cluster: db}
            clusters:
              - {name: db, endpoints: ["db.example.com:5432"]}
            workers: 1
            """
        )
        self.assertEqual(
            (config.workers, [listener.listen.text for listener in config.listeners]),
            (1, ["127.0.0.1:0", "unix:/tmp/x.sock"]),
        )

    def test_services_not_checked(self) -> None:
        """admin and metrics may use a description or port 0 with several workers."""
        config = parse(
            SHARED
            + "admin: {listen: 'unix:/tmp/admin.sock'}\n"
            + "metrics: {listen: '127.0.0.1:0'}\n"
            + "workers: 2\n"
        )
        self.assertEqual(
            (config.workers, config.admin, config.metrics),
            (
                2,
                HttpServiceConfig(
                    ListenAddress(
                        "unix:/tmp/admin.sock", None, None, False,
                        description="unix:/tmp/admin.sock",
                    )
                ),
                HttpServiceConfig(ListenAddress("127.0.0.1:0", "127.0.0.1", 0, False, None)),
            ),
        )

    def test_auto_checks_listens(self) -> None:
        """auto that comes to several workers refuses port 0, naming the count."""
        self.cpus(6)
        self.assertEqual(
            errors(MINIMAL + "workers: auto\n"),
            (
                "egress.yaml:3: listeners[0].listen: port 0 cannot be shared by 6 "
                "workers (each would get a different port); name a port or set workers: 1",
            ),
        )

    def test_auto_on_one_cpu_allows_any_listen(self) -> None:
        """auto on a single usable CPU is one worker, so port 0 is fine."""
        self.cpus(1)
        self.assertEqual(parse(MINIMAL + "workers: auto\n").workers, 1)

    def test_bad_count_skips_share_check(self) -> None:
        """A bad workers value is the only error; the listeners are not judged against it."""
        self.assertEqual(
            errors(MINIMAL + "workers: 0\n"),
            (f"egress.yaml:8: workers: {self.EXPECTED}, got 0",),
        )


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
                "shutdown_delay, workers, fast_path, expected_egress_ips, egress_ip_check)",
            ),
        )

    def test_future_key_rejected(self) -> None:
        """A key this version does not know, such as Envoy's outlier_detection, is rejected."""
        (error,) = errors(with_cluster(outlier_detection="{consecutive_5xx: 5}"))
        self.assertTrue(
            error.startswith("egress.yaml:8: clusters[0]: unknown key 'outlier_detection'"),
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
        """A file without listeners says so."""
        self.assertEqual(
            errors("access_log: {format: text}\n"),
            ("egress.yaml:1: missing required key 'listeners'",),
        )

    def test_clusters_optional_for_forward_proxies(self) -> None:
        """A file whose listeners are all forward proxies needs no clusters."""
        config = parse_config(
            "listeners:\n"
            "  - {name: out, listen: \"127.0.0.1:0\", mode: socks5, allow_destinations: [\"api.vendor.example:443\"]}\n",
            "egress.yaml", {},
        )
        self.assertEqual((config.clusters, config.listeners[0].cluster), ((), None))

    def test_tcp_listener_without_clusters(self) -> None:
        """A tcp listener in a file without clusters names the cluster it lacks."""
        self.assertEqual(
            errors("listeners:\n  - {name: a, listen: \":1\", cluster: pg}\n"),
            ("egress.yaml:2: listeners[0].cluster: unknown cluster 'pg' (defined clusters: none)",),
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
        """An unknown mode lists the four there are."""
        self.assertEqual(
            errors(with_listener(mode="https")),
            (
                "egress.yaml:5: listeners[0].mode: expected tcp, postgres, "
                "http_connect or socks5, got 'https'",
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
                "workers, fast_path, expected_egress_ips, egress_ip_check, got a list",
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


class TLSFiles:
    """Certificate, key and CA files for the tests that name them (only their existence is checked)."""

    def make_tls_files(self: SynchronousTestCase) -> tuple[str, str, str]:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        paths = []
        for name in ("proxy.crt", "proxy.key", "ca.pem"):
            path = os.path.join(directory, name)
            with open(path, "w", encoding="ascii") as f:
                f.write("-----BEGIN PLACEHOLDER-----\n")
            paths.append(path)
        return paths[0], paths[1], paths[2]


class ModeTests(SynchronousTestCase, TLSFiles):
    """Good files for the postgres, http_connect and socks5 modes."""

    def test_postgres_routes(self) -> None:
        """Routes to a name template and to a cluster; sni patterns are lower-cased."""
        config = parse(
            with_mode(
                "postgres",
                routes='[{sni: "*.PG.example.cloud", upstream: "{sni}:5432"}, '
                "{sni: db.example.com, cluster: db}]",
            )
        )
        self.assertEqual(
            config.listeners[0],
            ListenerConfig(
                name="main",
                listen=ListenAddress("127.0.0.1:0", "127.0.0.1", 0, False),
                mode="postgres",
                cluster=None,
                options=PostgresOptions(
                    tls="passthrough",
                    require_tls=False,
                    routes=(
                        PostgresRoute(sni="*.pg.example.cloud", upstream="{sni}:5432"),
                        PostgresRoute(sni="db.example.com", cluster="db"),
                    ),
                ),
            ),
        )

    def test_postgres_fixed_upstream_route(self) -> None:
        """An upstream without {sni} is a fixed HOST:PORT and is kept as written."""
        config = parse(
            with_mode("postgres", routes='[{sni: a.example.com, upstream: "[2001:db8::1]:6432"}]')
        )
        self.assertEqual(
            config.listeners[0].options.routes,
            (PostgresRoute(sni="a.example.com", upstream="[2001:db8::1]:6432"),),
        )

    def test_postgres_single_cluster(self) -> None:
        """A passthrough listener with one cluster, requiring TLS."""
        listener = parse(
            with_mode("postgres", cluster="db", tls="passthrough", require_tls="true")
        ).listeners[0]
        self.assertEqual(
            (listener.mode, listener.cluster, listener.options.tls, listener.options.require_tls, listener.options.routes),
            ("postgres", "db", "passthrough", True, ()),
        )

    def test_postgres_originate(self) -> None:
        """An originate listener with client_tls, to a cluster with tls settings."""
        cert, key, ca = self.make_tls_files()
        config = parse(
            with_mode(
                "postgres",
                cluster="db",
                tls="originate",
                require_tls="true",
                client_tls=f"{{cert: '{cert}', key: '{key}'}}",
            )
            + f"    tls: {{server_name: db.internal.example, ca_file: '{ca}'}}\n"
        )
        listener = config.listeners[0]
        self.assertEqual(
            (listener.options.tls, listener.options.require_tls, listener.options.client_tls),
            ("originate", True, ClientTLS(cert=cert, key=key)),
        )
        self.assertEqual(
            config.clusters[0].tls,
            ClusterTLS(server_name="db.internal.example", ca_file=ca),
        )

    def test_postgres_originate_without_client_tls(self) -> None:
        """An originate listener needs no client_tls when it does not require TLS."""
        listener = parse(with_mode("postgres", cluster="db", tls="originate")).listeners[0]
        self.assertEqual((listener.options.tls, listener.options.client_tls), ("originate", None))

    def test_cluster_tls_defaults(self) -> None:
        """Cluster tls of true, {} or null-valued keys verifies with the defaults."""
        for value in ("true", "{}", "{server_name: null, ca_file: null}"):
            self.assertEqual(parse(with_cluster(tls=value)).clusters[0].tls, ClusterTLS(), value)

    def test_cluster_tls_off(self) -> None:
        """Cluster tls of false or null, or no tls at all, is no TLS settings."""
        for value in ("false", "null"):
            self.assertIsNone(parse(with_cluster(tls=value)).clusters[0].tls, value)
        self.assertIsNone(parse(MINIMAL).clusters[0].tls)

    def test_http_connect_users_from_environment(self) -> None:
        """An http_connect listener with destinations and passwords from ${ENV}."""
        listener = parse(
            with_mode(
                "http_connect",
                allow_destinations='["api.vendor.com:443", "*.bank.example:443"]',
                users='[{name: app, password: "${APP_PASSWORD}"}, '
                '{name: release, password: "${RELEASE_PASSWORD:-fallback}"}]',
            ),
            {"APP_PASSWORD": "s3cret$"},
        ).listeners[0]
        self.assertEqual(
            listener,
            ListenerConfig(
                name="main",
                listen=ListenAddress("127.0.0.1:0", "127.0.0.1", 0, False),
                mode="http_connect",
                cluster=None,
                options=ForwardOptions(
                    allow_destinations=(
                        DestinationRule(host="api.vendor.com", port=443),
                        DestinationRule(host="*.bank.example", port=443),
                    ),
                    users=(User("app", "s3cret$"), User("release", "fallback")),
                ),
            ),
        )

    def test_socks5_without_users(self) -> None:
        """A socks5 listener without users or a cluster."""
        listener = parse(
            with_mode("socks5", allow_destinations='["db.example.com:5432"]')
        ).listeners[0]
        self.assertEqual(
            (listener.mode, listener.cluster, listener.options.users, listener.options.allow_destinations),
            ("socks5", None, (), (DestinationRule(host="db.example.com", port=5432),)),
        )

    def test_forward_proxy_with_cluster(self) -> None:
        """A forward proxy may name a cluster, which then supplies its limits."""
        listener = parse(
            with_mode("socks5", cluster="db", allow_destinations='["a.example.com:1"]')
        ).listeners[0]
        self.assertEqual(listener.cluster, "db")

    def test_destination_forms(self) -> None:
        """Every accepted allow_destinations form and the rule it becomes."""
        listener = parse(
            with_mode(
                "http_connect",
                allow_destinations=(
                    '["API.Vendor.com:443", "*.bank.example:*", "host.example:*", '
                    '"[2001:db8::1]:443", "10.1.2.0/24:443", "[2001:db8::/32]:443", '
                    '"203.0.113.7:443", "[2001:db8::7]:*"]'
                ),
            )
        ).listeners[0]
        self.assertEqual(
            listener.options.allow_destinations,
            (
                DestinationRule(host="api.vendor.com", port=443),
                DestinationRule(host="*.bank.example", port=None),
                DestinationRule(host="host.example", port=None),
                DestinationRule(network=IPv6Network("2001:db8::1/128"), port=443),
                DestinationRule(network=IPv4Network("10.1.2.0/24"), port=443),
                DestinationRule(network=IPv6Network("2001:db8::/32"), port=443),
                DestinationRule(network=IPv4Network("203.0.113.7/32"), port=443),
                DestinationRule(network=IPv6Network("2001:db8::7/128"), port=None),
            ),
        )

    def test_user_password_not_in_repr(self) -> None:
        """A loaded config's repr does not show passwords."""
        config = parse(
            with_mode(
                "socks5",
                allow_destinations='["a.example.com:1"]',
                users="[{name: app, password: hunter2}]",
            )
        )
        self.assertNotIn("hunter2", repr(config))
        self.assertEqual(config.listeners[0].options.users[0].password, "hunter2")

    def test_user_allow_destinations(self) -> None:
        """A user may carry its own allow_destinations; a user without one has None (the listener's)."""
        config = parse(
            with_mode(
                "http_connect",
                allow_destinations='["a.example.com:443"]',
                users=(
                    "[{name: app, password: pw1, allow_destinations: [\"b.example.com:443\", \"10.0.0.0/8:*\"]},"
                    " {name: ops, password: pw2}]"
                ),
                accept_risk='["10.0.0.0/8:*"]',
            )
        )
        app, ops = config.listeners[0].options.users
        self.assertEqual(
            app.allow_destinations,
            (DestinationRule(host="b.example.com", port=443), DestinationRule(network=IPv4Network("10.0.0.0/8"))),
        )
        self.assertIsNone(ops.allow_destinations)
        self.assertEqual(config.listeners[0].options.allow_destinations, (DestinationRule(host="a.example.com", port=443),))


class ModeErrorTests(SynchronousTestCase, TLSFiles):
    """Bad mode keys: the path, the rule broken and the fix."""

    def test_postgres_key_on_tcp(self) -> None:
        """A postgres key on a tcp listener (the default mode) says it is only for postgres."""
        self.assertEqual(
            errors(with_listener(require_tls="true")),
            (
                "egress.yaml:5: listeners[0].require_tls: only for mode: postgres; "
                "this listener has mode: tcp, the default",
            ),
        )

    def test_postgres_key_on_forward_proxy(self) -> None:
        """A postgres key on a socks5 listener names the listener's mode."""
        self.assertEqual(
            errors(with_mode("socks5", allow_destinations='["a.example.com:1"]', tls="originate")),
            (
                "egress.yaml:6: listeners[0].tls: only for mode: postgres; this "
                "listener has mode: socks5",
            ),
        )

    def test_forward_key_on_postgres(self) -> None:
        """A forward-proxy key on a postgres listener says which modes take it."""
        self.assertEqual(
            errors(with_mode("postgres", cluster="db", users="[{name: a, password: b}]")),
            (
                "egress.yaml:6: listeners[0].users: only for mode: http_connect or "
                "socks5; this listener has mode: postgres",
            ),
        )

    def test_misplaced_key_value_not_checked(self) -> None:
        """A key on the wrong mode is one error, whatever its value."""
        self.assertEqual(
            errors(with_listener(allow_destinations="nonsense")),
            (
                "egress.yaml:5: listeners[0].allow_destinations: only for mode: "
                "http_connect or socks5; this listener has mode: tcp, the default",
            ),
        )

    def test_bad_mode_still_checks_values(self) -> None:
        """With an unknown mode, mode rules are skipped but values are still checked."""
        self.assertEqual(
            errors(with_mode("sock5", tls="tunnel")),
            (
                "egress.yaml:4: listeners[0].mode: expected tcp, postgres, "
                "http_connect or socks5, got 'sock5'",
                "egress.yaml:5: listeners[0].tls: expected passthrough (the client's "
                "TLS goes through to the server) or originate (the proxy opens TLS to "
                "the cluster), got 'tunnel'",
            ),
        )

    def test_postgres_without_cluster_or_routes(self) -> None:
        """A postgres listener needs a cluster or routes."""
        self.assertEqual(
            errors(with_mode("postgres")),
            (
                "egress.yaml:2: listeners[0]: missing required key 'cluster' or "
                "'routes' (a postgres listener sends every connection to one "
                "cluster, or chooses by the TLS server name, SNI, with routes)",
            ),
        )

    def test_postgres_misspelt_cluster(self) -> None:
        """A misspelt cluster key gets its suggestion and no missing-key error."""
        self.assertEqual(
            errors(with_mode("postgres", clustr="db")),
            ("egress.yaml:5: listeners[0]: unknown key 'clustr'; did you mean 'cluster'?",),
        )

    def test_postgres_cluster_and_routes(self) -> None:
        """A postgres listener takes a cluster or routes, not both."""
        self.assertEqual(
            errors(with_mode("postgres", cluster="db", routes="[{sni: a.example.com, cluster: db}]")),
            (
                "egress.yaml:6: listeners[0].routes: give cluster or routes, not both "
                "(cluster sends every connection to one cluster; routes choose by the "
                "TLS server name, SNI)",
            ),
        )

    def test_originate_with_routes(self) -> None:
        """Routes are refused with tls: originate, which sees no SNI."""
        self.assertEqual(
            errors(
                with_mode("postgres", tls="originate", routes="[{sni: a.example.com, cluster: db}]")
            ),
            (
                "egress.yaml:6: listeners[0].routes: not allowed with tls: originate: "
                "routes choose by the TLS server name (SNI), and clients of a tls: "
                "originate listener speak plaintext to the proxy, so it sees none; "
                "name one cluster instead, or use tls: passthrough to route by SNI",
            ),
        )

    def test_originate_without_cluster(self) -> None:
        """A tls: originate listener needs a cluster."""
        self.assertEqual(
            errors(with_mode("postgres", tls="originate")),
            (
                "egress.yaml:2: listeners[0]: missing required key 'cluster' (a tls: "
                "originate listener opens TLS to one cluster)",
            ),
        )

    def test_bad_listener_tls(self) -> None:
        """A listener's tls is passthrough or originate."""
        self.assertEqual(
            errors(with_mode("postgres", cluster="db", tls="terminate")),
            (
                "egress.yaml:6: listeners[0].tls: expected passthrough (the client's "
                "TLS goes through to the server) or originate (the proxy opens TLS to "
                "the cluster), got 'terminate'",
            ),
        )

    def test_require_tls_not_a_bool(self) -> None:
        """require_tls must be true or false."""
        self.assertEqual(
            errors(with_mode("postgres", cluster="db", require_tls="always")),
            ("egress.yaml:6: listeners[0].require_tls: expected true or false, got 'always'",),
        )

    def test_require_tls_originate_without_client_tls(self) -> None:
        """require_tls with tls: originate needs client_tls, or no client could connect."""
        self.assertEqual(
            errors(with_mode("postgres", cluster="db", tls="originate", require_tls="true")),
            (
                "egress.yaml:7: listeners[0].require_tls: with tls: originate, "
                "require_tls needs client_tls (the certificate the proxy shows clients "
                "that ask for TLS); without it every client would be refused",
            ),
        )

    def test_client_tls_with_passthrough(self) -> None:
        """client_tls is refused on a passthrough listener."""
        cert, key, _ = self.make_tls_files()
        self.assertEqual(
            errors(
                with_mode("postgres", cluster="db", client_tls=f"{{cert: '{cert}', key: '{key}'}}")
            ),
            (
                "egress.yaml:6: listeners[0].client_tls: only with tls: originate "
                "(with passthrough the client's TLS goes through to the server and the "
                "proxy shows no certificate); this listener has tls: passthrough, the "
                "default",
            ),
        )

    def test_client_tls_missing_key(self) -> None:
        """client_tls needs both cert and key."""
        cert, _, _ = self.make_tls_files()
        self.assertEqual(
            errors(
                with_mode("postgres", cluster="db", tls="originate", client_tls=f"{{cert: '{cert}'}}")
            ),
            ("egress.yaml:7: listeners[0].client_tls: missing required key 'key'",),
        )

    def test_client_tls_missing_files(self) -> None:
        """client_tls files must exist; the error names the path."""
        _, key, _ = self.make_tls_files()
        directory = os.path.dirname(key)
        missing = os.path.join(directory, "absent.crt")
        self.assertEqual(
            errors(
                with_mode(
                    "postgres", cluster="db", tls="originate",
                    client_tls=f"{{cert: '{missing}', key: '{directory}'}}",
                )
            ),
            (
                f"egress.yaml:7: listeners[0].client_tls.cert: no such file: {missing!r}",
                f"egress.yaml:7: listeners[0].client_tls.key: {directory!r} is a "
                f"directory, not a file",
            ),
        )


class RouteErrorTests(SynchronousTestCase):
    """Bad postgres routes."""

    def route_errors(self, *routes: str) -> tuple[str, ...]:
        """Errors for a postgres listener with these routes, one per line from line 6."""
        text = with_mode("postgres", routes="") + ""
        lines = text.splitlines()
        lines[4:5] = ["    routes:"] + [f"      - {route}" for route in routes]
        return errors("\n".join(lines) + "\n")

    def test_empty_routes(self) -> None:
        """An empty routes list is refused."""
        self.assertEqual(
            errors(with_mode("postgres", routes="[]")),
            (
                "egress.yaml:5: listeners[0].routes: an empty list would refuse every "
                "connection; give at least one route, or use cluster instead",
            ),
        )

    def test_route_without_target(self) -> None:
        """A route needs a cluster or an upstream."""
        self.assertEqual(
            self.route_errors("{sni: a.example.com}"),
            (
                "egress.yaml:6: listeners[0].routes[0]: missing required key 'cluster' "
                "or 'upstream' (a route sends to a configured cluster, or to a "
                "HOST:PORT template such as '{sni}:5432')",
            ),
        )

    def test_route_with_both_targets(self) -> None:
        """A route takes a cluster or an upstream, not both."""
        self.assertEqual(
            self.route_errors("{sni: a.example.com, cluster: db, upstream: 'a.example.com:5432'}"),
            (
                "egress.yaml:6: listeners[0].routes[0].upstream: give cluster or "
                "upstream, not both (cluster sends to a configured cluster; upstream "
                "dials a HOST:PORT made from the server name)",
            ),
        )

    def test_route_without_sni(self) -> None:
        """A route needs an sni."""
        self.assertEqual(
            self.route_errors("{cluster: db}"),
            ("egress.yaml:6: listeners[0].routes[0]: missing required key 'sni'",),
        )

    def test_route_unknown_cluster(self) -> None:
        """A route's cluster must be defined."""
        self.assertEqual(
            self.route_errors("{sni: a.example.com, cluster: dbb}"),
            (
                "egress.yaml:6: listeners[0].routes[0].cluster: unknown cluster 'dbb' "
                "(defined clusters: db); did you mean 'db'?",
            ),
        )

    def test_duplicate_sni(self) -> None:
        """Two routes for one sni pattern (ignoring case) are an error on the second."""
        self.assertEqual(
            self.route_errors(
                "{sni: '*.pg.example.cloud', upstream: '{sni}:5432'}",
                "{sni: '*.PG.Example.cloud', cluster: db}",
            ),
            (
                "egress.yaml:7: listeners[0].routes[1].sni: duplicate route for "
                "'*.pg.example.cloud' (first at listeners[0].routes[0].sni, line 6)",
            ),
        )

    def test_sni_wildcard_forms(self) -> None:
        """'*' alone, a one-label suffix and '*' inside a name are refused."""
        self.assertEqual(
            self.route_errors(
                "{sni: '*', cluster: db}",
                "{sni: '*.cloud', cluster: db}",
                "{sni: 'db.*.cloud', cluster: db}",
            ),
            (
                "egress.yaml:6: listeners[0].routes[0].sni: '*' would match every "
                "server name and make this an open proxy; name the hosts, or a "
                "*.SUFFIX such as *.example.com",
                "egress.yaml:7: listeners[0].routes[1].sni: '*.cloud' is too broad: "
                "the suffix after '*.' needs at least two labels (e.g. *.example.com)",
                "egress.yaml:8: listeners[0].routes[2].sni: expected a server name "
                "such as db.example.com, or *.SUFFIX such as *.pg.example.cloud ('*' "
                "only as the whole first label), got 'db.*.cloud'",
            ),
        )

    def test_sni_bad_names(self) -> None:
        """An sni that is an IP address or not a host name is refused."""
        self.assertEqual(
            self.route_errors(
                "{sni: '10.0.0.1', cluster: db}", "{sni: 'db_1.example.com', cluster: db}"
            ),
            (
                "egress.yaml:6: listeners[0].routes[0].sni: clients send a TLS server "
                "name (SNI) only for host names, never for an IP address; expected a "
                "server name such as db.example.com, or *.SUFFIX such as "
                "*.pg.example.cloud ('*' only as the whole first label), got '10.0.0.1'",
                "egress.yaml:7: listeners[0].routes[1].sni: 'db_1.example.com' is not "
                "a valid host name (letters, digits and '-' in dot-separated labels of "
                "1-63 characters, at most 253 in all)",
            ),
        )

    def test_upstream_placeholders(self) -> None:
        """{sni} is the only placeholder; other braces are refused."""
        self.assertEqual(
            self.route_errors(
                "{sni: a.example.com, upstream: '{host}:5432'}",
                "{sni: b.example.com, upstream: '{sni:5432'}",
            ),
            (
                "egress.yaml:6: listeners[0].routes[0].upstream: unknown placeholder "
                "'{host}' in '{host}:5432'; {sni} (the server name the client sent) "
                "is the only one",
                "egress.yaml:7: listeners[0].routes[1].upstream: unmatched brace in "
                "'{sni:5432'; {sni} (the server name the client sent) is the only "
                "placeholder",
            ),
        )

    def test_upstream_without_port(self) -> None:
        """An upstream template needs a port."""
        self.assertEqual(
            self.route_errors("{sni: '*.pg.example.cloud', upstream: '{sni}'}"),
            (
                "egress.yaml:6: listeners[0].routes[0].upstream: expected a HOST:PORT "
                "template in which {sni} stands for the server name the client sent "
                "(e.g. '{sni}:5432' or 'db.internal:5432'), got '{sni}'",
            ),
        )

    def test_upstream_bad_after_substitution(self) -> None:
        """A template that makes no valid host name says so with the sample used."""
        self.assertEqual(
            self.route_errors(
                "{sni: '*.pg.example.cloud', upstream: '{sni}_direct:5432'}",
                "{sni: '*.pg.example.cloud.', upstream: '{sni}:0'}",
            ),
            (
                "egress.yaml:6: listeners[0].routes[0].upstream: 'x.example.test_direct' "
                "is not a valid host name (letters, digits and '-' in dot-separated "
                "labels of 1-63 characters, at most 253 in all) (from "
                "'{sni}_direct:5432' with {sni} = x.example.test)",
                "egress.yaml:7: listeners[0].routes[1].sni: 'pg.example.cloud.' is not "
                "a valid host name (letters, digits and '-' in dot-separated labels of "
                "1-63 characters, at most 253 in all)",
                "egress.yaml:7: listeners[0].routes[1].upstream: port 0 is out of "
                "range (1-65535)",
            ),
        )


class ClusterTLSErrorTests(SynchronousTestCase):
    """Bad tls on a cluster."""

    def test_bad_value(self) -> None:
        """Cluster tls is a mapping or a boolean."""
        self.assertEqual(
            errors(with_cluster(tls="verify")),
            (
                "egress.yaml:8: clusters[0].tls: expected a mapping with server_name "
                "and ca_file, or true to verify with the defaults (each endpoint's "
                "host name, the system trust store), got 'verify'",
            ),
        )

    def test_missing_ca_file(self) -> None:
        """ca_file must exist."""
        missing = os.path.join(tempfile.gettempdir(), "egressproxy-absent-ca.pem")
        self.assertEqual(
            errors(with_cluster(tls=f"{{ca_file: '{missing}'}}")),
            (f"egress.yaml:8: clusters[0].tls.ca_file: no such file: {missing!r}",),
        )

    def test_bad_server_name(self) -> None:
        """server_name must be a host name."""
        self.assertEqual(
            errors(with_cluster(tls="{server_name: 'db server'}")),
            (
                "egress.yaml:8: clusters[0].tls.server_name: 'db server' is not a "
                "valid host name (letters, digits and '-' in dot-separated labels of "
                "1-63 characters, at most 253 in all)",
            ),
        )

    def test_unknown_key(self) -> None:
        """An unknown key inside a cluster's tls gets a suggestion."""
        self.assertEqual(
            errors(with_cluster(tls="{sni: db.example.com}")),
            (
                "egress.yaml:8: clusters[0].tls: unknown key 'sni' (expected one of: "
                "server_name, ca_file)",
            ),
        )


class ForwardErrorTests(SynchronousTestCase):
    """Bad http_connect and socks5 listeners: destinations and users."""

    def destination_error(self, entry: str) -> str:
        (error,) = errors(with_mode("http_connect", allow_destinations=f"['{entry}']"))
        prefix = "egress.yaml:5: listeners[0].allow_destinations[0]: "
        self.assertTrue(error.startswith(prefix), error)
        return error[len(prefix):]

    def user_errors(self, *users: str, mode: str = "http_connect", environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
        """Errors for a listener with these users, one per line from line 7."""
        lines = with_mode(mode, allow_destinations="['a.example.com:443']").splitlines()
        lines[5:5] = ["    users:"] + [f"      - {user}" for user in users]
        return errors("\n".join(lines) + "\n", environ)

    def test_missing_allow_destinations(self) -> None:
        """A forward proxy without allow_destinations is refused: it is never open."""
        self.assertEqual(
            errors(with_mode("socks5")),
            (
                "egress.yaml:2: listeners[0]: missing required key 'allow_destinations' "
                "(socks5 listeners dial only the destinations listed there and are "
                "never open proxies; e.g. allow_destinations: [\"api.vendor.com:443\"])",
            ),
        )

    def test_empty_allow_destinations(self) -> None:
        """An empty allow_destinations list is refused."""
        self.assertEqual(
            errors(with_mode("http_connect", allow_destinations="[]")),
            (
                "egress.yaml:5: listeners[0].allow_destinations: an empty list would "
                "refuse every destination; list the HOST:PORT destinations clients may "
                "reach (the proxy is never open to all)",
            ),
        )

    def test_destination_garbage(self) -> None:
        """A destination of no accepted form lists the accepted forms."""
        self.assertEqual(
            self.destination_error("a.*.example.com:443"),
            "expected HOST:PORT, *.SUFFIX:PORT, IP:PORT, CIDR:PORT, [IPV6]:PORT or "
            "[IPV6 CIDR]:PORT, where PORT is a number or * for any port (e.g. "
            "api.vendor.com:443, *.bank.example:443, 10.1.2.0/24:443, "
            "[2001:db8::/32]:443, 203.0.113.7:*), got 'a.*.example.com'",
        )

    def test_destination_without_port(self) -> None:
        """A destination without a port says how to write one, or * for any."""
        self.assertEqual(
            self.destination_error("api.vendor.com"),
            "'api.vendor.com' has no port; write api.vendor.com:PORT, or "
            "api.vendor.com:* for any port",
        )

    def test_destination_bad_port(self) -> None:
        """A destination port is a number 1-65535 or *."""
        self.assertEqual(
            self.destination_error("api.vendor.com:https"),
            "expected a port number 1-65535 or * for any port, got 'https'",
        )

    def test_destination_every_host(self) -> None:
        """'*' as a host would be an open proxy."""
        self.assertEqual(
            self.destination_error("*:443"),
            "'*' would match every host name and make this an open proxy; name the "
            "hosts, or a *.SUFFIX such as *.example.com",
        )

    def test_destination_too_broad(self) -> None:
        """A wildcard over a one-label suffix is too broad."""
        self.assertEqual(
            self.destination_error("*.com:443"),
            "'*.com' is too broad: the suffix after '*.' needs at least two labels "
            "(e.g. *.example.com)",
        )

    def test_destination_every_address(self) -> None:
        """A /0 network would be an open proxy."""
        self.assertEqual(
            self.destination_error("[::/0]:443"),
            "'::/0' would allow every IPv6 address and make this an open proxy; list "
            "the networks clients may reach",
        )

    def test_destination_host_bits(self) -> None:
        """A CIDR with host bits set suggests the network."""
        self.assertEqual(
            self.destination_error("10.1.2.3/24:443"),
            "'10.1.2.3/24' has host bits set; did you mean '10.1.2.0/24'?",
        )

    def test_destination_unbracketed_ipv6(self) -> None:
        """An IPv6 destination without brackets gets the bracketed spelling."""
        self.assertEqual(
            self.destination_error("2001:db8::/32:443"),
            "an IPv6 address needs brackets: write [2001:db8::/32]:443, got "
            "'2001:db8::/32:443'",
        )

    def test_destination_ipv4_in_brackets(self) -> None:
        """Only IPv6 goes in brackets."""
        self.assertEqual(
            self.destination_error("[10.0.0.1]:443"),
            "only IPv6 addresses and networks go in brackets, got '10.0.0.1' in "
            "'[10.0.0.1]:443'",
        )

    def test_user_missing_password(self) -> None:
        """A user needs a name and a password."""
        self.assertEqual(
            self.user_errors("{name: app}"),
            ("egress.yaml:7: listeners[0].users[0]: missing required key 'password'",),
        )

    def test_user_empty_values(self) -> None:
        """An empty name or password is refused."""
        self.assertEqual(
            self.user_errors("{name: '', password: ''}"),
            (
                "egress.yaml:7: listeners[0].users[0].name: must not be empty",
                "egress.yaml:7: listeners[0].users[0].password: must not be empty",
            ),
        )

    def test_password_empty_variable(self) -> None:
        """A password from a variable set but empty says which reference was empty."""
        self.assertEqual(
            self.user_errors("{name: app, password: '${APP_PASSWORD}'}", environ={"APP_PASSWORD": ""}),
            (
                "egress.yaml:7: listeners[0].users[0].password: must not be empty "
                "(${APP_PASSWORD} expanded to nothing)",
            ),
        )

    def test_password_never_shown(self) -> None:
        """No message about a password quotes it, whatever is wrong with it."""
        found = self.user_errors(
            "{name: a, password: 8675309}",
            "{name: b, password: 'hunter${2'}",
            "{name: c, password: 'swordfish${bad ref}'}",
            "'d:correcthorse'",
        )
        self.assertEqual(
            found,
            (
                "egress.yaml:7: listeners[0].users[0].password: expected text; put the "
                "password in quotes (YAML reads it unquoted as another type)",
                "egress.yaml:8: listeners[0].users[1].password: unterminated '${' in "
                "the value; write $$ for a literal $",
                "egress.yaml:9: listeners[0].users[2].password: invalid reference in "
                "the value: expected ${NAME} or ${NAME:-default} (NAME is letters, "
                "digits and _); write $$ for a literal $",
                "egress.yaml:10: listeners[0].users[3]: expected a mapping with keys "
                "name, password, got a single value",
            ),
        )
        for secret in ("8675309", "hunter", "swordfish", "correcthorse"):
            self.assertNotIn(secret, "\n".join(found))

    def test_user_allow_destinations_empty(self) -> None:
        """A user's empty allow_destinations is refused, like the listener's."""
        self.assertEqual(
            self.user_errors("{name: app, password: a, allow_destinations: []}"),
            (
                "egress.yaml:7: listeners[0].users[0].allow_destinations: an empty list "
                "would refuse every destination to this user; list the HOST:PORT "
                "destinations this user may reach, or remove the key to use the "
                "listener's allow_destinations",
            ),
        )

    def test_user_allow_destinations_bad_entry(self) -> None:
        """A user's allowlist entries are checked as the listener's are, with the same messages."""
        found = self.user_errors("{name: app, password: hunter2, allow_destinations: ['api.example.com']}")
        (listener_error,) = errors(with_mode("http_connect", allow_destinations="['api.example.com']"))
        self.assertEqual(
            found,
            (
                "egress.yaml:7: listeners[0].users[0].allow_destinations[0]: "
                + listener_error.split(": ", 2)[2],
            ),
        )
        self.assertNotIn("hunter2", "\n".join(found))

    def test_user_unknown_key(self) -> None:
        """A misspelt user key gets a suggestion."""
        self.assertEqual(
            self.user_errors("{name: app, password: a, allow_destination: ['a.example.com:443']}"),
            (
                "egress.yaml:7: listeners[0].users[0]: unknown key 'allow_destination'; "
                "did you mean 'allow_destinations'?",
            ),
        )

    def test_users_not_a_list(self) -> None:
        """users written as a single value is refused without quoting it."""
        self.assertEqual(
            errors(
                with_mode(
                    "http_connect", allow_destinations="['a.example.com:443']",
                    users="'app:hunter2'",
                )
            ),
            (
                "egress.yaml:6: listeners[0].users: expected a list of {name, "
                "password} mappings, got a single value",
            ),
        )

    def test_users_empty(self) -> None:
        """An empty users list is refused as ambiguous."""
        self.assertEqual(
            errors(with_mode("socks5", allow_destinations="['a.example.com:443']", users="[]")),
            (
                "egress.yaml:6: listeners[0].users: an empty list is ambiguous; list "
                "{name, password} mappings, or remove the key to let clients in "
                "without a password",
            ),
        )

    def test_duplicate_user(self) -> None:
        """A user name given twice is an error on the second."""
        self.assertEqual(
            self.user_errors("{name: app, password: a}", "{name: app, password: b}"),
            (
                "egress.yaml:8: listeners[0].users[1].name: duplicate user name 'app' "
                "(first at listeners[0].users[0].name, line 7)",
            ),
        )

    def test_http_user_name_with_colon(self) -> None:
        """An http_connect user name cannot hold ':' (HTTP Basic splits on it)."""
        self.assertEqual(
            self.user_errors("{name: 'ops:admin', password: a}"),
            (
                "egress.yaml:7: listeners[0].users[0].name: HTTP Basic authentication "
                "cannot carry ':' in a user name, got 'ops:admin'",
            ),
        )

    def test_socks5_password_too_long(self) -> None:
        """A socks5 password longer than RFC 1929 allows is refused without showing it."""
        self.assertEqual(
            self.user_errors("{name: app, password: '${LONG}'}", mode="socks5", environ={"LONG": "x" * 256}),
            (
                "egress.yaml:7: listeners[0].users[0].password: longer than 255 bytes, "
                "the most SOCKS5 (RFC 1929) can carry",
            ),
        )


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
        """A listener takes the four modes and refuses any other."""
        listen = ListenAddress(":1", "::", 1, True)
        for mode in ("tcp", "postgres", "http_connect", "socks5"):
            self.assertEqual(ListenerConfig(name="a", listen=listen, mode=mode).mode, mode)
        self.assertRaises(
            ValueError, ListenerConfig, name="a", listen=listen, mode="udp", cluster="db"
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


    def test_config_checks_route_clusters(self) -> None:
        """A config whose route names a missing cluster cannot exist."""
        listen = ListenAddress(":1", "::", 1, True)
        listener = ListenerConfig(
            name="a", listen=listen, mode="postgres",
            options=PostgresOptions(routes=(PostgresRoute(sni="a.example.com", cluster="nope"),)),
        )
        self.assertRaises(
            ValueError,
            Config,
            source="x",
            listeners=(listener,),
            clusters=(ClusterConfig(name="db", endpoints=(Address("a.test", 1),)),),
        )

    def test_user_repr_hides_password(self) -> None:
        """A user's repr shows the name and not the password."""
        self.assertEqual(repr(User("app", "hunter2")), "User(name='app')")


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


class AllowlistRiskTests(SynchronousTestCase):
    """Allowlists open in all but name are refused unless accept_risk marks them (allowlint)."""

    def forward(self, destinations: str, accept_risk: str | None = None) -> str:
        """An http_connect listener on 127.0.0.1:0 with these destinations (line 5) and marks (line 6)."""
        fields = {"allow_destinations": destinations}
        if accept_risk is not None:
            fields["accept_risk"] = accept_risk
        return with_mode("http_connect", **fields)

    def test_two_halves_of_ipv4(self) -> None:
        """0.0.0.0/1 with 128.0.0.0/1 is every IPv4 address; the first also reaches admin and metrics."""
        self.assertEqual(
            errors(self.forward('["0.0.0.0/1:*", "128.0.0.0/1:*"]')),
            (
                'egress.yaml:5: listeners[0].allow_destinations[0]: "0.0.0.0/1:*" with '
                '"128.0.0.0/1:*" covers 4,294,967,296 IPv4 addresses (all of them), more '
                "than a /8 (16,777,216): an allowlist that wide is an open proxy in all "
                "but name; list the networks clients need, or mark them intended with "
                'accept_risk: ["0.0.0.0/1:*", "128.0.0.0/1:*"]',
                'egress.yaml:5: listeners[0].allow_destinations[0]: "0.0.0.0/1:*" admits '
                "this proxy's own admin service (127.0.0.1:9901) and metrics service "
                "([::]:9091): a client could use the admin API (drain, reload) from "
                "outside, or make the proxy connect to itself in a loop; narrow it so it "
                'cannot reach the proxy, or mark it intended with accept_risk: ["0.0.0.0/1:*"]',
                'egress.yaml:5: listeners[0].allow_destinations[1]: "128.0.0.0/1:*" with '
                '"0.0.0.0/1:*" covers 4,294,967,296 IPv4 addresses (all of them), more '
                "than a /8 (16,777,216): an allowlist that wide is an open proxy in all "
                "but name; list the networks clients need, or mark them intended with "
                'accept_risk: ["0.0.0.0/1:*", "128.0.0.0/1:*"]',
            ),
        )

    def test_public_suffix_wildcard(self) -> None:
        """*.co.uk admits every company registered under co.uk."""
        self.assertEqual(
            errors(self.forward('["api.vendor.example:443", "*.co.uk:*"]')),
            (
                'egress.yaml:5: listeners[0].allow_destinations[1]: "*.co.uk:*" is a '
                "wildcard directly under the public suffix co.uk: it admits every site "
                "registered there; list the hosts you need, or mark it intended with "
                'accept_risk: ["*.co.uk:*"]',
            ),
        )

    def test_nip_io_wildcard(self) -> None:
        """*.nip.io admits every address, internal ones included."""
        self.assertEqual(
            errors(self.forward('["*.nip.io:*"]')),
            (
                'egress.yaml:5: listeners[0].allow_destinations[0]: "*.nip.io:*" is a '
                "wildcard under nip.io, a DNS service that answers every name with the "
                "IP address written in it (10.0.0.1.nip.io is 10.0.0.1): it admits every "
                "address, internal ones included; list the hosts clients need, or mark it "
                'intended with accept_risk: ["*.nip.io:*"]',
            ),
        )

    def test_localhost(self) -> None:
        """localhost:* is this machine, the admin and metrics ports included."""
        self.assertEqual(
            errors(self.forward('["localhost:*"]')),
            (
                'egress.yaml:5: listeners[0].allow_destinations[0]: "localhost:*" names '
                "this machine: localhost and the names under it resolve to loopback (RFC "
                "6761), where the proxy's own ports and other local services listen; list "
                'the hosts clients need, or mark it intended with accept_risk: ["localhost:*"]',
                'egress.yaml:5: listeners[0].allow_destinations[0]: "localhost:*" admits '
                "this proxy's own admin service (127.0.0.1:9901) and metrics service "
                "([::]:9091): a client could use the admin API (drain, reload) from "
                "outside, or make the proxy connect to itself in a loop; narrow it so it "
                'cannot reach the proxy, or mark it intended with accept_risk: ["localhost:*"]',
            ),
        )

    def test_metadata_address(self) -> None:
        """169.254.169.254 is link-local, where cloud metadata services answer."""
        self.assertEqual(
            errors(self.forward('["169.254.169.254:80"]')),
            (
                'egress.yaml:5: listeners[0].allow_destinations[0]: "169.254.169.254:80" '
                "is in 169.254.0.0/16 (link-local, where cloud metadata services answer): "
                "the proxy would let clients reach internal addresses; remove it, list the "
                "range in allow_addresses if they should, or mark it intended with "
                'accept_risk: ["169.254.169.254:80"]',
            ),
        )

    def test_admin_port(self) -> None:
        """The admin port as a destination: loopback, and the proxy's own admin API."""
        self.assertEqual(
            errors(self.forward('["127.0.0.1:9901"]')),
            (
                'egress.yaml:5: listeners[0].allow_destinations[0]: "127.0.0.1:9901" is '
                "in 127.0.0.0/8 (loopback): the proxy would let clients reach internal "
                "addresses; remove it, list the range in allow_addresses if they should, "
                'or mark it intended with accept_risk: ["127.0.0.1:9901"]',
                'egress.yaml:5: listeners[0].allow_destinations[0]: "127.0.0.1:9901" '
                "admits this proxy's own admin service (127.0.0.1:9901): a client could "
                "use the admin API (drain, reload) from outside, or make the proxy connect "
                "to itself in a loop; narrow it so it cannot reach the proxy, or mark it "
                'intended with accept_risk: ["127.0.0.1:9901"]',
            ),
        )

    def test_each_accepted_when_marked(self) -> None:
        """Every one of the entries above loads when accept_risk lists it as written."""
        for destinations in (
            '["0.0.0.0/1:*", "128.0.0.0/1:*"]', '["*.co.uk:*"]', '["*.nip.io:*"]',
            '["localhost:*"]', '["169.254.169.254:80"]', '["127.0.0.1:9901"]',
        ):
            listener = parse(self.forward(destinations, accept_risk=destinations)).listeners[0]
            self.assertEqual(listener.options.accept_risk, tuple(yaml.safe_load(destinations)))

    def test_stale_mark(self) -> None:
        """A mark that matches no risky entry is an error, so it does not linger."""
        self.assertEqual(
            errors(self.forward('["api.vendor.example:443"]', '["*.co.uk:*"]')),
            (
                'egress.yaml:6: listeners[0].accept_risk[0]: accept_risk entry "*.co.uk:*" '
                "matches no risky allowlist entry; remove it",
            ),
        )

    def test_lines_and_users(self) -> None:
        """Each finding is on its entry's own line; a user's own list is checked too."""
        text = textwrap.dedent("""\
            listeners:
              - name: fwd
                listen: ":3128"
                mode: socks5
                allow_destinations:
                  - "api.vendor.example:443"
                  - "*.fly.dev:443"
                users:
                  - name: app
                    password: pw
                    allow_destinations: ["api.vendor.example:443", "10.0.0.0/8:*"]
                allow_addresses: ["fdaa::/16"]
            """)
        self.assertEqual(
            errors(text),
            (
                'egress.yaml:7: listeners[0].allow_destinations[1]: "*.fly.dev:443" is a '
                "wildcard directly under the public suffix fly.dev: it admits every site "
                "registered there; list the hosts you need, or mark it intended with "
                'accept_risk: ["*.fly.dev:443"]',
                'egress.yaml:11: listeners[0].users[0].allow_destinations[1]: "10.0.0.0/8:*" '
                "is in 10.0.0.0/8 (private, RFC 1918) and admits every port: the proxy "
                "would let clients reach any internal service there; name the ports "
                "clients need, list the range in allow_addresses if they should reach all "
                'of it, or mark it intended with accept_risk: ["10.0.0.0/8:*"]',
                'egress.yaml:12: listeners[0].allow_addresses[0]: "fdaa::/16" exempts '
                "2^112 IPv6 addresses from the internal-address check, more than a /32 "
                "(2^96): an exception that wide all but turns the check off; list the "
                'ranges clients need, or mark it intended with accept_risk: ["fdaa::/16"]',
            ),
        )

    def test_own_listener_as_endpoint(self) -> None:
        """A cluster endpoint that is the proxy's own listener would loop."""
        self.assertEqual(
            errors(with_cluster(endpoints='["db.example.com:5432", "127.0.0.1:5432"]').replace(
                '"127.0.0.1:0"\n    cluster', '":5432"\n    cluster'
            )),
            (
                "egress.yaml:7: clusters[0].endpoints[1]: 127.0.0.1:5432 is this proxy's "
                "own listener 'main' (:5432): the proxy would connect to itself in a "
                "loop; point it at the server the proxy should reach",
            ),
        )

    def test_self_dial_forms(self) -> None:
        """localhost, a hosts: pin and a postgres route upstream count; other ports and names do not."""
        text = textwrap.dedent("""\
            listeners:
              - name: pg
                listen: "[::]:5432"
                mode: postgres
                routes:
                  - {sni: db.example.com, upstream: "[::1]:5432"}
                  - {sni: "*.example.com", upstream: "{sni}:5432"}
            clusters:
              - name: db
                endpoints: ["localhost:5432", "db.pin:9091", "db.example.com:5432", "127.0.0.1:5433"]
            hosts:
              db.pin: 127.0.0.1
            """)
        self.assertEqual(
            errors(text),
            (
                "egress.yaml:6: listeners[0].routes[0].upstream: [::1]:5432 is this "
                "proxy's own listener 'pg' ([::]:5432): the proxy would connect to itself "
                "in a loop; point it at the server the proxy should reach",
                "egress.yaml:10: clusters[0].endpoints[0]: localhost:5432 is this proxy's "
                "own listener 'pg' ([::]:5432): the proxy would connect to itself in a "
                "loop; point it at the server the proxy should reach",
                "egress.yaml:10: clusters[0].endpoints[1]: db.pin:9091 (pinned to "
                "127.0.0.1 by hosts:) is this proxy's own metrics service ([::]:9091): the "
                "proxy would hand its clients to its own metrics service; point it at the "
                "server the proxy should reach",
            ),
        )
