"""What the demo prints once everything is up: the commands to try, ready to paste.

Owns the text only (a pure function of :class:`DemoFacts`), so its commands
can be checked without starting anything.  Every command is built with
``shlex.quote`` and is one line, so it pastes into a POSIX shell as is and a
test can ``shlex.split`` it and run it.  It does not run anything.
"""

from __future__ import annotations

import shlex

import attrs

from egressproxy.app.demo.configtext import SERVER_NAME, DemoPorts

#: The line that starts the banner: tests and scripts wait for it.
READY = "egressproxy demo is ready"
ROLE = "demo"
DATABASE = "demo"
#: A destination outside the allowlist, for the refused CONNECT.  The proxy
#: refuses it by name before any lookup, so it is never resolved or dialled.
REFUSED_URL = "https://example.com/"


@attrs.frozen
class DemoFacts:
    """Everything the banner names, gathered by the runner."""

    ports: DemoPorts
    pg_port: int
    pg_pid: int | None
    pg_version: str
    workdir: str
    config_path: str
    ca_path: str
    password: str = attrs.field(repr=False)
    admin_token: str = attrs.field(repr=False)
    psql: str
    startup_seconds: float


def _libpq_value(value: str) -> str:
    """A value for a libpq ``key=value`` string: single-quoted when it holds a space, quote or backslash."""
    if value and not any(c in value for c in " '\\\t"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def psql_command(facts: DemoFacts, port: int) -> str:
    """``PGPASSWORD=... psql "host=... hostaddr=127.0.0.1 port=P sslmode=verify-full ..."``."""
    conninfo = (
        f"host={SERVER_NAME} hostaddr=127.0.0.1 port={port} sslmode=verify-full "
        f"sslrootcert={_libpq_value(facts.ca_path)} user={ROLE} dbname={DATABASE}"
    )
    return f"PGPASSWORD={shlex.quote(facts.password)} {shlex.quote(facts.psql)} {shlex.quote(conninfo)}"


def curl_command(facts: DemoFacts, url: str) -> str:
    """``curl -sv -p -x http://127.0.0.1:P URL``: a CONNECT tunnel through the http_connect listener."""
    return f"curl -sv -p -x http://127.0.0.1:{facts.ports.connect} {shlex.quote(url)}"


def allowed_url(facts: DemoFacts) -> str:
    return f"https://{SERVER_NAME}:{facts.pg_port}/"


def render_banner(facts: DemoFacts) -> str:
    """The full text printed after start-up, ending with the access-log heading."""
    ports = facts.ports
    admin = f"http://127.0.0.1:{ports.admin}"
    pid = f"pid {facts.pg_pid}, " if facts.pg_pid is not None else ""
    return f"""
{READY} (started in {facts.startup_seconds:.1f} s).

PostgreSQL {facts.pg_version} ({pid}127.0.0.1:{facts.pg_port}) accepts TLS only, with SCRAM passwords,
and has a certificate for {SERVER_NAME}, a made-up name, from a CA made just now:
  {facts.ca_path}
The proxy in front of it runs this config (read it, edit a copy, reuse it):
  {facts.config_path}

Try, in another terminal:

1. psql through the tcp listener "direct" (bytes forwarded, TLS end to end, verify-full):

   {psql_command(facts, ports.direct)}

2. psql through the postgres listener "routed" (routes by the TLS server name, SNI):

   {psql_command(facts, ports.routed)}

3. curl through the http_connect listener "connect", whose allowlist holds only the database:
   allowed: look for "HTTP/1.1 200 Connection established" (curl's TLS then fails:
   the far end is PostgreSQL, not a web server)

   {curl_command(facts, allowed_url(facts))}

   refused: "HTTP/1.1 403 Forbidden", and nothing is dialled (access-log flag NR)

   {curl_command(facts, REFUSED_URL)}

4. check every cluster and listener of the config, step by step, and log in
   (the listeners' "loopback only" warnings are expected: the demo stays local):

   PGPASSWORD={shlex.quote(facts.password)} egressproxy doctor --config {shlex.quote(facts.config_path)} --login {ROLE}

5. the admin service: {admin}/ (status page), {admin}/stats, {admin}/clusters, {admin}/metrics
   POST /drain and /reload need: -H 'Authorization: Bearer {facts.admin_token}'

Ctrl-C stops the proxy and PostgreSQL and removes {facts.workdir}
Access log, one line per finished connection:
"""
