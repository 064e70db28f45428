"""What the two forward-proxy modes (``http_connect``, ``socks5``) share.

- ``rules.py``: the allowlist rule and user models; ``options.py``: their
  options; ``parse.py`` and ``read.py``: how their keys are read and
  checked (``allow_destinations``, ``users``, ``accept_risk``, with
  ``allowlint``'s judgement of allowlists);
- ``destinations.py``: the run-time policy (normal form of a destination,
  allowlist match, credentials);
- ``front.py``: the front both build on (handshake deadline, policy before
  any dial, report mode, saying no).

This is not a mode: nothing here registers one.  This module imports
nothing, so ``allowlint`` may name the rule type without importing a mode.
"""
