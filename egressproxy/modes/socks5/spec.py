"""The ``socks5`` mode's spec: the forward proxies' keys and rules, this machine.

Username/password authentication (RFC 1929) carries each in at most 255
bytes, so longer ones are refused when the file is read.
"""

from __future__ import annotations

from egressproxy.modes.forward.options import ForwardOptions
from egressproxy.modes.forward.read import Credentials, check_forward, forward_keys
from egressproxy.modes.registry import ModeSpec, register
from egressproxy.modes.socks5.front import Socks5Machine

__all__ = ["MAX_CREDENTIAL", "SPEC"]

#: SOCKS5 username/password authentication (RFC 1929) carries each in at
#: most 255 bytes.
MAX_CREDENTIAL = 255


def _too_long(value: str) -> str | None:
    if len(value.encode()) > MAX_CREDENTIAL:
        return f"longer than {MAX_CREDENTIAL} bytes, the most SOCKS5 (RFC 1929) can carry"
    return None


SPEC = ModeSpec(
    name="socks5",
    options=ForwardOptions,
    handshake=Socks5Machine,
    keys=forward_keys(Credentials(name=_too_long, password=_too_long)),
    check=check_forward,
    address_checks=True,
)
register(SPEC)
