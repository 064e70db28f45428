"""The HTTP plumbing the metrics and admin services share: routing and a bounded, quiet Site.

A site's root is a :class:`Routes` table of exact paths, each with the
methods it accepts.  Anything else is answered by the root itself: 404 for an
unknown path (a trailing slash or an extra segment included), 405 with an
``Allow`` header for a known path and another method.  HEAD is answered as
GET without the body, here rather than by ``twisted.web``, which logs a line
whenever it has to drop a body.  What the routes serve is ``admin.py``'s.

Bounds and guards (issue 11):

- **Deadline and cap.**  Each site keeps at most ``HTTP_MAX_CONNECTIONS``
  connections; a connection beyond that is closed at accept, unread
  (``buildProtocol`` answers None).  A connection must deliver a whole request
  within ``HTTP_TIMEOUT`` seconds of connecting or of its previous response,
  whatever it sends meanwhile: twisted.web's ``Site(timeout=...)`` alone is an
  idle timeout that every received byte resets, so a client dripping one
  header byte at a time would hold its descriptor for ever.  Idle sockets on
  these ports therefore cannot pile up and starve the listeners of descriptors.
- **Through the proxy.**  Every request whose TCP peer is the local end of
  one of the proxy's own live upstream connections (a forward mode, or a
  cluster, that dialled these ports) is answered 403, on both sites.  The
  address guard on dials stops that first; this is the second line.

Sites log nothing per request: Fly scrapes every few seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from egressproxy.addresses import format_peer

GET_HEAD = (b"GET", b"HEAD")
POST = (b"POST",)

TEXT = b"text/plain; charset=utf-8"
JSON = b"application/json"

#: path -> (the methods it accepts, the resource answering them)
RouteTable = Mapping[bytes, tuple[tuple[bytes, ...], IResource]]

#: Seconds a connection to the metrics or admin service has to deliver a whole
#: request, from its connect or its previous response; traffic does not extend it.
HTTP_TIMEOUT = 10.0
#: Connections each HTTP service keeps open; beyond it new ones are closed at accept.
HTTP_MAX_CONNECTIONS = 64

#: The namespace these lines had before this module was split from ``admin.py``.
log = Logger(namespace="egressproxy.observe.admin")


class OwnUpstreams(Protocol):
    """How :class:`Routes` tells a request that came through the proxy itself (``EgressService``)."""

    def is_own_upstream(self, address: IAddress) -> bool:
        """Whether ``address`` is the local end of one of the proxy's live upstream connections."""


def respond(request: Request, code: int, body: str, content_type: bytes = TEXT) -> bytes:
    """Set the status and content type of ``request``; the body to return from ``render``."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", content_type)
    return body.encode("utf-8")


def refused(site: str, request: Request, why: str) -> None:
    """Log a refused request: site, method, path and peer (never a credential)."""
    log.warn(
        "{site}: refused {method} {path} from {peer}: {why}",
        site=site,
        method=request.method.decode("ascii", "replace"),
        path=(b"/" + b"/".join(request.postpath)).decode("ascii", "replace"),
        peer=format_peer(request.getClientAddress()),
        why=why,
    )


class Routes(Resource):
    """A site's root: exact paths, each with its methods; 404 and 405 for the rest.

    With ``service``, a request that came through the proxy itself (its peer
    is one of the proxy's own upstream connections) is answered 403 first.
    """

    isLeaf = True

    def __init__(self, routes: RouteTable, service: OwnUpstreams | None = None, name: str = "http") -> None:
        super().__init__()
        self.routes = dict(routes)
        self.service = service
        self.name = name

    def render(self, request: Request) -> bytes:
        """Answer ``request`` (``IResource.render``); HEAD gets GET's headers and no body."""
        if self.service is not None and self.service.is_own_upstream(request.getClientAddress()):
            refused(self.name, request, "it came through this proxy")
            body = respond(request, 403, "request came through this proxy\n")
        else:
            body = self._dispatch(request)
        if request.method == b"HEAD":
            request.setHeader(b"Content-Length", b"%d" % (len(body),))
            return b""
        return body

    def _dispatch(self, request: Request) -> bytes:
        path = b"/" + b"/".join(request.postpath)
        route = self.routes.get(path)
        if route is None:
            return respond(request, 404, "not found\n")
        methods, resource = route
        if request.method not in methods:
            request.setHeader(b"Allow", b", ".join(methods))
            return respond(request, 405, "method not allowed\n")
        body: bytes = resource.render(request)
        return body


class BoundedChannel(HTTPChannel):
    """An HTTP connection whose timeout is a deadline for each request, and that logs nothing.

    ``HTTPChannel`` arms its timeout at connect and after each response and
    disarms it once a request is complete; ``TimeoutMixin`` would also push
    it back on every read, which here does nothing.  ``HTTPChannel`` logs
    only its timeouts, one line per connection: silenced, as requests are.
    """

    _log = Logger(observer=lambda event: None)

    def resetTimeout(self) -> None:
        """Reads do not extend the deadline (``TimeoutMixin.resetTimeout``)."""

    def connectionLost(self, reason: object) -> None:
        super().connectionLost(reason)
        self.site.channel_closed()


class QuietSite(Site):
    """A Site that logs nothing per request: no access line, no factory start/stop lines.

    ``name`` prefixes the port's own start and stop lines (``metrics http
    starting on 9091``).  ``timeout`` is each request's deadline (see
    :class:`BoundedChannel`; also how long a response may take to flush
    after it); past ``max_connections`` open connections, new ones are closed
    at accept without a byte read.
    """

    noisy = False
    protocol = BoundedChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        name: str,
        reactor: IReactorTime,
        timeout: float = HTTP_TIMEOUT,
        max_connections: int = HTTP_MAX_CONNECTIONS,
    ) -> None:
        super().__init__(resource, reactor=reactor, timeout=timeout)
        self.name = name
        self.max_connections = max_connections
        #: Connections open now, and those closed at accept for being over the cap.
        self.open_connections = 0
        self.refused_connections = 0
        self._full = False

    def buildProtocol(self, addr: IAddress) -> BoundedChannel | None:  # type: ignore[override]
        """A channel, or None (the port closes the socket unread) when ``max_connections`` are open."""
        if self.open_connections >= self.max_connections:
            self.refused_connections += 1
            if not self._full:
                self._full = True
                log.warn(
                    "{name} http: {count} connections open: closing new ones until some end",
                    name=self.name, count=self.open_connections,
                )
            return None
        channel: BoundedChannel = super().buildProtocol(addr)  # type: ignore[assignment]
        channel.abortTimeout = self.timeOut
        self.open_connections += 1
        return channel

    def channel_closed(self) -> None:
        """A channel's connection is gone."""
        self.open_connections -= 1
        if self.open_connections <= self.max_connections // 2:
            self._full = False  # the next time the cap is reached is logged again

    def logPrefix(self) -> str:
        """The prefix of the listening port's log lines (``Factory.logPrefix``)."""
        return f"{self.name} http"

    def log(self, request: Request) -> None:
        """Write no access-log line (``HTTPFactory.log``)."""
