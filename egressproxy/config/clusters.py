"""Reading one ``clusters`` entry: endpoints, limits, keepalive, health checks, TLS."""

from __future__ import annotations

from functools import partial

import yaml

from egressproxy.config.checks import MAX_KEEPALIVE_COUNT, MAX_KEEPALIVE_SECONDS
from egressproxy.config.context import FileFacts
from egressproxy.config.model import Address, ClusterConfig, ClusterTLS, HealthCheckConfig, Keepalive
from egressproxy.config.parse import ENDPOINT_HINT, parse_duration, parse_endpoint
from egressproxy.config.reader import FieldReader, Invalid, Reader
from egressproxy.config.syntax import Path, hostname_problem, ip_literal, show
from egressproxy.config.yamlnodes import flag, is_null

__all__ = ["ClusterSection"]

_CLUSTER_KEYS = (
    "name",
    "endpoints",
    "connect_timeout",
    "max_connect_attempts",
    "idle_timeout",
    "max_connections",
    "max_pending",
    "keepalive",
    "health_check",
    "tls",
)
_CLUSTER_TLS_KEYS = ("server_name", "ca_file")
_KEEPALIVE_KEYS = ("idle", "interval", "count")
_HEALTH_CHECK_KEYS = (
    "kind",
    "interval",
    "timeout",
    "unhealthy_threshold",
    "healthy_threshold",
)


def _format_seconds(seconds: float) -> str:
    """``2.0`` -> ``2s``, ``0.25`` -> ``250ms``: seconds as the file would spell them."""
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


