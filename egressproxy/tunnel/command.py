"""The tunnel's command: from parsed arguments to an exit status, for both ways of running it.

``egressproxy tunnel ...`` (the console script, ``app/cli.py``) and the
single-file ``egressproxy-tunnel ...`` (``__main__.py``) share the arguments
(``options.add_arguments``) and this function, so they behave the same.
A usage error prints one line naming the fix and exits 2, as argparse's
own errors do.  Twisted is imported only once the options are good.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

from egressproxy import __version__
from egressproxy.tunnel.options import add_arguments, from_arguments
from egressproxy.tunnel.parse import TunnelUsageError

DESCRIPTION = (
    "The app-side half of egressproxy: listen locally for each destination and carry every connection "
    "through the egress app (a socks5 listener, or a tcp/postgres listener), trying the --via paths in "
    "order. With --transparent, each destination's name points at the tunnel in /etc/hosts, so the "
    "app's connection strings stay unmodified and TLS stays end to end."
)


def run_command(args: argparse.Namespace, stdout: TextIO, stderr: TextIO, environ: Mapping[str, str]) -> int:
    """Check the options and run the tunnel (or --check); the exit status."""
    try:
        options = from_arguments(args, environ)
    except TunnelUsageError as e:
        print(f"egressproxy tunnel: {e}", file=stderr)
        return 2
    from egressproxy.tunnel.run import run_tunnel  # noqa: PLC0415 - Twisted loads only to run

    return run_tunnel(options, stdout, stderr, environ)


def main(argv: Sequence[str] | None = None) -> int:
    """``egressproxy-tunnel``: the single-file executable's command line."""
    parser = argparse.ArgumentParser(prog="egressproxy-tunnel", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"egressproxy-tunnel {__version__}")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(args, sys.stdout, sys.stderr, os.environ)
