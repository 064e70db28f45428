"""The ``egressproxy`` command: operator tools that run next to the proxy.

This module owns the command line (argument parsing, exit codes, what goes to
stdout and what to stderr) and nothing else: each subcommand is a thin adapter
over a library call. It does not run the proxy (``twistd egressproxy`` does,
through the plugin and ``tap.py``) and it holds no configuration rules of its
own (the ``config`` package does).

Subcommands: ``check-config FILE``, ``urls``, ``doctor``, ``demo`` and ``tunnel``;
each is a ``_add_<name>`` function that adds a subparser and sets ``run`` to a function
``(args, io) -> int``.  ``--version`` prints the installed version.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Callable, TextIO

import attrs

from egressproxy import __version__
from egressproxy.app import urls
from egressproxy.config import ConfigError, load_config


@attrs.frozen
class _IO:
    """The streams and environment a command may use, passed in so tests need no patching."""

    stdout: TextIO
    stderr: TextIO
    environ: Mapping[str, str]


Command = Callable[[argparse.Namespace, _IO], int]


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _check_config(args: argparse.Namespace, io: _IO) -> int:
    """Validate one file; exit 0 with a one-line summary, or 1 with every error."""
    try:
        config = load_config(args.file, io.environ)
    except ConfigError as e:
        for error in e.errors:
            print(error, file=io.stderr)
        return 1
    workers = f", {config.workers} workers" if config.workers > 1 else ""
    print(
        f"{args.file}: OK ({_plural(len(config.listeners), 'listener')}, "
        f"{_plural(len(config.clusters), 'cluster')}{workers})",
        file=io.stdout,
    )
    return 0


def _add_check_config(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    parser = commands.add_parser(
        "check-config",
        help="validate a config file and report every error",
        description=(
            "Validate FILE as the proxy would at start-up, with ${VAR} "
            "interpolation from the current environment. Exit status 0 if it "
            "is valid, 1 if not (every error is printed, one per line)."
        ),
    )
    parser.add_argument("file", metavar="FILE", help="the YAML config file")
    parser.set_defaults(run=_check_config)


def _config_path(args: argparse.Namespace, io: _IO) -> str:
    """``--config``, else ``$EGRESSPROXY_CONFIG``, else ``./egressproxy.yaml`` (as twistd egressproxy looks)."""
    return args.config or io.environ.get("EGRESSPROXY_CONFIG") or "egressproxy.yaml"


def _urls(args: argparse.Namespace, io: _IO) -> int:
    """Print each listener's connection strings for consumer apps."""
    path = _config_path(args, io)
    try:
        config = load_config(path, io.environ)
    except ConfigError as e:
        for error in e.errors:
            print(error, file=io.stderr)
        return 1
    resolved = None
    if args.app is not None:
        try:
            resolved = urls.resolve_app(args.app)
        except OSError as e:
            print(f"egressproxy: cannot resolve {args.app}.flycast ({e}); run this inside Fly's private "
                  f"network (fly ssh console, or WireGuard), or give --address with the app's private IPv6 "
                  f"from `fly ips private -a {args.app}`", file=io.stderr)
            return 1
    try:
        proxy = urls.proxy_address(args.address, args.app, resolved)
    except ValueError:
        print(f"egressproxy: --address {args.address} is not a numeric address (libpq's hostaddr takes "
              f"only numbers); use --app NAME to resolve NAME.flycast", file=io.stderr)
        return 2
    io.stdout.write(urls.render(config, proxy))
    return 0


def _add_urls(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "urls",
        help="print the connection strings consumer apps should use, per listener",
        description=(
            "For each listener in the config, the strings apps paste: libpq keywords and URI "
            "(DATABASE_URL), asyncpg, node-postgres, JDBC, the fly proxy laptop variant, and "
            "HTTPS_PROXY / ALL_PROXY for forward proxies. Passwords are placeholders."
        ),
    )
    parser.add_argument("--config", metavar="FILE", help="default: $EGRESSPROXY_CONFIG, then ./egressproxy.yaml")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--address", metavar="ADDR", help="the proxy's numeric address (e.g. its flycast IPv6)")
    where.add_argument("--app", metavar="NAME", help="the proxy's Fly app: NAME.flycast is resolved for hostaddr")
    parser.set_defaults(run=_urls)


