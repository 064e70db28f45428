"""Pure tests of the postgres machine's steps: bytes in, actions out, no reactor."""

from __future__ import annotations

import struct
from types import SimpleNamespace

from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.addresses import peer_ip
from egressproxy.config import Address
from egressproxy.datapath.handshake import (
    Abort, ArmTimer, ClientBytes, Close, CloseUpstream, Connected, Context, Count, Dial, DisarmTimer, Flag, Log,
    SendCopy, Splice, StartUpstreamTLS, TimerFired, UpstreamBytes, UpstreamLost, WriteClient, WriteUpstream,
)
from egressproxy.modes.postgres import pgwire
from egressproxy.modes.postgres.front import HANDLERS, PostgresMachine
from egressproxy.modes.postgres.options import PostgresOptions, PostgresRoute
from egressproxy.modes.postgres.pgwire import CancelKey
from egressproxy.modes.postgres.problems import HANDSHAKE_TIMEOUT, STARTUP_TIMEOUT
from egressproxy.modes.postgres.state import CANCEL_LINGER, CancelTarget, PostgresListenerState
from egressproxy.modes.postgres.steps import TABLE, Step
from tests.helpers import listener_config
from tests.test_pgwire import STARTUP, message, parse_error

PEER = IPv4Address("TCP", "192.0.2.1", 50000)
DB = Address("db.egress.test", 5432)
KEY_DATA = message(b"K", struct.pack("!ii", 4242, 77))
READY = message(b"Z", b"I")
AUTH_OK = message(b"R", struct.pack("!i", 0))


class _Cluster:
    name = "pg"
    config = SimpleNamespace(tls=None)


def sasl_initial(mechanism: bytes, data: bytes) -> bytes:
    return message(b"p", mechanism + b"\x00" + struct.pack("!i", len(data)) + data)


