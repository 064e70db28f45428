"""``upstream_connect: on_first_byte`` on tcp listeners: the key, the machine, the front.

Three layers, each alone: the config key (its values and its messages), the
machine (events in, actions out), and the tcp front on a MemoryReactorClock
with StringTransports (``tests.helpers.Harness``), where "dialled" means the
reactor recorded a ``connectTCP``.  The real-socket proof (100 probes, 0
upstream connections; psql through it) is ``tests/integration/test_first_byte.py``.
"""

from __future__ import annotations

import textwrap

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.config import ConfigError, parse_config
from egressproxy.datapath.handshake import (
    ArmTimer, ClientBytes, ClientEOF, Close, Connected, Context, Dial, DialFailed, DisarmTimer, Flag,
    HoldClient, Log, Splice, TimerFired,
)
from egressproxy.datapath.proxyprotocol import HEADER_TIMEOUT
from egressproxy.modes.tcp.front import FIRST_BYTE_TIMEOUT, NO_BYTES, TIMER, TcpMachine
from egressproxy.modes.tcp.options import TcpOptions
from tests.helpers import Harness, listener_config

PEER = IPv4Address("TCP", "192.0.2.1", 50000)

LISTENER = """\
listeners:
  - name: main
    listen: "127.0.0.1:0"
    cluster: db
{extra}
clusters:
  - name: db
    endpoints: ["db.example.com:5432"]
"""


def config_errors(extra: str) -> tuple[str, ...]:
    try:
        parse_config(LISTENER.format(extra=textwrap.indent(extra, "    ")), "egress.yaml", {})
    except ConfigError as e:
        return tuple(e.errors)
    raise AssertionError("the config was accepted")


def first_byte_listener(**overrides):  # type: ignore[no-untyped-def]
    return listener_config(options=TcpOptions(upstream_connect="on_first_byte"), **overrides)


class ConfigTests(SynchronousTestCase):
    """The ``upstream_connect`` key: its values, its default, and what a wrong one says."""

    def test_values(self) -> None:
        for value in ("immediate", "on_first_byte"):
            config = parse_config(LISTENER.format(extra=f"    upstream_connect: {value}"), "egress.yaml", {})
            self.assertEqual(config.listeners[0].options, TcpOptions(upstream_connect=value))

    def test_default_is_immediate(self) -> None:
        config = parse_config(LISTENER.format(extra=""), "egress.yaml", {})
        self.assertEqual(config.listeners[0].options.upstream_connect, "immediate")

    def test_bad_value_names_key_and_choices(self) -> None:
        self.assertEqual(config_errors("upstream_connect: lazy"), (
            "egress.yaml:5: listeners[0].upstream_connect: expected immediate (dial when the client "
            "connects; server-first protocols such as MySQL or SMTP need it) or on_first_byte (dial "
            "once the client has sent a byte), got 'lazy'",
        ))

    def test_only_for_tcp(self) -> None:
        self.assertEqual(config_errors("mode: postgres\nupstream_connect: on_first_byte"), (
            "egress.yaml:6: listeners[0].upstream_connect: only for mode: tcp; this listener has mode: postgres",
        ))


