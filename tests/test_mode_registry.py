"""A mode is one package: a whole new mode, defined and registered in this file alone.

``echo`` has its own options class (one key, ``greeting``, read with its own
message), rules, front (say the greeting, then echo every byte), refusal
reason and per-listener state.  It is registered through
``egressproxy.modes.registry`` and unregistered after each test; nothing
under ``egressproxy/`` names it.  The tests load a YAML file with
``mode: echo``, check the messages the reader builds from the registry, and
run the listener on the MemoryReactorClock/StringTransport harness.
"""

from __future__ import annotations

import textwrap
from typing import Any

import attrs
import yaml
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.config import Config, ConfigError, ListenAddress, ListenerConfig, parse_config
from egressproxy.config.context import ListenerKeys
from egressproxy.config.syntax import Path
from egressproxy.modes import registry
from egressproxy.datapath.handshake import ClientBytes, ClientEOF, Close, Count, Flag, WriteClient
from egressproxy.modes.base import Handshake
from egressproxy.modes.registry import ModeKey, ModeOptions, ModeSpec
from tests.helpers import Harness


@attrs.frozen
class EchoOptions(ModeOptions):
    """What an echo listener says first."""

    greeting: str = attrs.field(default="hello", validator=attrs.validators.instance_of(str))


def parse_greeting(text: str) -> str:
    if not text or "\r" in text or "\n" in text:
        raise ValueError(f"expected one non-empty line to greet clients with, got {text!r}")
    return text


def read_greeting(keys: ListenerKeys, node: yaml.Node, path: Path) -> str:
    return keys.r.parsed(node, path, "a greeting", parse_greeting)


def check_echo(keys: ListenerKeys, values: dict[str, Any]) -> None:
    """An echo listener dials nothing, so a cluster would be a mistake."""
    if "cluster" in keys.fields:
        keys.key_broken("cluster", "an echo listener dials nothing; remove cluster")


class EchoState:
    """Per listener: how many clients were greeted."""

    def __init__(self) -> None:
        self.greeted = 0


class EchoFront(Handshake):
    """Say the greeting, then send every byte back until the client's EOF."""

    def start(self) -> list:
        options = self.context.config.options
        assert isinstance(options, EchoOptions)
        state = self.context.state
        assert isinstance(state, EchoState)
        state.greeted += 1
        return [WriteClient(options.greeting.encode() + b"\r\n")]

    def receive(self, event: object) -> list:
        if isinstance(event, ClientEOF):
            return [Close()]
        if not isinstance(event, ClientBytes):
            return []
        if event.data.strip() == b"rude":
            return [Count("rejected", "rude"), Flag("NR"), Close()]
        return [WriteClient(event.data)]


SPEC = ModeSpec(
    name="echo",
    options=EchoOptions,
    handshake=EchoFront,
    keys=(ModeKey("greeting", read_greeting, "hello"),),
    check=check_echo,
    state=EchoState,
    reject_reasons=("rude",),
)

ECHO = """\
listeners:
  - name: echo
    listen: "127.0.0.1:0"
    mode: echo
    greeting: "hi there"
admin: false
metrics: false
"""

CLUSTER = "clusters: [{name: db, endpoints: ['db.example.com:5432']}]\n"


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), "egress.yaml", {})


def errors(text: str) -> tuple[str, ...]:
    try:
        config = parse(text)
    except ConfigError as e:
        return e.errors
    raise AssertionError(f"expected a ConfigError, got {config!r}")


