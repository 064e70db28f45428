"""The configuration: frozen attrs objects for everything a config file says, and its reader.

Every key of the design's configuration is supported: the listener modes
(``tcp``, ``postgres``, ``http_connect``, ``socks5``; each mode's own keys
are read and checked by its package, see ``modes.registry``), ``tls`` on
clusters, and the operations keys (``admin``, ``metrics``, ``drain_timeout``,
``shutdown_delay``, ``proxy_protocol``, ``health_check``, ``workers``,
``fast_path``). A key of one mode on a listener of another is an error, not
ignored, and the forward proxies need ``allow_destinations``: none is ever
open to every destination. Passwords are never quoted in a message.
Relative file paths are taken from the working directory. Not supported:
YAML merge keys (``<<``). Interpolation applies to string values only,
never to keys.

Both doors, :func:`load_config` and :func:`parse_config`, report every
problem at once in a single :class:`ConfigError`, each line shaped
``FILE:LINE: key.path: message``.

It does not own what the values mean at run time: it does not resolve names,
bind or connect sockets, install a resolver for ``hosts:`` or build Twisted
endpoints (the listener and cluster modules do that from these objects). It
does not read ``os.environ`` itself; callers pass the mapping in, so tests and
reloads decide which environment a file is read against.

The modules:

- ``model.py``: the attrs classes; ``checks.py`` their field validators;
- ``syntax.py`` and ``parse.py``: the text parsers (names, ports, durations,
  endpoints, listen addresses);
- ``yamlnodes.py`` and ``reader.py``: the YAML loader and the generic node
  reader with its converters;
- ``load.py``: the two doors and the top level; ``listeners.py``,
  ``clusters.py`` and ``settings.py``: one reader per section;
  ``context.py``: what they gather, and what a mode's reader is given;
  ``crosscheck.py``: the checks that need the whole file.
"""

from __future__ import annotations

from egressproxy.config.load import load_config, parse_config
from egressproxy.config.model import (
    DEFAULT_ADMIN,
    DEFAULT_METRICS,
    AccessLogConfig,
    Address,
    ClusterConfig,
    ClusterTLS,
    Config,
    ConfigError,
    HealthCheckConfig,
    HttpServiceConfig,
    Keepalive,
    ListenAddress,
    ListenerConfig,
)
from egressproxy.config.parse import parse_duration
from egressproxy.modes.registry import MODES

__all__ = [
    "AccessLogConfig",
    "Address",
    "ClusterConfig",
    "ClusterTLS",
    "Config",
    "ConfigError",
    "DEFAULT_ADMIN",
    "DEFAULT_METRICS",
    "HealthCheckConfig",
    "HttpServiceConfig",
    "Keepalive",
    "ListenAddress",
    "ListenerConfig",
    "MODES",
    "load_config",
    "parse_config",
    "parse_duration",
]
