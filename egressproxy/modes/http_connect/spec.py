"""The ``http_connect`` mode's spec: the forward proxies' keys and rules, this machine.

HTTP Basic authentication cannot carry ``:`` in a user name, so such a
name is refused when the file is read.
"""

from __future__ import annotations

from egressproxy.modes.forward.options import ForwardOptions
from egressproxy.modes.forward.read import Credentials, check_forward, forward_keys
from egressproxy.modes.http_connect.front import HttpConnectMachine
from egressproxy.modes.registry import ModeSpec, register

__all__ = ["SPEC"]


def _name_problem(value: str) -> str | None:
    if ":" in value:
        return f"HTTP Basic authentication cannot carry ':' in a user name, got {value!r}"
    return None


SPEC = ModeSpec(
    name="http_connect",
    options=ForwardOptions,
    handshake=HttpConnectMachine,
    keys=forward_keys(Credentials(name=_name_problem)),
    check=check_forward,
    address_checks=True,
)
register(SPEC)
