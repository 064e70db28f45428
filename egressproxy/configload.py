"""The config loader: YAML nodes in, frozen config objects (``config.py``) out.

This module owns reading the file: a SafeLoader that refuses duplicate keys
and keeps line numbers, ``${ENV}`` interpolation, every key's parsing, the
cross-checks that need the whole file (names, references, listen clashes,
endpoints that are the proxy's own sockets, and ``allowlint``'s judgement of
forward-proxy allowlists with their ``accept_risk`` marks), and every error
message, each ``FILE:LINE: key.path: message``, all reported at once.  The
objects it builds, and their own field rules, live in ``config.py``, which
re-exports :func:`load_config` and :func:`parse_config`.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from ipaddress import ip_address, ip_network
from typing import Any, NoReturn

import attrs
import yaml

from egressproxy import allowlint
from egressproxy.config import (
    AccessLogConfig,
    Address,
    ClientTLS,
    ClusterConfig,
    ClusterTLS,
    Config,
    ConfigError,
    DEFAULT_ADMIN,
    DEFAULT_METRICS,
    DestinationRule,
    HealthCheckConfig,
    HttpServiceConfig,
    IPNetwork,
    Keepalive,
    ListenAddress,
    ListenerConfig,
    MODES,
    Path,
    PostgresRoute,
    T,
    User,
    _DESTINATION_HINT,
    _ENDPOINT_HINT,
    _LISTEN_HINT,
    _MAX_KEEPALIVE_COUNT,
    _MAX_KEEPALIVE_SECONDS,
    _NAME_RE,
    _SNI_HINT,
    _UPSTREAM_HINT,
    _hostname_problem,
    _ip_literal,
    _parse_destination,
    _parse_endpoint,
    _parse_listen,
    _parse_name_pattern,
    _parse_upstream_template,
    _show,
    parse_duration,
)

class _Loader(yaml.SafeLoader):
    """A ``SafeLoader`` that refuses duplicate mapping keys.

    PyYAML keeps the last of two equal keys without a word, which turns a
    copy-paste slip into a silently different proxy. :func:`parse_config` walks
    the composed node tree itself (so it can report every duplicate with its line
    and path); this override makes the class safe for plain ``yaml.load`` too.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # unhashable: the base class reports it
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r} (first at line {first_line[key]})",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _Invalid(Exception):
    """A value was rejected; the problem has already been recorded."""


_REF_RE = re.compile(r"\$(?:\$|\{(?P<body>[^}]*)\}|(?P<open>\{))?")
_VAR_RE = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?\Z", re.S)


