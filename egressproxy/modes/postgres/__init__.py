"""``mode: postgres``: the conversation before the splice, in Postgres terms.

The package:

- ``spec.py``: the mode's spec, registered by name; ``options.py`` and
  ``read.py``: its options and how its keys are read and checked;
- ``front.py``: the front (session hooks, saying no), with its two halves
  ``client.py`` (the client's first packets, client TLS) and
  ``upstream.py`` (dialling, the upstream's answers, relaying the startup,
  cancels); ``problems.py``: how it says no, and its bounds;
  ``steps.py``: where the machine waits (``Step``) and its dispatch table
  ``(step, event type) -> handler``;
- ``state.py``: the per-listener state (cancel keys, routed sessions, TLS
  options); ``routing.py``: routes by server name;
- ``pgwire.py`` and ``tlshello.py``: the sans-I/O parsers of the initial
  packets and of the ClientHello.

Design notes
------------

Everything here happens before the splice; once it is made, bytes flow
through ``splice.py`` untouched, with no per-chunk work of this module's.
The front is a small state machine over two sans-I/O parsers (``pgwire``
for the initial packets, ``tlshello`` for the ClientHello), with every
client read bounded in size (``CLIENT_BUFFER_LIMIT``) and time
(``HANDSHAKE_TIMEOUT``), so a slow or silent client cannot hold a slot.

A listener is one of three kinds:

**Routed** (``tls: passthrough`` with ``routes``).  To an SSLRequest the
proxy answers ``S`` itself and reads the ClientHello; a direct-TLS client
(PostgreSQL 17 ``sslnegotiation=direct``) sends the ClientHello at once.
The SNI picks the first matching route (exact name or ``*.suffix``); a name
no route matches is never dialled (flag ``NR``).  Upstream, the proxy sends
its own SSLRequest, requires ``S``, forwards the ClientHello as received and
splices: TLS stays end to end, the proxy never sees plaintext.

**Single cluster** (``tls: passthrough`` with ``cluster``).  The upstream is
dialled first and the client's SSLRequest (or StartupMessage) forwarded;
the server's answer is relayed.  Dialling before answering means that when
the upstream cannot be reached, the client can still be told why.

**Originate** (``tls: originate``).  Clients speak plaintext to the proxy
(``N`` to an SSLRequest), or TLS terminated here with ``client_tls``; the
proxy sends an SSLRequest upstream, requires ``S`` and starts TLS with full
verification (chain against the system store or ``ca_file``, name by
service-identity); there is no fallback to plaintext or unverified TLS.
The server's startup answer is relayed and scanned up to ReadyForQuery for
BackendKeyData, so a later CancelRequest reaches the right server.

**Saying no.**  A client in plaintext (having sent a StartupMessage) gets a
FATAL ErrorResponse naming egressproxy, the upstream and the likely cause,
which psql prints.  A client that asked for TLS gets no ErrorResponse,
because libpq 14+ does not show one sent in answer to an SSLRequest: it
gets ``S``, its ClientHello is read, and the answer is a fatal TLS alert
(``unrecognized_name`` for no route, ``access_denied`` for a refused source,
``internal_error`` for an unreachable upstream or an open breaker).  Clients
are never simply hung up on; the access log and metrics carry the detail.

**SCRAM in originate.**  Channel binding cannot cross a proxy that ends
one TLS session and starts another (see ``pgwire``).  To a plaintext client
the proxy relays the server's SASL mechanism list without
``SCRAM-SHA-256-PLUS``, so libpq picks ``SCRAM-SHA-256``; md5, cleartext and
trust pass unchanged.  To a client on ``client_tls`` the list goes as it
came: a client that then chooses ``-PLUS``, or sends the GS2 flag ``y``
(libpq's default ``channel_binding=prefer`` over TLS when ``-PLUS`` is
missing, which the server refuses as a downgrade), gets a FATAL
ErrorResponse from the proxy that says why and what to do, instead of the
server's "SCRAM channel binding check failed".  A plaintext client with
``channel_binding=require`` is stopped by libpq itself, before the proxy
can say anything ("channel binding is required, but server did not offer
an authentication method that supports channel binding").

**Login outcome.**  Wherever the proxy relays the startup answer
(originate, plaintext single cluster), a login the server refuses is
flagged ``LR:<SQLSTATE>`` (``LR:28P01`` wrong password, ``LR:28000`` no
pg_hba entry, ``LR:3D000`` no such database) and counted per SQLSTATE.

**Cancels.**  A CancelRequest is routed by its key where the proxy saw the
key (originate, and plaintext single-cluster sessions), else forwarded to
the listener's cluster.  On an SNI-routed listener a plaintext
CancelRequest names no server, and the key is hidden inside TLS; it is sent
to the upstream endpoints that the same client source (after any PROXY
header) has live sessions with on that listener, newest first, at most
``MAX_CANCEL_FANOUT`` of them, and never anywhere else.  A server ignores a
key it does not know, so the copies that miss do nothing.  A source with no
live session is refused (``NR``).  A cancel sent over TLS (libpq 17+
``PQcancelCreate``) carries the SNI and is routed like any connection.

Flags: ``NR`` no route (no or unknown SNI; a cancel from a source with no
live session on a routed listener), ``DPE`` a client protocol error, a
handshake timeout, a plaintext startup where TLS is required, or channel
binding asked for through ``originate``; ``LR:<SQLSTATE>`` the server
refused the login; ``UF``/``UT``/``UO`` as for any dial, ``UF`` also for an
upstream that closes before answering, refuses TLS or fails TLS
verification.

Rejected alternative: terminating TLS to read the startup packet in
passthrough mode.  It would put the proxy's certificate in front of every
database and end ``verify-full`` between client and server.
"""
