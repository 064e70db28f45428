"""Front protocols, one module per listener ``mode`` (see ``base.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from egressproxy.modes.base import Front


def front_class(mode: str) -> type[Front]:
    """The front for a listener mode (imported on first use)."""
    if mode == "tcp":
        from egressproxy.modes.base import Front

        return Front
    if mode == "postgres":
        from egressproxy.modes.postgres import PostgresFront

        return PostgresFront
    if mode == "http_connect":
        from egressproxy.modes.http_connect import HttpConnectFront

        return HttpConnectFront
    if mode == "socks5":
        from egressproxy.modes.socks5 import Socks5Front

        return Socks5Front
    raise ValueError(f"no front for mode {mode!r}")
