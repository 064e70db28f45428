"""The SSLRequest step: does a Postgres answer, offer TLS, and admit this source?

libpq opens every TLS connection with an SSLRequest (8 bytes) and waits for
one byte: ``S`` (TLS follows) or ``N`` (no TLS).  What else can happen is
what this step tells apart:

- the server closes with 0 bytes: some providers accept every connection
  and drop, at once, those whose source is not on the allowlist; libpq
  then says "server closed the connection unexpectedly".  Reported as the
  allowlist symptom, naming the egress address when it is known;
- no answer within the timeout: not a Postgres server on that port (or
  one that waits for something else);
- any other byte: not a Postgres server.
"""

from __future__ import annotations

import struct
from typing import Any

from egressproxy.doctor import hints
from egressproxy.doctor.conn import Closed, ProbeConnection, TimedOut
from egressproxy.doctor.report import FAIL, OK, Check

#: int32 length 8, int32 code 1234 << 16 | 5679.
SSL_REQUEST = struct.pack("!ii", 8, 80877103)

HINT_NO_TLS = ("the server does not offer TLS: enable ssl on it (managed providers always do), or this is not "
               "the database endpoint you meant")
HINT_NOT_POSTGRES = ("this port does not answer like PostgreSQL: check the endpoint's port (5432 for most "
                     "providers; not a pooler's HTTP or a TLS-only port)")


async def sslrequest_step(
    reactor: Any, conn: ProbeConnection, subject: str, address: str, timeout: float, egress: str | None
) -> Check:
    """Send the SSLRequest and judge the answer; on ``S`` the connection is ready for TLS."""
    started = reactor.seconds()
    conn.write(SSL_REQUEST)
    try:
        answer = await conn.read(1, timeout)
    except Closed as e:
        seconds = reactor.seconds() - started
        if e.received == 0:
            return Check(subject, "sslrequest", FAIL,
                         f"{e.reason} with 0 bytes right after accept: the usual sign that the provider's "
                         f"allowlist does not admit this source (libpq: \"server closed the connection "
                         f"unexpectedly\")", seconds, hints.allowlist(egress), address)
        return Check(subject, "sslrequest", FAIL, f"{e.reason} before answering the SSLRequest", seconds,
                     HINT_NOT_POSTGRES, address)
    except TimedOut as e:
        return Check(subject, "sslrequest", FAIL, f"no answer to the SSLRequest: {e}",
                     reactor.seconds() - started, HINT_NOT_POSTGRES, address)
    seconds = reactor.seconds() - started
    if answer == b"S":
        return Check(subject, "sslrequest", OK, "S: TLS offered", seconds, None, address)
    if answer == b"N":
        return Check(subject, "sslrequest", FAIL, "N: the server refuses TLS", seconds, HINT_NO_TLS, address)
    return Check(subject, "sslrequest", FAIL, f"answered {answer!r}, not S or N: not a PostgreSQL server",
                 seconds, HINT_NOT_POSTGRES, address)
