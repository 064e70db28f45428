"""The configuration model: frozen attrs objects for everything a config file says.

An object that exists is valid: field validators (``checks.py``) check local
rules (port ranges, name patterns) and :class:`Config` checks the cross
references other modules rely on without re-checking (unique names, known
clusters).  Reading YAML into these objects and the wording of every error
live in the readers (``load.py`` and the section readers).
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Address, IPv6Network

import attrs

from egressproxy.config.checks import (
    check_host,
    check_hosts,
    check_keepalive_count,
    check_keepalive_seconds,
    check_log_prefix,
    check_name,
    check_non_negative_seconds,
    check_optional_seconds,
    check_port,
    check_positive_int,
    check_positive_seconds,
    tuple_of,
)
from egressproxy.config.syntax import IPNetwork, ip_literal
from egressproxy.modes import registry
from egressproxy.modes.registry import ModeOptions

__all__ = [
    "AccessLogConfig",
    "Address",
    "ClusterConfig",
    "ClusterTLS",
    "Config",
    "ConfigError",
    "DEFAULT_ADMIN",
    "DEFAULT_METRICS",
    "HealthCheckConfig",
    "HttpServiceConfig",
    "Keepalive",
    "ListenAddress",
    "ListenerConfig",
]


class ConfigError(Exception):
    """Every problem found in one configuration file.

    The loader collects all of them before raising, because an operator fixing a
    file one error per run is an operator who stops trusting the tool. Each entry
    reads ``FILE:LINE: key.path: message`` and ``str()`` joins them with newlines,
    so printing the exception is enough.
    """

    errors: tuple[str, ...]

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


@attrs.frozen
class Address:
    """One upstream endpoint: a DNS name or IP literal and a port.

    IPv6 literals are kept without brackets so they can be handed to
    ``HostnameEndpoint`` as they are; ``str()`` adds the brackets back for logs.
    """

    host: str = attrs.field(validator=check_host)
    port: int = attrs.field(validator=check_port(1))

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@attrs.frozen
class ListenAddress:
    """Where one listener accepts connections.

    Either an IP literal and port (``host``/``port`` set, ``description`` None),
    or a raw Twisted server endpoint description for anything else (``unix:``,
    ``systemd:``, plugin types), in which case ``host`` and ``port`` are None and
    the description is handed to Twisted unchanged. ``dual_stack`` marks the one
    IPv6 socket that also accepts IPv4 (``:5432``, ``[::]:5432``).
    """

    text: str = attrs.field(validator=attrs.validators.instance_of(str))
    host: str | None
    port: int | None
    dual_stack: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    description: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.description is not None:
            if self.host is not None or self.port is not None or self.dual_stack:
                raise ValueError("a description leaves host, port and dual_stack unset")
            return
        literal = ip_literal(self.host) if isinstance(self.host, str) else None
        if literal is None:
            raise ValueError(f"host must be an IP literal, got {self.host!r}")
        check_port(0)(self, attrs.fields(ListenAddress).port, self.port)
        if self.dual_stack and not (
            isinstance(literal, IPv6Address) and literal.is_unspecified
        ):
            raise ValueError("only the IPv6 any-address '::' can be dual-stack")

    def __str__(self) -> str:
        return self.text


@attrs.frozen
class Keepalive:
    """TCP keepalive on upstream sockets: how dead peers are found.

    Long-idle Postgres sessions (LISTEN/NOTIFY) have no idle timeout by default,
    so keepalive is what notices a peer that vanished. The kernel takes whole
    seconds, hence the integer-valued floats.
    """

    idle: float = attrs.field(default=60.0, validator=check_keepalive_seconds)
    interval: float = attrs.field(default=15.0, validator=check_keepalive_seconds)
    count: int = attrs.field(default=4, validator=check_keepalive_count)


@attrs.frozen
class HealthCheckConfig:
    """Active health checks of a cluster's endpoints.

    ``tcp`` connects and closes; ``postgres`` also sends an SSLRequest and
    expects ``S`` or ``N``, which proves a Postgres answers and that it
    accepts this proxy's egress address (providers that drop non-allowlisted
    peers right after accept fail it); ``none`` runs no checks.
    """

    kind: str = attrs.field(default="tcp", validator=attrs.validators.in_(("tcp", "postgres", "none")))
    interval: float = attrs.field(default=10.0, validator=check_positive_seconds)
    timeout: float = attrs.field(default=2.0, validator=check_positive_seconds)
    unhealthy_threshold: int = attrs.field(default=2, validator=check_positive_int)
    healthy_threshold: int = attrs.field(default=1, validator=check_positive_int)


@attrs.frozen
class ClusterTLS:
    """TLS the proxy originates to a cluster (Postgres ``tls: originate`` listeners).

    Verification is never optional: the chain against ``ca_file`` (default:
    the system trust store) and the name against ``server_name`` (default:
    each endpoint's host).
    """

    server_name: str | None = attrs.field(default=None)
    ca_file: str | None = attrs.field(default=None)


@attrs.frozen
class ClusterConfig:
    """One named group of upstream endpoints and the limits for reaching them."""

    name: str = attrs.field(validator=check_name)
    endpoints: tuple[Address, ...] = attrs.field(
        # Empty only for the dynamic clusters the service makes (the loader
        # requires at least one endpoint in a file).
        validator=tuple_of(Address, non_empty=False)
    )
    connect_timeout: float = attrs.field(
        default=5.0, validator=check_positive_seconds
    )
    max_connect_attempts: int = attrs.field(default=3, validator=check_positive_int)
    idle_timeout: float | None = attrs.field(
        default=None, validator=check_optional_seconds
    )
    max_connections: int = attrs.field(default=1024, validator=check_positive_int)
    max_pending: int = attrs.field(default=128, validator=check_positive_int)
    keepalive: Keepalive | None = attrs.field(
        default=Keepalive(),
        validator=attrs.validators.optional(attrs.validators.instance_of(Keepalive)),
    )
    health_check: HealthCheckConfig = attrs.field(
        default=HealthCheckConfig(),
        validator=attrs.validators.instance_of(HealthCheckConfig),
    )
    tls: ClusterTLS | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(ClusterTLS))
    )


def _default_log_prefix(listener: ListenerConfig) -> str:
    return listener.name.upper()


def _check_mode(_instance: object, attribute: attrs.Attribute, value: object) -> None:
    if not registry.known(value):
        raise ValueError(
            f"{attribute.name} must be one of {', '.join(registry.names())}, got {value!r}"
        )


def _default_options(listener: ListenerConfig) -> ModeOptions | None:
    """The mode's options with every default (None for an unknown mode, which is refused)."""
    if not registry.known(listener.mode):
        return None
    return registry.spec(listener.mode).options()


def _check_options(instance: ListenerConfig, attribute: attrs.Attribute, value: object) -> None:
    if not registry.known(instance.mode):
        return  # the mode's own check refuses it
    wanted = registry.spec(instance.mode).options
    if not isinstance(value, wanted):
        raise TypeError(
            f"{attribute.name} of a {instance.mode} listener must be {wanted.__name__}, got {value!r}"
        )


@attrs.frozen
class ListenerConfig:
    """One listening address, the cluster it forwards to, and who may use it."""

    name: str = attrs.field(validator=check_name)
    listen: ListenAddress = attrs.field(
        validator=attrs.validators.instance_of(ListenAddress)
    )
    mode: str = attrs.field(validator=_check_mode)
    #: None for modes that choose destinations themselves (forward proxies,
    #: routed Postgres): their limits come from a per-listener dynamic cluster.
    cluster: str | None = attrs.field(default=None, validator=attrs.validators.optional(check_name))
    log_prefix: str = attrs.field(
        default=attrs.Factory(_default_log_prefix, takes_self=True),
        validator=check_log_prefix,
    )
    allow_sources: tuple[IPNetwork, ...] | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(
            tuple_of((IPv4Network, IPv6Network), non_empty=True)
        ),
    )
    max_connections: int = attrs.field(default=10000, validator=check_positive_int)
    #: At most this many connections from one source address (after any PROXY
    #: header); default half of max_connections, so no one source fills a listener.
    max_connections_per_source: int = attrs.field(
        default=attrs.Factory(lambda self: max(1, self.max_connections // 2), takes_self=True),
        validator=check_positive_int,
    )
    proxy_protocol: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    #: The peers allowed to send a PROXY header (None: any peer, as before).
    proxy_protocol_trusted: tuple[IPNetwork, ...] | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(tuple_of((IPv4Network, IPv6Network), non_empty=True)),
    )
    # -- address checks (modes whose clients choose destinations) ---------------
    #: Exceptions to the built-in list of refused (internal) address ranges.
    allow_addresses: tuple[IPNetwork, ...] = attrs.field(
        default=(), validator=tuple_of((IPv4Network, IPv6Network), non_empty=False)
    )
    #: More ranges to refuse.
    deny_addresses: tuple[IPNetwork, ...] = attrs.field(
        default=(), validator=tuple_of((IPv4Network, IPv6Network), non_empty=False)
    )
    #: ``enforce`` refuses what the policy forbids; ``report`` allows it, logs and counts it.
    policy: str = attrs.field(default="enforce", validator=attrs.validators.in_(("enforce", "report")))
    #: The mode's own options (``modes/<mode>/``): its keys' values, defaults when built in code.
    options: ModeOptions = attrs.field(
        default=attrs.Factory(_default_options, takes_self=True), validator=_check_options
    )


@attrs.frozen
class EgressIpCheck:
    """``egress_ip_check``: STUN servers asked, in order, for the address the proxy egresses from."""

    stun: tuple[Address, ...]
    interval: float = 60.0
    #: ``close_listeners``: also stop listening while the address is
    #: unexpected (egressgate.py); ``not_ready``: only /ready says so.
    when_unexpected: str = attrs.field(
        default="close_listeners", validator=attrs.validators.in_(("close_listeners", "not_ready"))
    )


@attrs.frozen
class HttpServiceConfig:
    """Where one of the HTTP services (admin, metrics) listens."""

    listen: ListenAddress = attrs.field(validator=attrs.validators.instance_of(ListenAddress))


#: Admin has full control (drain, reload): loopback only unless told otherwise.
DEFAULT_ADMIN = HttpServiceConfig(ListenAddress("127.0.0.1:9901", "127.0.0.1", 9901, False, None))
#: Metrics are read-only: all interfaces, so Fly's scraper reaches them.
DEFAULT_METRICS = HttpServiceConfig(ListenAddress("[::]:9091", "::", 9091, True, None))


@attrs.frozen
class AccessLogConfig:
    """How finished connections are written to stdout: Envoy-like text or JSON."""

    format: str = attrs.field(
        default="text", validator=attrs.validators.in_(("text", "json"))
    )


@attrs.frozen
class Config:
    """A whole, valid configuration; an instance that exists is consistent.

    Besides the field checks, construction verifies the cross-object rules that
    other modules rely on without re-checking: names are unique and every
    cluster a listener or one of its routes names exists.
    """

    source: str = attrs.field(validator=attrs.validators.instance_of(str))
    listeners: tuple[ListenerConfig, ...] = attrs.field(
        validator=tuple_of(ListenerConfig, non_empty=True)
    )
    clusters: tuple[ClusterConfig, ...] = attrs.field(
        validator=tuple_of(ClusterConfig, non_empty=False)
    )
    hosts: tuple[tuple[str, str], ...] = attrs.field(default=(), validator=check_hosts)
    access_log: AccessLogConfig = attrs.field(
        default=AccessLogConfig(),
        validator=attrs.validators.instance_of(AccessLogConfig),
    )
    #: None when disabled (``admin: false``).
    admin: HttpServiceConfig | None = attrs.field(
        default=DEFAULT_ADMIN,
        validator=attrs.validators.optional(attrs.validators.instance_of(HttpServiceConfig)),
    )
    #: None when disabled (``metrics: false``).
    metrics: HttpServiceConfig | None = attrs.field(
        default=DEFAULT_METRICS,
        validator=attrs.validators.optional(attrs.validators.instance_of(HttpServiceConfig)),
    )
    drain_timeout: float = attrs.field(default=25.0, validator=check_non_negative_seconds)
    shutdown_delay: float = attrs.field(default=0.0, validator=check_non_negative_seconds)
    #: Worker processes sharing the listeners (``auto`` is resolved to the
    #: CPUs this process may run on when the file is read).
    workers: int = attrs.field(default=1, validator=check_positive_int)
    #: The data path of spliced connections (egressproxy.datapath.relay): auto
    #: (the compiled relay when it loads, else the Python fast path), relay,
    #: python, or off (Twisted's own path).  true and false mean auto and off.
    fast_path: str = attrs.field(
        default="auto", converter=lambda v: {True: "auto", False: "off"}.get(v, v) if isinstance(v, bool) else v,
        validator=attrs.validators.in_(("auto", "relay", "python", "off")),
    )
    #: The public addresses this proxy should egress from; None: no check.
    expected_egress_ips: tuple[str, ...] | None = attrs.field(default=None)
    #: How the egress address is learnt (STUN servers) and how often.
    egress_ip_check: EgressIpCheck | None = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        for kind, items in (("listener", self.listeners), ("cluster", self.clusters)):
            names = [item.name for item in items]
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} names are not unique: {names}")
        clusters = {cluster.name for cluster in self.clusters}
        for listener in self.listeners:
            if listener.cluster is not None and listener.cluster not in clusters:
                raise ValueError(
                    f"listener {listener.name!r} names unknown cluster "
                    f"{listener.cluster!r}"
                )
            for what, name in listener.options.clusters_named():
                if name not in clusters:
                    raise ValueError(
                        f"listener {listener.name!r} {what} unknown cluster {name!r}"
                    )

    def cluster(self, name: str) -> ClusterConfig:
        """The cluster called ``name``; ``KeyError`` if there is none."""
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        raise KeyError(name)

    def pinned_address(self, host: str) -> str | None:
        """The address ``hosts:`` pins ``host`` to (case-insensitive), else None."""
        wanted = host.lower()
        for name, address in self.hosts:
            if name == wanted:
                return address
        return None
