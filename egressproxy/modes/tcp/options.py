"""The options of a ``mode: tcp`` listener: when it dials its cluster."""

from __future__ import annotations

import attrs

from egressproxy.modes.registry import ModeOptions

__all__ = ["IMMEDIATE", "ON_FIRST_BYTE", "UPSTREAM_CONNECT", "TcpOptions"]

#: Dial when the client connects (server-first protocols need it).
IMMEDIATE = "immediate"
#: Dial once the client has sent at least one byte (Envoy's ON_DOWNSTREAM_DATA).
ON_FIRST_BYTE = "on_first_byte"
#: The values ``upstream_connect`` takes, the default first.
UPSTREAM_CONNECT = (IMMEDIATE, ON_FIRST_BYTE)


@attrs.frozen
class TcpOptions(ModeOptions):
    """When a tcp listener dials its cluster (``upstream_connect``)."""

    upstream_connect: str = attrs.field(default=IMMEDIATE, validator=attrs.validators.in_(UPSTREAM_CONNECT))
