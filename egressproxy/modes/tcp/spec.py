"""The ``tcp`` mode's spec: forward bytes to the listener's cluster, untouched.

The machine is :class:`~egressproxy.modes.base.Handshake` itself: hold the
client, dial the cluster, splice, and say no by closing.  The mode has no
keys of its own; it needs the common ``cluster``.
"""

from __future__ import annotations

from typing import Any

import attrs

from egressproxy.config.context import ListenerKeys
from egressproxy.modes.base import Handshake
from egressproxy.modes.registry import ModeOptions, ModeSpec, register

__all__ = ["SPEC", "TcpOptions"]


@attrs.frozen
class TcpOptions(ModeOptions):
    """A tcp listener has no options of its own."""


def _check(keys: ListenerKeys, values: dict[str, Any]) -> None:
    if not keys.has("cluster"):
        keys.broken(keys.node, keys.path, "missing required key 'cluster'")


SPEC = ModeSpec(name="tcp", options=TcpOptions, handshake=Handshake, check=_check)
register(SPEC)
