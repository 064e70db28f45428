"""Reading the top-level sections besides listeners and clusters.

``hosts`` (names pinned to addresses), ``access_log``, the two HTTP
services (``admin``, ``metrics``), ``workers`` and ``fast_path``; the plain
top-level values (durations) are read by ``load.py`` directly.
"""

from __future__ import annotations

import os
from functools import partial

import yaml

from egressproxy.config.context import FileFacts
from egressproxy.config.listeners import read_listen
from egressproxy.config.model import (
    DEFAULT_ADMIN,
    DEFAULT_METRICS,
    AccessLogConfig,
    Address,
    EgressIpCheck,
    HttpServiceConfig,
)
from egressproxy.config.parse import parse_endpoint
from egressproxy.config.reader import FieldReader, Invalid, Reader
from egressproxy.config.syntax import Path, hostname_problem, ip_literal, show
from egressproxy.config.yamlnodes import flag, line

__all__ = ["HTTP_SERVICE_DEFAULTS", "MAX_WORKERS", "Settings"]

#: The most ``workers`` accepted (beyond this, per-worker limits get too small to be useful).
MAX_WORKERS = 64
#: The HTTP services by top-level key, with the address each has when not told.
HTTP_SERVICE_DEFAULTS = {"admin": DEFAULT_ADMIN, "metrics": DEFAULT_METRICS}
_ACCESS_LOG_KEYS = ("format",)
_HTTP_SERVICE_KEYS = ("listen",)


