"""The ``egressproxy`` command: operator tools that run next to the proxy.

This module owns the command line (argument parsing, exit codes, what goes to
stdout and what to stderr) and nothing else: each subcommand is a thin adapter
over a library call. It does not run the proxy (``twistd egressproxy`` does,
through the plugin and ``tap.py``) and it holds no configuration rules of its
own (the ``config`` package does).

Subcommands so far: ``check-config FILE``. Later ones (``doctor``, ``urls``)
register the same way: a ``_add_<name>`` function that adds a subparser and sets
``run`` to a function ``(args, io) -> int``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Callable, TextIO

import attrs

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egressproxy",
        description=(
            "Tools for the egressproxy TCP egress proxy. The proxy itself runs "
            "under twistd: twistd -n egressproxy --config FILE"
        ),
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True
    )
    _add_check_config(commands)
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
