"""A small lab network for tests: several hosts on one switch, all in namespaces.

:class:`~tests.integration.netns.NetNS` gives one isolated host whose
addresses are all local to it.  Tests about what crosses a network (which
source address a database sees, an allowlist that admits one host and not
another, two proxy Machines behind a load balancer) need several hosts that
reach each other and nothing else.  A :class:`Lab` is that:

- a *switch* namespace holding a Linux bridge;
- any number of *hosts*, each a :class:`NetNS` joined to the bridge by a veth
  pair, with the addresses the test chooses on one shared subnet
  (``10.77.0.0/24`` and ``fd77::/64`` by default);
- optionally a ``nameserver`` per host (its ``resolv.conf``), so a test's own
  DNS server on one host answers the others.

Nothing is routed out: the lab has no default route and no link to the
machine's own namespace, so every packet stays among the test's hosts.

Teardown (:meth:`Lab.close`) closes every host (stopping its processes by
pid) and then the switch; deleting a namespace deletes its veth ends.  Like
``NetNS.create``, :meth:`Lab.create` raises ``unittest.SkipTest`` naming the
reason where namespaces cannot be made.
"""

from __future__ import annotations

import ipaddress
import itertools
from typing import Iterable

from tests.integration.netns import NetNS, _ip

_counter = itertools.count(1)


class Lab:
    """A switch and the hosts joined to it; see the module notes."""

    def __init__(self, switch: NetNS, prefix4: int, prefix6: int) -> None:
        self.switch = switch
        self.hosts: list[NetNS] = []
        self.prefix4 = prefix4
        self.prefix6 = prefix6

    @classmethod
    def create(cls, prefix4: int = 24, prefix6: int = 64) -> "Lab":
        """A new, empty lab: the switch namespace with its bridge up."""
        switch = NetNS.create()
        try:
            switch._in("link", "add", "br0", "type", "bridge")
            switch._in("link", "set", "br0", "up")
        except BaseException:
            switch.close()
            raise
        return cls(switch, prefix4, prefix6)

    def host(self, addresses: Iterable[str], nameserver: str | None = None) -> NetNS:
        """A new host on the switch holding ``addresses`` (IPv4 and/or IPv6, no prefix).

        The addresses are given the lab's prefix lengths, so every host on
        the same subnet reaches the others directly.
        """
        host = NetNS.create(nameserver=nameserver)
        self.hosts.append(host)
        number = next(_counter)
        inside, outside = "eth0", f"lab{number}"
        made = _ip("link", "add", outside, "netns", self.switch.name, "type", "veth",
                   "peer", "name", inside, "netns", host.name)
        if made.returncode != 0:
            raise RuntimeError(f"veth pair for {host.name}: {made.stderr.strip()}")
        self.switch._in("link", "set", outside, "master", "br0")
        self.switch._in("link", "set", outside, "up")
        host.interface, host.interface_kind = inside, "veth"
        for address in addresses:
            ip = ipaddress.ip_address(address)
            if ip.version == 4:
                host._in("addr", "add", f"{ip}/{self.prefix4}", "dev", inside)
            else:
                host._in("-6", "addr", "add", f"{ip}/{self.prefix6}", "dev", inside, "nodad")
            host.addresses.append(str(ip))
        host._in("link", "set", inside, "up")
        return host

    def close(self) -> None:
        """Close every host, then the switch."""
        for host in reversed(self.hosts):
            host.close()
        self.switch.close()

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
