"""A TLS upstream leg for the compiled relay: ``tls: originate`` at TCP speed.

With ``tls: originate`` the proxy itself is the TLS client towards the
server, through Twisted's TLS layer (``TLSMemoryBIOProtocol``: a pyOpenSSL
``Connection`` with memory BIOs).  Left in Python, every record of a spliced
session passes through the interpreter twice (decrypt, encrypt).  The
relay can instead carry such a pair itself, calling SSL_read/SSL_write on
that same SSL object on its own thread (see ``egressproxy/_relaytls.h``).

Two parts here:

- :func:`enable`, once per relay start: the relay must call the OpenSSL
  that pyOpenSSL uses (the one ``cryptography`` bundles, not the system's
  libssl), so it is given that library's function addresses, taken from
  pyOpenSSL's cffi ``lib`` (``ffi.cast("uintptr_t", lib.SSL_read)``).  When a
  function or a pyOpenSSL/Twisted name is missing, TLS legs are not
  relayed (the reason is in the relay's start-up line) and take the Python
  path as before.
- :func:`qualifies` and :func:`take`, at each hand-off of a session whose
  upstream leg is TLS (``relayjoin.hand_off``).

What the hand-off must move out of Twisted's TLS layer, in order, and how:

- Decrypted bytes not yet delivered: none.  Twisted delivers what it
  decrypts at once (``_flushReceiveBIO`` reads until OpenSSL wants input),
  and what the SSL object still holds (a partial record in the read BIO,
  decrypted bytes not read) stays in the SSL object, which the relay reads
  first.
- Plaintext written but not yet encrypted: Twisted's ``BufferingTLSTransport``
  aggregates small writes until the next reactor turn (``_aggregator``); it
  is flushed now and its scheduled flush cancelled.  The bytes the client
  leg held before the splice (``Leg.pending``) are written through the TLS
  layer too, so that everything owed to the server is ciphertext.
- Ciphertext queued for the socket: the TCP transport's ``dataBuffer``, as
  for plain legs (``relayjoin._owed``): the relay sends it first.
- Plaintext held because the TLS layer was handshaking or waiting for a
  read (``_appSendBuffer``): not transferable (it needs the TLS layer's
  own retry); the hand-off declines, and also when the handshake is not
  done, a TLS shutdown has begun (either way), the layer was aborted or
  lost, or a producer is registered on it.

Declining is always safe: the session is joined in Python as before.

After the hand-off nothing in Python touches the ``Connection`` again: the
relay holds a reference to it (so the SSL object is not freed) until it has
reported the pair ended; Twisted's TLS layer is given an inert stand-in
(:class:`_Handed`: the hand-off often runs inside its receive loop, which
would otherwise call into the SSL object once more, racing the relay
thread), and the ``Connection``'s app data (Twisted's TLS protocol) is
dropped so the rest of Twisted's objects for that socket are freed.

Rejected: kernel TLS (kTLS).  It would leave the relay's plain path
unchanged, but this kernel offers no ``tls`` ULP and the proxy cannot load
modules; a memory-BIO relay works wherever pyOpenSSL does.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.protocols.tls import TLSMemoryBIOProtocol

#: What :func:`qualifies` reads on Twisted's TLS protocol and pyOpenSSL's ``Connection``.
_TLS_PROTOCOL_NAMES = ("_handshakeDone", "_lostTLSConnection", "_aborted", "_producer")
_CONNECTION_NAMES = ("_ssl", "_into_ssl", "_from_ssl", "get_shutdown", "set_app_data")


def _library() -> tuple[Any, Any]:
    """pyOpenSSL's cffi library and its ffi (the OpenSSL its SSL objects belong to)."""
    from OpenSSL._util import ffi, lib

    return lib, ffi


def _address(lib: Any, ffi: Any, name: str) -> int:
    """The address of ``lib``'s function ``name``; raises AttributeError when it lacks it."""
    return int(ffi.cast("uintptr_t", getattr(lib, name)))


