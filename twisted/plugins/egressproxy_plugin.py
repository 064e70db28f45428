"""twistd plugin: ``twistd -n egressproxy --config FILE``.

This folder deliberately has no ``__init__.py``: ``twisted.plugins`` is a
namespace that Twisted scans.
"""

from twisted.application.service import ServiceMaker

egressproxy = ServiceMaker(
    "egressproxy",
    "egressproxy.app.tap",
    "Egress proxy: static egress IPs for IP-allowlisted databases and APIs.",
    "egressproxy",
)
