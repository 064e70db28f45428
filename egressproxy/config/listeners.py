"""Reading one ``listeners`` entry: the keys every listener has, then its mode's.

The common keys (name, listen, mode, cluster, log prefix, sources, limits,
PROXY protocol, and the address checks for modes whose clients choose
destinations) are read here; the keys of each mode, the rules tying them
and the options object they make come from the mode's spec
(``modes.registry``).  A key of another mode is an error naming the modes
that take it, and its value is not read.  With an unknown mode written,
each mode key's value is still checked, and no mode's rules apply.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import yaml

from egressproxy.config.context import FileFacts, ListenerKeys
from egressproxy.config.model import ListenAddress, ListenerConfig
from egressproxy.config.parse import LISTEN_HINT, parse_listen
from egressproxy.config.reader import Fields, Reader
from egressproxy.config.syntax import IPNetwork, Path
from egressproxy.config.yamlnodes import is_null
from egressproxy.modes import registry
from egressproxy.modes.registry import ModeKey, ModeSpec

__all__ = ["ADDRESS_KEYS", "COMMON_KEYS", "DEFAULT_MODE", "ListenerSection", "read_listen"]

#: The keys of every listener.
COMMON_KEYS = (
    "name",
    "listen",
    "mode",
    "cluster",
    "log_prefix",
    "allow_sources",
    "max_connections",
    "max_connections_per_source",
    "proxy_protocol",
    "proxy_protocol_trusted",
)
#: The address checks: keys of the modes whose spec sets ``address_checks``.
ADDRESS_KEYS = ("allow_addresses", "deny_addresses", "policy")
#: The mode of a listener that names none.
DEFAULT_MODE = "tcp"


def read_listen(r: Reader, node: yaml.Node, path: Path) -> ListenAddress:
    """A ``listen`` value (listeners, admin, metrics)."""
    value = r.scalar(node, path, "an address to listen on")
    if isinstance(value, int) and not isinstance(value, bool):
        r.fail(node, path, f"{LISTEN_HINT}, got {value}; write \":{value}\" for all interfaces")
    return r.convert(node, path, value, parse_listen, LISTEN_HINT)


def _mode_keys() -> tuple[ModeKey, ...]:
    """Every mode's keys, each name once (its first mode's), in mode order."""
    keys: dict[str, ModeKey] = {}
    for spec in registry.specs():
        for key in spec.keys:
            keys.setdefault(key.name, key)
    return tuple(keys.values())


class ListenerSection:
    """Reads listeners into :class:`ListenerConfig` objects, recording facts for the cross checks."""

    def __init__(self, r: Reader, facts: FileFacts) -> None:
        self.r = r
        self.facts = facts

    def read(self, node: yaml.Node, path: Path) -> ListenerConfig | None:
        r, facts = self.r, self.facts
        mode_keys = _mode_keys()
        allowed = COMMON_KEYS + ADDRESS_KEYS + tuple(key.name for key in mode_keys)
        entry = r.named_entry(node, path, allowed, ("name", "listen"), facts.listener_names)
        if entry is None:
            return None
        fields, read, name = entry
        listen = read("listen", partial(read_listen, r))
        if listen is not None:
            facts.listens.append((listen, fields["listen"], path + ("listen",)))
        # None when the mode written is wrong: the rules tied to a mode are
        # then skipped, and every key's value is still checked.
        mode = read("mode", self._mode) if "mode" in fields else DEFAULT_MODE
        spec = registry.spec(mode) if mode is not None else None
        if spec is not None and not self._foreign_keys(fields, path, spec):
            read.ok = False
        cluster = read("cluster", r.name)
        if cluster is not None:
            facts.refer_cluster(cluster, fields["cluster"], path + ("cluster",))
        log_prefix = read("log_prefix", self._log_prefix, name.upper() if name else None)
        allow_sources = read("allow_sources", self._allow_sources)
        max_connections = read("max_connections", r.positive, 10000)
        per_source = read("max_connections_per_source", r.positive)
        proxy_protocol = read("proxy_protocol", r.boolean, False)
        proxy_protocol_trusted = read("proxy_protocol_trusted", self._trusted_proxies)
        allow_addresses = read("allow_addresses", self._address_ranges, ())
        deny_addresses = read("deny_addresses", self._address_ranges, ())
        policy = read("policy", partial(r.choice, expected="enforce or report", choices=("enforce", "report")), "enforce")
        if proxy_protocol_trusted is not None and proxy_protocol is False:
            r.report(
                fields.key_nodes["proxy_protocol_trusted"], path + ("proxy_protocol_trusted",),
                "only with proxy_protocol: true (it names who may send the PROXY header)",
            )
            read.ok = False
        keys = ListenerKeys(r, facts, node, path, fields, read, mode)
        values = self._mode_values(keys, spec.keys if spec is not None else mode_keys)
        if spec is not None and spec.check is not None:
            spec.check(keys, values)
        if not read.ok or spec is None:
            return None
        options = r.build(node, path, spec.options, **values)
        if options is None:
            return None
        listener = r.build(
            node, path, ListenerConfig, name=name, listen=listen, mode=mode,
            cluster=cluster, log_prefix=log_prefix, allow_sources=allow_sources,
            max_connections=max_connections, proxy_protocol=proxy_protocol,
            proxy_protocol_trusted=proxy_protocol_trusted, allow_addresses=allow_addresses,
            deny_addresses=deny_addresses, policy=policy, options=options,
            **({} if per_source is None else {"max_connections_per_source": per_source}),
        )
        if listener is not None:
            facts.listener_checks.extend((listener, check) for check in keys.checks)
        return listener

    def _mode_values(self, keys: ListenerKeys, own: tuple[ModeKey, ...]) -> dict[str, Any]:
        """Each mode key's value: its default when absent, None when its value was wrong."""
        values: dict[str, Any] = {}
        for key in own:
            if key.name in keys.fields:
                values[key.name] = keys.read(key.name, partial(key.read, keys), None)
            else:
                values[key.name] = key.default
        return values

    def _foreign_keys(self, fields: Fields, path: Path, spec: ModeSpec) -> bool:
        """Report keys that belong to other modes and drop them from ``fields``.

        Their values are not read: the key is wrong wherever its value is.
        Returns False if any was reported.
        """
        ok = True
        default = "" if "mode" in fields else ", the default"
        own = set(spec.key_names)
        if spec.address_checks:
            own.update(ADDRESS_KEYS)
        for key in tuple(key.name for key in _mode_keys()) + ADDRESS_KEYS:
            if key in own or key not in fields:
                continue
            if key in ADDRESS_KEYS:
                modes = tuple(other.name for other in registry.specs() if other.address_checks)
            else:
                modes = registry.owners(key)
            self.r.report(
                fields.key_nodes[key], path + (key,),
                f"only for mode: {registry.wording(modes)}; this listener has mode: {spec.name}{default}",
            )
            del fields[key]
            ok = False
        return ok

    # -- the common keys ------------------------------------------------------

    def _mode(self, node: yaml.Node, path: Path) -> str:
        return self.r.choice(node, path, registry.wording(registry.names()), registry.names())

    def _log_prefix(self, node: yaml.Node, path: Path) -> str:
        value = self.r.text(node, path, "a prefix without spaces")
        if not value or any(c.isspace() for c in value):
            self.r.fail(node, path, f"expected a non-empty prefix without whitespace, got {value!r}")
        return value

    def _allow_sources(self, node: yaml.Node, path: Path) -> tuple[IPNetwork, ...] | None:
        if is_null(node):
            return None
        items = self.r.non_empty_sequence(
            node, path, "CIDRs or IP addresses",
            "an empty list would refuse every client; remove the key to allow any source",
        )
        return self.r.each(items, path, self.r.network)

    def _trusted_proxies(self, node: yaml.Node, path: Path) -> tuple[IPNetwork, ...]:
        items = self.r.non_empty_sequence(
            node, path, "CIDRs or IP addresses",
            "an empty list would refuse every PROXY header; list the proxies that send it "
            "(e.g. Fly's proxy), or remove the key to accept it from any peer",
        )
        return self.r.each(items, path, self.r.network)

    def _address_ranges(self, node: yaml.Node, path: Path) -> tuple[IPNetwork, ...]:
        items = self.r.sequence(node, path, "CIDRs or IP addresses")
        return self.r.each(items, path, self.r.network)

