"""``mode: socks5``: a SOCKS5 proxy (RFC 1928) for CONNECT only.

- ``spec.py``: the mode's spec (keys, rules, machine), registered by name;
- ``front.py``: the conversation, as a pure machine (see its notes);
- ``socks.py``: the sans-I/O wire format.

The keys and the policy are the forward proxies' (``modes/forward``).
"""
