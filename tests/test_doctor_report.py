"""The doctor's report model and its text and JSON renderings (golden strings)."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from egressproxy.doctor.report import FAIL, OK, SKIP, WARN, Check, Report, render_json, render_text

CHECKS = (
    Check("listener pg", "dual-stack", OK, "[::]:5432: takes IPv6 and IPv4"),
    Check("cluster db endpoint db.example.cloud:5432", "tcp", OK, "port 5432: accepted", 0.0123, None, "203.0.113.5"),
    Check("cluster db endpoint db.example.cloud:5432", "tls expiry", WARN, "9 days left", 0.0, "renew it", "203.0.113.5"),
    Check("cluster db endpoint db.example.cloud:5432", "login", FAIL, "28P01: password authentication failed",
          0.5, "wrong password for app", "203.0.113.5"),
    Check("route *.pg.example.cloud (listener pg)", "route", SKIP, "a wildcard route", 0.0, "run with --name HOST"),
)


class CheckTests(SynchronousTestCase):
    def test_failure_needs_hint(self) -> None:
        """A failed check without a hint cannot be made."""
        self.assertRaises(ValueError, Check, "s", "tcp", FAIL, "refused")

    def test_unknown_status(self) -> None:
        """Only the four statuses exist."""
        self.assertRaises(ValueError, Check, "s", "tcp", "maybe", "x")

    def test_ok_except_failures(self) -> None:
        """Warnings and skips let the run pass; failures do not."""
        self.assertEqual([c.ok for c in CHECKS], [True, True, True, False, True])


class ReportTests(SynchronousTestCase):
    def test_counts_and_verdict(self) -> None:
        """The report fails when one check failed, and counts each status."""
        report = Report("egressproxy.yaml", CHECKS)
        self.assertFalse(report.ok)
        self.assertEqual(report.counts(), {OK: 2, FAIL: 1, WARN: 1, SKIP: 1})
        self.assertTrue(Report("x", CHECKS[:3]).ok)

    def test_text(self) -> None:
        """Text groups checks by subject, one line each, the hint under it, a verdict and the first failure last."""
        self.assertEqual(render_text(Report("egressproxy.yaml", CHECKS)), "\n".join([
            "egressproxy doctor: egressproxy.yaml",
            "",
            "listener pg",
            "  ✓ dual-stack   0.000s  [::]:5432: takes IPv6 and IPv4",
            "",
            "cluster db endpoint db.example.cloud:5432",
            "  ✓ tcp          0.012s  [203.0.113.5] port 5432: accepted",
            "  ! tls expiry   0.000s  [203.0.113.5] 9 days left",
            "      hint: renew it",
            "  ✗ login        0.500s  [203.0.113.5] 28P01: password authentication failed",
            "      hint: wrong password for app",
            "",
            "route *.pg.example.cloud (listener pg)",
            "  - route        0.000s  a wildcard route",
            "      hint: run with --name HOST",
            "",
            "FAILED: 2 ok, 1 failed, 1 warnings, 1 skipped",
            "first failure: cluster db endpoint db.example.cloud:5432, step login",
            "",
        ]))

    def test_text_passing(self) -> None:
        """A passing report says so and names no failure."""
        text = render_text(Report("f.yaml", CHECKS[:1]))
        self.assertTrue(text.endswith("all checks passed: 1 ok, 0 failed, 0 warnings, 0 skipped\n"))
        self.assertNotIn("first failure", text)

    def test_json(self) -> None:
        """JSON has the overall verdict, the counts, and per check subject, step, address, status, ok, seconds, detail, hint."""
        document = json.loads(render_json(Report("egressproxy.yaml", CHECKS)))
        self.assertEqual(document["ok"], False)
        self.assertEqual(document["source"], "egressproxy.yaml")
        self.assertEqual(document["summary"], {"ok": 2, "fail": 1, "warn": 1, "skip": 1})
        self.assertEqual(document["checks"][3], {
            "subject": "cluster db endpoint db.example.cloud:5432",
            "step": "login",
            "address": "203.0.113.5",
            "status": "fail",
            "ok": False,
            "seconds": 0.5,
            "detail": "28P01: password authentication failed",
            "hint": "wrong password for app",
        })
        self.assertEqual(document["checks"][1]["seconds"], 0.012)