def _demo(args: argparse.Namespace, io: _IO) -> int:
    """Run the demo (egressproxy/app/demo/) until Ctrl-C; 1 when it cannot start."""
    from egressproxy.app.demo.runner import run_demo  # noqa: PLC0415 - Twisted loads only for this command

    return run_demo(args.port_base, args.pg_bindir, io.stdout, io.stderr, io.environ)


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "demo",
        help="run a throwaway TLS PostgreSQL with the proxy in front of it, and show what to try",
        description=(
            "Start a throwaway PostgreSQL (TLS, SCRAM, a certificate for db.demo.egress.test from a CA "
            "made now) and the proxy in front of it on 127.0.0.1 (tcp, postgres and http_connect "
            "listeners, admin), print commands to try and the access log. Ctrl-C stops both and "
            "removes every file. Needs PostgreSQL's server programs (apt-get install postgresql, "
            "brew install postgresql)."
        ),
    )
    parser.add_argument("--port-base", metavar="N", type=int, default=15432,
                        help="listeners on N..N+3 (taken ones replaced by free ports); 0: free ports (default 15432)")
    parser.add_argument("--pg-bindir", metavar="DIR",
                        help="where initdb and pg_ctl are (default: PATH, then /usr/lib/postgresql/*/bin)")
    parser.set_defaults(run=_demo)


def _doctor(args: argparse.Namespace, io: _IO) -> int:
    """Check every upstream and listener of the config step by step (egressproxy/doctor/)."""
    from egressproxy.doctor.command import run  # noqa: PLC0415 - the reactor loads only for this command
    from egressproxy.doctor.runner import DoctorOptions  # noqa: PLC0415

    if args.dbname is not None and args.login is None:
        print("egressproxy doctor: --dbname needs --login USER", file=io.stderr)
        return 2
    try:
        config = load_config(_config_path(args, io), io.environ)
    except ConfigError as e:
        for error in e.errors:
            print(error, file=io.stderr)
        return 1
    options = DoctorOptions(name=args.name, login=args.login, dbname=args.dbname,
                            password=io.environ.get("PGPASSWORD"), timeout=args.timeout)
    return run(config, options, args.json, io.stdout, io.stderr)


def _add_doctor(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "doctor",
        help="check each upstream (DNS, TCP, SSLRequest, TLS, login) and listener, with a hint per failure",
        description=(
            "For every cluster endpoint and exact route name: DNS (A and AAAA), TCP per address, the "
            "Postgres SSLRequest answer, TLS with the name as SNI (chain, name, expiry) and, with --login, "
            "a real login (password from PGPASSWORD). Also each listener (bound, dual-stack) and the "
            "egress address against expected_egress_ips. Exit 0 only when every check passes."
        ),
    )
    parser.add_argument("--config", metavar="FILE", help="default: $EGRESSPROXY_CONFIG, then ./egressproxy.yaml")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--name", metavar="HOST", help="the name to check for a wildcard route (must match one)")
    parser.add_argument("--login", metavar="USER", help="log in as USER (password from PGPASSWORD)")
    parser.add_argument("--dbname", metavar="DB", help="the database for --login (default: USER, as libpq)")
    parser.add_argument("--timeout", metavar="SECONDS", type=float, default=5.0,
                        help="the limit of each step: DNS, connect, each answer (default 5)")
    parser.set_defaults(run=_doctor)


def _tunnel(args: argparse.Namespace, io: _IO) -> int:
    """Run the app-side tunnel (egressproxy/tunnel/) until COMMAND ends or a signal stops it."""
    from egressproxy.tunnel.command import run_command  # noqa: PLC0415 - Twisted loads only for this command

    return run_command(args, io.stdout, io.stderr, io.environ)


def _add_tunnel(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from egressproxy.tunnel.command import DESCRIPTION  # noqa: PLC0415 - light: no Twisted
    from egressproxy.tunnel.options import add_arguments  # noqa: PLC0415

    parser = commands.add_parser(
        "tunnel", help="the app-side half: local listeners carried through the egress app", description=DESCRIPTION
    )
    add_arguments(parser)
    parser.set_defaults(run=_tunnel)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egressproxy",
        description=(
            "Tools for the egressproxy TCP egress proxy. The proxy itself runs "
            "under twistd: twistd -n egressproxy --config FILE"
        ),
    )
    parser.add_argument("--version", action="version", version=f"egressproxy {__version__}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True
    )
    _add_check_config(commands)
    _add_urls(commands)
    _add_demo(commands)
    _add_doctor(commands)
    _add_tunnel(commands)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run one subcommand and return its exit status (the console script entry).

    The keyword arguments exist for tests; the console script passes none and
    gets ``sys.stdout``, ``sys.stderr`` and ``os.environ``. Usage errors exit 2,
    as argparse does everywhere else.
    """
    io = _IO(
        stdout=stdout if stdout is not None else sys.stdout,
        stderr=stderr if stderr is not None else sys.stderr,
        environ=environ if environ is not None else os.environ,
    )
    parser = _parser()
    # argparse writes help and usage errors to sys.stdout/sys.stderr itself and
    # then exits; point those at our streams and turn the exit into a status.
    try:
        with contextlib.redirect_stdout(io.stdout), contextlib.redirect_stderr(
            io.stderr
        ):
            args = parser.parse_args(argv)
    except SystemExit as e:
        if e.code is None:
            return 0
        return e.code if isinstance(e.code, int) else 2
    command: Command = args.run
    return command(args, io)


if __name__ == "__main__":
    sys.exit(main())
