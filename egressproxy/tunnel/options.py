"""The tunnel's command line and environment, combined into one checked :class:`TunnelOptions`.

Command line (DESIGN.md, "Commands")::

    egressproxy tunnel [--transparent] [--via URL]... [--dest HOST:PORT]...
                       [--check] [--config FILE] [--connect-timeout SECONDS] [-- COMMAND ...]

The same arguments serve ``egressproxy tunnel`` (added to the ``egressproxy``
console script by ``app/cli.py``) and the single-file ``egressproxy-tunnel``
(``__main__.py``), so both accept exactly the same things.

Where each setting comes from, first match wins: the command line, then the
``--config`` file, then the environment (``EGRESSPROXY_TUNNEL_VIA`` and
``EGRESSPROXY_TUNNEL_DESTINATIONS``, comma-separated).  A file named on the
command line is more specific than the ambient environment, which is why it
comes second.  This module owns those rules and the cross-checks (a
``tcp://`` path carries exactly one destination); the text forms are
``parse.py``'s.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import attrs

from egressproxy.tunnel.parse import (
    Destination,
    FileSettings,
    Path,
    TunnelUsageError,
    parse_destination,
    parse_via,
    read_file,
    split_list,
)

ENV_VIA = "EGRESSPROXY_TUNNEL_VIA"
ENV_DESTINATIONS = "EGRESSPROXY_TUNNEL_DESTINATIONS"
#: Seconds one path may take to accept a TCP connection (and, for socks5, to answer).
DEFAULT_CONNECT_TIMEOUT = 5.0


@attrs.frozen
class TunnelOptions:
    """Everything one run of the tunnel needs, checked."""

    paths: tuple[Path, ...]
    destinations: tuple[Destination, ...]
    transparent: bool = False
    check: bool = False
    command: tuple[str, ...] = ()
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The tunnel's arguments, on ``parser`` (a subcommand's or the executable's own)."""
    parser.add_argument(
        "--via", metavar="URL", action="append", default=[],
        help="a path to the egress app, in order of preference (repeat): socks5://[USER:PASSWORD@]HOST:PORT "
        "(a socks5 listener; the password may be ${ENV}) or tcp://HOST:PORT (a tcp/postgres listener; "
        f"then exactly one --dest). Default: ${ENV_VIA}, comma-separated",
    )
    parser.add_argument(
        "--dest", metavar="HOST:PORT", action="append", default=[],
        help=f"a destination the app connects to (repeat). Default: ${ENV_DESTINATIONS}, comma-separated",
    )
    parser.add_argument(
        "--transparent", action="store_true",
        help="point each destination's name at its own loopback address (127.77.0.N) in /etc/hosts, "
        "on the destination's own port, so connection strings stay unmodified (removed again on exit)",
    )
    parser.add_argument(
        "--check", action="store_true",
        help="dial every destination through the paths, print one line each, exit 0 if all connect, else 1",
    )
    parser.add_argument("--config", metavar="FILE", help="a YAML file with via, destinations, transparent, connect_timeout")
    parser.add_argument(
        "--connect-timeout", metavar="SECONDS", type=float, default=None,
        help=f"per path: TCP connect plus SOCKS5 answer (default {DEFAULT_CONNECT_TIMEOUT:g})",
    )
    parser.add_argument(
        # Not "command": the egressproxy console script's subparsers use that name.
        "wrapped_command", metavar="-- COMMAND", nargs=argparse.REMAINDER,
        help="run COMMAND once the listeners are up, pass it SIGTERM/SIGINT/SIGHUP, exit with its status; "
        "without it, run in the foreground until SIGTERM or SIGINT",
    )


def _command(words: list[str]) -> tuple[str, ...]:
    """The wrapped command: argparse's REMAINDER keeps the ``--`` that introduced it (3.11, checked)."""
    if words and words[0] == "--":
        words = words[1:]
    return tuple(words)


def _first(*sources: tuple[str, tuple[str, ...] | list[str]]) -> tuple[str, list[str]]:
    """The first source with items: (its name, its items)."""
    for name, items in sources:
        if items:
            return name, list(items)
    return "", []


def from_arguments(args: argparse.Namespace, environ: Mapping[str, str]) -> TunnelOptions:
    """Combine parsed arguments, the ``--config`` file and the environment; raise TunnelUsageError."""
    settings = read_file(args.config) if args.config else FileSettings()
    via_from, via = _first(
        ("--via", args.via), (f"{args.config} via", settings.via), (ENV_VIA, split_list(environ.get(ENV_VIA, "")))
    )
    dest_from, dests = _first(
        ("--dest", args.dest),
        (f"{args.config} destinations", settings.destinations),
        (ENV_DESTINATIONS, split_list(environ.get(ENV_DESTINATIONS, ""))),
    )
    if not via:
        raise TunnelUsageError(
            f"no path to the egress app: give --via socks5://USER:${{EGRESS_PASSWORD}}@my-egress.flycast:1080 "
            f"(repeat --via for fallbacks, e.g. my-egress.internal), or set {ENV_VIA}"
        )
    if not dests:
        raise TunnelUsageError(
            f"no destination: give --dest HOST:PORT (e.g. --dest db.example.com:5432), or set {ENV_DESTINATIONS}"
        )
    paths = tuple(parse_via(text, environ, via_from) for text in via)
    destinations = tuple(parse_destination(text, dest_from) for text in dests)
    seen: set[Destination] = set()
    for destination in destinations:
        if destination in seen:
            raise TunnelUsageError(f"{dest_from}: {destination} is given twice; list each destination once")
        seen.add(destination)
    tcp = [path for path in paths if path.scheme == "tcp"]
    if tcp and len(destinations) != 1:
        raise TunnelUsageError(
            f"{tcp[0]} forwards to its listener's one cluster, so it carries exactly one destination "
            f"(got {len(destinations)}); give one --dest, or use a socks5:// path for several"
        )
    command = _command(list(args.wrapped_command))
    if args.check and command:
        raise TunnelUsageError("--check dials each destination and exits; it runs no COMMAND (remove it, or drop --check)")
    timeout = args.connect_timeout if args.connect_timeout is not None else settings.connect_timeout
    if timeout is not None and timeout <= 0:
        raise TunnelUsageError("--connect-timeout: expected a number of seconds above 0, e.g. 5")
    return TunnelOptions(
        paths=paths,
        destinations=destinations,
        transparent=bool(args.transparent or settings.transparent),
        check=bool(args.check),
        command=command,
        connect_timeout=timeout if timeout is not None else DEFAULT_CONNECT_TIMEOUT,
    )
