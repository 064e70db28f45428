"""The doctor's result: one :class:`Check` per step, and the report's text and JSON forms.

A check has a status: ``ok`` (✓), ``fail`` (✗, always with a one-line
hint naming the fix), ``warn`` (!, does not fail the run: a certificate
close to expiry) or ``skip`` (-, with the reason: a wildcard route without
``--name``, no ``expected_egress_ips``).  The report passes when no check
failed; the CLI's exit status and ``/doctor``'s 200/503 say exactly that.

Rendering is pure (no I/O, no clock), so it is tested on golden strings.
The JSON shape is the contract scripts read::

    {"ok": false, "source": "egressproxy.yaml",
     "summary": {"ok": 20, "fail": 1, "warn": 0, "skip": 1},
     "checks": [{"subject": "cluster db endpoint db.example.cloud:5432",
                 "step": "login", "address": "203.0.113.5", "status": "fail",
                 "ok": false, "seconds": 0.041, "detail": "...", "hint": "..."}]}
"""

from __future__ import annotations

import json
from typing import Any

import attrs

OK = "ok"
FAIL = "fail"
WARN = "warn"
SKIP = "skip"
STATUSES = (OK, FAIL, WARN, SKIP)
MARKS = {OK: "✓", FAIL: "✗", WARN: "!", SKIP: "-"}


def _check_status(_instance: object, _attribute: object, value: str) -> None:
    if value not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {value!r}")


@attrs.frozen
class Check:
    """One step's verdict about one subject (a listener, an endpoint, a route, the egress address)."""

    subject: str
    step: str
    status: str = attrs.field(validator=_check_status)
    detail: str
    seconds: float = 0.0
    #: The one-line fix; every failure has one.
    hint: str | None = None
    #: The address the step ran against, when the subject has several.
    address: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.status == FAIL and not self.hint:
            raise ValueError(f"a failed check needs a hint: {self.subject}: {self.step}")

    @property
    def ok(self) -> bool:
        """Whether this check lets the run pass (warnings and skips do)."""
        return self.status != FAIL

    def as_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "step": self.step,
            "address": self.address,
            "status": self.status,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "detail": self.detail,
            "hint": self.hint,
        }


@attrs.frozen
class Report:
    """Every check of one run, in the order they were made."""

    source: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if check.status == FAIL]

    def counts(self) -> dict[str, int]:
        return {status: sum(1 for c in self.checks if c.status == status) for status in STATUSES}

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "source": self.source,
            "summary": self.counts(),
            "checks": [check.as_dict() for check in self.checks],
        }


def render_json(report: Report) -> str:
    """The report as one JSON document (with a trailing newline)."""
    return json.dumps(report.as_dict(), indent=2, ensure_ascii=False) + "\n"


def _grouped(checks: tuple[Check, ...]) -> list[tuple[str, list[Check]]]:
    """Checks by subject, subjects in the order they first appear."""
    groups: dict[str, list[Check]] = {}
    for check in checks:
        groups.setdefault(check.subject, []).append(check)
    return list(groups.items())


def render_text(report: Report) -> str:
    """The report for a terminal: a block per subject, a line per step, hints under failures."""
    lines = [f"egressproxy doctor: {report.source}"]
    width = max((len(c.step) for c in report.checks), default=4)
    for subject, checks in _grouped(report.checks):
        lines += ["", subject]
        for check in checks:
            where = f"[{check.address}] " if check.address else ""
            lines.append(
                f"  {MARKS[check.status]} {check.step:<{width}}  {check.seconds:6.3f}s  {where}{check.detail}"
            )
            if check.hint:
                lines.append(f"      hint: {check.hint}")
    counts = report.counts()
    verdict = "all checks passed" if report.ok else "FAILED"
    lines += [
        "",
        f"{verdict}: {counts[OK]} ok, {counts[FAIL]} failed, {counts[WARN]} warnings, {counts[SKIP]} skipped",
    ]
    if report.failures:
        first = report.failures[0]
        lines.append(f"first failure: {first.subject}, step {first.step}")
    return "\n".join(lines) + "\n"
