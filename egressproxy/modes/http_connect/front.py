"""``mode: http_connect``: an HTTP forward proxy (CONNECT tunnels, plain http:// requests).

The conversation, for one client connection:

1. Read one request head (``httpreq.HeadParser``: at most 16 KiB, within
   ``HEADER_TIMEOUT`` seconds of admission; else ``431``/``414``/``400``/
   ``408``).  A plain ``http://`` request with a chunked body is read whole
   first, body included, within the same deadline (see *Bodies* below).
2. Find the destination: the authority of ``CONNECT host:port`` (the port
   is required), or of an absolute ``http://host[:port]/...`` target (port
   80 by default).  Anything else is ``400``: this is a proxy, not a server.
3. With ``users`` configured, require ``Proxy-Authorization: Basic`` for
   one of them, else ``407`` with ``Proxy-Authenticate: Basic
   realm="egressproxy"`` (flag ``UAEX``).  ``policy: report`` never skips
   this.
4. Match the destination against ``allow_destinations`` (the user's own
   list if it has one, else the listener's), else ``403`` (flag ``NR``);
   under ``policy: report`` it is dialled anyway, flagged ``RP``.  Nothing
   is dialled before these checks pass.
5. Dial it through the listener's cluster: a refused connect, a name that
   does not resolve or any other failure is ``502``, a connect timeout
   ``504``, an open circuit breaker ``503``.
6. CONNECT: answer ``200 Connection established`` and splice; from then on
   bytes flow untouched (TLS stays end to end between client and origin).

   Plain ``http://``: send the origin the request in origin-form with its
   ``Host`` set from the URL, hop-by-hop and ``Proxy-*`` fields removed and
   ``Connection: close`` added, then the body exactly as received
   (``Content-Length`` or chunked), then splice the origin's response back
   untouched.  **One request per client connection**: keep-alive is honoured
   in the only way that needs no parsing of responses, by asking the origin
   to close after its response, which the client sees as ``Connection:
   close`` and an EOF, so it sends its next request on a new connection.
   Bytes the client sends after the request's body (a pipelined request)
   are dropped, never forwarded: they may carry ``Proxy-Authorization``,
   and they may be meant for another origin.  RFC 9112 section 9.3.2 has
   clients retry those on a new connection.  Once spliced, the body's end
   is found by the client leg's splice filter (``_request_body``, given with
   the ``Splice`` action; splice note 7); the response direction has none and goes untouched.

*Bodies.*  A request whose framing turns out bad must be answered ``400``
with nothing sent upstream, so no bad request ever reaches an origin in
part.  Only a chunked body can turn out bad once its head is read (a
``Content-Length`` body is just that many bytes), so:

- a ``Content-Length`` body streams: it is dialled at once and the body
  follows the head through the splice, at any size, with no copy;
- a chunked body is read and its framing checked whole before anything is
  dialled, then sent with the head in one write.  It must arrive within
  ``HEADER_TIMEOUT`` of admission (else ``408``) and, framing included, fit
  in ``PENDING_LIMIT`` (256 KiB, what a client may deliver before its
  upstream is connected anyway), else ``413``; malformed framing is
  ``400`` (flag ``DPE`` for all three).  Larger uploads send
  ``Content-Length``.

Checking chunk framing only before the first upstream write could not
promise this (a bad chunk may come at any byte), and holding every body
would put a copy and a size limit on the streaming path that needs neither.

Every refusal is answered with a short text body and ``Connection: close``,
then the connection is closed (see ``forward/front.py`` for how).
"""

from __future__ import annotations

from typing import Any

from egressproxy.upstream.addrguard import FLAG as ADDRESS_FLAG
from egressproxy.datapath.handshake import (
    Connected,
    Context,
    DialFailed,
    HoldClient,
    Refuse,
    Splice,
    WriteClient,
    WriteUpstream,
)
from egressproxy.modes.forward.destinations import (
    Destination,
    InvalidDestination,
    authenticate,
    parse_authority,
    parse_basic,
)
from egressproxy.modes.forward.front import ForwardHandshake
from egressproxy.modes.http_connect.httpreq import (
    CONNECTION_ESTABLISHED,
    BodyReader,
    HeadParser,
    RequestError,
    RequestHead,
    body_framing,
    forward_head,
    response,
    split_absolute_http,
)
from egressproxy.datapath.splice import PENDING_LIMIT

__all__ = ["HEADER_TIMEOUT", "HttpConnectMachine"]

#: Seconds a client has to send its whole request head (slowloris bound).
HEADER_TIMEOUT = 10.0

#: The challenge sent with 407.
PROXY_AUTHENTICATE = ("Proxy-Authenticate", 'Basic realm="egressproxy"')

#: What a failed connect tells the client, by the reason upstream.py classified.
_CONNECT_FAILURES = {
    "refused": "connection refused",
    "dns": "the name does not resolve",
    "unreachable": "no route to the destination",
    "timeout": "connect timed out",
}


