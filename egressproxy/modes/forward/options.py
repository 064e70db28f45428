"""The options of a forward-proxy listener (``http_connect``, ``socks5``)."""

from __future__ import annotations

import attrs

from egressproxy.config.checks import tuple_of
from egressproxy.modes.forward.rules import DestinationRule, User
from egressproxy.modes.registry import ModeOptions

__all__ = ["ForwardOptions"]


@attrs.frozen
class ForwardOptions(ModeOptions):
    """Where clients may go, and who they must be."""

    #: The listener's allowlist (a user's own replaces it for that user).
    allow_destinations: tuple[DestinationRule, ...] = attrs.field(
        default=(), validator=tuple_of(DestinationRule, non_empty=False)
    )
    #: Credentials; none means clients need no password.
    users: tuple[User, ...] = attrs.field(default=(), validator=tuple_of(User, non_empty=False))
    #: Allowlist entries (as written) that check-config would call too broad,
    #: marked by the operator as intended.
    accept_risk: tuple[str, ...] = attrs.field(default=(), validator=tuple_of(str, non_empty=False))
