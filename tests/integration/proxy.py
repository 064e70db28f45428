"""Running egressproxy inside the test's reactor, on real loopback sockets.

The proxy under test is the real service tree (``EgressService``) built from
a YAML string, sharing trial's reactor with the test; clients are real
sockets or real subprocesses (psql, pgbench).  The access log goes to a
StringIO the test reads.

A YAML text without ``fast_path:`` runs on the data path that
``EGRESSPROXY_TEST_DATA_PATH`` names (``relay`` or ``python``; unset: the
default, ``auto``), so one test module can be run on either (``.ci/run``
runs the data-path modules once more with ``python``).
"""

from __future__ import annotations

import io
import os
import shutil
import functools
from typing import Any, Callable, Coroutine, Mapping

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

import attrs

from egressproxy.config import HealthCheckConfig, HttpServiceConfig, ListenAddress, parse_config
from egressproxy.app.service import EgressService
from tests.relaykit import wanted_data_path


def inline(f: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., defer.Deferred[Any]]:
    """Run an ``async def`` test method as a Deferred, which trial waits on."""

    @functools.wraps(f)
    def run(*args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return defer.ensureDeferred(f(*args, **kwargs))

    return run


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> None:
    """Poll ``predicate`` on the reactor until true; fail after ``timeout`` seconds."""
    for _ in range(int(timeout / step) + 1):
        if predicate():
            return
        await deferLater(reactor, step, lambda: None)
    raise AssertionError(f"condition not met within {timeout}s: {predicate}")


def test_data_path(default: str) -> str:
    """The ``fast_path`` a test's config gets when it names none (see the module notes)."""
    wanted = wanted_data_path()
    return default if wanted == "auto" else wanted


class InProcessProxy:
    """An EgressService on the test reactor, stopped (and its sessions dropped) at cleanup."""

    def __init__(self, testcase: TestCase, yaml_text: str, environ: Mapping[str, str] | None = None) -> None:
        config = parse_config(yaml_text, "test.yaml", dict(environ or {}))
        # Unless a test asks for them, the HTTP services listen on loopback
        # ephemeral ports, never on the defaults a developer's proxy may hold.
        ephemeral = HttpServiceConfig(ListenAddress("127.0.0.1:0", "127.0.0.1", 0, False, None))
        # Health probes would add connections to upstreams that tests count;
        # tests that want them configure them.
        if "health_check:" not in yaml_text:
            config = attrs.evolve(config, clusters=tuple(
                attrs.evolve(c, health_check=HealthCheckConfig(kind="none")) for c in config.clusters
            ))
        self.config = attrs.evolve(
            config,
            admin=config.admin if "admin:" in yaml_text else ephemeral,
            metrics=config.metrics if "metrics:" in yaml_text else ephemeral,
            fast_path=config.fast_path if "fast_path:" in yaml_text else test_data_path(config.fast_path),
        )
        self.access = io.StringIO()
        self.service = EgressService(
            self.config, reactor, access_stream=self.access, environ=dict(environ) if environ is not None else None
        )
        self.service.startService()
        testcase.addCleanup(self.stop)

    def port(self, listener: str) -> int:
        return self.service.ports[listener].getHost().port

    def access_lines(self) -> list[str]:
        return [line for line in self.access.getvalue().splitlines() if line]

    async def wait_for_lines(self, count: int, timeout: float = 10.0) -> list[str]:
        """The access log once it has at least ``count`` lines."""
        await wait_until(lambda: len(self.access_lines()) >= count, timeout)
        return self.access_lines()

    def live_sessions(self) -> int:
        return self.service.live_sessions()

    async def stop(self) -> None:
        # Drop live connections first, so the drain in stopService finds none.
        self.service.abort_sessions()
        await wait_until(lambda: self.live_sessions() == 0, timeout=5)
        if self.service.running:
            await self.service.stopService()
        # Let connectionLost calls already scheduled by the aborts run.
        await deferLater(reactor, 0.05, lambda: None)


def require_tool(name: str) -> str:
    """The path of a client program the test drives, or a skip saying what is missing."""
    path = shutil.which(name)
    if path is None:
        raise SkipTest(f"{name} not found on PATH: install Debian's postgresql-client, as .ci/run does")
    return path


async def run_process(argv: list[str], env: Mapping[str, str] | None = None, timeout: float = 120.0) -> tuple[str, str, int]:
    """Run a client program without blocking the reactor: (stdout, stderr, exit code)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    environment.update({"LC_ALL": "C.UTF-8", "PGCLIENTENCODING": "UTF8"})
    environment.update(env or {})
    d = getProcessOutputAndValue(argv[0], argv[1:], env=environment)
    d.addTimeout(timeout, reactor)
    out, err, code = await d
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), code
