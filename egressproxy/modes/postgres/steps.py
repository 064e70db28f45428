"""The postgres machine's waiting points, and what each does with each event.

``PostgresMachine.receive`` looks ``(its step, the event's type)`` up in
:data:`TABLE` and calls the handler method named there; a pair not in the
table is ignored.  :data:`COMMON` holds what every step does unless its own
rows say otherwise.  Nothing on the machine stores a callable: its next move
is its :class:`Step`, and the handlers move it on.
"""

from __future__ import annotations

import enum

from egressproxy.datapath.driver import TLSUnavailable
from egressproxy.datapath.handshake import (
    ClientBytes,
    ClientEOF,
    Connected,
    DialFailed,
    TimerFired,
    UpstreamBytes,
    UpstreamEOF,
    UpstreamLost,
)

__all__ = ["COMMON", "Step", "TABLE"]


class Step(enum.Enum):
    """Where the postgres machine waits."""

    #: Reading an initial packet (SSLRequest, GSSENCRequest, startup, cancel, or a direct ClientHello).
    READ_PACKET = "read_packet"
    #: Reading a ClientHello (after answering S, or a direct one) to route it, or to answer it with an alert.
    READ_HELLO = "read_hello"
    #: Reading a direct ClientHello on a listener that takes no TLS from clients, to refuse it.
    READ_HELLO_TO_REFUSE = "read_hello_to_refuse"
    #: A single cluster, an SSLRequest from the client: dialling to ask the server.
    DIAL_FOR_SSL_RELAY = "dial_for_ssl_relay"
    #: Our SSLRequest is sent for the client: its answer is relayed.
    AWAIT_SSL_ANSWER = "await_ssl_answer"
    #: A ClientHello to pass through (routed, or direct TLS): dialling.
    DIAL_FOR_HELLO = "dial_for_hello"
    #: Our SSLRequest is sent ahead of the ClientHello: S, then the splice.
    AWAIT_TLS_ACCEPT_FOR_HELLO = "await_tls_accept_for_hello"
    #: A plaintext StartupMessage for a single cluster: dialling.
    DIAL_FOR_STARTUP = "dial_for_startup"
    #: A StartupMessage to send over our own TLS (originate): dialling.
    DIAL_TO_ORIGINATE = "dial_to_originate"
    #: Originate: our SSLRequest is sent; S, then TLS and the startup.
    ORIGINATE_AWAIT_S = "originate_await_s"
    #: The startup is sent: the server's first answer starts the relay.
    AWAIT_STARTUP_ANSWER = "await_startup_answer"
    #: Relaying the startup phase both ways until ReadyForQuery.
    RELAY = "relay"
    #: A CancelRequest: dialling its backend.
    DIAL_FOR_CANCEL = "dial_for_cancel"
    #: A cancel to a TLS backend: our SSLRequest is sent; S, then TLS and the cancel.
    CANCEL_AWAIT_S = "cancel_await_s"
    #: The cancel is sent: waiting (a while) for the server to hang up.
    CANCEL_SENT = "cancel_sent"
    #: Handed to the splice.
    SPLICED = "spliced"
    #: Closing: nothing more is read.
    DONE = "done"


#: What every step does with an event, unless its rows in TABLE say otherwise.
COMMON: dict[type, str] = {
    ClientBytes: "_hold_client_bytes",  # kept (bounded) for later
    ClientEOF: "_client_eof",
    UpstreamBytes: "_hold_upstream_bytes",  # kept (bounded) for later
    UpstreamEOF: "_upstream_eof",
    DialFailed: "_dial_failed",
    UpstreamLost: "_upstream_lost",
    TLSUnavailable: "_tls_unavailable",
}

_ROWS: dict[tuple[Step, type], str] = {
    # The client's first packets.
    (Step.READ_PACKET, ClientBytes): "_packet_bytes",
    (Step.READ_PACKET, TimerFired): "_client_timed_out",
    (Step.READ_HELLO, ClientBytes): "_hello_bytes",
    (Step.READ_HELLO, TimerFired): "_client_timed_out",
    (Step.READ_HELLO_TO_REFUSE, ClientBytes): "_refused_hello_bytes",
    (Step.READ_HELLO_TO_REFUSE, TimerFired): "_client_timed_out",
    # A single cluster, an SSLRequest from the client.
    (Step.DIAL_FOR_SSL_RELAY, Connected): "_relay_ssl_request",
    (Step.AWAIT_SSL_ANSWER, UpstreamBytes): "_relay_ssl_answer",
    (Step.AWAIT_SSL_ANSWER, TimerFired): "_upstream_timed_out",
    # A ClientHello passed through.
    (Step.DIAL_FOR_HELLO, Connected): "_send_hello_after_ssl_request",
    (Step.AWAIT_TLS_ACCEPT_FOR_HELLO, UpstreamBytes): "_hello_answer",
    (Step.AWAIT_TLS_ACCEPT_FOR_HELLO, TimerFired): "_upstream_timed_out",
    # A StartupMessage: plaintext, or originated over our TLS.
    (Step.DIAL_FOR_STARTUP, Connected): "_send_startup",
    (Step.DIAL_TO_ORIGINATE, Connected): "_originate_ssl_request",
    (Step.ORIGINATE_AWAIT_S, UpstreamBytes): "_originate_answer",
    (Step.ORIGINATE_AWAIT_S, TimerFired): "_upstream_timed_out",
    (Step.AWAIT_STARTUP_ANSWER, UpstreamBytes): "_start_relay",
    (Step.AWAIT_STARTUP_ANSWER, TimerFired): "_upstream_timed_out",
    (Step.RELAY, ClientBytes): "_relay_client_bytes",
    (Step.RELAY, UpstreamBytes): "_relay_upstream_bytes",
    (Step.RELAY, TimerFired): "_startup_timed_out",
    # A CancelRequest.
    (Step.DIAL_FOR_CANCEL, Connected): "_send_cancel",
    (Step.CANCEL_AWAIT_S, UpstreamBytes): "_cancel_answer",
    (Step.CANCEL_AWAIT_S, TimerFired): "_upstream_timed_out",
    (Step.CANCEL_SENT, TimerFired): "_cancel_linger_over",
    # Closing.
    (Step.DONE, ClientBytes): "_ignore",
    (Step.DONE, ClientEOF): "_ignore",
}

#: ``(step, event type) -> handler method name``: every row the machine has.
TABLE: dict[tuple[Step, type], str] = {
    **{(step, event): name for step in Step for event, name in COMMON.items()},
    **_ROWS,
}
