"""``GET /doctor`` on the admin service: the doctor's checks from inside the running proxy.

The same runner as ``egressproxy doctor``, with the config the proxy runs
now (after any reload) and its reactor; listeners the proxy has bound are
reported as such rather than dialled.  The answer is the same report: text
by default, JSON with ``Accept: application/json``; 200 when every check
passed, 503 otherwise.

Not offered over HTTP: ``--name`` (a query string must not choose what the
proxy dials) and ``--login`` (a password must never travel in a URL); run
the CLI for those.  One run at a time: a request while a run is in progress
gets 429 with ``Retry-After``, so the endpoint cannot be used to multiply
connections to the upstreams.  A client that goes away mid-run is not
written to; the run still ends by its own timeouts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from egressproxy.config import Config
from egressproxy.doctor.report import Report, render_json, render_text

if TYPE_CHECKING:
    from egressproxy.doctor.runner import DoctorOptions
from egressproxy.observe.httpsite import JSON, TEXT

#: The methods the route accepts (no HEAD: a run is not free).
METHODS = (b"GET",)


class DoctorTarget(Protocol):
    """What ``/doctor`` reads of the service (``EgressService``)."""

    reactor: Any
    config: Config
    ports: Mapping[str, Any]


def _bound_port(service: DoctorTarget, name: str) -> int | None:
    """The port the service has bound for listener ``name``, else None."""
    port = service.ports.get(name)
    if port is None:
        return None
    return int(getattr(port.getHost(), "port", 0))  # 0: a unix socket or other non-TCP endpoint


def wants_json(request: Request) -> bool:
    accept = request.getHeader(b"accept") or b""
    return b"application/json" in accept.lower()


class DoctorResource(Resource):
    """``GET /doctor``: run the checks and answer the report; see the module notes."""

    isLeaf = True
    log = Logger()

    def __init__(self, service: DoctorTarget, options: DoctorOptions | None = None) -> None:
        super().__init__()
        self.service = service
        #: None: the defaults, made at the first run.
        self.options = options
        self.running = False

    def render_GET(self, request: Request) -> bytes | int:
        if self.running:
            request.setResponseCode(429)
            request.setHeader(b"Content-Type", TEXT)
            request.setHeader(b"Retry-After", b"5")
            return b"a doctor run is in progress; try again when it ends\n"
        self.running = True
        gone: list[bool] = []
        request.notifyFinish().addBoth(lambda _: gone.append(True))
        # The checks (DNS, STUN, TLS clients) are loaded at the first run, not
        # at start: each worker would otherwise carry them (about 4.5 MiB) unused.
        from egressproxy.doctor.runner import DoctorOptions, run_doctor  # noqa: PLC0415

        service = self.service
        run = defer.ensureDeferred(run_doctor(
            service.reactor, service.config, self.options or DoctorOptions(),
            bound=lambda name: _bound_port(service, name),
        ))
        run.addCallbacks(lambda report: self._answer(request, report, gone),
                         lambda failure: self._failed(request, failure, gone))
        return NOT_DONE_YET

    def _answer(self, request: Request, report: Report, gone: list[bool]) -> None:
        self.running = False
        if gone:
            return
        as_json = wants_json(request)
        request.setResponseCode(200 if report.ok else 503)
        request.setHeader(b"Content-Type", JSON if as_json else TEXT)
        request.write((render_json(report) if as_json else render_text(report)).encode("utf-8"))
        request.finish()

    def _failed(self, request: Request, failure: Failure, gone: list[bool]) -> None:
        self.running = False
        self.log.failure("doctor run failed", failure)
        if gone:
            return
        request.setResponseCode(500)
        request.setHeader(b"Content-Type", TEXT)
        request.write(b"the doctor run failed; see the proxy's log\n")
        request.finish()
