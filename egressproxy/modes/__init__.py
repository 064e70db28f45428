"""Listener modes, one package each, found by name through ``registry.py``.

``base.py`` holds the front interface (and ``mode: tcp``'s behaviour);
``tcp/``, ``postgres/``, ``http_connect/`` and ``socks5/`` each register a
:class:`~egressproxy.modes.registry.ModeSpec`; ``forward/`` holds what the
two forward proxies share.  This module imports nothing, so importing the
registry never imports a mode.
"""
