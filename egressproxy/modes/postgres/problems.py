"""How a postgres session says no, and the bounds it holds clients and servers to."""

from __future__ import annotations

import attrs

from egressproxy.datapath.support import tls_failure_text
from egressproxy.modes.postgres import pgwire, tlshello

__all__ = [
    "CLIENT_BUFFER_LIMIT",
    "HANDSHAKE_TIMEOUT",
    "Problem",
    "STARTUP_TIMEOUT",
    "UPSTREAM_BUFFER_LIMIT",
    "tls_failure_text",
]

#: answering an SSLRequest or a StartupMessage.
HANDSHAKE_TIMEOUT = 10.0
#: How long the startup phase (authentication) may take once the server
#: has answered, in originate mode; PostgreSQL's authentication_timeout is 60s.
STARTUP_TIMEOUT = 120.0
#: Client bytes held before the splice: a ClientHello and a startup packet at most.
CLIENT_BUFFER_LIMIT = tlshello.MAX_CLIENT_HELLO + pgwire.MAX_STARTUP_PACKET
#: Server bytes held before the splice (an answer is one byte; more is refused).
UPSTREAM_BUFFER_LIMIT = 64 * 1024


@attrs.frozen
class Problem:
    """Why a session cannot go on, in every form a client may need to hear it.

    ``message`` follows ``egressproxy: `` in the ErrorResponse; ``alert`` is
    the TLS alert for a client that asked for TLS; ``reason`` labels the
    listener's rejected counter or the cluster's connect-failure counter.
    """

    flag: str
    sqlstate: str
    message: str
    alert: int
    hint: str | None = None
    detail: str | None = None
    reason: str | None = None