class MachineTests(SynchronousTestCase):
    """The machine alone: no dial before a byte, and ``NB`` for a client that sent none."""

    def machine(self, options: TcpOptions | None = None) -> TcpMachine:
        config = listener_config(**({} if options is None else {"options": options}))
        return TcpMachine(Context(listener=lambda: config, peer=PEER))

    def waiting(self) -> TcpMachine:
        machine = self.machine(TcpOptions(upstream_connect="on_first_byte"))
        self.assertEqual(machine.start(), [ArmTimer(FIRST_BYTE_TIMEOUT, TIMER)])
        return machine

    def test_immediate_dials_at_once(self) -> None:
        machine = self.machine()
        self.assertEqual(machine.start(), [HoldClient(), Dial(hold_client=True)])
        self.assertEqual(machine.receive(Connected()), [Splice()])
        self.assertEqual(machine.ended(), [])

    def test_first_bytes_then_dial(self) -> None:
        machine = self.waiting()
        self.assertEqual(machine.receive(ClientBytes(b"")), [])
        self.assertEqual(
            machine.receive(ClientBytes(b"\x00\x00\x00\x08")),
            [DisarmTimer(TIMER), HoldClient(b"\x00\x00\x00\x08"), Dial(hold_client=True)],
        )
        self.assertEqual(machine.receive(Connected()), [Splice()])
        self.assertEqual(machine.ended(), [])

    def test_dial_failure_after_first_bytes(self) -> None:
        machine = self.waiting()
        machine.receive(ClientBytes(b"x"))
        self.assertEqual(machine.receive(DialFailed("UF", "refused")), [Close()])
        self.assertEqual(machine.ended(), [])

    def test_eof_before_bytes(self) -> None:
        machine = self.waiting()
        self.assertEqual(machine.receive(ClientEOF()), [DisarmTimer(TIMER), Flag(NO_BYTES), Close()])
        self.assertEqual(machine.ended(), [])

    def test_silent_client_times_out(self) -> None:
        machine = self.waiting()
        self.assertEqual(machine.receive(TimerFired("other")), [])
        actions = machine.receive(TimerFired(TIMER))
        self.assertEqual([type(a) for a in actions], [Flag, Log, Close])
        self.assertEqual(actions[0], Flag(NO_BYTES))
        self.assertIn("server-first protocol needs upstream_connect: immediate", actions[1].format)
        self.assertEqual(machine.receive(ClientBytes(b"late")), [])

    def test_gone_before_bytes(self) -> None:
        self.assertEqual(self.waiting().ended(), [Flag(NO_BYTES)])

    def test_refused_at_admission(self) -> None:
        machine = self.machine(TcpOptions(upstream_connect="on_first_byte"))
        self.assertEqual(machine.refuse("RBAC", "source address not allowed"), [Close()])
        self.assertEqual(machine.ended(), [])


