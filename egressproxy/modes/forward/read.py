"""Reading a forward-proxy listener's keys: ``allow_destinations``, ``users``, ``accept_risk``.

Each mode adds its own limits on credentials (:class:`Credentials`): HTTP
Basic cannot carry ``:`` in a name, SOCKS5 carries at most 255 bytes.  Once
the whole file is read, every allowlist is judged by ``allowlint`` (lists
open in all but name, unless ``accept_risk`` marks them).  No message ever
shows a password.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import yaml

from egressproxy.config import allowlint
from egressproxy.config.context import FileFacts, ListenerKeys
from egressproxy.config.model import ListenerConfig
from egressproxy.config.reader import FieldReader, Invalid, Named, Reader
from egressproxy.config.syntax import Path
from egressproxy.config.yamlnodes import is_null, kind, line, render_path, value_of
from egressproxy.modes.forward.options import ForwardOptions
from egressproxy.modes.forward.parse import DESTINATION_HINT, parse_destination
from egressproxy.modes.forward.rules import DestinationRule, User
from egressproxy.modes.registry import ModeKey

__all__ = ["Credentials", "check_forward", "forward_keys"]

_USER_KEYS = ("name", "password", "allow_destinations")
_USER_REQUIRED = ("name", "password")


@attrs.frozen
class Credentials:
    """A mode's own limits on user names and passwords: each says what is wrong, or None."""

    name: Callable[[str], str | None] = lambda _value: None
    password: Callable[[str], str | None] = lambda _value: None


#: No limits beyond the common ones (and what an unknown mode's users are checked against).
ANY_CREDENTIALS = Credentials()


def forward_keys(credentials: Credentials) -> tuple[ModeKey, ...]:
    """The keys of a forward-proxy mode whose users have ``credentials``' limits."""

    def users(keys: ListenerKeys, node: yaml.Node, path: Path) -> tuple[User, ...]:
        limits = credentials if keys.mode is not None else ANY_CREDENTIALS
        return _read_users(keys.r, node, path, limits)

    return (
        ModeKey("allow_destinations", lambda keys, node, path: _allow_destinations(keys.r, node, path), ()),
        ModeKey("users", users, ()),
        ModeKey("accept_risk", lambda keys, node, path: _accept_risk(keys.r, node, path), ()),
    )


def check_forward(keys: ListenerKeys, values: dict[str, Any]) -> None:
    """A forward proxy dials only what ``allow_destinations`` lists: it must be there."""
    if not keys.has("allow_destinations"):
        keys.broken(
            keys.node, keys.path,
            f"missing required key 'allow_destinations' ({keys.mode} listeners dial "
            f"only the destinations listed there and are never open proxies; "
            f"e.g. allow_destinations: [\"api.vendor.com:443\"])",
        )
    r, node, path = keys.r, keys.node, keys.path
    keys.later(lambda listener, facts: _check_allowlists(r, node, path, listener, facts))


# -- the keys -----------------------------------------------------------------


def _allow_destinations(r: Reader, node: yaml.Node, path: Path) -> tuple[DestinationRule, ...]:
    items = r.non_empty_sequence(
        node, path, "HOST:PORT destinations",
        "an empty list would refuse every destination; list the HOST:PORT "
        "destinations clients may reach (the proxy is never open to all)",
    )
    return r.each(items, path, lambda item, at: _destination(r, item, at))


def _destination(r: Reader, node: yaml.Node, path: Path) -> DestinationRule:
    return r.parsed(node, path, "HOST:PORT", parse_destination, DESTINATION_HINT)


def _user_destinations(r: Reader, node: yaml.Node, path: Path) -> tuple[DestinationRule, ...]:
    """A user's own ``allow_destinations``: it replaces the listener's for that user."""
    items = r.non_empty_sequence(
        node, path, "HOST:PORT destinations",
        "an empty list would refuse every destination to this user; list the "
        "HOST:PORT destinations this user may reach, or remove the key to use "
        "the listener's allow_destinations",
    )
    return r.each(items, path, lambda item, at: _destination(r, item, at))


def _accept_risk(r: Reader, node: yaml.Node, path: Path) -> tuple[str, ...]:
    items = r.sequence(node, path, "allowlist entries as written")
    wrong = 'expected an allowlist entry as written (e.g. "*.co.uk:443")'
    return r.each(items, path, lambda item, at: r.parsed(item, at, "an allowlist entry", str, wrong))