class EchoModeTests(SynchronousTestCase):
    def setUp(self) -> None:
        registry.register(SPEC)
        self.addCleanup(registry.unregister, "echo")

    def test_registered_after_the_built_in_modes(self) -> None:
        """The new mode is known, after the four built-in ones."""
        self.assertTrue(registry.known("echo"))
        self.assertEqual(registry.names(), ("tcp", "postgres", "http_connect", "socks5", "echo"))
        self.assertIs(registry.spec("echo"), SPEC)

    def test_loads(self) -> None:
        """A file with mode: echo gives a listener with the mode's own options."""
        listener = parse(ECHO).listeners[0]
        self.assertEqual((listener.mode, listener.cluster), ("echo", None))
        self.assertEqual(listener.options, EchoOptions(greeting="hi there"))

    def test_default_options(self) -> None:
        """Absent keys take their defaults, in a file and in code."""
        self.assertEqual(parse(ECHO.replace('    greeting: "hi there"\n', "")).listeners[0].options, EchoOptions())
        listen = ListenAddress(":1", "::", 1, True)
        self.assertEqual(ListenerConfig(name="e", listen=listen, mode="echo").options, EchoOptions())

    def test_options_of_another_mode_refused(self) -> None:
        """A listener object cannot carry another mode's options."""
        listen = ListenAddress(":1", "::", 1, True)
        self.assertRaises(TypeError, ListenerConfig, name="e", listen=listen, mode="tcp", options=EchoOptions())

    def test_bad_greeting(self) -> None:
        """The mode's reader words its own message, at the key's line."""
        self.assertEqual(
            errors(ECHO.replace('"hi there"', '"two\\nlines"')),
            ("egress.yaml:5: listeners[0].greeting: expected one non-empty line to greet clients with, "
             "got 'two\\nlines'",),
        )
        self.assertEqual(
            errors(ECHO.replace('"hi there"', "[a, b]")),
            ("egress.yaml:5: listeners[0].greeting: expected a greeting, got a list",),
        )

    def test_rule(self) -> None:
        """The mode's rules apply to its listeners."""
        self.assertEqual(
            errors(ECHO.replace("    mode: echo\n", "    mode: echo\n    cluster: db\n") + CLUSTER),
            ("egress.yaml:5: listeners[0].cluster: an echo listener dials nothing; remove cluster",),
        )

    def test_key_on_another_mode(self) -> None:
        """Its key on a tcp listener names the mode that takes it."""
        text = ECHO.replace("    mode: echo\n", "    cluster: db\n") + CLUSTER
        self.assertEqual(
            errors(text),
            ("egress.yaml:5: listeners[0].greeting: only for mode: echo; this listener has mode: tcp, "
             "the default",),
        )

    def test_unknown_mode_lists_it(self) -> None:
        """The list of modes in messages comes from the registry."""
        self.assertEqual(
            errors(ECHO.replace("mode: echo", "mode: ecko")),
            ("egress.yaml:4: listeners[0].mode: expected tcp, postgres, http_connect, socks5 or echo, got 'ecko'",),
        )

    def test_runs(self) -> None:
        """On the harness: greeted, echoed, closed at EOF, logged."""
        h = Harness(listener=parse(ECHO).listeners[0])
        client, transport = h.connect_client()
        self.assertEqual(transport.value(), b"hi there\r\n")
        client.dataReceived(b"ping\n")
        self.assertEqual(transport.value(), b"hi there\r\nping\n")
        self.assertEqual(h.reactor.tcpClients, [])  # nothing dialled
        client.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        client.connectionLost(Failure(ConnectionDone()))
        [record] = h.records()
        self.assertEqual(
            (record.listener, record.upstream, record.bytes_received, record.bytes_sent), ("echo", "-", 5, 15)
        )

    def test_state_and_refusal_reasons(self) -> None:
        """The spec's state is made once per listener; its refusal reasons start at zero."""
        h = Harness(listener=parse(ECHO).listeners[0])
        self.assertEqual(h.listener.rejected["rude"], 0)
        h.connect_client()
        client, transport = h.connect_client()
        self.assertEqual(h.listener.state().greeted, 2)  # type: ignore[union-attr]
        client.dataReceived(b"rude\n")
        self.assertEqual(h.listener.rejected["rude"], 1)
        self.assertTrue(transport.disconnecting)


class UnregisteredTests(SynchronousTestCase):
    def test_unknown_without_registration(self) -> None:
        """Without its registration, echo is an unknown mode again."""
        self.assertFalse(registry.known("echo"))
        self.assertEqual(
            errors(ECHO),
            (
                "egress.yaml:4: listeners[0].mode: expected tcp, postgres, http_connect or socks5, got 'echo'",
                "egress.yaml:5: listeners[0]: unknown key 'greeting' (expected one of: name, listen, mode, "
                "cluster, log_prefix, allow_sources, max_connections, max_connections_per_source, "
                "proxy_protocol, proxy_protocol_trusted, allow_addresses, deny_addresses, policy, "
                "upstream_connect, tls, require_tls, routes, client_tls, allow_destinations, users, accept_risk)",
            ),
        )

    def test_built_in_modes_stay(self) -> None:
        """Built-in modes cannot be unregistered, nor a name registered twice."""
        self.assertRaises(ValueError, registry.unregister, "tcp")
        self.assertRaises(ValueError, registry.register, registry.spec("tcp"))
