"""The two doors into the config: :func:`load_config` and :func:`parse_config`.

A file is read in one pass over PyYAML's node tree: the top-level keys here,
each section by its reader (``listeners.py``, ``clusters.py``,
``settings.py``, each mode's keys by its spec), then the checks that need
the whole file (``py``).  Every problem is collected, sorted by
line and raised at once in one :class:`ConfigError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import yaml

from egressproxy.config.crosscheck import (
    check_cluster_refs,
    check_dials,
    check_listens,
    check_names,
    check_shareable_listens,
    own_sockets,
    run_listener_checks,
)
from egressproxy.config.clusters import ClusterSection
from egressproxy.config.context import FileFacts
from egressproxy.config.listeners import ListenerSection
from egressproxy.config.model import DEFAULT_ADMIN, DEFAULT_METRICS, AccessLogConfig, Config, ConfigError
from egressproxy.config.reader import FieldReader, Invalid, Reader
from egressproxy.config.settings import HTTP_SERVICE_DEFAULTS, Settings
from egressproxy.config.syntax import Path
from egressproxy.config.yamlnodes import Loader, is_null, syntax_error

__all__ = ["load_config", "parse_config"]

T = TypeVar("T")

_TOP_KEYS = (
    "listeners",
    "clusters",
    "hosts",
    "access_log",
    "admin",
    "metrics",
    "drain_timeout",
    "shutdown_delay",
    "workers",
    "fast_path",
    "expected_egress_ips",
    "egress_ip_check",
)


class _Document:
    """Reads one whole file: the top-level keys, the sections, then the cross checks."""

    def __init__(self, r: Reader) -> None:
        self.r = r
        self.facts = FileFacts()
        self.listeners = ListenerSection(r, self.facts)
        self.clusters = ClusterSection(r, self.facts)
        self.settings = Settings(r, self.facts)

    def read(self, root: yaml.Node | None) -> Config | None:
        r, facts = self.r, self.facts
        if root is None:
            r.errors.append(
                (1, f"{r.source}:1: the file is empty; expected a mapping with 'listeners' and 'clusters'")
            )
            return None
        try:
            fields = r.mapping(root, (), _TOP_KEYS, ("listeners",))
        except Invalid:
            return None
        # Only forward-proxy listeners may go without: an unknown cluster
        # reference below reports the rest ("defined clusters: none").
        clusters = self._list(fields, "clusters", self.clusters.read) if "clusters" in fields else ()
        listeners = self._list(fields, "listeners", self.listeners.read)
        hosts = self._optional(fields, "hosts", (), self.settings.hosts)
        access_log = self._optional(fields, "access_log", AccessLogConfig(), self.settings.access_log)
        for key, default in HTTP_SERVICE_DEFAULTS.items():
            if key not in fields:
                facts.listens.append((default.listen, None, (key, "listen")))
        read = FieldReader(fields, (), ())
        admin = read("admin", self.settings.http_service, DEFAULT_ADMIN)
        metrics = read("metrics", self.settings.http_service, DEFAULT_METRICS)
        drain_timeout = read("drain_timeout", r.duration, 25.0)
        shutdown_delay = read("shutdown_delay", r.duration, 0.0)
        workers = read("workers", self.settings.workers, 1)
        fast_path = read("fast_path", self.settings.fast_path, "auto")
        expected_egress_ips = read("expected_egress_ips", self.settings.egress_ips)
        egress_ip_check = read("egress_ip_check", self.settings.egress_ip_check)
        if expected_egress_ips and egress_ip_check is None and "egress_ip_check" not in fields:
            r.report(
                fields["expected_egress_ips"], ("expected_egress_ips",),
                "needs egress_ip_check: {stun: [\"HOST:PORT\", ...]} to learn the egress address "
                "(e.g. stun.cloudflare.com:3478); remove it to turn the check off",
            )
        check_names(r, "listener", facts.listener_names)
        check_names(r, "cluster", facts.cluster_names)
        check_cluster_refs(r, facts)
        check_listens(r, facts)
        facts.own_sockets = own_sockets(facts)
        facts.pins = dict(hosts or ())
        check_dials(r, facts)
        run_listener_checks(facts)
        if isinstance(workers, int) and workers > 1:
            check_shareable_listens(r, facts, workers)
        if r.errors or listeners is None or clusters is None:
            return None
        if hosts is None or access_log is None or not read.ok:
            return None
        return r.build(
            root, (), Config, source=r.source, listeners=listeners,
            clusters=clusters, hosts=hosts, access_log=access_log, admin=admin,
            metrics=metrics, drain_timeout=drain_timeout,
            shutdown_delay=shutdown_delay, workers=workers, fast_path=fast_path,
            expected_egress_ips=expected_egress_ips, egress_ip_check=egress_ip_check,
        )

    def _optional(
        self, fields: Mapping[str, yaml.Node], key: str, default: T, build: Callable[[yaml.Node, Path], T]
    ) -> T | None:
        node = fields.get(key)
        if node is None or is_null(node):
            return default
        try:
            return build(node, (key,))
        except Invalid:
            return None

    def _list(
        self, fields: Mapping[str, yaml.Node], key: str, build: Callable[[yaml.Node, Path], T | None]
    ) -> tuple[T, ...] | None:
        node = fields.get(key)
        if node is None:
            return None  # reported as missing
        try:
            items = self.r.sequence(node, (key,), key)
        except Invalid:
            return None
        if not items:
            self.r.report(node, (key,), f"expected at least one entry in {key}, got []")
            return None
        built = [build(item, (key, index)) for index, item in enumerate(items)]
        if any(item is None for item in built):
            return None
        return tuple(built)  # type: ignore[arg-type]


def parse_config(text: str, source: str, environ: Mapping[str, str]) -> Config:
    """Validate configuration ``text`` and return it as a :class:`Config`.

    ``source`` labels the messages (normally the file name). Every problem is
    collected and raised together as one :class:`ConfigError`, sorted by line.
    """
    loader = Loader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            raise ConfigError([syntax_error(source, text, e)]) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"{source}:1: invalid YAML: {e}"]) from None
        reader = Reader(source, environ, loader)
        config = _Document(reader).read(root)
    finally:
        loader.dispose()
    if config is None or reader.errors:
        ordered = sorted(reader.errors, key=lambda error: error[0])
        raise ConfigError(message for _, message in ordered)
    return config


def load_config(path: str, environ: Mapping[str, str]) -> Config:
    """Read the file at ``path`` and validate it; see :func:`parse_config`.

    A file that cannot be read (missing, a directory, not UTF-8) is reported as
    a :class:`ConfigError` too, so callers have one exception to handle.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the config file: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: the config file is not UTF-8 text: {e.reason}"]) from None
    return parse_config(text, path, environ)
