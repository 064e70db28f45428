"""The demo's ports and the YAML config the proxy runs with.

Owns the choice of the four loopback ports (``--port-base N``: the tcp,
postgres, http_connect and admin listeners on N, N+1, N+2 and N+3, each
replaced by a free port when it is taken; 0: free ports throughout) and the
text of the config, which the runner writes to a file, loads with the
ordinary loader and shows the user.  Pure apart from the port probes: no
reactor, no files.

Why a file and the ordinary loader rather than a ``Config`` built in code:
what the user reads is exactly what runs, and ``egressproxy doctor --config``
and ``check-config`` work on it as on any other.
"""

from __future__ import annotations

import socket
from typing import Callable

import attrs

#: The database's made-up name (RFC 2606 ``.test``): in its certificate, pinned by ``hosts:``.
SERVER_NAME = "db.demo.egress.test"
DEFAULT_PORT_BASE = 15432
#: The listener names, in port order; the access log's prefixes are these upper-cased.
LISTENERS = ("direct", "routed", "connect", "admin")


@attrs.frozen
class DemoPorts:
    """The loopback ports of the demo's three listeners and its admin service."""

    direct: int
    routed: int
    connect: int
    admin: int


def port_is_free(port: int) -> bool:
    """Whether ``port`` can be bound on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (racy: whoever binds it later may find it taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def choose_ports(
    base: int,
    is_free: Callable[[int], bool] = port_is_free,
    ephemeral: Callable[[], int] = free_port,
) -> DemoPorts:
    """``base`` .. ``base + 3``, each taken one replaced by a free port; ``base`` 0: all free ports.

    Racy like every probe (a port may be taken before the proxy binds it);
    the proxy then fails to start and says which address was busy.
    """
    if base < 0 or base > 65535 - 3:
        raise ValueError(f"--port-base must be 0 or 1-{65535 - 3}, got {base}")
    chosen: list[int] = []
    for offset in range(len(LISTENERS)):
        wanted = base + offset if base else 0
        if wanted and wanted not in chosen and is_free(wanted):
            chosen.append(wanted)
            continue
        for _ in range(20):
            port = ephemeral()
            if port not in chosen:
                chosen.append(port)
                break
        else:
            raise ValueError("no free loopback port found")
    return DemoPorts(*chosen)


def render_config(ports: DemoPorts, pg_port: int, ca_file: str) -> str:
    """The demo's YAML: three listeners in front of one database, admin on loopback.

    ``ca_file`` is the demo CA's certificate: the cluster names it so that
    ``egressproxy doctor`` verifies the database's chain against it (a real
    provider's CA is usually in the system store and needs no such line).
    """
    db = f"{SERVER_NAME}:{pg_port}"
    return f"""\
# egressproxy demo: three listeners in front of one throwaway PostgreSQL.
# Written by `egressproxy demo`; removed, with the database, when it stops.
#
# The database's name, {SERVER_NAME}, is made up: the pin below resolves it
# to 127.0.0.1 for this process only, and its certificate comes from a CA the
# demo made at start-up. Clients keep sslmode=verify-full through the proxy.

hosts:
  {SERVER_NAME}: 127.0.0.1

# Control and stats: / (status page), /stats, /clusters, /metrics.
admin:
  listen: "127.0.0.1:{ports.admin}"
# The separate read-only service (default [::]:9091, all interfaces) is off:
# the demo listens on loopback only, and admin serves /metrics too.
metrics: false

# Ctrl-C drains: connections still open after drain_timeout are closed.
shutdown_delay: 0s
drain_timeout: 2s

listeners:
  # Plain TCP forwarding: bytes in, bytes out, TLS end to end (libpq's
  # host= names the database, hostaddr= and port= the proxy).
  - name: direct
    listen: "127.0.0.1:{ports.direct}"
    mode: tcp
    cluster: demo_db
    # Dial the database only once the client has sent something (PostgreSQL
    # clients always speak first): a port probe costs the database nothing.
    upstream_connect: on_first_byte

  # Postgres-aware: reads the TLS server name (SNI) from the client's hello
  # and routes by it; a name that matches no route is never dialled (NR).
  - name: routed
    listen: "127.0.0.1:{ports.routed}"
    mode: postgres
    routes:
      - {{sni: "{SERVER_NAME}", cluster: demo_db}}

  # An HTTP CONNECT forward proxy (HTTPS_PROXY): only the destinations on
  # the allowlist are dialled; anything else gets 403 and no connection.
  - name: connect
    listen: "127.0.0.1:{ports.connect}"
    mode: http_connect
    allow_destinations: ["{db}"]

clusters:
  - name: demo_db
    endpoints: ["{db}"]
    connect_timeout: 2s
    # The CA that signed the database's certificate, for doctor's chain check.
    tls: {{ca_file: "{ca_file}"}}
    # Every 5s: an SSLRequest, and the answer must be PostgreSQL's.
    health_check: {{kind: postgres, interval: 5s, timeout: 2s}}

access_log:
  format: text
"""
