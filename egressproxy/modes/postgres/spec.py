"""The ``postgres`` mode's spec: its options, keys, rules, machine and per-listener state."""

from __future__ import annotations

from egressproxy.modes.postgres.front import PostgresMachine
from egressproxy.modes.postgres.options import PostgresOptions
from egressproxy.modes.postgres.read import KEYS, check_postgres
from egressproxy.modes.postgres.state import PostgresListenerState
from egressproxy.modes.registry import ModeSpec, register

__all__ = ["SPEC"]

SPEC = ModeSpec(
    name="postgres",
    options=PostgresOptions,
    handshake=PostgresMachine,
    keys=KEYS,
    check=check_postgres,
    # {sni} routes dial names their clients send.
    address_checks=True,
    state=PostgresListenerState,
    # The reasons its machine counts (no_route, tls_required, protocol,
    # channel_binding) appear from their first occurrence, as they always
    # have; listing them here would export them at zero from the start.
    reject_reasons=(),
)
register(SPEC)