class PostgresStepsTests(SynchronousTestCase):
    def machine(self, cluster: object = None, **options: object) -> PostgresMachine:
        config = listener_config(mode="postgres", cluster=cluster, options=PostgresOptions(**options))  # type: ignore[arg-type]
        self.state = PostgresListenerState()
        self.cluster = _Cluster()
        machine = PostgresMachine(Context(listener=lambda: config, peer=PEER, cluster=self.cluster, state=self.state))
        self.assertEqual(machine.start(), [ArmTimer(HANDSHAKE_TIMEOUT, "postgres")])
        self.assertIs(machine._step, Step.READ_PACKET)
        return machine

    def originated(self) -> PostgresMachine:
        """An originate session up to the server's first answer (SSLRequest, S, TLS, the startup)."""
        machine = self.machine(cluster="pg", tls="originate")
        self.assertEqual(machine.receive(ClientBytes(STARTUP)), [DisarmTimer("postgres"), Dial(self.cluster, None, False)])
        self.assertIs(machine._step, Step.DIAL_TO_ORIGINATE)
        actions = machine.receive(Connected(address=DB, cluster=self.cluster))
        self.assertEqual(actions, [WriteUpstream(pgwire.SSL_REQUEST), ArmTimer(HANDSHAKE_TIMEOUT, "postgres")])
        self.assertIs(machine._step, Step.ORIGINATE_AWAIT_S)
        self.assertEqual(machine.receive(UpstreamBytes(b"S")), [
            DisarmTimer("postgres"), StartUpstreamTLS("db.egress.test", None), WriteUpstream(STARTUP),
            ArmTimer(HANDSHAKE_TIMEOUT, "postgres"),
        ])
        self.assertIs(machine._step, Step.AWAIT_STARTUP_ANSWER)
        return machine

    def test_table_resolves(self) -> None:
        """Every row of the table names a handler method; every step has rows."""
        self.assertEqual(set(HANDLERS), set(TABLE))
        self.assertEqual({step for step, _ in TABLE}, set(Step))
        for handler in HANDLERS.values():
            self.assertTrue(callable(handler))

    def test_originate(self) -> None:
        """-PLUS leaves the SASL list for a plaintext client; the key is registered; ReadyForQuery splices."""
        machine = self.originated()
        offered = pgwire.sasl_request(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
        self.assertEqual(machine.receive(UpstreamBytes(offered)), [
            DisarmTimer("postgres"), ArmTimer(STARTUP_TIMEOUT, "postgres"),
            WriteClient(pgwire.sasl_request(["SCRAM-SHA-256"])),
        ])
        self.assertIs(machine._step, Step.RELAY)
        choice = sasl_initial(b"SCRAM-SHA-256", b"n,,n=,r=abc")
        self.assertEqual(machine.receive(ClientBytes(choice[:5])), [])  # held until whole, then checked
        self.assertEqual(machine.receive(ClientBytes(choice[5:])), [WriteUpstream(choice)])
        self.assertEqual(machine.receive(UpstreamBytes(AUTH_OK + KEY_DATA)), [WriteClient(AUTH_OK + KEY_DATA)])
        self.assertEqual(machine.receive(UpstreamBytes(READY + b"more")), [  # relayed as it came
            WriteClient(READY + b"more"), DisarmTimer("postgres"), Splice(client=b"", upstream=b""),
        ])
        self.assertIs(machine._step, Step.SPLICED)
        [(key, target)] = self.state.backend_keys.items()
        self.assertEqual(key.pid, 4242)
        self.assertEqual((target.address, target.tls), (DB, True))
        machine.ended()
        self.assertEqual(self.state.backend_keys, {})

    def test_channel_binding_refused(self) -> None:
        """A client choosing SCRAM-SHA-256-PLUS through originate: DPE, an ErrorResponse, both legs ended."""
        machine = self.originated()
        machine.receive(UpstreamBytes(pgwire.sasl_request(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])))
        actions = machine.receive(ClientBytes(sasl_initial(b"SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=x")))
        self.assertEqual(actions[:2], [Flag("DPE"), Count("rejected", "channel_binding")])
        self.assertIsInstance(actions[2], Log)
        [write] = [a for a in actions if isinstance(a, WriteClient)]
        self.assertIn("channel binding", parse_error(write.data)["M"])
        self.assertEqual(actions[-3:], [CloseUpstream(), DisarmTimer("postgres"), Close()])
        self.assertFalse([a for a in actions if isinstance(a, WriteUpstream)])
        self.assertIs(machine._step, Step.DONE)
        self.assertEqual(machine.receive(ClientBytes(b"more")), [])

    def test_startup_timeout(self) -> None:
        """The relay's timer: DI, both legs dropped."""
        machine = self.originated()
        machine.receive(UpstreamBytes(AUTH_OK))
        self.assertEqual(machine.receive(TimerFired("postgres")), [Flag("DI"), Abort()])

    def test_tls_failure(self) -> None:
        """TLS with the server fails: UF counted as tls, a FATAL ErrorResponse naming the failure, close."""
        machine = self.originated()
        actions = machine.receive(UpstreamLost(tls_failure="certificate verify failed"))
        self.assertEqual(actions[:3], [DisarmTimer("postgres"), Flag("UF"), Count("connect_failure", "tls")])
        [write] = [a for a in actions if isinstance(a, WriteClient)]
        fields = parse_error(write.data)
        self.assertEqual(fields["C"], pgwire.SQLSTATE_CANNOT_CONNECT)
        self.assertIn("TLS with db.egress.test:5432 failed: certificate verify failed", fields["M"])
        self.assertEqual(actions[-1], Close())
        self.assertIs(machine._step, Step.DONE)

    def test_cancel_routed_by_source(self) -> None:
        """A routed listener's plaintext cancel: copies to older endpoints, the newest dialled, then linger and close."""
        machine = self.machine(routes=(PostgresRoute(sni="*.db.egress.test", upstream="{sni}:5432"),))
        old, new = Address("a.db.egress.test", 5432), Address("b.db.egress.test", 5432)
        source = peer_ip(PEER)
        self.state.add_routed(source, object(), CancelTarget(self.cluster, old))  # type: ignore[arg-type]
        self.state.add_routed(source, object(), CancelTarget(self.cluster, new))  # type: ignore[arg-type]
        cancel = pgwire.cancel_request(CancelKey(4242, struct.pack("!i", 77)))
        self.assertEqual(machine.receive(ClientBytes(cancel)), [
            DisarmTimer("postgres"), SendCopy(self.cluster, old, cancel, CANCEL_LINGER), Dial(self.cluster, (new,), False),
        ])
        self.assertIs(machine._step, Step.DIAL_FOR_CANCEL)
        self.assertEqual(machine.receive(Connected(address=new, cluster=self.cluster)), [
            WriteUpstream(cancel), ArmTimer(CANCEL_LINGER, "postgres"),
        ])
        self.assertIs(machine._step, Step.CANCEL_SENT)
        self.assertEqual(machine.receive(UpstreamLost()), [])  # the server hung up: the session ends
        self.assertEqual(machine.receive(TimerFired("postgres")), [Close()])
        self.assertIs(machine._step, Step.DONE)

    def test_cancel_from_unknown_source(self) -> None:
        """No live routed session from this source: NR, closed, nothing dialled."""
        machine = self.machine(routes=(PostgresRoute(sni="*.db.egress.test", upstream="{sni}:5432"),))
        actions = machine.receive(ClientBytes(pgwire.cancel_request(CancelKey(1, b"\x00\x00\x00\x01"))))
        self.assertEqual(actions[:3], [DisarmTimer("postgres"), Flag("NR"), Count("rejected", "no_route")])
        self.assertEqual(actions[-1], Close())
