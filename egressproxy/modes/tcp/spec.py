"""The ``tcp`` mode's spec: forward bytes to the listener's cluster, untouched.

Its machine is :class:`~egressproxy.modes.tcp.front.TcpMachine`: hold the
client, dial the cluster (at once, or once the client has sent a byte),
splice, and say no by closing.  Besides the common ``cluster`` it takes one
key, ``upstream_connect`` (``options.py``): when to dial.
"""

from __future__ import annotations

from typing import Any

import yaml

from egressproxy.config.context import ListenerKeys
from egressproxy.config.syntax import Path
from egressproxy.modes.registry import ModeKey, ModeSpec, register
from egressproxy.modes.tcp.front import TcpMachine
from egressproxy.modes.tcp.options import IMMEDIATE, UPSTREAM_CONNECT, TcpOptions

__all__ = ["SPEC", "TcpOptions"]


def _upstream_connect(keys: ListenerKeys, node: yaml.Node, path: Path) -> str:
    return keys.r.choice(
        node, path, "immediate or on_first_byte", UPSTREAM_CONNECT,
        "expected immediate (dial when the client connects; server-first protocols such as "
        "MySQL or SMTP need it) or on_first_byte (dial once the client has sent a byte)",
    )


def _check(keys: ListenerKeys, values: dict[str, Any]) -> None:
    if not keys.has("cluster"):
        keys.broken(keys.node, keys.path, "missing required key 'cluster'")


SPEC = ModeSpec(
    name="tcp",
    options=TcpOptions,
    handshake=TcpMachine,
    keys=(ModeKey("upstream_connect", _upstream_connect, IMMEDIATE),),
    check=_check,
)
register(SPEC)
