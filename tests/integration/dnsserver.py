"""A tiny authoritative DNS server for tests, answering from a JSON zone file.

Run it inside a test's network namespace::

    python -m tests.integration.dnsserver --zone ZONE.json --listen 127.0.0.1:53 [--log FILE]

The zone maps names to lists of IP addresses: exact names
(``"db.partner.example": ["10.0.0.5"]``, an address in the netns) and wildcards
(``"*.partner.example": [...]``, which match any name strictly below the
suffix; an exact name wins over a wildcard).  IPv4 addresses answer ``A``
queries, IPv6 ones ``AAAA`` (``::ffff:127.0.0.1`` too: it is an AAAA record).

- A name in the zone gets its records of the asked type (none: an empty
  NOERROR answer, so a resolver asking A and AAAA gets what exists).
- Any other name gets NXDOMAIN.  There is no recursion and nothing is ever
  forwarded: the server sends packets only back to whoever asked.

It serves UDP and TCP on the same address, prints ``ready HOST:PORT`` on
stdout once both are bound, and appends ``QTYPE NAME RCODE ANSWERS`` per
query to ``--log``.  It is bounded: queries are read up to 4 KiB (UDP) or
one length-prefixed message of at most 64 KiB (TCP), a TCP client gets
5 s, at most 32 TCP clients are served at once, and ``--max-seconds``
(default 600) ends the server by itself.  SIGTERM ends it at once.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

TTL = 5
MAX_TCP_CLIENTS = 32
TCP_CLIENT_SECONDS = 5.0


class Zone:
    """Names (exact and ``*.suffix``) to their addresses."""

    def __init__(self, mapping: dict[str, list[str]]) -> None:
        self.exact: dict[dns.name.Name, list[str]] = {}
        self.wild: list[tuple[dns.name.Name, list[str]]] = []
        for key, ips in mapping.items():
            for ip in ips:
                ipaddress.ip_address(ip)  # a bad zone fails at start, not per query
            if key.startswith("*."):
                self.wild.append((dns.name.from_text(key[2:]), list(ips)))
            else:
                self.exact[dns.name.from_text(key)] = list(ips)
        # The longest suffix wins among wildcards.
        self.wild.sort(key=lambda item: -len(item[0]))

    def lookup(self, name: dns.name.Name) -> list[str] | None:
        """The addresses of ``name``, or None when it is not in the zone."""
        name = name.canonicalize()
        if name in self.exact:
            return self.exact[name]
        for suffix, ips in self.wild:
            if name != suffix and name.is_subdomain(suffix):
                return ips
        return None


def answer(zone: Zone, wire: bytes) -> tuple[bytes | None, str]:
    """The response to the query ``wire`` (None for garbage), and a log line."""
    try:
        query = dns.message.from_wire(wire)
    except Exception as e:  # noqa: BLE001 - any malformed packet is dropped
        return None, f"- malformed {type(e).__name__}"
    response = dns.message.make_response(query)
    response.flags &= ~dns.flags.RA  # no recursion offered
    response.flags |= dns.flags.AA
    if len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
        return response.to_wire(), "- FORMERR"
    question = query.question[0]
    qtype = dns.rdatatype.to_text(question.rdtype)
    ips = zone.lookup(question.name)
    if ips is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire(), f"{qtype} {question.name} NXDOMAIN -"
    wanted = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(question.rdtype)
    records = [ip for ip in ips if wanted is not None and ipaddress.ip_address(ip).version == wanted]
    if records:
        response.answer.append(dns.rrset.from_text_list(
            question.name, TTL, dns.rdataclass.IN, question.rdtype, [str(ipaddress.ip_address(ip)) for ip in records]
        ))
    return response.to_wire(), f"{qtype} {question.name} NOERROR {','.join(records) or '-'}"


def split_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def serve(zone: Zone, host: str, port: int, log_path: str | None, max_seconds: float) -> None:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.bind((host, port))
    tcp = socket.socket(family, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((host, port))
    tcp.listen(16)
    for s in (udp, tcp):
        s.setblocking(False)
    log = open(log_path, "a", encoding="utf-8", buffering=1) if log_path else None
    selector = selectors.DefaultSelector()
    selector.register(udp, selectors.EVENT_READ, "udp")
    selector.register(tcp, selectors.EVENT_READ, "accept")
    clients: dict[socket.socket, tuple[bytearray, float]] = {}
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    print(f"ready {host}:{port}", flush=True)
    end = time.monotonic() + max_seconds

    def note(line: str) -> None:
        if log is not None:
            log.write(line + "\n")

    def drop(client: socket.socket) -> None:
        selector.unregister(client)
        clients.pop(client, None)
        client.close()

    while not stopping and time.monotonic() < end:
        for key, _ in selector.select(timeout=0.5):
            kind: Any = key.data
            if kind == "udp":
                try:
                    wire, peer = udp.recvfrom(4096)
                except BlockingIOError:
                    continue
                reply, line = answer(zone, wire)
                note(f"udp {line}")
                if reply is not None:
                    udp.sendto(reply, peer)
            elif kind == "accept":
                try:
                    client, _ = tcp.accept()
                except BlockingIOError:
                    continue
                if len(clients) >= MAX_TCP_CLIENTS:
                    client.close()
                    continue
                client.setblocking(False)
                clients[client] = (bytearray(), time.monotonic() + TCP_CLIENT_SECONDS)
                selector.register(client, selectors.EVENT_READ, "tcp")
            else:
                client = key.fileobj  # type: ignore[assignment]
                buffer, _deadline = clients[client]
                try:
                    data = client.recv(65537)
                except OSError:
                    data = b""
                if not data:
                    drop(client)
                    continue
                buffer += data
                if len(buffer) >= 2:
                    (length,) = struct.unpack("!H", buffer[:2])
                    if len(buffer) >= 2 + length:
                        reply, line = answer(zone, bytes(buffer[2:2 + length]))
                        note(f"tcp {line}")
                        if reply is not None:
                            client.setblocking(True)
                            client.settimeout(TCP_CLIENT_SECONDS)
                            try:
                                client.sendall(struct.pack("!H", len(reply)) + reply)
                            except OSError:
                                pass
                        drop(client)
        now = time.monotonic()
        for client, (_, deadline) in list(clients.items()):
            if now > deadline:
                drop(client)
    for client in list(clients):
        drop(client)
    udp.close()
    tcp.close()
    if log is not None:
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--zone", required=True, help="JSON file: name or *.suffix -> list of IP addresses")
    parser.add_argument("--listen", default="127.0.0.1:53", help="HOST:PORT for UDP and TCP")
    parser.add_argument("--log", help="append one line per query here")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop by itself after this long")
    args = parser.parse_args(argv)
    with open(args.zone, encoding="utf-8") as f:
        zone = Zone(json.load(f))
    host, port = split_listen(args.listen)
    serve(zone, host, port, args.log, args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