class HttpConnectMachine(ForwardHandshake):
    """One client connection of an ``http_connect`` listener; see the module docstring."""

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self._parser = HeadParser()
        #: For plain http:// requests: the head to send the origin, the body's
        #: end, and body bytes read before the origin was connected.
        self._origin_head: bytes | None = None
        self._body: BodyReader | None = None
        self._held = b""
        #: A chunked body being read whole before the dial: where it goes.
        self._collecting: Destination | None = None
        #: ``_held`` is the whole body, checked (chunked), rather than what came while dialling.
        self._body_checked = False

    def handshake_timeout(self) -> float:
        return HEADER_TIMEOUT

    def handshake_started(self) -> bool:
        return self._parser.started

    def refuse(self, flag: str, reason: str) -> list[Any]:
        """Admission refused (``RBAC``, ``OM``): answer 403 or 503 and close."""
        status = 403 if flag == "RBAC" else 503
        return [Refuse(answer=response(status, reason), how="close")]

    def handshake_timed_out(self) -> None:
        self.answer_and_close(response(408, f"no complete request within {HEADER_TIMEOUT:g}s"))

    def handshake_received(self, data: bytes) -> None:
        if self._collecting is not None:
            self._collect_body(data)
            return
        try:
            result = self._parser.feed(data)
        except RequestError as e:
            self.refuse_request(response(e.status, e.reason), e.reason)
            return
        if result is not None:
            self._serve(*result)

    # -- policy ---------------------------------------------------------------

    def _serve(self, head: RequestHead, rest: bytes) -> None:
        try:
            if head.method == "CONNECT":
                dest = parse_authority(head.target)
            else:
                authority, origin_form = split_absolute_http(head.target)
                dest = parse_authority(authority, default_port=80)
                framing = body_framing(head)
        except InvalidDestination as e:
            self.refuse_request(response(400, f"bad destination: {e}"), f"bad destination: {e}")
            return
        except RequestError as e:
            self.refuse_request(response(e.status, e.reason), e.reason)
            return
        self.set_upstream_name(str(dest))
        if self.options.users and not self._authenticated(head):
            why = "missing credentials" if not head.values("proxy-authorization") else "wrong credentials"
            self.refuse_credentials(response(407, "proxy credentials required", [PROXY_AUTHENTICATE]), why)
            return
        if not self.destination_allowed(dest, head.method):
            self.refuse_destination(dest, response(403, f"destination {dest} is not allowed"), head.method)
            return
        if head.method == "CONNECT":
            self.end_handshake()
            self.emit(HoldClient(rest))
            self.dial(dest)
            return
        host = f"[{dest.host}]" if ":" in dest.host else dest.host
        if dest.port != 80:
            host += f":{dest.port}"
        self._origin_head = forward_head(head, origin_form, host)
        self._body = BodyReader(framing)
        if framing.length is None:
            # Chunked: read and check the whole body first (module docstring, *Bodies*).
            self._collecting = dest
            self._collect_body(rest)
            return
        self.end_handshake()
        self._held = rest
        # Body bytes wait here (the client is held) until the origin is connected.
        self.dial(dest)

    def _authenticated(self, head: RequestHead) -> bool:
        values = head.values("proxy-authorization")
        if len(values) != 1:
            return False
        credentials = parse_basic(values[0])
        if credentials is None:
            return False
        return self.authenticated(authenticate(self.options.users, *credentials))

    # -- the upstream ---------------------------------------------------------

    def connected(self, event: Connected) -> None:
        if self._origin_head is None:
            self.emit(WriteClient(CONNECTION_ESTABLISHED), Splice())
            return
        self._send_request()

    def dial_failed(self, event: DialFailed) -> None:
        upstream = event.upstream
        if event.flag == ADDRESS_FLAG:
            self.note(f"destination {upstream} {event.detail}")
            self.answer_and_close(response(403, f"destination {upstream} {event.detail}: not allowed"))
            return
        if event.flag == "UO":
            status, detail = 503, "too many connections to this proxy's destinations"
        else:
            status = 504 if event.flag == "UT" else 502
            detail = _CONNECT_FAILURES.get(event.reason, "cannot connect")
        self.answer_and_close(response(status, f"{upstream}: {detail}"))

    # -- plain http:// ----------------------------------------------------------

    def client_while_dialling(self, data: bytes) -> None:
        """Body bytes while the origin connects are held; bytes after a whole chunked body are dropped."""
        if self._body_checked:
            return  # after the request (pipelining): dropped, see the module docstring
        self._held += data
        if len(self._held) > PENDING_LIMIT:
            self.emit(Refuse(how="abort"))

    def _collect_body(self, data: bytes) -> None:
        """A chunk of a chunked body read before the dial: checked, held, dialled once whole."""
        body, dest = self._body, self._collecting
        assert body is not None and dest is not None
        try:
            taken = body.feed(data)
        except RequestError as e:
            self.refuse_request(response(e.status, e.reason), e.reason)
            return
        self._held += data[:taken]
        if len(self._held) > PENDING_LIMIT:
            reason = f"chunked request body larger than {PENDING_LIMIT // 1024} KiB (send Content-Length)"
            self.refuse_request(response(413, reason), reason)
            return
        if not body.done:
            return
        self._collecting = None
        self._body_checked = True
        self.end_handshake()
        # What follows the body (a pipelined request) is dropped; an EOF waits for the splice.
        self.dial(dest)

    def _send_request(self) -> None:
        """Write the rewritten head and the body so far, then splice with the client leg filtered.

        The rest of the body goes through the splice, past the client leg's
        splice filter (:meth:`_request_body`, splice note 7), which ends it
        at the body's last byte; EOF, pressure and closing are the splice's.
        """
        body = self._body
        assert body is not None and self._origin_head is not None
        held, self._held = self._held, b""
        # A chunked body is whole and checked; a Content-Length one cannot be malformed.
        taken = len(held) if self._body_checked else body.feed(held)
        self.emit(WriteUpstream(self._origin_head + held[:taken]), Splice(client_filter=self._request_body))

    def _request_body(self, data: bytes) -> bytes:
        """The client leg's splice filter: the body up to its end; what follows (pipelining) dropped."""
        body = self._body
        assert body is not None
        if body.done:
            return b""
        return data[:body.feed(data)]  # Content-Length: counting only, it cannot fail