class Settings:
    """Reads the smaller top-level sections."""

    def __init__(self, r: Reader, facts: FileFacts) -> None:
        self.r = r
        self.facts = facts

    def hosts(self, node: yaml.Node, path: Path) -> tuple[tuple[str, str], ...]:
        r = self.r
        if not isinstance(node, yaml.MappingNode):
            r.fail(node, path, f"expected a mapping of host name to IP address, got {r.got(node)}")
        pairs: list[tuple[str, str]] = []
        seen: dict[str, int] = {}
        failed = False
        for key, (key_node, value_node) in r.entries(node, path).items():
            name = key.lower()
            entry = path + (key,)
            problem = hostname_problem(name)
            if problem:
                r.report(key_node, entry, problem)
                failed = True
                continue
            if name in seen:
                r.report(
                    key_node, entry,
                    f"duplicate host {key!r} (names ignore case; first at line {seen[name]})",
                )
                failed = True
                continue
            seen[name] = line(key_node)
            try:
                address = r.text(value_node, entry, "an IP address")
            except Invalid:
                failed = True
                continue
            literal = ip_literal(address)
            if literal is None:
                r.report(
                    value_node, entry,
                    f"expected an IP address (e.g. 127.0.0.1 or fdaa::3), got {address!r}",
                )
                failed = True
                continue
            pairs.append((name, str(literal)))
        if failed:
            raise Invalid()
        return tuple(pairs)

    def access_log(self, node: yaml.Node, path: Path) -> AccessLogConfig:
        fields = self.r.mapping(node, path, _ACCESS_LOG_KEYS)
        read = FieldReader(fields, path, ())
        log_format = read("format", partial(self.r.choice, expected="text or json", choices=("text", "json")), "text")
        if not read.ok:
            raise Invalid()
        return AccessLogConfig(format=log_format)

    def http_service(self, node: yaml.Node, path: Path) -> HttpServiceConfig | None:
        """``admin`` or ``metrics``: null, true or ``{}`` is the default, false is off.

        The address the service will use, written or default, is claimed for
        the listen clash check; a key absent from the file is claimed by the
        document reader.
        """
        r = self.r
        key = path[-1]
        assert isinstance(key, str)
        default = HTTP_SERVICE_DEFAULTS[key]
        listen_path = path + ("listen",)
        if isinstance(node, yaml.ScalarNode):
            value = flag(r.scalar(node, path, "a mapping or true/false"))
            if value is False:
                return None
            if value is None or value is True:
                self.facts.listens.append((default.listen, None, listen_path))
                return default
            r.fail(node, path, f"expected a mapping with listen, or false to turn {key} off, got {show(value)}")
        fields = r.mapping(node, path, _HTTP_SERVICE_KEYS)
        if "listen" not in fields:
            self.facts.listens.append((default.listen, None, listen_path))
            return default
        listen = read_listen(r, fields["listen"], listen_path)
        self.facts.listens.append((listen, fields["listen"], listen_path))
        return r.built(node, path, HttpServiceConfig, listen=listen)

    def egress_ips(self, node: yaml.Node, path: Path) -> tuple[str, ...]:
        """``expected_egress_ips``: a list of IP literals, or one list per Fly region.

        App-scoped egress IPs are per region, so the mapping form
        (``{ams: [...], iad: [...]}``) is resolved here, once, against
        ``FLY_REGION``: the Machine checks only its own region's addresses.
        A region missing from the mapping is an error (the Machine would
        never be ready); without ``FLY_REGION`` (outside Fly) any listed
        address counts.
        """
        if isinstance(node, yaml.MappingNode):
            return self._regional_egress_ips(node, path)
        return self._egress_ip_list(node, path)

    def _regional_egress_ips(self, node: yaml.MappingNode, path: Path) -> tuple[str, ...]:
        r = self.r
        fields = {key: value for key, (_, value) in r.entries(node, path).items()}
        if not fields:
            r.fail(node, path, "an empty mapping would never be ready; list each region's egress IPs")
        per_region = {
            region: self._egress_ip_list(item, path + (region,)) for region, item in fields.items()
        }
        region = r.environ.get("FLY_REGION", "").strip()
        if not region:
            return tuple(dict.fromkeys(ip for ips in per_region.values() for ip in ips))
        if region not in per_region:
            r.fail(
                node, path,
                f"no entry for this Machine's region FLY_REGION={region!r} (listed: {', '.join(per_region)}); "
                f"add `{region}: [<its egress IPs>]` (`fly ips list` shows them) or remove the region's Machines",
            )
        return per_region[region]

    def _egress_ip_list(self, node: yaml.Node, path: Path) -> tuple[str, ...]:
        r = self.r
        items = r.sequence(node, path, "IP addresses")
        if not items:
            r.fail(node, path, "an empty list would never be ready; list the egress IPs, or remove the key")

        def one(item: yaml.Node, item_path: Path) -> str:
            text = r.text(item, item_path, "an IP address")
            literal = ip_literal(text)
            if literal is None:
                r.fail(item, item_path, f"expected an IP address (e.g. 203.0.113.7 or 2a09:8280:1::5), got {text!r}")
            return str(literal)

        return tuple(r.each(items, path, one))

    def egress_ip_check(self, node: yaml.Node, path: Path) -> EgressIpCheck:
        """``egress_ip_check``: ``stun`` (HOST:PORT list, required), ``interval`` (default 60s), ``when_unexpected``."""
        r = self.r
        fields = r.mapping(node, path, ("stun", "interval", "when_unexpected"), ("stun",))
        items = r.sequence(fields["stun"], path + ("stun",), "HOST:PORT STUN servers")
        if not items:
            r.fail(fields["stun"], path + ("stun",), "list at least one STUN server, e.g. stun.cloudflare.com:3478")

        def one(item: yaml.Node, item_path: Path) -> Address:
            text = r.text(item, item_path, "HOST:PORT")
            try:
                return parse_endpoint(text)
            except ValueError as e:
                r.fail(item, item_path, str(e))

        servers = tuple(r.each(items, path + ("stun",), one))
        interval = r.duration(fields["interval"], path + ("interval",)) if "interval" in fields else 60.0
        if interval <= 0:
            r.fail(fields["interval"], path + ("interval",), "expected a duration above zero, e.g. 60s")
        when = "close_listeners"
        if "when_unexpected" in fields:
            when = r.text(fields["when_unexpected"], path + ("when_unexpected",), "close_listeners or not_ready")
            if when not in ("close_listeners", "not_ready"):
                r.fail(fields["when_unexpected"], path + ("when_unexpected",),
                       f"expected close_listeners (stop listening while the address is unexpected, so Fly's "
                       f"checks fail over) or not_ready (only /ready answers 503), got {when!r}")
        return EgressIpCheck(stun=servers, interval=interval, when_unexpected=when)

    def workers(self, node: yaml.Node, path: Path) -> int:
        """``workers``: a count, or ``auto`` for one per CPU this process may use."""
        expected = f"a whole number 1-{MAX_WORKERS} or auto"
        value = self.r.scalar(node, path, expected)
        if value == "auto":
            return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
        if isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
            self.r.fail(node, path, f"expected {expected}, got {show(value)}")
        return value

    def fast_path(self, node: yaml.Node, path: Path) -> str:
        """``fast_path``: auto, relay, python or off; true and false mean auto and off."""
        expected = "auto, relay, python or off (or true/false)"
        value = flag(self.r.scalar(node, path, expected))
        if isinstance(value, bool):
            return "auto" if value else "off"
        if value not in ("auto", "relay", "python", "off"):
            self.r.fail(node, path, f"expected {expected}, got {show(value)}")
        return value  # type: ignore[return-value]
