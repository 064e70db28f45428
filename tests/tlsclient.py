"""Real TLS ClientHellos for tests, made by OpenSSL through pyOpenSSL's memory BIO."""

from __future__ import annotations

from OpenSSL import SSL


def client_hello(server_name: bytes | None = b"a.db.egress.test", alpn: list[bytes] | None = None) -> bytes:
    """The wire bytes of the ClientHello OpenSSL sends with this SNI and ALPN."""
    context = SSL.Context(SSL.TLS_METHOD)
    if alpn:
        context.set_alpn_protos(alpn)
    connection = SSL.Connection(context, None)
    if server_name is not None:
        connection.set_tlsext_host_name(server_name)
    connection.set_connect_state()
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    return connection.bio_read(65536)
