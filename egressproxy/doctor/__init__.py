"""``egressproxy doctor`` and ``GET /doctor``: which of the usual causes is behind a failing connection.

One symptom ("server closed the connection unexpectedly", 0 bytes in the
access log) has four usual causes: the wrong TLS name, an IPv4-only bind,
an egress address missing from the provider's allowlist, or a wrong
password.  The doctor walks every upstream the config names step by step
(DNS, TCP, the Postgres SSLRequest, TLS, an optional login) and every
listener, and says at which step it fails and what fixes it.

The package, one job per module:

- ``report.py``: the result model (a :class:`~egressproxy.doctor.report.Check`
  per step) and its text and JSON renderings;
- ``targets.py``: what to check, read from the config (cluster endpoints,
  exact route names, ``--name`` for a wildcard route; nothing else);
- ``conn.py``: one probe connection with awaitable reads and TLS;
- ``dns.py``, ``tcp.py``, ``sslrequest.py``, ``tls.py`` (with
  ``certs.py``), ``login.py`` (with ``pgclient.py``), ``listeners.py``,
  ``egress.py``: one step each;
- ``runner.py``: orders the steps (the same runner for the CLI and the
  admin service); ``command.py``: the CLI's reactor glue;
  ``resource.py``: ``GET /doctor``.

This package imports nothing from ``observe.admin`` (admin imports it).
"""
