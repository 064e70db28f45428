"""``mode: http_connect``: an HTTP forward proxy (CONNECT tunnels, plain http:// requests).

- ``spec.py``: the mode's spec (keys, rules, front), registered by name;
- ``front.py``: the conversation (see its notes);
- ``httpreq.py``: the sans-I/O request parser.

The keys and the policy are the forward proxies' (``modes/forward``).
"""
