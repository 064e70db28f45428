"""The DNS step: a target's IPv4 and IPv6 addresses, each family looked up and reported separately.

As the proxy does: a ``hosts:`` pin wins (no lookup), an IP literal needs
none; any other name goes to the system resolver, ``getaddrinfo`` once per
family (``AF_INET`` for A, ``AF_INET6`` for AAAA), each in a daemon thread of
its own so that a resolver that never answers cannot hold the reactor nor
its shutdown.  Each lookup is bounded by the step's timeout.

A family without records is a note, not a failure (most databases are
IPv4 only); a name with no address in either family is the failure, with a
hint that tells an unknown name (NXDOMAIN) from a resolver that did not
answer.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer

from egressproxy.doctor.report import FAIL, OK, SKIP, Check

#: ``lookup(host, family)``: the addresses of ``host`` in ``family`` (raises ``socket.gaierror``).
Lookup = Callable[[str, int], Awaitable[list[str]]]

FAMILIES = ((socket.AF_INET, "A"), (socket.AF_INET6, "AAAA"))

HINT_UNKNOWN = ("the name does not resolve: check its spelling in the config, or pin it with "
                "hosts: {NAME: ADDRESS} if it is private")
HINT_NO_ANSWER = ("the resolver did not answer: check /etc/resolv.conf and that this Machine reaches its "
                  "nameserver, or pin the name with hosts: {NAME: ADDRESS}")


def thread_lookup(reactor: Any) -> Lookup:
    """The system resolver, one daemon thread per lookup, the answer delivered on the reactor."""

    def lookup(host: str, family: int) -> defer.Deferred[list[str]]:
        d: defer.Deferred[list[str]] = defer.Deferred()

        def deliver(ok: bool, value: Any) -> None:
            if d.called:
                return  # timed out meanwhile
            if ok:
                d.callback(value)
            else:
                d.errback(value)

        def work() -> None:
            try:
                infos = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
                found = list(dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in infos))
                reactor.callFromThread(deliver, True, found)
            except Exception as e:  # handed to the reactor thread as the failure
                reactor.callFromThread(deliver, False, e)

        threading.Thread(target=work, name=f"doctor-dns-{host}", daemon=True).start()
        return d

    return lookup


def _describe(e: BaseException) -> tuple[str, bool]:
    """(words, whether the resolver answered at all) for a failed lookup."""
    if isinstance(e, defer.TimeoutError):
        return "no answer from the resolver in time", False
    if isinstance(e, socket.gaierror):
        answered = e.errno not in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", -11))
        return e.strerror or str(e), answered
    return str(e), False


async def _one(lookup: Lookup, reactor: Any, host: str, family: int, timeout: float) -> tuple[list[str], BaseException | None]:
    d = defer.ensureDeferred(lookup(host, family))  # type: ignore[arg-type]
    d.addTimeout(timeout, reactor)
    try:
        return list(await d), None
    except Exception as e:
        return [], e


async def resolve(
    reactor: Any, subject: str, host: str, pinned: str | None, lookup: Lookup, timeout: float
) -> tuple[list[Check], list[str]]:
    """The DNS checks of ``host`` and the addresses found (IPv4 first), for the TCP step."""
    try:
        ipaddress.ip_address(host)
        return [Check(subject, "dns", OK, f"{host} is an IP literal: no lookup")], [host]
    except ValueError:
        pass
    if pinned is not None:
        return [Check(subject, "dns", OK, f"pinned by hosts: to {pinned} (no lookup, as the proxy does)")], [pinned]
    started = reactor.seconds()
    results = await defer.gatherResults([
        defer.ensureDeferred(_one(lookup, reactor, host, family, timeout)) for family, _ in FAMILIES
    ])
    seconds = reactor.seconds() - started
    addresses = [address for found, _ in results for address in found]
    if not addresses:
        words = [f"{label}: {_describe(e)[0] if e else 'no records'}" for (_, label), (_, e) in zip(FAMILIES, results)]
        answered = all(e is None or _describe(e)[1] for _, e in results)
        return [Check(subject, "dns", FAIL, f"{host} does not resolve ({'; '.join(words)})", seconds,
                      HINT_UNKNOWN if answered else HINT_NO_ANSWER)], []
    checks = []
    for (_, label), (found, e) in zip(FAMILIES, results):
        if found:
            checks.append(Check(subject, f"dns {label}", OK, ", ".join(found), seconds))
        else:
            why = _describe(e)[0] if e is not None else "none"
            checks.append(Check(subject, f"dns {label}", SKIP, f"no {label} records ({why})", seconds))
    return checks, addresses
