"""``egressproxy tunnel``: the app-side half, run inside a consumer app.

The egress app holds the static IPs; this package runs next to the app that
needs them, so the app keeps its ordinary connection strings.  For each
destination (``db.example.com:5432``) it listens on a local address and
carries every connection through the egress app, over SOCKS5 to a
``socks5`` listener (which enforces its allowlist) or straight to a
``tcp``/``postgres`` listener, trying the ``--via`` paths in order.

The modules, one job each:

- ``parse.py``: the text forms (``socks5://USER:PASSWORD@HOST:PORT``,
  ``HOST:PORT``, ``${ENV}`` expansion) and the optional config file;
- ``options.py``: the command line and environment, combined into
  :class:`~egressproxy.tunnel.options.TunnelOptions`;
- ``socks.py``: the SOCKS5 client handshake, sans-I/O (RFC 1928/1929);
- ``dial.py``: one attempt over one path, ending in a leg ready to splice;
- ``failover.py``: the order paths are tried in, and the attempts of one
  connection across them;
- ``connection.py``: one local connection, from accept to its log line
  (the bytes path is ``egressproxy.datapath.splice``, shared with the proxy);
- ``logline.py``: the ``TUNNEL`` line and the tunnel's own messages;
- ``listeners.py``: which local address and port serve each destination;
- ``hostsfile.py``: the ``/etc/hosts`` entries of ``--transparent``;
- ``child.py``: the wrapped COMMAND and the signals passed to it;
- ``check.py``: ``--check``, one dial per destination;
- ``run.py``: the process: set-up in order, undo on every way out;
- ``command.py``: arguments to exit status, shared by ``egressproxy tunnel``
  (``app/cli.py``) and the single-file ``egressproxy-tunnel``, whose entry
  is ``__main__.py``.
"""