class FrontTests(SynchronousTestCase):
    """The tcp front on StringTransports: what is dialled, when, and what reaches the upstream."""

    def setUp(self) -> None:
        self.h = Harness(listener=first_byte_listener())

    def settle(self, *pairs) -> None:  # type: ignore[no-untyped-def]
        """A closing StringTransport never finishes: finish it, as the reactor would."""
        for leg, transport in pairs:
            if not leg.lost and transport.disconnecting:
                leg.connectionLost(Failure(ConnectionDone()))

    def assertUntouched(self, h: Harness) -> None:
        """Nothing dialled, and nothing the cluster counts (failures, breaker, totals) moved."""
        cluster = h.cluster
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual(sum(cluster.connect_failures.values()), 0, cluster.connect_failures)
        self.assertEqual((cluster.connections_total, cluster.breaker.pending, cluster.breaker.active), (0, 0, 0))
        self.assertEqual(cluster.breaker.overflows, 0)
        for state in cluster.endpoints.values():
            self.assertEqual((state.connect_failures, state.healthy), (0, None))

    def test_no_dial_before_first_byte(self) -> None:
        client, ct = self.h.connect_client()
        self.h.reactor.advance(FIRST_BYTE_TIMEOUT / 2)
        self.assertUntouched(self.h)
        self.assertEqual(ct.producerState, "producing")
        client.dataReceived(b"S")
        self.assertEqual(len(self.h.reactor.tcpClients), 1)

    def test_first_bytes_forwarded_in_order(self) -> None:
        client, ct = self.h.connect_client()
        client.dataReceived(b"first ")
        # Read in the same turn as the first bytes, before the pause took effect.
        client.dataReceived(b"second ")
        up, ut = self.h.accept_upstream()
        self.assertEqual(ut.value(), b"first second ")
        client.dataReceived(b"third")
        self.assertEqual(ut.value(), b"first second third")
        up.dataReceived(b"reply")
        self.assertEqual(ct.value(), b"reply")
        client.readConnectionLost()
        up.readConnectionLost()
        self.settle((client, ct), (up, ut))
        [record] = self.h.records()
        self.assertEqual((record.bytes_received, record.bytes_sent, record.flags), (18, 5, ()))
        self.assertEqual(record.upstream, "db.egress.test:5432")

    def test_backpressure_while_dialling(self) -> None:
        """The client is not read while the upstream connects, and is again once joined."""
        client, ct = self.h.connect_client()
        client.dataReceived(b"hello")
        self.assertEqual(ct.producerState, "paused")
        self.h.accept_upstream()
        self.assertEqual(ct.producerState, "producing")

    def test_close_before_data(self) -> None:
        """EOF before a byte: nothing dialled, nothing counted against the cluster, flag NB."""
        client, ct = self.h.connect_client()
        client.readConnectionLost()
        self.assertTrue(ct.disconnecting)
        self.settle((client, ct))
        [record] = self.h.records()
        self.assertEqual((record.upstream, record.bytes_received, record.flags), ("-", 0, (NO_BYTES,)))
        self.assertUntouched(self.h)
        self.assertEqual(self.h.reactor.getDelayedCalls(), [])

    def test_reset_before_data(self) -> None:
        """A reset before a byte (how some checkers hang up): DC,NB, and nothing dialled."""
        client, _ = self.h.connect_client()
        client.connectionLost(Failure(ConnectionLost()))
        [record] = self.h.records()
        self.assertEqual((record.upstream, record.flags), ("-", ("DC", NO_BYTES)))
        self.assertUntouched(self.h)

    def test_silent_client_closed_after_timeout(self) -> None:
        """No byte within FIRST_BYTE_TIMEOUT: closed, flag NB, one warning naming the fix."""
        logged: list[dict] = []
        self.h.listener.log = Logger(observer=logged.append)  # type: ignore[misc]
        client, ct = self.h.connect_client(PEER)
        self.h.reactor.advance(FIRST_BYTE_TIMEOUT - 0.1)
        self.assertFalse(ct.disconnecting)
        self.h.reactor.advance(0.2)
        self.assertTrue(ct.disconnecting)
        self.settle((client, ct))
        [record] = self.h.records()
        self.assertEqual((record.upstream, record.flags), ("-", (NO_BYTES,)))
        self.assertUntouched(self.h)
        [warning] = logged
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertEqual(
            formatEvent(warning),
            "direct: closed 192.0.2.1:50000: no byte within 10s (upstream_connect: on_first_byte; "
            "a server-first protocol needs upstream_connect: immediate)",
        )

    def test_immediate_still_dials_on_accept(self) -> None:
        h = Harness()
        _, ct = h.connect_client()
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertEqual(ct.producerState, "paused")

    def test_after_a_proxy_header(self) -> None:
        """On a proxy_protocol listener, the bytes after the header are the first bytes."""
        h = Harness(listener=first_byte_listener(proxy_protocol=True))
        client, ct = h.connect_client()
        client.dataReceived(b"PROXY TCP4 198.51.100.7 192.0.2.9 40000 5432\r\n")
        h.reactor.advance(HEADER_TIMEOUT + 1)
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertFalse(ct.disconnecting)
        client.dataReceived(b"startup")
        _, ut = h.accept_upstream()
        self.assertEqual(ut.value(), b"startup")

    def test_header_only_is_no_bytes(self) -> None:
        h = Harness(listener=first_byte_listener(proxy_protocol=True))
        client, ct = h.connect_client()
        client.dataReceived(b"PROXY TCP4 198.51.100.7 192.0.2.9 40000 5432\r\n")
        client.readConnectionLost()
        self.settle((client, ct))
        [record] = h.records()
        self.assertEqual((record.downstream, record.flags), ("198.51.100.7:40000", (NO_BYTES,)))
        self.assertEqual(h.reactor.tcpClients, [])