class ClusterSection:
    """Reads clusters into :class:`ClusterConfig` objects, recording names and endpoints."""

    def __init__(self, r: Reader, facts: FileFacts) -> None:
        self.r = r
        self.facts = facts

    def read(self, node: yaml.Node, path: Path) -> ClusterConfig | None:
        r = self.r
        entry = r.named_entry(node, path, _CLUSTER_KEYS, ("name", "endpoints"), self.facts.cluster_names)
        if entry is None:
            return None
        _fields, read, name = entry
        endpoints = read("endpoints", self._endpoints)
        connect_timeout = read("connect_timeout", partial(r.positive_duration, example="5s"), 5.0)
        max_connect_attempts = read("max_connect_attempts", r.positive, 3)
        idle_timeout = read("idle_timeout", self._idle_timeout, None)
        max_connections = read("max_connections", r.positive, 1024)
        max_pending = read("max_pending", r.positive, 128)
        keepalive = read("keepalive", self._keepalive, Keepalive())
        health_check = read("health_check", self._health_check, HealthCheckConfig())
        tls = read("tls", self._tls)
        if not read.ok:
            return None
        return r.build(
            node, path, ClusterConfig, name=name, endpoints=endpoints,
            connect_timeout=connect_timeout,
            max_connect_attempts=max_connect_attempts, idle_timeout=idle_timeout,
            max_connections=max_connections, max_pending=max_pending,
            keepalive=keepalive, health_check=health_check, tls=tls,
        )

    def _endpoints(self, node: yaml.Node, path: Path) -> tuple[Address, ...]:
        items = self.r.non_empty_sequence(node, path, "HOST:PORT endpoints", f"{ENDPOINT_HINT}: the list is empty")
        return self.r.each(items, path, self._endpoint)

    def _endpoint(self, node: yaml.Node, path: Path) -> Address:
        address = self.r.parsed(node, path, "HOST:PORT", parse_endpoint, ENDPOINT_HINT)
        self.facts.dial(address, node, path)
        return address

    def _idle_timeout(self, node: yaml.Node, path: Path) -> float | None:
        if is_null(node):
            return None
        return self.r.duration(node, path) or None

    # -- keepalive ------------------------------------------------------------

    def _keepalive(self, node: yaml.Node, path: Path) -> Keepalive | None:
        r = self.r
        if isinstance(node, yaml.ScalarNode):
            value = flag(r.scalar(node, path, "a mapping or true/false"))
            if value is None or value is False:
                return None
            if value is True:
                return Keepalive()
            r.fail(
                node, path,
                f"expected a mapping with idle, interval and count, or false to "
                f"turn keepalive off, got {show(value)}",
            )
        fields = r.mapping(node, path, _KEEPALIVE_KEYS)
        read = FieldReader(fields, path, ())
        defaults = Keepalive()
        idle = read("idle", self._keepalive_seconds, defaults.idle)
        interval = read("interval", self._keepalive_seconds, defaults.interval)
        count = read("count", partial(r.integer, low=1, high=MAX_KEEPALIVE_COUNT), defaults.count)
        if not read.ok:
            raise Invalid()
        return r.built(node, path, Keepalive, idle=idle, interval=interval, count=count)

    def _keepalive_seconds(self, node: yaml.Node, path: Path) -> float:
        value = self.r.scalar(node, path, "a duration")
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            self.r.fail(node, path, str(e))
        if seconds < 1 or seconds != int(seconds) or seconds > MAX_KEEPALIVE_SECONDS:
            self.r.fail(
                node, path,
                f"expected whole seconds from 1s to {MAX_KEEPALIVE_SECONDS}s "
                f"(the kernel counts keepalive time in whole seconds), "
                f"got {show(value)}",
            )
        return seconds

    # -- health checks ----------------------------------------------------------

    def _health_check(self, node: yaml.Node, path: Path) -> HealthCheckConfig:
        r = self.r
        if isinstance(node, yaml.ScalarNode):
            value = flag(r.scalar(node, path, "a mapping or true/false"))
            if value is None or value is True:
                return HealthCheckConfig()
            if value is False:
                return HealthCheckConfig(kind="none")
            r.fail(
                node, path,
                f"expected a mapping with kind, interval, timeout, unhealthy_threshold "
                f"and healthy_threshold, or false to turn health checks off, got "
                f"{show(value)}",
            )
        fields = r.mapping(node, path, _HEALTH_CHECK_KEYS)
        read = FieldReader(fields, path, ())
        defaults = HealthCheckConfig()
        kind = read(
            "kind", partial(r.choice, expected="tcp, postgres or none", choices=("tcp", "postgres", "none")),
            defaults.kind,
        )
        interval = read("interval", partial(r.positive_duration, example="10s"), defaults.interval)
        timeout = read("timeout", partial(r.positive_duration, example="2s"), defaults.timeout)
        unhealthy_threshold = read("unhealthy_threshold", r.positive, defaults.unhealthy_threshold)
        healthy_threshold = read("healthy_threshold", r.positive, defaults.healthy_threshold)
        if not read.ok:
            raise Invalid()
        assert timeout is not None and interval is not None
        if timeout >= interval:
            # A check still running when the next is due would overlap it.
            written = fields.get("timeout") or fields.get("interval") or node
            timeout_text = _format_seconds(timeout)
            if "timeout" not in fields:
                timeout_text += ", the default"
            interval_text = _format_seconds(interval)
            if "interval" not in fields:
                interval_text += ", the default"
            r.fail(written, path, f"timeout ({timeout_text}) must be less than interval ({interval_text})")
        return r.built(
            node, path, HealthCheckConfig, kind=kind, interval=interval,
            timeout=timeout, unhealthy_threshold=unhealthy_threshold,
            healthy_threshold=healthy_threshold,
        )

    # -- tls ----------------------------------------------------------------------

    def _tls(self, node: yaml.Node, path: Path) -> ClusterTLS | None:
        """A cluster's ``tls``: true, null-valued keys or ``{}`` verify with defaults."""
        r = self.r
        if isinstance(node, yaml.ScalarNode):
            value = flag(r.scalar(node, path, "a mapping or true/false"))
            if value is None or value is False:
                return None
            if value is True:
                return ClusterTLS()
            r.fail(
                node, path,
                f"expected a mapping with server_name and ca_file, or true to verify "
                f"with the defaults (each endpoint's host name, the system trust "
                f"store), got {show(value)}",
            )
        fields = r.mapping(node, path, _CLUSTER_TLS_KEYS)
        read = FieldReader(fields, path, ())
        server_name = read("server_name", self._server_name)
        ca_file = read("ca_file", self._ca_file)
        if not read.ok:
            raise Invalid()
        return r.built(node, path, ClusterTLS, server_name=server_name, ca_file=ca_file)

    def _server_name(self, node: yaml.Node, path: Path) -> str | None:
        if is_null(node):
            return None
        value = self.r.text(node, path, "a host name")
        if ip_literal(value) is None:
            problem = hostname_problem(value)
            if problem:
                self.r.fail(node, path, problem)
        return value

    def _ca_file(self, node: yaml.Node, path: Path) -> str | None:
        if is_null(node):
            return None
        return self.r.file(node, path)
