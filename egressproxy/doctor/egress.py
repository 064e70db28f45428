"""The egress-address check: the public address STUN sees, against ``expected_egress_ips``.

With both ``expected_egress_ips`` and ``egress_ip_check`` set, one STUN
probe (``observe/egressip.py``, the same client the proxy's ``/ready`` uses)
asks the configured servers which address this Machine's packets come from.
An unexpected address fails with the allowlist hint; the address found is
also handed to the other steps' allowlist hints.  Without the keys the check
is skipped with a note.
"""

from __future__ import annotations

from typing import Any

from egressproxy.config import Config
from egressproxy.doctor.report import FAIL, OK, SKIP, Check
from egressproxy.observe.egressip import ProbeFailed, first_answer

SUBJECT = "egress address"


async def egress_check(reactor: Any, config: Config) -> tuple[Check, str | None]:
    """The check, and the public address seen (None when not learnt)."""
    expected = config.expected_egress_ips
    check = config.egress_ip_check
    if not expected or check is None:
        return Check(SUBJECT, "egress ip", SKIP,
                     "expected_egress_ips and egress_ip_check are not both set: the egress address is not checked"), None
    started = reactor.seconds()
    servers = [(server.host, server.port) for server in check.stun]
    try:
        seen = await first_answer(reactor, servers)
    except ProbeFailed as e:
        return Check(SUBJECT, "egress ip", FAIL, f"no STUN answer: {e}", reactor.seconds() - started,
                     "this Machine cannot reach the STUN servers in egress_ip_check.stun (UDP): check them, or "
                     "that outbound UDP is allowed"), None
    seconds = reactor.seconds() - started
    if seen in expected:
        return Check(SUBJECT, "egress ip", OK, f"{seen} (expected)", seconds), seen
    return Check(SUBJECT, "egress ip", FAIL,
                 f"{seen} is not in expected_egress_ips ({', '.join(expected)})", seconds,
                 f"give this Machine the app's static egress IP (fly ips allocate-egress) and allowlist it at the "
                 f"provider, or add {seen} to expected_egress_ips if it is the right one"), seen