def _read_users(r: Reader, node: yaml.Node, path: Path, limits: Credentials) -> tuple[User, ...]:
    """``users``: name and password pairs, each with an optional ``allow_destinations``.

    Shapes are checked here rather than by ``Reader.sequence`` and
    ``Reader.mapping``, whose messages quote the value they got, which could
    be a password written in the wrong place.
    """
    if not isinstance(node, yaml.SequenceNode):
        got = "null" if is_null(node) else kind(node)
        r.fail(node, path, f"expected a list of {{name, password}} mappings, got {got}")
    if not node.value:
        r.fail(
            node, path,
            "an empty list is ambiguous; list {name, password} mappings, or "
            "remove the key to let clients in without a password",
        )
    users: list[User] = []
    first: dict[str, Named] = {}
    failed = False
    for index, item in enumerate(node.value):
        entry = path + (index,)
        if not isinstance(item, yaml.MappingNode):
            got = "null" if is_null(item) else kind(item)
            r.report(item, entry, f"expected a mapping with keys name, password, got {got}")
            failed = True
            continue
        try:
            fields = r.mapping(item, entry, _USER_KEYS, _USER_REQUIRED)
        except Invalid:
            failed = True
            continue
        read = FieldReader(fields, entry, _USER_REQUIRED)
        name = read("name", lambda n, p: _user_name(r, n, p, limits))
        password = read("password", lambda n, p: _password(r, n, p, limits))
        # The user's own list replaces the listener's (same syntax and messages).
        destinations = read("allow_destinations", lambda n, p: _user_destinations(r, n, p))
        if name is not None:
            name_path = entry + ("name",)
            if name in first:
                earlier = first[name]
                r.report(
                    fields["name"], name_path,
                    f"duplicate user name {name!r} (first at "
                    f"{render_path(earlier.path)}, line {line(earlier.node)})",
                )
                read.ok = False
            else:
                first[name] = Named(name, fields["name"], name_path)
        if not read.ok:
            failed = True
            continue
        users.append(User(name=name, password=password, allow_destinations=destinations))
    if failed:
        raise Invalid()
    return tuple(users)


def _user_name(r: Reader, node: yaml.Node, path: Path, limits: Credentials) -> str:
    value = r.text(node, path, "a user name")
    if not value:
        r.fail(node, path, "must not be empty")
    if any(c.isspace() or not c.isprintable() for c in value):
        r.fail(
            node, path,
            f"expected a user name without whitespace or control characters, got {value!r}",
        )
    problem = limits.name(value)
    if problem:
        r.fail(node, path, problem)
    return value


def _password(r: Reader, node: yaml.Node, path: Path, limits: Credentials) -> str:
    """A password: text, never quoted back in a message."""
    if not isinstance(node, yaml.ScalarNode):
        r.fail(node, path, f"expected text, got {kind(node)}")
    value = r.scalar(node, path, "text", secret=True)
    if value is None or value == "":
        # An empty result can only come of references that expanded to
        # nothing, so the text written is safe to show.
        written = node.value if "${" in node.value else ""
        hint = f" ({written} expanded to nothing)" if written else ""
        r.fail(node, path, f"must not be empty{hint}")
    if not isinstance(value, str):
        r.fail(node, path, "expected text; put the password in quotes (YAML reads it unquoted as another type)")
    problem = limits.password(value)
    if problem:
        r.fail(node, path, problem)
    return value


# -- allowlint, once the whole file is known ------------------------------------


def _check_allowlists(r: Reader, node: yaml.Node, path: Path, listener: ListenerConfig, facts: FileFacts) -> None:
    """Allowlists open in all but name, unless ``accept_risk`` marks them (``allowlint``)."""
    options = listener.options
    assert isinstance(options, ForwardOptions)
    lists: list[tuple[Path, list[allowlint.Entry]]] = []
    own_node = value_of(node, "allow_destinations")
    if own_node is not None:
        lists.append((("allow_destinations",), _entries(r, own_node, options.allow_destinations)))
    users_node = value_of(node, "users")
    for index, user in enumerate(options.users):
        rules = user.allow_destinations
        user_node = (
            value_of(users_node.value[index], "allow_destinations")
            if rules is not None and users_node is not None else None
        )
        if user_node is not None and rules is not None:
            lists.append((("users", index, "allow_destinations"), _entries(r, user_node, rules)))
    allow_node = value_of(node, "allow_addresses")
    allow_texts = r.written(allow_node) if allow_node is not None else []
    result = allowlint.check_listener(
        lists,
        allow_addresses=list(zip(allow_texts, listener.allow_addresses)),
        accept_risk=options.accept_risk,
        own_sockets=facts.own_sockets,
        hosts=facts.pins,
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
                found = value_of(target, part)
                assert found is not None
                target = found
        r.report(target.value[finding.index], path + key + (finding.index,), finding.message)


def _entries(r: Reader, node: yaml.Node, rules: tuple[DestinationRule, ...]) -> list[allowlint.Entry]:
    """An allowlist's entries: the text each item expands to, with its rule."""
    return [allowlint.Entry(text, rule) for text, rule in zip(r.written(node), rules)]
