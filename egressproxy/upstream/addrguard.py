"""Which addresses the proxy may dial for a destination a client chose.

An allowlist judges names; DNS decides where a name goes.  Whoever controls
DNS for an allowed name (or an allowlist a little too wide) could otherwise
point it at ``127.0.0.1``, the cloud metadata address or the private network
the proxy lives in, and use the proxy as a way in.  So for every
client-chosen destination (``http_connect``, ``socks5``, and Postgres routes
whose upstream is a ``{sni}`` template) the dial works like this:

1. resolve the name once (A and AAAA, through the reactor's resolver);
2. judge every answer with :meth:`AddressPolicy.refusal`;
3. connect only to answers that passed, by address: there is no second
   lookup between the check and the connect, so a rebinding DNS server
   cannot swap the answer in between.

What is refused: the internal ranges of ``internal.py`` (loopback,
private, link-local, unique-local, ...) unless the listener lists them in
``allow_addresses``; anything in ``deny_addresses``, always; and the proxy's
own listening sockets, always, whatever the lists say (:class:`OwnSockets`).
The operator's explicit choices are honoured: a ``hosts:`` pin, and an IP
literal the client asked for that an IP/CIDR entry of ``allow_destinations``
admits, are dialled without the internal-range check (never to the proxy's
own sockets).

Dials the operator configured (cluster endpoints, named-cluster routes) are
not resolved here; they are still refused after connecting if they reached
one of the proxy's own sockets (``dial.py``), which ends the loop a
``PG_HOST=127.0.0.1`` behind a ``:5432`` listener would make.
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Callable, Iterable

import attrs

from egressproxy.upstream.internal import IPAddress, IPNetwork, internal_class

#: Metric reasons (``rejected``/``reported``) and the access-log flag of a refused address.
REASON_INTERNAL = "internal_address"
REASON_OWN = "own_address"
FLAG = "IA"


class AddressRefused(Exception):
    """Every address of a destination was refused; ``reason`` and ``what`` say why, for logs and clients."""

    def __init__(self, reason: str, what: str) -> None:
        super().__init__(what)
        self.reason = reason
        self.what = what


def normal_ip(ip: IPAddress) -> IPAddress:
    """``ip`` with an IPv4-mapped IPv6 address unmapped (as sockets report IPv4 peers on dual-stack)."""
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@attrs.frozen
class AddressPolicy:
    """A listener's address rules: ``allow_addresses`` and ``deny_addresses``."""

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    #: ``policy: report``: dial what would be refused, and say so (never for the proxy's own sockets).
    report: bool = False

    def refusal(self, ip: IPAddress) -> str | None:
        """Why ``ip`` may not be dialled (the class, for messages), or None if it may."""
        ip = normal_ip(ip)
        if any(ip.version == n.version and ip in n for n in self.deny):
            return "an address this listener denies"
        if any(ip.version == n.version and ip in n for n in self.allow):
            return None
        label = internal_class(ip)
        if label is None:
            return None
        article = "an" if label[0] in "aeiouAEIOU" else "a"
        return f"{article} {label} address"


def is_local_address(ip: IPAddress) -> bool:
    """Whether ``ip`` is an address of this machine (loopback, unspecified, or bindable here)."""
    ip = normal_ip(ip)
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET if isinstance(ip, IPv4Address) else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # Binding succeeds only for an address one of our interfaces has.
            probe.bind((str(ip), 0))
    except OSError:
        return False
    return True


class OwnSockets:
    """The proxy's own listening sockets (listeners, admin, metrics), read live from the service.

    ``bound`` returns ``(host, port)`` pairs as the sockets report them; a
    wildcard host (``::``, ``0.0.0.0``) stands for every local address.
    """

    def __init__(self, bound: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self._bound = bound

    def includes(self, ip: IPAddress, port: int) -> bool:
        """Whether ``ip:port`` would reach one of the proxy's own listening sockets."""
        ip = normal_ip(ip)
        local: bool | None = None
        for host, bound_port in self._bound():
            if bound_port != port:
                continue
            if ip.is_unspecified:
                return True  # connecting to 0.0.0.0 or :: reaches this machine, whatever the bind
            try:
                bound_ip = normal_ip(ip_address(host.split("%", 1)[0]))
            except ValueError:
                continue
            if bound_ip.is_unspecified:
                if local is None:
                    local = is_local_address(ip)
                if local:
                    return True
            elif bound_ip == ip:
                return True
        return False


#: Nobody's sockets: for clusters made outside a service (tests, tools).
NO_SOCKETS = OwnSockets(lambda: ())


class DialGuard:
    """What one dial must respect: the listener's policy (None: operator-chosen) and the proxy's sockets.

    In report mode a policy refusal is kept in ``reported`` instead, and the
    address passes.
    """

    def __init__(self, policy: AddressPolicy | None, own: OwnSockets = NO_SOCKETS) -> None:
        self.policy = policy
        self.own = own
        self.reported: AddressRefused | None = None

    def check(self, ip: IPAddress, port: int) -> AddressRefused | None:
        """The refusal for dialling ``ip:port``, or None."""
        if self.own.includes(ip, port):
            return AddressRefused(REASON_OWN, "is one of this proxy's own listening sockets")
        if self.policy is not None:
            refused = self.policy.refusal(ip)
            if refused is not None:
                refusal = AddressRefused(REASON_INTERNAL, f"resolves to {refused}")
                if not self.policy.report:
                    return refusal
                self.reported = self.reported or refusal
        return None

    def filter(self, ips: list[IPAddress], port: int) -> tuple[list[IPAddress], AddressRefused | None]:
        """The addresses that pass, in order; and the first refusal, for when none does."""
        passed: list[IPAddress] = []
        first: AddressRefused | None = None
        for ip in ips:
            refused = self.check(ip, port)
            if refused is None:
                if ip not in passed:
                    passed.append(ip)
            elif first is None:
                first = refused
        return passed, first
