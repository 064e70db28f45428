"""``egressproxy doctor`` behind the command line: run the checks on a reactor and print the report.

``cli.py`` parses the flags and loads the config; this module runs one
:func:`~egressproxy.doctor.runner.run_doctor` on the global reactor with
``twisted.internet.task.react`` (a command-line entry point, like twistd,
is where the global reactor belongs) and turns the report into output and
an exit status: 0 when every check passed (warnings and skips included),
1 when one failed, 2 when ``--name`` is refused.
"""

from __future__ import annotations

from typing import Any, TextIO

from twisted.internet import defer, task

from egressproxy.config import Config
from egressproxy.doctor.report import Report, render_json, render_text
from egressproxy.doctor.runner import DoctorOptions, run_doctor
from egressproxy.doctor.targets import NameRefused, check_name


def run(config: Config, options: DoctorOptions, as_json: bool, stdout: TextIO, stderr: TextIO) -> int:
    """Run the doctor to its end and print the report; the exit status (see the module notes)."""
    if options.name is not None:
        try:
            check_name(config, options.name)
        except NameRefused as e:
            print(f"egressproxy doctor: {e}", file=stderr)
            return 2
    reports: list[Report] = []

    async def main(reactor: Any) -> None:
        reports.append(await run_doctor(reactor, config, options))

    try:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    except SystemExit as e:
        if e.code not in (0, None) or not reports:
            print("egressproxy doctor: the run did not finish (see the error above)", file=stderr)
            return 1
    report = reports[0]
    stdout.write(render_json(report) if as_json else render_text(report))
    return 0 if report.ok else 1
