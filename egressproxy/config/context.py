"""What the readers learn about the whole file, and what a mode's reader is given.

:class:`FileFacts` collects, while the sections are read, everything the
cross checks need once the whole file is known: names, cluster references,
listen addresses, the endpoints the proxy will dial, and the checks a mode
asked to run at the end.  :class:`ListenerKeys` is one listener's mapping as
a mode's key readers and rules see it (``modes.registry.ModeSpec``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs
import yaml

from egressproxy.config.model import Address, ListenAddress, ListenerConfig
from egressproxy.config.reader import FieldReader, Fields, Named, Reader
from egressproxy.config.syntax import Path
from egressproxy.config.ownsocket import OwnSocket

__all__ = ["FileFacts", "ListenerCheck", "ListenerKeys"]

#: A check a mode runs once the whole file is read, on a listener built without error.
ListenerCheck = Callable[[ListenerConfig, "FileFacts"], None]


@attrs.define
class FileFacts:
    """Facts gathered across the file for the checks that need all of it."""

    listener_names: list[Named] = attrs.Factory(list)
    cluster_names: list[Named] = attrs.Factory(list)
    cluster_refs: list[Named] = attrs.Factory(list)
    #: Every address something will listen on; the node is None for an
    #: admin or metrics default the file does not spell out.
    listens: list[tuple[ListenAddress, yaml.Node | None, Path]] = attrs.Factory(list)
    #: Every endpoint the file names for the proxy to dial (cluster
    #: endpoints, route upstreams), for the never-dial-yourself check.
    dials: list[tuple[Address, yaml.Node, Path]] = attrs.Factory(list)
    #: The modes' end-of-file checks, with the listener each is for.
    listener_checks: list[tuple[ListenerConfig, ListenerCheck]] = attrs.Factory(list)
    #: Known once everything is read: the proxy's own sockets and the ``hosts:`` pins.
    own_sockets: list[OwnSocket] = attrs.Factory(list)
    pins: Mapping[str, str] = attrs.Factory(dict)

    def refer_cluster(self, name: str, node: yaml.Node, path: Path) -> None:
        """Remember a reference to a cluster, checked once every cluster is known."""
        self.cluster_refs.append(Named(name, node, path))

    def dial(self, address: Address, node: yaml.Node, path: Path) -> None:
        """Remember an endpoint the proxy will dial, for the never-dial-yourself check."""
        self.dials.append((address, node, path))


class ListenerKeys:
    """One listener's mapping, as its mode's key readers and rules see it."""

    def __init__(
        self, r: Reader, facts: FileFacts, node: yaml.Node, path: Path, fields: Fields,
        read: FieldReader, mode: str | None,
    ) -> None:
        self.r = r
        self.facts = facts
        self.node = node
        self.path = path
        self.fields = fields
        self.read = read
        #: The listener's mode; None when the mode written is unknown (values
        #: are then checked on their own, and no mode's rules apply).
        self.mode = mode
        self.checks: list[ListenerCheck] = []

    def has(self, key: str) -> bool:
        """Whether ``key`` is written, or an unknown key was taken for a misspelling of it."""
        return self.fields.has(key)

    def broken(self, node: yaml.Node, path: Path, message: str) -> None:
        """Report a broken rule: the listener is not built."""
        self.r.report(node, path, message)
        self.read.ok = False

    def key_broken(self, key: str, message: str) -> None:
        """Report a broken rule at the line of ``key`` (which is written)."""
        self.broken(self.fields.key_nodes[key], self.path + (key,), message)

    def later(self, check: ListenerCheck) -> None:
        """Run ``check`` once the whole file is read, if this listener is built."""
        self.checks.append(check)
