"""The public address this Machine egresses from, learnt with STUN, against the expected ones.

Managed databases admit the app's static egress IPs only.  A Machine that
has not (yet) been given one of them, or egresses from another region's,
would accept clients and fail every connection with a timeout that looks
like an allowlist problem, because it is one.  So with
``expected_egress_ips`` set, the proxy asks a STUN server (RFC 5389 Binding
request over UDP) which address its packets come from, every
``egress_ip_check.interval``; while that address is not expected, ``/ready``
answers 503 naming it, and Fly's proxy sends no traffic here.

Message encoding and decoding come from the maintained ``aioice`` package
(its ``stun`` module, as used by aiortc); the transport is Twisted UDP.  A
probe sends one Binding request per server, retransmitted after 0.5, 1 and 2
seconds (RFC 5389's doubling RTO, bounded), and takes the first response
whose transaction id matches and which carries XOR-MAPPED-ADDRESS (or the
older MAPPED-ADDRESS).  Anything else a UDP socket receives is ignored.

What this does not do: NAT type discovery, TURN, or any check of a path
other than the one to the STUN server (the database's path may differ if
routing differs; on Fly all egress from a Machine leaves through one
address per family).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: Retransmission delays of one probe (RFC 5389 section 7.2.1: RTO doubling).
RETRANSMIT = (0.5, 1.0, 2.0)
#: How long one probe waits for any answer in all.
PROBE_TIMEOUT = 4.0


class ProbeFailed(Exception):
    """No STUN server gave an answer; the message says what was tried."""


def _stun() -> Any:
    """aioice's STUN module, loaded when first needed.

    It brings asyncio and more (about 4 MiB per worker); a proxy without
    ``egress_ip_check`` never needs it.
    """
    from aioice import stun  # noqa: PLC0415

    return stun


def binding_request() -> tuple[bytes, bytes]:
    """A Binding request and its transaction id."""
    stun = _stun()
    message = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    return bytes(message), message.transaction_id


def mapped_address(data: bytes, transaction_id: bytes) -> str | None:
    """The address a Binding success response for ``transaction_id`` reports, else None.

    Never raises: the bytes come from the network.
    """
    stun = _stun()
    try:
        message = stun.parse_message(data)
    except Exception:  # malformed input of any shape: not an answer
        return None
    if message.transaction_id != transaction_id:
        return None
    if message.message_method != stun.Method.BINDING or message.message_class != stun.Class.RESPONSE:
        return None
    found = message.attributes.get("XOR-MAPPED-ADDRESS") or message.attributes.get("MAPPED-ADDRESS")
    if not found:
        return None
    try:
        return str(ipaddress.ip_address(found[0]))
    except ValueError:
        return None


class _Probe(DatagramProtocol):
    """One Binding transaction with one server: retransmitted, bounded, then closed."""

    def __init__(self, reactor: IReactorTime, address: tuple[str, int]) -> None:
        self.reactor = reactor
        self.address = address
        self.request, self.transaction_id = binding_request()
        # Cancelling (the watch stopping) ends the transaction: timers and socket.
        self.deferred: defer.Deferred[str] = defer.Deferred(lambda _: self._end())
        self._calls: list[Any] = []

    def startProtocol(self) -> None:
        self._send()
        for delay in RETRANSMIT:
            self._calls.append(self.reactor.callLater(delay, self._send))
        self._calls.append(self.reactor.callLater(PROBE_TIMEOUT, self._give_up))

    def _send(self) -> None:
        if self.transport is not None:
            try:
                self.transport.write(self.request, self.address)
            except OSError:
                pass  # unreachable now; a retransmission may do better, the timeout ends it

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if addr[:2] != self.address[:2]:
            return
        seen = mapped_address(data, self.transaction_id)
        if seen is not None:
            self._end()
            self.deferred.callback(seen)

    def _give_up(self) -> None:
        self._end()
        self.deferred.errback(ProbeFailed(f"no STUN answer from {self.address[0]}:{self.address[1]} "
                                          f"within {PROBE_TIMEOUT:g}s"))

    def _end(self) -> None:
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        if self.transport is not None:
            self.transport.stopListening()


async def probe(reactor: Any, host: str, port: int) -> str:
    """Our public address as the STUN server ``host:port`` sees it (raises ProbeFailed)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            host = await reactor.resolve(host)
        except Exception as e:
            raise ProbeFailed(f"{host}: {e}") from None
        ip = ipaddress.ip_address(host)
    attempt = _Probe(reactor, (str(ip), port))
    udp: IReactorUDP = reactor
    udp.listenUDP(0, attempt, interface="::" if ip.version == 6 else "0.0.0.0")
    return await attempt.deferred


async def first_answer(reactor: Any, servers: Sequence[tuple[str, int]]) -> str:
    """The address the first answering server reports, trying ``servers`` in order."""
    errors = []
    for host, port in servers:
        try:
            return await probe(reactor, host, port)
        except ProbeFailed as e:
            errors.append(str(e))
    raise ProbeFailed("; ".join(errors) or "no STUN server configured")


class EgressIpWatch:
    """Probes the egress address every ``interval`` and says whether it is expected.

    ``ready`` is what ``/ready`` asks: True without ``expected`` (no check
    configured), else only while the address last seen is one of them.
    ``on_change`` hears every change of that verdict or address.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        servers: Sequence[tuple[str, int]],
        expected: frozenset[str] | None,
        interval: float,
        on_change: Callable[[EgressIpWatch], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.servers = tuple(servers)
        self.expected = expected
        self.interval = interval
        self.on_change = on_change
        #: The address last learnt, and the last error (None after a success).
        self.seen: str | None = None
        self.error: str | None = None
        self.checked_at: float | None = None
        self._loop: LoopingCall | None = None
        self._current: defer.Deferred[None] | None = None

    @property
    def ready(self) -> bool:
        return self.expected is None or (self.seen is not None and self.seen in self.expected)

    def reason(self) -> str:
        """Why the proxy is not ready, in words fit for /ready and the log."""
        if self.ready:
            return "ok"
        if self.seen is None:
            return f"egress address not known yet ({self.error or 'first check pending'})"
        return (f"egress address {self.seen} is not in expected_egress_ips "
                f"({', '.join(sorted(self.expected or ()))})")

    def start(self) -> None:
        if self.expected is None or self._loop is not None:
            return
        self._loop = LoopingCall(self._check_now)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True)

    def _check_now(self) -> defer.Deferred[None]:
        self._current = defer.ensureDeferred(self.check())
        return self._current

    def stop(self) -> None:
        """Stop probing; a probe in flight is abandoned, its socket closed at once."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._current is not None and not self._current.called:
            self._current.cancel()
        self._current = None

    async def check(self) -> None:
        """One probe; logs once per change of address or verdict."""
        before = (self.seen, self.ready)
        try:
            self.seen = await first_answer(self.reactor, self.servers)
            self.error = None
        except ProbeFailed as e:
            self.error = str(e)
        except defer.CancelledError:
            return
        self.checked_at = self.reactor.seconds()
        if (self.seen, self.ready) == before:
            return
        if self.ready:
            self.log.info("egress address {seen} is expected: ready", seen=self.seen)
        elif self.seen is not None:
            self.log.warn(
                "egress address {seen} is not in expected_egress_ips: not ready; allowlist {seen} at the "
                "provider and add it to expected_egress_ips, or give this Machine the app's static egress IP "
                "(fly ips allocate-egress)", seen=self.seen,
            )
        if self.on_change is not None:
            self.on_change(self)
