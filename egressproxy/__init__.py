"""egressproxy: one small hop with a static egress IP between Fly apps and
IP-allowlisted databases and APIs."""

__version__ = "0.1.0"
