"""The start-up file-descriptor limit."""

from __future__ import annotations

import resource

from twisted.trial.unittest import SynchronousTestCase

from egressproxy.app.limits import raise_fd_limit


class FdLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.original = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, self.original)

    def test_soft_limit_raised_to_hard(self) -> None:
        """A soft limit below the hard one is raised to the hard limit."""
        soft, hard = self.original
        if hard == resource.RLIM_INFINITY or hard < 2048:
            self.skipTest(f"hard limit {hard} leaves nothing to raise in this test")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        self.assertEqual(raise_fd_limit(), (1024, hard))
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), (hard, hard))

    def test_already_at_hard_limit(self) -> None:
        """A soft limit already at the hard one is left as it is."""
        soft, hard = self.original
        if hard == resource.RLIM_INFINITY:
            self.skipTest("no finite hard limit here")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.assertEqual(raise_fd_limit(), (hard, hard))
