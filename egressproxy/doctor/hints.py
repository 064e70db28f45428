"""The hints shared by several steps: above all the allowlist one, which names this Machine's egress address.

A provider that does not admit the source address either closes the
connection right after accept (0 bytes) or, for Postgres, answers the login
with ``28000`` ("no pg_hba.conf entry for host ..."); the fix is the same,
so the words are too.  When the egress step learnt the public address (STUN),
the hint names it.
"""

from __future__ import annotations


def allowlist(egress: str | None) -> str:
    """The allowlist hint: add this Machine's egress address at the provider."""
    which = f"this Machine's egress IP ({egress})" if egress else "this Machine's egress IP"
    return (f"add {which} to the provider's allowlist (its console's IP allowlist / network settings); "
            f"on Fly give the app a static egress IP first: fly ips allocate-egress")


def sees_you_as(address: str, egress: str | None) -> str:
    """The hint for a 28000 whose message shows the address the server saw."""
    mismatch = f"; the egress check saw {egress}" if egress and egress != address else ""
    return (f"{address} is not on the database's allowlist / pg_hba{mismatch}: add it in the provider console "
            f"(on Fly: the app's static egress IP, fly ips allocate-egress)")
