"""The doctor's runner: which steps run, in which order, for the CLI and for ``GET /doctor`` alike.

Order of a run:

1. the egress address (first, so that every allowlist hint can name it);
2. each listener (bound, dual-stack, PROXY protocol, allow_sources);
3. each upstream target (``targets.py``), all targets at once, each one
   step after the other: DNS; then per address TCP, and for Postgres the
   SSLRequest, for Postgres and TLS-first ports the TLS handshake with its
   chain, name and expiry checks, and with ``--login`` the login.  A failed
   step ends that address's walk (a verify-full client would stop there
   too), so the first failure of a walk is its cause;
4. the wildcard routes that had no ``--name``, as skipped.

Every step is bounded by ``timeout`` (DNS, connect, each read, the
handshake), so a run ends; the checks come back in this order whatever
finished first.  A bug in a step becomes a failed check, not a crash.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer

from egressproxy.config import Config
from egressproxy.doctor import targets as targets_module
from egressproxy.doctor.dns import Lookup, resolve, thread_lookup
from egressproxy.doctor.egress import egress_check
from egressproxy.doctor.listeners import listener_checks
from egressproxy.doctor.login import login_step
from egressproxy.doctor.report import FAIL, SKIP, Check, Report
from egressproxy.doctor.sslrequest import sslrequest_step
from egressproxy.doctor.targets import POSTGRES, TCP, TLS, Target
from egressproxy.doctor.tcp import tcp_step
from egressproxy.doctor.tls import tls_steps

DEFAULT_TIMEOUT = 5.0


@attrs.frozen
class DoctorOptions:
    """What one run is asked for (the CLI's flags; ``/doctor`` uses the defaults)."""

    #: ``--name``: the host to check for a wildcard route (refused outside every route pattern).
    name: str | None = None
    #: ``--login`` and ``--dbname``; the password (``PGPASSWORD``) is never shown.
    login: str | None = None
    dbname: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT


@attrs.define
class _Run:
    reactor: Any
    config: Config
    options: DoctorOptions
    lookup: Lookup
    egress: str | None = None


async def _walk_address(run: _Run, target: Target, address: str) -> list[Check]:
    """TCP, then (by protocol) SSLRequest, TLS and login, on one connection to ``address``."""
    options = run.options
    check, conn = await tcp_step(run.reactor, target.subject, address, target.port, options.timeout,
                                 target.protocol == TCP, run.egress)
    if conn is None:
        return [check]
    checks = [check]
    try:
        if target.protocol == POSTGRES:
            answer = await sslrequest_step(run.reactor, conn, target.subject, address, options.timeout, run.egress)
            checks.append(answer)
            if not answer.ok:
                return checks
        if target.protocol not in (POSTGRES, TLS):
            return checks
        tls, fit = await tls_steps(run.reactor, conn, target.subject, address, target.server_name,
                                   target.ca_file, options.timeout)
        checks += tls
        if target.protocol != POSTGRES or options.login is None:
            return checks
        if not fit:
            checks.append(Check(target.subject, "login", SKIP, "not tried: TLS did not verify", 0.0, None, address))
            return checks
        checks.append(await login_step(
            run.reactor, conn, target.subject, address, options.login, options.dbname or options.login,
            options.password, options.timeout, run.egress,
        ))
        return checks
    finally:
        conn.close()


async def _walk(run: _Run, target: Target) -> list[Check]:
    try:
        checks, addresses = await resolve(run.reactor, target.subject, target.host,
                                          run.config.pinned_address(target.host), run.lookup, run.options.timeout)
        for address in addresses:
            checks += await _walk_address(run, target, address)
        return checks
    except Exception as e:  # a bug in a step: report it, keep the other targets' results
        return [Check(target.subject, "doctor", FAIL, f"the check itself failed: {type(e).__name__}: {e}", 0.0,
                      "this is a bug in egressproxy doctor: please report it with this line")]


async def run_doctor(
    reactor: Any,
    config: Config,
    options: DoctorOptions = DoctorOptions(),
    lookup: Lookup | None = None,
    bound: Callable[[str], int | None] | None = None,
) -> Report:
    """One whole run (see the module notes); raises ``targets.NameRefused`` for a ``--name`` no route admits.

    ``lookup`` replaces the system resolver (tests); ``bound`` gives the port
    of each listener the calling proxy has bound (``GET /doctor``), so they are not
    dialled.
    """
    plan = targets_module.plan(config, options.name)
    run = _Run(reactor, config, options, lookup or thread_lookup(reactor))
    egress, run.egress = await egress_check(reactor, config)
    checks: list[Check] = [egress]
    for listener in config.listeners:
        checks += await listener_checks(reactor, listener, bound)
    walks = await defer.gatherResults([defer.ensureDeferred(_walk(run, target)) for target in plan.targets])
    for walked in walks:
        checks += walked
    checks += [Check(skip.subject, "route", SKIP, skip.detail, 0.0, skip.hint) for skip in plan.skipped]
    return Report(config.source, tuple(checks))