def _render_path(path: Path) -> str:
    """``("clusters", 1, "endpoints", 0)`` -> ``clusters[1].endpoints[0]``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif text:
            text += f".{part}"
        else:
            text = part
    return text


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return "a single value"


#: The most ``workers`` accepted (beyond this, per-worker limits get too small to be useful).
MAX_WORKERS = 64

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
)
_LISTENER_KEYS = (
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
    "allow_addresses",
    "deny_addresses",
    "policy",
    "tls",
    "require_tls",
    "routes",
    "client_tls",
    "allow_destinations",
    "users",
    "accept_risk",
)
#: Listener keys that belong to some modes only, with the modes and how the
#: error names them.
_MODE_KEYS = (
    (("tls", "require_tls", "routes", "client_tls"), ("postgres",), "postgres"),
    (
        ("allow_destinations", "users", "accept_risk"),
        ("http_connect", "socks5"),
        "http_connect or socks5",
    ),
    (
        ("allow_addresses", "deny_addresses", "policy"),
        ("postgres", "http_connect", "socks5"),
        "postgres, http_connect or socks5",
    ),
)
_POLICIES = ("enforce", "report")
_LISTENER_TLS = ("passthrough", "originate")
_ROUTE_KEYS = ("sni", "cluster", "upstream")
_CLIENT_TLS_KEYS = ("cert", "key")
_USER_KEYS = ("name", "password", "allow_destinations")
_USER_REQUIRED = ("name", "password")
#: SOCKS5 username/password authentication (RFC 1929) carries each in at most
#: 255 bytes.
_SOCKS5_MAX_CREDENTIAL = 255
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
_HEALTH_CHECK_KINDS = ("tcp", "postgres", "none")
_ACCESS_LOG_KEYS = ("format",)
_HTTP_SERVICE_KEYS = ("listen",)
#: The HTTP services by top-level key, with the address each has when not told.
_HTTP_SERVICE_DEFAULTS = {"admin": DEFAULT_ADMIN, "metrics": DEFAULT_METRICS}


class _Fields(dict[str, yaml.Node]):
    """The known keys of one mapping, each with its value node.

    ``key_nodes`` holds each key's own node, for errors about a key being there
    at all; ``suggested`` holds the known keys that an unknown key was taken
    for a misspelling of, so a rule that requires one of them stays quiet (the
    suggestion already says what to fix).
    """

    def __init__(self) -> None:
        super().__init__()
        self.key_nodes: dict[str, yaml.Node] = {}
        self.suggested: set[str] = set()

    def has(self, key: str) -> bool:
        """Whether ``key`` is written, or an unknown key was taken for it."""
        return key in self or key in self.suggested


@attrs.define
class _Named:
    """A name read from the file, remembered for the cross checks."""

    value: str
    node: yaml.Node
    path: Path


class _Builder:
    """Walks a composed YAML tree, converting values and collecting errors.

    Converters take ``(node, path)`` and either return a value or record the
    problem and raise :class:`_Invalid`; the ``_build_*`` methods catch that per
    field so one bad value never hides the next.
    """

    def __init__(self, source: str, environ: Mapping[str, str], loader: _Loader):
        self.source = source
        self.environ = environ
        self.loader = loader
        self.errors: list[tuple[int, str]] = []
        self.listener_names: list[_Named] = []
        self.cluster_names: list[_Named] = []
        self.cluster_refs: list[_Named] = []
        # Every address something will listen on; the node is None for an
        # admin or metrics default the file does not spell out.
        self.listens: list[tuple[ListenAddress, yaml.Node | None, Path]] = []
        # Forward-proxy listeners read without error, with their nodes, for
        # the allowlist checks (which need every listen address).
        self.forward_listeners: list[tuple[ListenerConfig, yaml.Node, Path]] = []
        # Every endpoint the file names for the proxy to dial (cluster
        # endpoints, route upstreams), for the never-dial-yourself check.
        self.dials: list[tuple[Address, yaml.Node, Path]] = []

    # -- reporting ----------------------------------------------------------

    def report(self, node: yaml.Node, path: Path, message: str) -> None:
        where = _render_path(path)
        prefix = f"{self.source}:{_line(node)}: "
        self.errors.append((_line(node), prefix + (f"{where}: " if where else "") + message))

    def fail(self, node: yaml.Node, path: Path, message: str) -> NoReturn:
        self.report(node, path, message)
        raise _Invalid()

    # -- structure ----------------------------------------------------------

    def mapping(
        self,
        node: yaml.Node,
        path: Path,
        allowed: Sequence[str],
        required: Sequence[str] = (),
    ) -> _Fields:
        """Read a mapping with a fixed set of keys; report unknown and missing ones."""
        if not isinstance(node, yaml.MappingNode):
            got = self._got(node)
            self.fail(
                node, path, f"expected a mapping with keys {', '.join(allowed)}, got {got}"
            )
        fields = self.entries(node, path)
        result = _Fields()
        for key, (key_node, value_node) in fields.items():
            if key in allowed:
                result[key] = value_node
                result.key_nodes[key] = key_node
                continue
            close = difflib.get_close_matches(key, allowed, n=1)
            if close:
                result.suggested.add(close[0])
                hint = f"; did you mean {close[0]!r}?"
            else:
                hint = f" (expected one of: {', '.join(allowed)})"
            self.report(key_node, path, f"unknown key {key!r}{hint}")
        for key in required:
            if not result.has(key):
                self.report(node, path, f"missing required key {key!r}")
        return result

    def entries(
        self, node: yaml.MappingNode, path: Path
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """The string-keyed entries of a mapping, first occurrence winning.

        Duplicates and non-string keys are reported here, once, with their line.
        """
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.construct(key_node, path)
            if not isinstance(key, str):
                got = _show(key) if isinstance(key_node, yaml.ScalarNode) else _kind(key_node)
                self.report(key_node, path, f"keys must be text, got {got}")
                continue
            if key in entries:
                first = _line(entries[key][0])
                self.report(
                    key_node, path + (key,), f"duplicate key {key!r} (first at line {first})"
                )
                continue
            entries[key] = (key_node, value_node)
        return entries

    def each(self, items: list[yaml.Node], path: Path, build: Callable[[yaml.Node, Path], T]) -> tuple[T, ...]:
        """Build every item of a list, reporting each bad one; then one ``_Invalid`` if any was."""
        built: list[T] = []
        failed = False
        for index, item in enumerate(items):
            try:
                built.append(build(item, path + (index,)))
            except _Invalid:
                failed = True
        if failed:
            raise _Invalid()
        return tuple(built)

    def sequence(self, node: yaml.Node, path: Path, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, path, f"expected a list of {what}, got {self._got(node)}")
        return list(node.value)

    def non_empty_sequence(self, node: yaml.Node, path: Path, what: str, when_empty: str) -> list[yaml.Node]:
        """A list of ``what`` that may not be empty; ``when_empty`` says why and what to do."""
        items = self.sequence(node, path, what)
        if not items:
            self.fail(node, path, when_empty)
        return items

    # -- scalars ------------------------------------------------------------

    def construct(self, node: yaml.Node, path: Path) -> object:
        """The Python value of a scalar node, before interpolation."""
        if not isinstance(node, yaml.ScalarNode):
            return node  # the caller's type check reports it
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e)
            self.fail(node, path, f"cannot read this value: {problem}")

    def scalar(
        self, node: yaml.Node, path: Path, expected: str, *, secret: bool = False
    ) -> object:
        """A scalar's value with ``${...}`` expanded in strings.

        With ``secret``, interpolation errors do not quote the text.
        """
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, path, f"expected {expected}, got {_kind(node)}")
        value = self.construct(node, path)
        if isinstance(value, str):
            value = self.interpolate(value, node, path, secret=secret)
        return value

    def interpolate(
        self, text: str, node: yaml.Node, path: Path, *, secret: bool = False
    ) -> str:
        """Expand ``${VAR}``, ``${VAR:-default}`` and ``$$``; report unset variables.

        A ``$`` followed by anything else is kept as written, so passwords with
        a dollar sign survive; ``${`` without its ``}`` is an error. With
        ``secret`` (passwords) the errors name variables but never quote the
        text around them.
        """
        problems: list[str] = []

        def expand(match: re.Match[str]) -> str:
            token = match.group(0)
            if token == "$$":
                return "$"
            if match.group("open"):
                where = "the value" if secret else repr(text)
                problems.append(
                    f"unterminated '${{' in {where}; write $$ for a literal $"
                )
                return token
            body = match.group("body")
            if body is None:
                return token
            var = _VAR_RE.match(body)
            if not var:
                reference = "in the value" if secret else repr(token)
                problems.append(
                    f"invalid reference {reference}: expected ${{NAME}} or "
                    f"${{NAME:-default}} (NAME is letters, digits and _); "
                    f"write $$ for a literal $"
                )
                return token
            name, default = var.group("name"), var.group("default")
            value = self.environ.get(name)
            if value:
                return value
            if default is not None:
                return default
            if value is not None:
                return value  # set but empty, and no default to prefer
            problems.append(
                f"environment variable {name} is not set; "
                f"set {name} or write ${{{name}:-default}}"
            )
            return token

        result = _REF_RE.sub(expand, text)
        for problem in problems:
            self.report(node, path, problem)
        if problems:
            raise _Invalid()
        return result

    def _got(self, node: yaml.Node) -> str:
        if isinstance(node, yaml.ScalarNode):
            try:
                return _show(self.loader.construct_object(node, deep=True))
            except yaml.YAMLError:
                return repr(node.value)
        return _kind(node)

    # -- typed converters ---------------------------------------------------

    def text(self, node: yaml.Node, path: Path, expected: str = "text") -> str:
        value = self.scalar(node, path, expected)
        if not isinstance(value, str):
            self.fail(node, path, f"expected {expected}, got {_show(value)}")
        return value

    def name(self, node: yaml.Node, path: Path) -> str:
        expected = "a name of lower-case letters, digits, '_' and '-'"
        value = self.text(node, path, expected)
        if not _NAME_RE.match(value):
            self.fail(node, path, f"expected {expected}, got {value!r}")
        return value

    def integer(self, node: yaml.Node, path: Path, low: int, high: int | None) -> int:
        """An int within bounds; digit strings count, since ``${VAR}`` yields text."""
        expected = (
            f"a whole number >= {low}" if high is None else f"a whole number {low}-{high}"
        )
        value = self.scalar(node, path, expected)
        if isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(node, path, f"expected {expected}, got {_show(value)}")
        if value < low or (high is not None and value > high):
            self.fail(node, path, f"expected {expected}, got {value}")
        return value

    def positive(self, node: yaml.Node, path: Path) -> int:
        return self.integer(node, path, 1, None)

    def boolean(self, node: yaml.Node, path: Path) -> bool:
        """true or false; the text ``true``/``false`` counts, as ``${VAR}`` yields text."""
        value = _flag(self.scalar(node, path, "true or false"))
        if not isinstance(value, bool):
            self.fail(node, path, f"expected true or false, got {_show(value)}")
        return value

    def duration(self, node: yaml.Node, path: Path) -> float:
        value = self.scalar(node, path, "a duration")
        try:
            return parse_duration(value)
        except ValueError as e:
            self.fail(node, path, str(e))

    # -- the document -------------------------------------------------------

    def build(self, root: yaml.Node | None) -> Config | None:
        if root is None:
            self.errors.append(
                (1, f"{self.source}:1: the file is empty; expected a mapping with "
                    f"'listeners' and 'clusters'")
            )
            return None
        try:
            fields = self.mapping(root, (), _TOP_KEYS, ("listeners",))
        except _Invalid:
            return None
        # Only forward-proxy listeners may go without: an unknown cluster
        # reference below reports the rest ("defined clusters: none").
        clusters = (
            self._build_list(fields, "clusters", "clusters", self._build_cluster)
            if "clusters" in fields else ()
        )
        listeners = self._build_list(
            fields, "listeners", "listeners", self._build_listener
        )
        hosts = self._optional(fields, "hosts", (), self._build_hosts)
        access_log = self._optional(
            fields, "access_log", AccessLogConfig(), self._build_access_log
        )
        for key, default in _HTTP_SERVICE_DEFAULTS.items():
            if key not in fields:
                self.listens.append((default.listen, None, (key, "listen")))
        settings = _FieldReader(self, fields, (), ())
        admin = settings("admin", self._http_service, DEFAULT_ADMIN)
        metrics = settings("metrics", self._http_service, DEFAULT_METRICS)
        drain_timeout = settings("drain_timeout", self.duration, 25.0)
        shutdown_delay = settings("shutdown_delay", self.duration, 0.0)
        workers = settings("workers", self._workers, 1)
        fast_path = settings("fast_path", self.boolean, True)
        self._check_names("listener", self.listener_names)
        self._check_names("cluster", self.cluster_names)
        self._check_cluster_refs()
        self._check_listens()
        own_sockets = self._own_sockets()
        pins = dict(hosts or ())
        self._check_dials(own_sockets, pins)
        self._check_allowlists(own_sockets, pins)
        if isinstance(workers, int) and workers > 1:
            self._check_shareable_listens(workers)
        if self.errors or listeners is None or clusters is None:
            return None
        if hosts is None or access_log is None or not settings.ok:
            return None
        return self._construct(
            root, (), Config, source=self.source, listeners=listeners,
            clusters=clusters, hosts=hosts, access_log=access_log, admin=admin,
            metrics=metrics, drain_timeout=drain_timeout,
            shutdown_delay=shutdown_delay, workers=workers, fast_path=fast_path,
        )

    def _optional(
        self,
        fields: dict[str, yaml.Node],
        key: str,
        default: T,
        build: Callable[[yaml.Node, Path], T],
    ) -> T | None:
        node = fields.get(key)
        if node is None or _is_null(node):
            return default
        try:
            return build(node, (key,))
        except _Invalid:
            return None

    def _build_list(
        self,
        fields: dict[str, yaml.Node],
        key: str,
        what: str,
        build: Callable[[yaml.Node, Path], T | None],
    ) -> tuple[T, ...] | None:
        node = fields.get(key)
        if node is None:
            return None  # reported as missing
        try:
            items = self.sequence(node, (key,), what)
        except _Invalid:
            return None
        if not items:
            self.report(node, (key,), f"expected at least one entry in {what}, got []")
            return None
        built = [build(item, (key, index)) for index, item in enumerate(items)]
        if any(item is None for item in built):
            return None
        return tuple(built)  # type: ignore[arg-type]

    def _construct(self, node: yaml.Node, path: Path, cls: Callable[..., T], **kw: Any) -> T | None:
        """Build an attrs object; a validator failure becomes an ordinary error.

        The loader checks everything first, so this only fires if the two lines
        of defence disagree; reporting beats a traceback.
        """
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            self.report(node, path, str(e))
            return None

    def _named_entry(
        self, node: yaml.Node, path: Path, keys: Sequence[str], required: tuple[str, ...], names: list[_Named]
    ) -> tuple[_Fields, _FieldReader, str | None] | None:
        """Open one named list entry: its fields, a reader, and its name (recorded in ``names``)."""
        try:
            fields = self.mapping(node, path, keys, required)
        except _Invalid:
            return None
        read = _FieldReader(self, fields, path, required)
        name = read("name", self.name)
        if name is not None:
            names.append(_Named(name, fields["name"], path + ("name",)))
        return fields, read, name

    def _build_listener(self, node: yaml.Node, path: Path) -> ListenerConfig | None:
        entry = self._named_entry(node, path, _LISTENER_KEYS, ("name", "listen"), self.listener_names)
        if entry is None:
            return None
        fields, read, name = entry
        listen = read("listen", self._listen)
        if listen is not None:
            self.listens.append((listen, fields["listen"], path + ("listen",)))
        # None when the mode written is wrong: the rules tied to a mode are
        # then skipped, and every key's value is still checked.
        mode = read("mode", self._mode) if "mode" in fields else "tcp"
        if not self._check_mode_keys(fields, path, mode):
            read.ok = False
        cluster = read("cluster", self.name)
        if cluster is not None:
            self.cluster_refs.append(
                _Named(cluster, fields["cluster"], path + ("cluster",))
            )
        log_prefix = read(
            "log_prefix", self._log_prefix, name.upper() if name else None
        )
        allow_sources = read("allow_sources", self._allow_sources)
        max_connections = read("max_connections", self.positive, 10000)
        per_source = read("max_connections_per_source", self.positive)
        proxy_protocol = read("proxy_protocol", self.boolean, False)
        proxy_protocol_trusted = read("proxy_protocol_trusted", self._trusted_proxies)
        allow_addresses = read("allow_addresses", self._address_ranges, ())
        deny_addresses = read("deny_addresses", self._address_ranges, ())
        policy = read("policy", self._policy, "enforce")
        accept_risk = read("accept_risk", self._accept_risk, ())
        if proxy_protocol_trusted is not None and proxy_protocol is False:
            self.report(
                fields.key_nodes["proxy_protocol_trusted"], path + ("proxy_protocol_trusted",),
                "only with proxy_protocol: true (it names who may send the PROXY header)",
            )
            read.ok = False
        tls = read("tls", self._listener_tls) if "tls" in fields else "passthrough"
        require_tls = read("require_tls", self.boolean, False)
        routes = read("routes", self._routes, ())
        client_tls = read("client_tls", self._client_tls)
        allow_destinations = read("allow_destinations", self._allow_destinations, ())
        users = read("users", lambda n, p: self._users(n, p, mode), ())
        if mode == "tcp":
            if not fields.has("cluster"):
                self.report(node, path, "missing required key 'cluster'")
                read.ok = False
        elif mode == "postgres":
            if not self._check_postgres(node, path, fields, tls, require_tls):
                read.ok = False
        elif mode is not None and not fields.has("allow_destinations"):
            self.report(
                node, path,
                f"missing required key 'allow_destinations' ({mode} listeners dial "
                f"only the destinations listed there and are never open proxies; "
                f"e.g. allow_destinations: [\"api.vendor.com:443\"])",
            )
            read.ok = False
        if not read.ok:
            return None
        listener = self._construct(
            node, path, ListenerConfig, name=name, listen=listen, mode=mode,
            cluster=cluster, log_prefix=log_prefix, allow_sources=allow_sources,
            max_connections=max_connections, proxy_protocol=proxy_protocol,
            tls=tls, require_tls=require_tls, routes=routes, client_tls=client_tls,
            allow_destinations=allow_destinations, users=users,
            proxy_protocol_trusted=proxy_protocol_trusted, allow_addresses=allow_addresses,
            deny_addresses=deny_addresses, policy=policy, accept_risk=accept_risk,
            **({} if per_source is None else {"max_connections_per_source": per_source}),
        )
        if listener is not None and mode in ("http_connect", "socks5"):
            self.forward_listeners.append((listener, node, path))
        return listener

    def _check_mode_keys(self, fields: _Fields, path: Path, mode: str | None) -> bool:
        """Report keys that belong to other modes and drop them from ``fields``.

        Their values are not read: the key is wrong wherever its value is.
        Returns False if any was reported.
        """
        if mode is None:
            return True
        ok = True
        default = "" if "mode" in fields else ", the default"
        for keys, modes, wanted in _MODE_KEYS:
            if mode in modes:
                continue
            for key in keys:
                if key not in fields:
                    continue
                self.report(
                    fields.key_nodes[key], path + (key,),
                    f"only for mode: {wanted}; this listener has mode: {mode}{default}",
                )
                del fields[key]
                ok = False
        return ok

    def _check_postgres(
        self,
        node: yaml.Node,
        path: Path,
        fields: _Fields,
        tls: str | None,
        require_tls: bool | None,
    ) -> bool:
        """The rules tying a postgres listener's cluster, routes and TLS keys.

        Checked on which keys are written, so a bad value elsewhere does not
        hide them; ``tls`` is None when its value was wrong, and the rules
        that depend on it are then skipped. Returns False if any was broken.
        """
        before = len(self.errors)
        if tls == "originate":
            if "routes" in fields:
                self.report(
                    fields.key_nodes["routes"], path + ("routes",),
                    "not allowed with tls: originate: routes choose by the TLS "
                    "server name (SNI), and clients of a tls: originate listener "
                    "speak plaintext to the proxy, so it sees none; name one "
                    "cluster instead, or use tls: passthrough to route by SNI",
                )
            elif not fields.has("cluster"):
                self.report(
                    node, path,
                    "missing required key 'cluster' (a tls: originate listener "
                    "opens TLS to one cluster)",
                )
            if require_tls is True and not fields.has("client_tls"):
                self.report(
                    fields.key_nodes["require_tls"], path + ("require_tls",),
                    "with tls: originate, require_tls needs client_tls (the "
                    "certificate the proxy shows clients that ask for TLS); "
                    "without it every client would be refused",
                )
        else:
            if "cluster" in fields and "routes" in fields:
                self.report(
                    fields.key_nodes["routes"], path + ("routes",),
                    "give cluster or routes, not both (cluster sends every "
                    "connection to one cluster; routes choose by the TLS server "
                    "name, SNI)",
                )
            elif not fields.has("cluster") and not fields.has("routes"):
                self.report(
                    node, path,
                    "missing required key 'cluster' or 'routes' (a postgres "
                    "listener sends every connection to one cluster, or chooses "
                    "by the TLS server name, SNI, with routes)",
                )
        if tls == "passthrough" and "client_tls" in fields:
            default = "" if "tls" in fields else ", the default"
            self.report(
                fields.key_nodes["client_tls"], path + ("client_tls",),
                f"only with tls: originate (with passthrough the client's TLS goes "
                f"through to the server and the proxy shows no certificate); this "
                f"listener has tls: passthrough{default}",
            )
        return len(self.errors) == before

    def _build_cluster(self, node: yaml.Node, path: Path) -> ClusterConfig | None:
        entry = self._named_entry(node, path, _CLUSTER_KEYS, ("name", "endpoints"), self.cluster_names)
        if entry is None:
            return None
        fields, read, name = entry
        endpoints = read("endpoints", self._endpoints)
        connect_timeout = read("connect_timeout", self._connect_timeout, 5.0)
        max_connect_attempts = read("max_connect_attempts", self.positive, 3)
        idle_timeout = read("idle_timeout", self._idle_timeout, None)
        max_connections = read("max_connections", self.positive, 1024)
        max_pending = read("max_pending", self.positive, 128)
        keepalive = read("keepalive", self._keepalive, Keepalive())
        health_check = read("health_check", self._health_check, HealthCheckConfig())
        tls = read("tls", self._cluster_tls)
        if not read.ok:
            return None
        return self._construct(
            node, path, ClusterConfig, name=name, endpoints=endpoints,
            connect_timeout=connect_timeout,
            max_connect_attempts=max_connect_attempts, idle_timeout=idle_timeout,
            max_connections=max_connections, max_pending=max_pending,
            keepalive=keepalive, health_check=health_check, tls=tls,
        )

    def _listen(self, node: yaml.Node, path: Path) -> ListenAddress:
        value = self.scalar(node, path, "an address to listen on")
        if isinstance(value, int) and not isinstance(value, bool):
            self.fail(
                node, path,
                f"{_LISTEN_HINT}, got {value}; write \":{value}\" for all interfaces",
            )
        if not isinstance(value, str):
            self.fail(node, path, f"{_LISTEN_HINT}, got {_show(value)}")
        try:
            return _parse_listen(value)
        except ValueError as e:
            self.fail(node, path, str(e))

    def _mode(self, node: yaml.Node, path: Path) -> str:
        expected = "tcp, postgres, http_connect or socks5"
        value = self.scalar(node, path, expected)
        if value not in MODES:
            self.fail(node, path, f"expected {expected}, got {_show(value)}")
        return value

    def _log_prefix(self, node: yaml.Node, path: Path) -> str:
        value = self.text(node, path, "a prefix without spaces")
        if not value or any(c.isspace() for c in value):
            self.fail(
                node, path,
                f"expected a non-empty prefix without whitespace, got {value!r}",
            )
        return value

    def _allow_sources(self, node: yaml.Node, path: Path) -> tuple[IPNetwork, ...] | None:
        if _is_null(node):
            return None
        items = self.non_empty_sequence(
            node, path, "CIDRs or IP addresses",
            "an empty list would refuse every client; remove the key to allow any source",
        )
        return self.each(items, path, self._network)

    def _trusted_proxies(self, node: yaml.Node, path: Path) -> tuple[IPNetwork, ...]:
        items = self.non_empty_sequence(
            node, path, "CIDRs or IP addresses",
            "an empty list would refuse every PROXY header; list the proxies that send it "
            "(e.g. Fly's proxy), or remove the key to accept it from any peer",
        )
        return self.each(items, path, self._network)

    def _address_ranges(self, node: yaml.Node, path: Path) -> tuple[IPNetwork, ...]:
        items = self.sequence(node, path, "CIDRs or IP addresses")
        return self.each(items, path, self._network)

    def _policy(self, node: yaml.Node, path: Path) -> str:
        value = self.scalar(node, path, "enforce or report")
        if value not in _POLICIES:
            self.fail(node, path, f"expected enforce or report, got {_show(value)}")
        return value

    def _accept_risk(self, node: yaml.Node, path: Path) -> tuple[str, ...]:
        items = self.sequence(node, path, "allowlist entries as written")
        return tuple(self.each(items, path, self._entry_text))

    def _entry_text(self, node: yaml.Node, path: Path) -> str:
        value = self.scalar(node, path, "an allowlist entry")
        if not isinstance(value, str):
            self.fail(node, path, f"expected an allowlist entry as written (e.g. \"*.co.uk:443\"), got {_show(value)}")
        return value

    def _network(self, node: yaml.Node, path: Path) -> IPNetwork:
        expected = (
            "expected a CIDR such as 10.0.0.0/8 or fdaa::/16, or a single IP address"
        )
        value = self.scalar(node, path, "a CIDR")
        if not isinstance(value, str):
            self.fail(node, path, f"{expected}, got {_show(value)}")
        try:
            return ip_network(value)
        except ValueError:
            pass
        try:
            network = ip_network(value, strict=False)
        except ValueError:
            self.fail(node, path, f"{expected}, got {value!r}")
        self.fail(
            node, path,
            f"{value!r} has host bits set; did you mean '{network}'?",
        )

    # -- postgres listeners -------------------------------------------------

    def _listener_tls(self, node: yaml.Node, path: Path) -> str:
        value = self.scalar(node, path, "passthrough or originate")
        if value not in _LISTENER_TLS:
            self.fail(
                node, path,
                f"expected passthrough (the client's TLS goes through to the server) "
                f"or originate (the proxy opens TLS to the cluster), got {_show(value)}",
            )
        return value

    def _routes(self, node: yaml.Node, path: Path) -> tuple[PostgresRoute, ...]:
        items = self.non_empty_sequence(
            node, path, "routes ({sni: NAME, cluster: NAME} or {sni: NAME, upstream: HOST:PORT})",
            "an empty list would refuse every connection; give at least one route, or use cluster instead",
        )
        routes: list[PostgresRoute] = []
        first: dict[str, _Named] = {}
        failed = False
        for index, item in enumerate(items):
            try:
                route, sni_node = self._route(item, path + (index,))
            except _Invalid:
                failed = True
                continue
            sni_path = path + (index, "sni")
            if route.sni in first:
                earlier = first[route.sni]
                self.report(
                    sni_node, sni_path,
                    f"duplicate route for {route.sni!r} (first at "
                    f"{_render_path(earlier.path)}, line {_line(earlier.node)})",
                )
                failed = True
                continue
            first[route.sni] = _Named(route.sni, sni_node, sni_path)
            routes.append(route)
        if failed:
            raise _Invalid()
        return tuple(routes)

    def _route(self, node: yaml.Node, path: Path) -> tuple[PostgresRoute, yaml.Node]:
        """One route and the node of its ``sni``, for the duplicate check."""
        fields = self.mapping(node, path, _ROUTE_KEYS, ("sni",))
        read = _FieldReader(self, fields, path, ("sni",))
        sni = read("sni", self._sni)
        cluster = read("cluster", self.name)
        if cluster is not None:
            self.cluster_refs.append(
                _Named(cluster, fields["cluster"], path + ("cluster",))
            )
        upstream = read("upstream", self._upstream)
        if "cluster" in fields and "upstream" in fields:
            self.report(
                fields.key_nodes["upstream"], path + ("upstream",),
                "give cluster or upstream, not both (cluster sends to a configured "
                "cluster; upstream dials a HOST:PORT made from the server name)",
            )
            read.ok = False
        elif not fields.has("cluster") and not fields.has("upstream"):
            self.report(
                node, path,
                "missing required key 'cluster' or 'upstream' (a route sends to a "
                "configured cluster, or to a HOST:PORT template such as "
                "'{sni}:5432')",
            )
            read.ok = False
        if not read.ok:
            raise _Invalid()
        route = self._construct(
            node, path, PostgresRoute, sni=sni, cluster=cluster, upstream=upstream
        )
        if route is None:
            raise _Invalid()
        if upstream is not None:
            self._record_upstream(route, fields["upstream"], path + ("upstream",))
        return route, fields["sni"]

    def _record_upstream(self, route: PostgresRoute, node: yaml.Node, path: Path) -> None:
        """Remember a route's upstream for the never-dial-yourself check.

        A template with ``{sni}`` is known only for an exact ``sni`` (the
        name then is the one the client sends); a wildcard route's dials are
        checked at run time instead.
        """
        assert route.upstream is not None
        if "{sni}" in route.upstream and "*" in route.sni:
            return
        try:
            address = _parse_endpoint(route.upstream.replace("{sni}", route.sni))
        except ValueError:
            return
        self.dials.append((address, node, path))

    def _sni(self, node: yaml.Node, path: Path) -> str:
        value = self.text(node, path, "a server name")
        if _ip_literal(value) is not None:
            self.fail(
                node, path,
                f"clients send a TLS server name (SNI) only for host names, never "
                f"for an IP address; {_SNI_HINT}, got {value!r}",
            )
        try:
            return _parse_name_pattern(value, "every server name", _SNI_HINT)
        except ValueError as e:
            self.fail(node, path, str(e))

    def _upstream(self, node: yaml.Node, path: Path) -> str:
        value = self.scalar(node, path, "HOST:PORT")
        if not isinstance(value, str):
            self.fail(node, path, f"{_UPSTREAM_HINT}, got {_show(value)}")
        try:
            return _parse_upstream_template(value)
        except ValueError as e:
            self.fail(node, path, str(e))

    def _client_tls(self, node: yaml.Node, path: Path) -> ClientTLS:
        fields = self.mapping(node, path, _CLIENT_TLS_KEYS, _CLIENT_TLS_KEYS)
        read = _FieldReader(self, fields, path, _CLIENT_TLS_KEYS)
        cert = read("cert", self._file)
        key = read("key", self._file)
        if not read.ok:
            raise _Invalid()
        result = self._construct(node, path, ClientTLS, cert=cert, key=key)
        if result is None:
            raise _Invalid()
        return result

    def _file(self, node: yaml.Node, path: Path) -> str:
        """The path of an existing file (relative paths: to the working directory)."""
        value = self.text(node, path, "a file path")
        if not value:
            self.fail(node, path, "expected a file path, got ''")
        if os.path.isdir(value):
            self.fail(node, path, f"{value!r} is a directory, not a file")
        if not os.path.isfile(value):
            self.fail(node, path, f"no such file: {value!r}")
        return value

    def _optional_file(self, node: yaml.Node, path: Path) -> str | None:
        if _is_null(node):
            return None
        return self._file(node, path)

    # -- cluster tls --------------------------------------------------------

    def _cluster_tls(self, node: yaml.Node, path: Path) -> ClusterTLS | None:
        """A cluster's ``tls``: true, null-valued keys or ``{}`` verify with defaults."""
        if isinstance(node, yaml.ScalarNode):
            value = _flag(self.scalar(node, path, "a mapping or true/false"))
            if value is None or value is False:
                return None
            if value is True:
                return ClusterTLS()
            self.fail(
                node, path,
                f"expected a mapping with server_name and ca_file, or true to verify "
                f"with the defaults (each endpoint's host name, the system trust "
                f"store), got {_show(value)}",
            )
        fields = self.mapping(node, path, _CLUSTER_TLS_KEYS)
        read = _FieldReader(self, fields, path, ())
        server_name = read("server_name", self._server_name)
        ca_file = read("ca_file", self._optional_file)
        if not read.ok:
            raise _Invalid()
        result = self._construct(
            node, path, ClusterTLS, server_name=server_name, ca_file=ca_file
        )
        if result is None:
            raise _Invalid()
        return result

    def _server_name(self, node: yaml.Node, path: Path) -> str | None:
        if _is_null(node):
            return None
        value = self.text(node, path, "a host name")
        if _ip_literal(value) is None:
            problem = _hostname_problem(value)
            if problem:
                self.fail(node, path, problem)
        return value

    # -- forward-proxy listeners --------------------------------------------

    def _allow_destinations(
        self, node: yaml.Node, path: Path
    ) -> tuple[DestinationRule, ...]:
        items = self.non_empty_sequence(
            node, path, "HOST:PORT destinations",
            "an empty list would refuse every destination; list the HOST:PORT "
            "destinations clients may reach (the proxy is never open to all)",
        )
        return self.each(items, path, self._destination)

    def _destination(self, node: yaml.Node, path: Path) -> DestinationRule:
        value = self.scalar(node, path, "HOST:PORT")
        if not isinstance(value, str):
            self.fail(node, path, f"{_DESTINATION_HINT}, got {_show(value)}")
        try:
            return _parse_destination(value)
        except ValueError as e:
            self.fail(node, path, str(e))

    def _user_destinations(self, node: yaml.Node, path: Path) -> tuple[DestinationRule, ...]:
        """A user's own ``allow_destinations``: it replaces the listener's for that user."""
        items = self.non_empty_sequence(
            node, path, "HOST:PORT destinations",
            "an empty list would refuse every destination to this user; list the "
            "HOST:PORT destinations this user may reach, or remove the key to use "
            "the listener's allow_destinations",
        )
        return self.each(items, path, self._destination)

    def _users(self, node: yaml.Node, path: Path, mode: str | None) -> tuple[User, ...]:
        """``users``: name and password pairs, each with an optional ``allow_destinations``.

        No message ever shows a password.

        Shapes are checked here rather than by :meth:`sequence` and
        :meth:`mapping`, whose messages quote the value they got, which could be
        a password written in the wrong place.
        """
        if not isinstance(node, yaml.SequenceNode):
            got = "null" if _is_null(node) else _kind(node)
            self.fail(
                node, path, f"expected a list of {{name, password}} mappings, got {got}"
            )
        if not node.value:
            self.fail(
                node, path,
                "an empty list is ambiguous; list {name, password} mappings, or "
                "remove the key to let clients in without a password",
            )
        users: list[User] = []
        first: dict[str, _Named] = {}
        failed = False
        for index, item in enumerate(node.value):
            entry = path + (index,)
            if not isinstance(item, yaml.MappingNode):
                got = "null" if _is_null(item) else _kind(item)
                self.report(
                    item, entry, f"expected a mapping with keys name, password, got {got}"
                )
                failed = True
                continue
            try:
                fields = self.mapping(item, entry, _USER_KEYS, _USER_REQUIRED)
            except _Invalid:
                failed = True
                continue
            read = _FieldReader(self, fields, entry, _USER_REQUIRED)
            name = read("name", lambda n, p: self._user_name(n, p, mode))
            password = read("password", lambda n, p: self._password(n, p, mode))
            # The user's own list replaces the listener's (same syntax and messages).
            destinations = read("allow_destinations", self._user_destinations)
            if name is not None:
                name_path = entry + ("name",)
                if name in first:
                    earlier = first[name]
                    self.report(
                        fields["name"], name_path,
                        f"duplicate user name {name!r} (first at "
                        f"{_render_path(earlier.path)}, line {_line(earlier.node)})",
                    )
                    read.ok = False
                else:
                    first[name] = _Named(name, fields["name"], name_path)
            if not read.ok:
                failed = True
                continue
            users.append(User(name=name, password=password, allow_destinations=destinations))
        if failed:
            raise _Invalid()
        return tuple(users)

    def _user_name(self, node: yaml.Node, path: Path, mode: str | None) -> str:
        value = self.text(node, path, "a user name")
        if not value:
            self.fail(node, path, "must not be empty")
        if any(c.isspace() or not c.isprintable() for c in value):
            self.fail(
                node, path,
                f"expected a user name without whitespace or control characters, "
                f"got {value!r}",
            )
        if mode == "http_connect" and ":" in value:
            self.fail(
                node, path,
                f"HTTP Basic authentication cannot carry ':' in a user name, got "
                f"{value!r}",
            )
        if mode == "socks5" and len(value.encode()) > _SOCKS5_MAX_CREDENTIAL:
            self.fail(
                node, path,
                f"longer than {_SOCKS5_MAX_CREDENTIAL} bytes, the most SOCKS5 "
                f"(RFC 1929) can carry",
            )
        return value

    def _password(self, node: yaml.Node, path: Path, mode: str | None) -> str:
        """A password: text, never quoted back in a message."""
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, path, f"expected text, got {_kind(node)}")
        value = self.scalar(node, path, "text", secret=True)
        if value is None or value == "":
            # An empty result can only come of references that expanded to
            # nothing, so the text written is safe to show.
            written = node.value if "${" in node.value else ""
            hint = f" ({written} expanded to nothing)" if written else ""
            self.fail(node, path, f"must not be empty{hint}")
        if not isinstance(value, str):
            self.fail(
                node, path,
                "expected text; put the password in quotes (YAML reads it "
                "unquoted as another type)",
            )
        if mode == "socks5" and len(value.encode()) > _SOCKS5_MAX_CREDENTIAL:
            self.fail(
                node, path,
                f"longer than {_SOCKS5_MAX_CREDENTIAL} bytes, the most SOCKS5 "
                f"(RFC 1929) can carry",
            )
        return value

    def _endpoints(self, node: yaml.Node, path: Path) -> tuple[Address, ...]:
        items = self.non_empty_sequence(node, path, "HOST:PORT endpoints", f"{_ENDPOINT_HINT}: the list is empty")
        return self.each(items, path, self._endpoint)

    def _endpoint(self, node: yaml.Node, path: Path) -> Address:
        value = self.scalar(node, path, "HOST:PORT")
        if not isinstance(value, str):
            self.fail(node, path, f"{_ENDPOINT_HINT}, got {_show(value)}")
        try:
            address = _parse_endpoint(value)
        except ValueError as e:
            self.fail(node, path, str(e))
        self.dials.append((address, node, path))
        return address

    def _connect_timeout(self, node: yaml.Node, path: Path) -> float:
        return self._positive_duration(node, path, "5s")

    def _positive_duration(self, node: yaml.Node, path: Path, example: str) -> float:
        seconds = self.duration(node, path)
        if seconds <= 0:
            self.fail(node, path, f"must be greater than 0 (e.g. {example})")
        return seconds

    def _idle_timeout(self, node: yaml.Node, path: Path) -> float | None:
        if _is_null(node):
            return None
        return self.duration(node, path) or None

    def _keepalive(self, node: yaml.Node, path: Path) -> Keepalive | None:
        if isinstance(node, yaml.ScalarNode):
            value = _flag(self.scalar(node, path, "a mapping or true/false"))
            if value is None or value is False:
                return None
            if value is True:
                return Keepalive()
            self.fail(
                node, path,
                f"expected a mapping with idle, interval and count, or false to "
                f"turn keepalive off, got {_show(value)}",
            )
        fields = self.mapping(node, path, _KEEPALIVE_KEYS)
        read = _FieldReader(self, fields, path, ())
        defaults = Keepalive()
        idle = read("idle", self._keepalive_seconds, defaults.idle)
        interval = read("interval", self._keepalive_seconds, defaults.interval)
        count = read(
            "count",
            lambda n, p: self.integer(n, p, 1, _MAX_KEEPALIVE_COUNT),
            defaults.count,
        )
        if not read.ok:
            raise _Invalid()
        result = self._construct(node, path, Keepalive, idle=idle, interval=interval, count=count)
        if result is None:
            raise _Invalid()
        return result

    def _keepalive_seconds(self, node: yaml.Node, path: Path) -> float:
        value = self.scalar(node, path, "a duration")
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            self.fail(node, path, str(e))
        if seconds < 1 or seconds != int(seconds) or seconds > _MAX_KEEPALIVE_SECONDS:
            self.fail(
                node, path,
                f"expected whole seconds from 1s to {_MAX_KEEPALIVE_SECONDS}s "
                f"(the kernel counts keepalive time in whole seconds), "
                f"got {_show(value)}",
            )
        return seconds

    def _health_check(self, node: yaml.Node, path: Path) -> HealthCheckConfig:
        if isinstance(node, yaml.ScalarNode):
            value = _flag(self.scalar(node, path, "a mapping or true/false"))
            if value is None or value is True:
                return HealthCheckConfig()
            if value is False:
                return HealthCheckConfig(kind="none")
            self.fail(
                node, path,
                f"expected a mapping with kind, interval, timeout, unhealthy_threshold "
                f"and healthy_threshold, or false to turn health checks off, got "
                f"{_show(value)}",
            )
        fields = self.mapping(node, path, _HEALTH_CHECK_KEYS)
        read = _FieldReader(self, fields, path, ())
        defaults = HealthCheckConfig()
        kind = read("kind", self._health_check_kind, defaults.kind)
        interval = read(
            "interval",
            lambda n, p: self._positive_duration(n, p, "10s"),
            defaults.interval,
        )
        timeout = read(
            "timeout",
            lambda n, p: self._positive_duration(n, p, "2s"),
            defaults.timeout,
        )
        unhealthy_threshold = read(
            "unhealthy_threshold", self.positive, defaults.unhealthy_threshold
        )
        healthy_threshold = read(
            "healthy_threshold", self.positive, defaults.healthy_threshold
        )
        if not read.ok:
            raise _Invalid()
        if timeout >= interval:
            # A check still running when the next is due would overlap it.
            written = fields.get("timeout") or fields.get("interval") or node
            timeout_text = _format_seconds(timeout)
            if "timeout" not in fields:
                timeout_text += ", the default"
            interval_text = _format_seconds(interval)
            if "interval" not in fields:
                interval_text += ", the default"
            self.fail(
                written, path,
                f"timeout ({timeout_text}) must be less than interval ({interval_text})",
            )
        result = self._construct(
            node, path, HealthCheckConfig, kind=kind, interval=interval,
            timeout=timeout, unhealthy_threshold=unhealthy_threshold,
            healthy_threshold=healthy_threshold,
        )
        if result is None:
            raise _Invalid()
        return result

    def _health_check_kind(self, node: yaml.Node, path: Path) -> str:
        value = self.scalar(node, path, "tcp, postgres or none")
        if value not in _HEALTH_CHECK_KINDS:
            self.fail(node, path, f"expected tcp, postgres or none, got {_show(value)}")
        return value

    def _build_hosts(self, node: yaml.Node, path: Path) -> tuple[tuple[str, str], ...]:
        if not isinstance(node, yaml.MappingNode):
            self.fail(
                node, path,
                f"expected a mapping of host name to IP address, got {self._got(node)}",
            )
        pairs: list[tuple[str, str]] = []
        seen: dict[str, int] = {}
        failed = False
        for key, (key_node, value_node) in self.entries(node, path).items():
            name = key.lower()
            entry = path + (key,)
            problem = _hostname_problem(name)
            if problem:
                self.report(key_node, entry, problem)
                failed = True
                continue
            if name in seen:
                self.report(
                    key_node, entry,
                    f"duplicate host {key!r} (names ignore case; first at line "
                    f"{seen[name]})",
                )
                failed = True
                continue
            seen[name] = _line(key_node)
            try:
                address = self.text(value_node, entry, "an IP address")
            except _Invalid:
                failed = True
                continue
            literal = _ip_literal(address)
            if literal is None:
                self.report(
                    value_node, entry,
                    f"expected an IP address (e.g. 127.0.0.1 or fdaa::3), got {address!r}",
                )
                failed = True
                continue
            pairs.append((name, str(literal)))
        if failed:
            raise _Invalid()
        return tuple(pairs)

    def _build_access_log(self, node: yaml.Node, path: Path) -> AccessLogConfig:
        fields = self.mapping(node, path, _ACCESS_LOG_KEYS)
        read = _FieldReader(self, fields, path, ())
        log_format = read("format", self._log_format, "text")
        if not read.ok:
            raise _Invalid()
        return AccessLogConfig(format=log_format)

    def _log_format(self, node: yaml.Node, path: Path) -> str:
        value = self.scalar(node, path, "text or json")
        if value not in ("text", "json"):
            self.fail(node, path, f"expected text or json, got {_show(value)}")
        return value

    def _http_service(self, node: yaml.Node, path: Path) -> HttpServiceConfig | None:
        """``admin`` or ``metrics``: null, true or ``{}`` is the default, false is off.

        The address the service will use, written or default, is claimed for
        the listen clash check; a key absent from the file is claimed by
        :meth:`build`.
        """
        key = path[-1]
        default = _HTTP_SERVICE_DEFAULTS[key]
        listen_path = path + ("listen",)
        if isinstance(node, yaml.ScalarNode):
            value = _flag(self.scalar(node, path, "a mapping or true/false"))
            if value is False:
                return None
            if value is None or value is True:
                self.listens.append((default.listen, None, listen_path))
                return default
            self.fail(
                node, path,
                f"expected a mapping with listen, or false to turn {key} off, "
                f"got {_show(value)}",
            )
        fields = self.mapping(node, path, _HTTP_SERVICE_KEYS)
        if "listen" not in fields:
            self.listens.append((default.listen, None, listen_path))
            return default
        listen = self._listen(fields["listen"], listen_path)
        self.listens.append((listen, fields["listen"], listen_path))
        result = self._construct(node, path, HttpServiceConfig, listen=listen)
        if result is None:
            raise _Invalid()
        return result

    # -- cross checks -------------------------------------------------------

    def _check_names(self, kind: str, names: list[_Named]) -> None:
        first: dict[str, _Named] = {}
        for named in names:
            if named.value in first:
                earlier = first[named.value]
                self.report(
                    named.node, named.path,
                    f"duplicate {kind} name {named.value!r} (first at "
                    f"{_render_path(earlier.path)}, line {_line(earlier.node)})",
                )
            else:
                first[named.value] = named

    def _check_cluster_refs(self) -> None:
        defined = list(dict.fromkeys(named.value for named in self.cluster_names))
        for ref in self.cluster_refs:
            if ref.value in defined:
                continue
            listing = ", ".join(defined) if defined else "none"
            close = difflib.get_close_matches(ref.value, defined, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            self.report(
                ref.node, ref.path,
                f"unknown cluster {ref.value!r} (defined clusters: {listing}){hint}",
            )

    def _workers(self, node: yaml.Node, path: Path) -> int:
        """``workers``: a count, or ``auto`` for one per CPU this process may use."""
        expected = f"a whole number 1-{MAX_WORKERS} or auto"
        value = self.scalar(node, path, expected)
        if value == "auto":
            return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
        if isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
            self.fail(node, path, f"expected {expected}, got {_show(value)}")
        return value

    def _check_shareable_listens(self, workers: int) -> None:
        """Each worker binds every listener itself (SO_REUSEPORT): only a named host:port can be shared."""
        for listen, node, path in self.listens:
            if node is None or path[0] != "listeners":
                continue
            if listen.port is None:
                self.report(node, path, (
                    f"{listen.text!r} cannot be shared by {workers} workers (each binds "
                    f"its own socket with SO_REUSEPORT); use a host:port address or set workers: 1"
                ))
            elif listen.port == 0:
                self.report(node, path, (
                    f"port 0 cannot be shared by {workers} workers (each would get a "
                    f"different port); name a port or set workers: 1"
                ))

    def _check_listens(self) -> None:
        # Defaults first, then file order: of two clashing addresses the later
        # one written carries the error and names the other.
        claims = sorted(
            self.listens, key=lambda claim: 0 if claim[1] is None else _line(claim[1])
        )
        for index, (listen, node, path) in enumerate(claims):
            if node is None:
                continue  # the defaults do not clash with each other
            for other, other_node, other_path in claims[:index]:
                if not _overlaps(listen, other):
                    continue
                where = _render_path(other_path)
                if other_node is None:
                    service = other_path[0]
                    message = (
                        f"{listen.text!r} overlaps the default {where} "
                        f"{other.text!r}; give {service} another address "
                        f"({service}: {{listen: ...}}) or turn it off "
                        f"({service}: false)"
                    )
                else:
                    if path[0] == other_path[0] == "listeners":
                        needs = "each listener needs its own address"
                    else:
                        needs = (
                            "listeners, admin and metrics each need their own address"
                        )
                    message = (
                        f"{listen.text!r} overlaps {where} {other.text!r} "
                        f"(line {_line(other_node)}); {needs}"
                    )
                self.report(node, path, message)
                break

    def _own_sockets(self) -> list[allowlint.OwnSocket]:
        """The proxy's own listening sockets with a known address and port (not 0)."""
        names = {named.path[:2]: named.value for named in self.listener_names}
        sockets: list[allowlint.OwnSocket] = []
        for listen, _node, path in self.listens:
            if listen.host is None or not listen.port:
                continue
            if path[0] == "listeners":
                name = names.get(path[:2])
                what = f"listener {name!r}" if name else "listener"
            else:
                what = f"{path[0]} service"
            sockets.append(allowlint.OwnSocket(what, listen.text, listen.host, listen.port))
        return sockets

    def _check_dials(
        self, own_sockets: list[allowlint.OwnSocket], pins: Mapping[str, str]
    ) -> None:
        """Never dial yourself: no endpoint may be one of the proxy's own sockets.

        The host counts when it is known without DNS: an IP literal, a name
        ``hosts:`` pins, or ``localhost`` (and names under it). A wildcard
        listen address is reached on loopback too.
        """
        for address, node, path in self.dials:
            host = address.host.lower()
            shown = str(address)
            if host in pins:
                candidates = [ip_address(pins[host])]
                shown += f" (pinned to {pins[host]} by hosts:)"
            elif _ip_literal(host) is not None:
                candidates = [ip_address(host)]
            elif host == "localhost" or host.endswith(".localhost"):
                candidates = [ip_address("127.0.0.1"), ip_address("::1")]
            else:
                continue
            for own in own_sockets:
                if any(own.reached_by(ip, address.port) for ip in candidates):
                    if own.what.startswith("listener"):
                        harm = "the proxy would connect to itself in a loop"
                    else:
                        harm = f"the proxy would hand its clients to its own {own.what}"
                    self.report(node, path, (
                        f"{shown} is this proxy's own {own}: {harm}; point it at "
                        f"the server the proxy should reach"
                    ))
                    break

    def _check_allowlists(
        self, own_sockets: list[allowlint.OwnSocket], pins: Mapping[str, str]
    ) -> None:
        """Allowlists open in all but name, unless ``accept_risk`` marks them (``allowlint``)."""
        for listener, node, path in self.forward_listeners:
            lists: list[tuple[Path, list[allowlint.Entry]]] = []
            own_node = _value_of(node, "allow_destinations")
            if own_node is not None:
                lists.append((
                    ("allow_destinations",),
                    self._entries(own_node, listener.allow_destinations),
                ))
            users_node = _value_of(node, "users")
            for index, user in enumerate(listener.users):
                rules = getattr(user, "allow_destinations", None)
                user_node = (
                    _value_of(users_node.value[index], "allow_destinations")
                    if rules is not None and users_node is not None else None
                )
                if user_node is not None:
                    lists.append((
                        ("users", index, "allow_destinations"),
                        self._entries(user_node, rules),
                    ))
            allow_node = _value_of(node, "allow_addresses")
            allow_texts = self._written(allow_node) if allow_node is not None else []
            result = allowlint.check_listener(
                lists,
                allow_addresses=list(zip(allow_texts, listener.allow_addresses)),
                accept_risk=listener.accept_risk,
                own_sockets=own_sockets,
                hosts=pins,
                allow_addresses_key=("allow_addresses",),
                accept_risk_key=("accept_risk",),
            )
            for finding in result.errors:
                key = finding.key
                assert isinstance(key, tuple)
                target = node
                for part in key:
                    if isinstance(part, int):
                        target = target.value[part]
                    else:
                        target = _value_of(target, part)
                self.report(
                    target.value[finding.index], path + key + (finding.index,),
                    finding.message,
                )

    def _entries(self, node: yaml.Node, rules: tuple[DestinationRule, ...]) -> list[allowlint.Entry]:
        """An allowlist's entries: the text each item expands to, with its rule."""
        return [allowlint.Entry(text, rule) for text, rule in zip(self._written(node), rules)]

    def _written(self, node: yaml.Node) -> list[str]:
        """The expanded text of each item of a list already read without error."""
        return [
            self.interpolate(str(item.value), item, ()) for item in node.value
        ]


class _FieldReader:
    """Reads optional and required fields of one mapping, remembering failures."""

    def __init__(
        self,
        builder: _Builder,
        fields: dict[str, yaml.Node],
        path: Path,
        required: Sequence[str],
    ) -> None:
        self.builder = builder
        self.fields = fields
        self.path = path
        self.ok = all(key in fields for key in required)

    def __call__(
        self,
        key: str,
        convert: Callable[[yaml.Node, Path], T],
        default: T | None = None,
    ) -> T | None:
        node = self.fields.get(key)
        if node is None:
            return default
        try:
            return convert(node, self.path + (key,))
        except _Invalid:
            self.ok = False
            return default


def _flag(value: object) -> object:
    """The text ``true``/``false`` (what ``${VAR}`` yields) as a bool; others unchanged."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _format_seconds(seconds: float) -> str:
    """``2.0`` -> ``2s``, ``0.25`` -> ``250ms``: seconds as the file would spell them."""
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def _value_of(node: yaml.Node, key: str) -> yaml.Node | None:
    """The value node of ``key`` in a mapping node (the first, as the reader takes it), or None."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                return value_node
    return None


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _overlaps(a: ListenAddress, b: ListenAddress) -> bool:
    """Whether two listen addresses would fight over the same port.

    Port 0 (ephemeral) never clashes. On Linux a listening wildcard socket
    blocks specific addresses of its family on the same port, and a dual-stack
    ``::`` socket blocks both families.
    """
    if a.description is not None or b.description is not None:
        return a.description == b.description
    if a.port != b.port or a.port == 0:
        return False
    assert a.host is not None and b.host is not None
    if a.host == b.host:
        return True
    first, second = ip_address(a.host), ip_address(b.host)
    if a.dual_stack or b.dual_stack:
        return True
    if first.version != second.version:
        return False
    return first.is_unspecified or second.is_unspecified


def _syntax_error(source: str, text: str, error: yaml.MarkedYAMLError) -> str:
    """One line for a YAML syntax error: where it broke, and where the broken part began.

    PyYAML puts errors found at the end of the stream on the line after the
    last; that is clamped to the last line so the number exists in the file.
    """
    mark = error.problem_mark or error.context_mark
    last_line = max(1, len(text.splitlines()))
    line = min(mark.line + 1, last_line) if mark else 1
    problem, context = error.problem or "", error.context or ""
    if problem.startswith("but ") and context:
        # The composer's "expected a single document ... but found another".
        problem, context = f"{context}, {problem}", ""
    message = f"{source}:{line}: invalid YAML: {problem or context}"
    if mark and error.problem_mark:
        if mark.line + 1 > last_line:
            message += " (at the end of the file)"
        else:
            message += f" (column {mark.column + 1})"
    if problem and context:
        message += f", {context}"
        if error.context_mark:
            message += f" that starts at line {error.context_mark.line + 1}"
    return message


def parse_config(text: str, source: str, environ: Mapping[str, str]) -> Config:
    """Validate configuration ``text`` and return it as a :class:`Config`.

    ``source`` labels the messages (normally the file name). Every problem is
    collected and raised together as one :class:`ConfigError`, sorted by line.
    """
    loader = _Loader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            raise ConfigError([_syntax_error(source, text, e)]) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"{source}:1: invalid YAML: {e}"]) from None
        builder = _Builder(source, environ, loader)
        config = builder.build(root)
    finally:
        loader.dispose()
    if config is None or builder.errors:
        ordered = sorted(builder.errors, key=lambda error: error[0])
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
