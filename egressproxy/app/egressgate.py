"""Stop listening while the egress address is unexpected, so the platform routes elsewhere.

``/ready`` answering 503 only helps where the load balancer asks ``/ready``
(HAProxy, Kubernetes).  Fly's proxy routes by the *service* checks, and a
service check runs against the service's own port: for a ``tcp`` service,
a connection that is accepted passes.  A Machine whose egress address is
not in ``expected_egress_ips`` (it has not picked up the app's static egress
IP yet, or it runs in a region without one) would therefore keep taking
traffic that the database then refuses.

With ``egress_ip_check: {when_unexpected: close_listeners}`` (the default)
this gate closes every data listener's socket as soon as STUN reports an
address that is not expected, so connections (Fly's checks included) are
refused at once and Fly's proxy tries another Machine; it binds them again
when the address is expected.  What it does not do:

- close live connections (they were made before; the database decides);
- close anything while the address is merely *unknown* (no STUN answer):
  a STUN outage must not take the egress down, so that only turns
  ``/ready`` 503 (and is logged);
- touch the admin and metrics services, which keep answering, ``/ready``
  with the reason.

While a listener is closed its entry in ``service.ports`` is a
:class:`ClosedPort`, which remembers the address it had: a drain or reload
that stops it finds a port to stop, and reopening binds the same address
(also when the config said port 0).  A bind that fails on reopening (the
port was taken meanwhile) is logged and retried every check interval.
Each worker process (``workers: N``) runs its own check and gate for its
own sockets.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger

from egressproxy.app.listen import ListenError
from egressproxy.observe.egressip import EgressIpWatch


class ClosedPort:
    """Stands in ``service.ports`` for a listener the gate closed: stopping it is a no-op."""

    def __init__(self, address: IAddress) -> None:
        self.address = address

    def getHost(self) -> IAddress:
        return self.address

    def stopListening(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class EgressGate:
    """Closes and reopens one service's data listeners as the egress verdict changes."""

    log = Logger()

    def __init__(self, service: Any, retry_interval: float) -> None:
        self.service = service
        self.retry_interval = retry_interval
        #: True while the listeners are (meant to be) closed.
        self.closed = False
        self._retry: Any = None

    def changed(self, watch: EgressIpWatch) -> None:
        """The watch's callback: close on an unexpected address, reopen on an expected one."""
        if watch.ready:
            self.open()
        elif watch.seen is not None:
            self.close(watch.seen)

    def enforce(self) -> None:
        """After a reload bound new listeners: close them too while the gate is closed."""
        if self.closed:
            self._close_all()

    def close(self, seen: str) -> None:
        if self.closed or self.service.draining:
            return
        self.closed = True
        names = self._close_all()
        if names:
            self.log.warn(
                "egress address {seen} is unexpected: stopped listening on {names} until it is expected, "
                "so connections and the platform's checks go to another Machine",
                seen=seen, names=", ".join(names),
            )

    def _close_all(self) -> list[str]:
        closed = []
        for name, port in list(self.service.ports.items()):
            if isinstance(port, ClosedPort):
                continue
            self.service.ports[name] = ClosedPort(port.getHost())
            port.stopListening()
            closed.append(name)
        return closed

    def open(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if not self.closed or self.service.draining:
            self.closed = False
            return
        failed = []
        for name, port in list(self.service.ports.items()):
            if not isinstance(port, ClosedPort):
                continue
            runtime = self.service.listeners[name]
            try:
                self.service.ports[name] = self.service._bind_listener(runtime, _same_address(runtime, port))
            except ListenError as e:
                failed.append(str(e))
        self.service._tune_listening_sockets()
        if failed:
            self.log.error("egress address expected again, but {failed}; retrying in {interval:g}s",
                           failed="; ".join(failed), interval=self.retry_interval)
            self._retry = self.service.reactor.callLater(self.retry_interval, self.open)
            return
        self.closed = False
        self.log.info("egress address is expected: listening again")


def _same_address(runtime: Any, port: ClosedPort) -> Any:
    """The listener's listen address with the port it really had (a config's port 0 included)."""
    listen = runtime.config.listen
    actual = getattr(port.address, "port", None)
    if listen.host is None or actual is None or listen.port == actual:
        return listen
    return attrs.evolve(listen, port=actual)