def enable(module: Any) -> str:
    """Give ``module`` (``egressproxy._relay``) pyOpenSSL's OpenSSL: "" when TLS legs can be relayed, else why not."""
    names, setup = getattr(module, "TLS_FUNCTIONS", None), getattr(module, "tls_setup", None)
    if names is None or setup is None:
        return "this build of the relay has no TLS side"
    try:
        lib, ffi = _library()
    except ImportError as e:
        return f"pyOpenSSL cannot be imported: {e}"
    functions, missing = {}, []
    for name in names:
        try:
            functions[name] = _address(lib, ffi, name)
        except (AttributeError, TypeError):
            missing.append(name)
    option = getattr(lib, "SSL_OP_NO_RENEGOTIATION", None)
    if not isinstance(option, int):
        missing.append("SSL_OP_NO_RENEGOTIATION")
    if missing:
        return "pyOpenSSL's OpenSSL lacks " + ", ".join(missing)
    probe = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    lacking = [f"OpenSSL.SSL.Connection.{n}" for n in _CONNECTION_NAMES if not hasattr(probe, n)]
    lacking += [f"twisted.protocols.tls.TLSMemoryBIOProtocol.{n}" for n in _TLS_PROTOCOL_NAMES
                if not hasattr(TLSMemoryBIOProtocol, n)]
    if lacking:
        return "the hand-off needs " + ", ".join(lacking)
    try:
        setup(functions, option)
    except (KeyError, ValueError, TypeError, OverflowError) as e:
        return f"tls_setup failed: {e}"
    return ""


def qualifies(transport: Any) -> bool:
    """Whether a TLS transport's TLS layer is in a state the relay can take over (module notes)."""
    tls = getattr(transport, "protocol", None)
    if not isinstance(tls, TLSMemoryBIOProtocol):
        return False
    connection = getattr(tls, "_tlsConnection", None)
    if connection is None or not tls._handshakeDone or tls._lostTLSConnection or tls._aborted:
        return False
    if tls.disconnecting or tls._producer is not None or getattr(tls, "_appSendBuffer", True):
        return False
    if getattr(connection, "_into_ssl", None) is None or getattr(connection, "_from_ssl", None) is None:
        return False
    return connection.get_shutdown() == 0


def take(transport: Any, plaintext: list[bytes]) -> tuple[int, int, int, Any] | None:
    """Encrypt what is owed to the server and give ``add(tls_b=...)``'s tuple; None: decline.

    ``plaintext`` (the client leg's ``pending``) is written through the TLS
    layer either way, so the caller must not write it again.  The ciphertext
    lands in the TCP transport's buffer, which the caller hands over.
    """
    tls = transport.protocol
    for chunk in plaintext:
        tls.write(chunk)
    aggregator = getattr(tls, "_aggregator", None)
    if aggregator is not None:
        scheduled = getattr(aggregator, "_scheduled", None)
        if scheduled is not None:
            if scheduled.active():
                scheduled.cancel()
            aggregator._scheduled = None
        aggregator.flush()
    if tls._appSendBuffer or tls._lostTLSConnection:
        return None
    connection = tls._tlsConnection
    _, ffi = _library()

    def address(pointer: Any) -> int:
        return int(ffi.cast("uintptr_t", pointer))

    return (address(connection._ssl), address(connection._into_ssl), address(connection._from_ssl), connection)


class _Handed:
    """Twisted's TLS layer's ``Connection`` once the relay has the real one: it never has input.

    The hand-off usually runs inside Twisted's own receive loop
    (``_flushReceiveBIO``: the bytes that finish a Postgres login are
    delivered from there), which calls ``recv`` again, then ``bio_read``,
    once the hand-off returns.  Done on the real SSL object those calls
    would race the relay thread; here they find nothing, and any other use
    fails loudly instead of touching the relay's SSL object.
    """

    def recv(self, size: int) -> bytes:
        raise SSL.WantReadError()

    def bio_read(self, size: int) -> bytes:
        raise SSL.WantReadError()

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"the compiled relay owns this TLS connection (asked for {name})")


def release(transport: Any) -> None:
    """Right after a successful ``add``: Twisted's TLS layer lets go of the ``Connection`` (module notes).

    It stops its receive loop and sees a stand-in from now on; the
    ``Connection`` (kept alive by the relay) no longer keeps Twisted's objects alive.
    """
    tls = transport.protocol
    connection = tls._tlsConnection
    tls._lostTLSConnection = True
    tls._tlsConnection = _Handed()
    connection.set_app_data(None)
