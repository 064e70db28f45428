"""Listener modes by name: each mode registers one :class:`ModeSpec`.

A spec is everything the rest of the proxy knows of a mode: its name, its
options class (the listener keys only it takes), how each of those keys is
read from the file (with its messages), the rules tying them together, the
handshake machine that holds the conversation before the splice, its per-listener
state, and the refusal reasons it counts.  The config reader, the listener
runtime and the metrics ask this module, never a mode by name, so adding a
mode touches no other mode, no data-path module and no if-chain: a package
that calls :func:`register` (or a test that does, and :func:`unregister`
after).

The built-in modes are listed here by module path and imported on first
use, at config-load time or when a listener first needs its machine, so this
module imports nothing of the proxy itself: the modes depend on it, and on
the config reader's types, never the other way round.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

import attrs

__all__ = [
    "BUILTIN",
    "MODES",
    "ModeKey",
    "ModeOptions",
    "ModeSpec",
    "known",
    "names",
    "owners",
    "register",
    "spec",
    "specs",
    "unregister",
    "wording",
]

#: The built-in modes, in the order messages list them, and the module that registers each.
BUILTIN: tuple[tuple[str, str], ...] = (
    ("tcp", "egressproxy.modes.tcp.spec"),
    ("postgres", "egressproxy.modes.postgres.spec"),
    ("http_connect", "egressproxy.modes.http_connect.spec"),
    ("socks5", "egressproxy.modes.socks5.spec"),
)
#: The built-in mode names.
MODES = tuple(name for name, _ in BUILTIN)
_BUILTIN_MODULES = dict(BUILTIN)


class ModeOptions:
    """The base of every mode's options class (an attrs class whose defaults are the mode's).

    Besides its fields, the rest of the proxy asks an options object one
    thing: which configured clusters it names, so that a :class:`Config`
    naming an unknown one cannot exist.
    """

    __slots__ = ()

    def clusters_named(self) -> Iterable[tuple[str, str]]:
        """``(what, cluster)`` per cluster named, ``what`` completing "listener 'x' ... unknown cluster"."""
        return ()


@attrs.frozen
class ModeKey:
    """One listener key a mode takes: its name, how it is read, its value when absent.

    ``read(keys, node, path)`` gets the reader's view of the listener
    (``config.context.ListenerKeys``) and returns the value, or reports the
    problem and raises the reader's ``Invalid``; a value that failed is
    None.  With an unknown mode written, ``keys.mode`` is None and only the
    value's own syntax should be checked.
    """

    name: str
    read: Callable[[Any, Any, Any], Any]
    default: Any = None


@attrs.frozen
class ModeSpec:
    """Everything that makes one listener mode."""

    name: str
    #: The options class: ``options(**values)`` from the keys read, ``options()`` the defaults.
    options: type[ModeOptions]
    #: Builds the handshake machine for one admitted session (its conversation
    #: before the splice), given a ``datapath.handshake.Context``; see ``base.py``.
    handshake: Callable[[Any], Any]
    #: The listener keys only this mode takes (beside the common ones), in reading order.
    keys: tuple[ModeKey, ...] = ()
    #: The rules tying this mode's keys (and the common ``cluster``): called
    #: with the listener's ``ListenerKeys`` and the values read, only on a
    #: listener of this mode; it reports each broken rule through ``keys``.
    check: Callable[[Any, dict[str, Any]], None] | None = None
    #: The address checks (``allow_addresses``, ``deny_addresses``,
    #: ``policy``) apply: this mode dials destinations its clients choose.
    address_checks: bool = False
    #: Makes the mode's per-listener state (e.g. Postgres cancel keys), on first use.
    state: Callable[[], object] | None = None
    #: Refusal reasons the listener's ``rejected`` counter starts at zero,
    #: so their series exist before the first event.
    reject_reasons: tuple[str, ...] = ()

    @property
    def key_names(self) -> tuple[str, ...]:
        return tuple(key.name for key in self.keys)


_registered: dict[str, ModeSpec] = {}


def register(mode: ModeSpec) -> None:
    """Make ``mode`` known by its name; a name already taken is a ``ValueError``."""
    if mode.name in _registered:
        raise ValueError(f"mode {mode.name!r} is already registered")
    _registered[mode.name] = mode


def unregister(name: str) -> None:
    """Forget a mode registered by :func:`register` (the built-in ones stay)."""
    if name in _BUILTIN_MODULES:
        raise ValueError(f"mode {name!r} is built in")
    del _registered[name]


def known(name: object) -> bool:
    """Whether ``name`` is a built-in or registered mode."""
    return isinstance(name, str) and (name in _BUILTIN_MODULES or name in _registered)


def spec(name: str) -> ModeSpec:
    """The spec of mode ``name``, importing a built-in mode's package on first use."""
    found = _registered.get(name)
    if found is None:
        module = _BUILTIN_MODULES.get(name)
        if module is None:
            raise KeyError(name)
        importlib.import_module(module)
        found = _registered[name]
    return found


def names() -> tuple[str, ...]:
    """Every mode name: the built-in ones, then the registered ones in registration order."""
    return MODES + tuple(name for name in _registered if name not in _BUILTIN_MODULES)


def specs() -> tuple[ModeSpec, ...]:
    """Every mode's spec, in :func:`names` order."""
    return tuple(spec(name) for name in names())


def owners(key: str) -> tuple[str, ...]:
    """The modes that take listener key ``key``, in :func:`names` order."""
    return tuple(mode.name for mode in specs() if key in mode.key_names)


def wording(items: Iterable[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``: a choice as messages put it."""
    listed = list(items)
    if len(listed) < 2:
        return "".join(listed)
    return f"{', '.join(listed[:-1])} or {listed[-1]}"
