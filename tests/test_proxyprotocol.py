"""Unit tests of PROXY protocol: the header parser, and sessions on a proxy_protocol listener."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.datapath.proxyprotocol import (
    HEADER_TIMEOUT,
    V1_MAX_LINE,
    V2_MAX_HEADER,
    HeaderParser,
    InvalidProxyHeader,
    ProxyHeader,
)
from tests.helpers import Harness, listener_config

#: Written out here rather than imported, so a wrong constant cannot pass.
SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"

#: The balancer's address: the TCP peer every test client really has.
BALANCER = IPv6Address("TCP", "fdaa:0:1::2", 61000)


def v1(source: str = "203.0.113.7", destination: str = "10.0.0.1", sport: int = 50123, dport: int = 5432,
       protocol: str | None = None) -> bytes:
    """A v1 line, CRLF included."""
    if protocol is None:
        protocol = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {protocol} {source} {destination} {sport} {dport}\r\n".encode()


def v2(source: str = "203.0.113.7", destination: str = "10.0.0.1", sport: int = 50123, dport: int = 5432,
       command: int = 0x1, fam: int | None = None, tlvs: bytes = b"", length: int | None = None) -> bytes:
    """A v2 header built field by field: signature, ver/cmd, fam, length, addresses, TLVs."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    if fam is None:
        fam = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", sport, dport) + tlvs
    return SIGNATURE + struct.pack("!BBH", 0x20 | command, fam, len(block) if length is None else length) + block


def parse(data: bytes) -> tuple[ProxyHeader, bytes] | None:
    return HeaderParser().feed(data)


def parse_bytewise(data: bytes) -> tuple[ProxyHeader, bytes] | None:
    """Feed one byte at a time; the first answer, with the bytes not yet fed appended."""
    parser = HeaderParser()
    for i in range(len(data)):
        result = parser.feed(data[i : i + 1])
        if result is not None:
            header, rest = result
            return header, rest + data[i + 1 :]
    return None


class V1ParserTests(SynchronousTestCase):
    def test_tcp4(self) -> None:
        """A TCP4 line gives IPv4 source and destination and the bytes after the CRLF."""
        header, rest = parse(v1() + b"hello")  # type: ignore[misc]
        self.assertEqual(header, ProxyHeader(
            1, IPv4Address("TCP", "203.0.113.7", 50123), IPv4Address("TCP", "10.0.0.1", 5432)))
        self.assertEqual(rest, b"hello")

    def test_tcp6(self) -> None:
        """A TCP6 line gives IPv6 addresses, written in their compressed form."""
        header, _rest = parse(v1("2001:DB8:0:0::7", "fdaa::1"))  # type: ignore[misc]
        self.assertEqual(header.source, IPv6Address("TCP", "2001:db8::7", 50123))
        self.assertEqual(header.destination, IPv6Address("TCP", "fdaa::1", 5432))

    def test_unknown_keeps_real_peer(self) -> None:
        """UNKNOWN, with or without the optional fields, names no address."""
        for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n",
                     b"PROXY UNKNOWN \xff anything\r\n"):
            self.assertEqual(parse(line), (ProxyHeader(1, None, None), b""), line)

    def test_split_anywhere(self) -> None:
        """A line delivered one byte at a time parses as when delivered whole."""
        data = v1("2001:db8::7", "::1") + b"after"
        self.assertEqual(parse_bytewise(data), parse(data))

    def test_incomplete_waits(self) -> None:
        """A line without its CRLF yet is neither accepted nor refused."""
        self.assertIsNone(parse(v1()[:-1]))
        self.assertIsNone(parse(b"PROX"))

    def test_longest_line_accepted(self) -> None:
        """The spec's worst case, exactly V1_MAX_LINE bytes, is accepted."""
        full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        line = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
        self.assertEqual(len(line), V1_MAX_LINE)
        self.assertEqual(parse(line), (ProxyHeader(1, None, None), b""))

    def test_no_crlf_within_limit(self) -> None:
        """V1_MAX_LINE bytes without a CRLF are refused, whatever follows."""
        with self.assertRaises(InvalidProxyHeader):
            parse(b"PROXY UNKNOWN " + b"x" * (V1_MAX_LINE - 14) + b"\r\n")
        with self.assertRaises(InvalidProxyHeader):
            parse(b"PROXY TCP4 " + b"1" * 200)

    def test_strict_fields(self) -> None:
        """Malformed lines are refused rather than half understood."""
        bad = [
            b"PROXY TCP4 203.0.113.07 10.0.0.1 1 2\r\n",      # leading zero in an address
            b"PROXY TCP4 203.0.113.7 10.0.0.1 01 2\r\n",      # leading zero in a port
            b"PROXY TCP4 203.0.113.7 10.0.0.1 65536 2\r\n",   # port out of range
            b"PROXY TCP4 203.0.113.7 10.0.0.1 -1 2\r\n",
            b"PROXY TCP4 203.0.113.7  10.0.0.1 1 2\r\n",      # two spaces
            b"PROXY TCP4 203.0.113.7 10.0.0.1 1 2 \r\n",      # trailing space
            b"PROXY TCP4 203.0.113.7 10.0.0.1 1\r\n",         # a field missing
            b"PROXY TCP4 2001:db8::7 ::1 1 2\r\n",            # family mismatch
            b"PROXY TCP6 203.0.113.7 10.0.0.1 1 2\r\n",
            b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",           # zone index
            b"PROXY tcp4 203.0.113.7 10.0.0.1 1 2\r\n",       # lower case
            b"PROXY UDP4 203.0.113.7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 1 2\n\r\n",     # a lone LF
            b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 \xd9\xa1 2\r\n",  # a non-ASCII digit
            b"PROXY \r\n",
        ]
        for line in bad:
            with self.assertRaises(InvalidProxyHeader, msg=line):
                parse(line)

    def test_refused_at_first_wrong_byte(self) -> None:
        """Bytes that cannot start a header are refused at once, not at the timeout."""
        for data in (b"G", b"PROXZ", b"\x00\x00\x00\x08", b"\x16\x03\x01", b"\r\n\r\n\x00X"):
            with self.assertRaises(InvalidProxyHeader, msg=data):
                parse(data)

    def test_message_does_not_quote_peer_bytes(self) -> None:
        """An error message names the problem without repeating what the peer sent."""
        with self.assertRaises(InvalidProxyHeader) as caught:
            parse(b"PROXY TCP4 evil\x1b[2J 10.0.0.1 1 2\r\n")
        self.assertNotIn("evil", str(caught.exception))


class V2ParserTests(SynchronousTestCase):
    def test_tcp4(self) -> None:
        """A PROXY TCP4 header gives its addresses and the bytes after it."""
        header, rest = parse(v2() + b"hello")  # type: ignore[misc]
        self.assertEqual(header, ProxyHeader(
            2, IPv4Address("TCP", "203.0.113.7", 50123), IPv4Address("TCP", "10.0.0.1", 5432)))
        self.assertEqual(rest, b"hello")

    def test_tcp6(self) -> None:
        """A PROXY TCP6 header gives IPv6 addresses."""
        header, _rest = parse(v2("2001:db8::7", "fdaa::1"))  # type: ignore[misc]
        self.assertEqual(header.source, IPv6Address("TCP", "2001:db8::7", 50123))

    def test_tlvs_skipped(self) -> None:
        """TLVs after the addresses belong to the header and are skipped."""
        tlvs = b"\x05\x00\x04abcd" + b"\x04\x00\x00"
        header, rest = parse(v2(tlvs=tlvs) + b"data")  # type: ignore[misc]
        self.assertEqual((header.source, rest), (IPv4Address("TCP", "203.0.113.7", 50123), b"data"))

    def test_local_keeps_real_peer(self) -> None:
        """LOCAL names no address, whatever its address block holds."""
        self.assertEqual(parse(SIGNATURE + b"\x20\x00\x00\x00"), (ProxyHeader(2, None, None), b""))
        self.assertEqual(parse(v2(command=0x0, fam=0xFF)), (ProxyHeader(2, None, None), b""))

    def test_other_families_keep_real_peer(self) -> None:
        """UNSPEC, UDP and AF_UNIX are valid but not carried: no address."""
        for fam in (0x00, 0x10, 0x12, 0x22, 0x31, 0x32):
            self.assertEqual(parse(v2(fam=fam)), (ProxyHeader(2, None, None), b""), hex(fam))

    def test_split_anywhere(self) -> None:
        """A header delivered one byte at a time parses as when delivered whole."""
        data = v2("2001:db8::7", "::1", tlvs=b"\x04\x00\x02xx") + b"after"
        self.assertEqual(parse_bytewise(data), parse(data))

    def test_invalid(self) -> None:
        """Wrong version, unassigned command or family, or a short address block is refused."""
        bad = [
            v2()[:12] + b"\x11" + v2()[13:],   # version 1 in a v2 header
            v2(command=0x2),
            v2(fam=0x41),
            v2(fam=0x13),
            v2(length=11)[:16 + 11],           # TCP4 needs 12 address bytes
            v2("::1", "::1", length=35)[:16 + 35],
        ]
        for data in bad:
            with self.assertRaises(InvalidProxyHeader, msg=data):
                parse(data)

    def test_oversized_refused_before_reading(self) -> None:
        """A length beyond V2_MAX_HEADER is refused from the fixed 16 bytes alone."""
        self.assertIsNone(parse(v2(tlvs=b"\x04" + struct.pack("!H", V2_MAX_HEADER - 32) + bytes(V2_MAX_HEADER - 32))[:-1]))
        with self.assertRaises(InvalidProxyHeader):
            parse(SIGNATURE + struct.pack("!BBH", 0x21, 0x11, V2_MAX_HEADER - 16 + 1))

    @given(st.binary(max_size=700), st.lists(st.integers(1, 64), max_size=40))
    @settings(max_examples=300, deadline=None)
    def test_any_bytes_any_split(self, data: bytes, cuts: list[int]) -> None:
        """Any bytes in any chunking give a header, "need more" or InvalidProxyHeader, never another error."""
        parser = HeaderParser()
        position = 0
        for size in cuts + [len(data)]:
            chunk, position = data[position : position + size], position + size
            try:
                if parser.feed(chunk) is not None:
                    return
            except InvalidProxyHeader:
                return

    @given(st.sampled_from([v1(), v1("2001:db8::7", "::1"), v2(), v2("2001:db8::7", "::1", tlvs=b"\x04\x00\x01z"),
                            b"PROXY UNKNOWN\r\n"]),
           st.binary(max_size=50), st.lists(st.integers(1, 20), max_size=30))
    @settings(max_examples=200, deadline=None)
    def test_valid_header_any_split(self, header: bytes, after: bytes, cuts: list[int]) -> None:
        """A valid header split anywhere gives the same header and exactly the bytes after it."""
        data = header + after
        expected = parse(data)
        assert expected is not None
        parser = HeaderParser()
        position = 0
        for size in cuts + [len(data)]:
            chunk, position = data[position : position + size], position + size
            result = parser.feed(chunk)
            if result is not None:
                self.assertEqual((result[0], result[1] + data[position:]), expected)
                return
        self.fail("no header")


def pp_harness(**listener: object) -> Harness:
    return Harness(listener=listener_config(proxy_protocol=True, **listener))


def rejected(h: Harness) -> dict[str, int]:
    """The listener's refusals that happened (known reasons may be listed at zero)."""
    return {reason: n for reason, n in h.listener.rejected.items() if n}


def end(client) -> None:  # type: ignore[no-untyped-def]
    """The client's connection goes away cleanly (what the reactor reports after a close)."""
    client.connectionLost(Failure(ConnectionDone()))


class SessionTests(SynchronousTestCase):
    """A session on a proxy_protocol listener: header first, then admission and the dial."""

    def test_v1_tcp4_peer_logged_and_dial_after_header(self) -> None:
        """The v1 TCP4 source is the logged peer, and the upstream is dialled only once the header is in."""
        h = pp_harness()
        client, ct = h.connect_client(BALANCER)
        self.assertEqual(h.reactor.tcpClients, [])
        client.dataReceived(v1("203.0.113.7", sport=40001))
        self.assertEqual(len(h.reactor.tcpClients), 1)
        up, _ut = h.accept_upstream()
        end(client)
        up.connectionLost(Failure(ConnectionDone()))
        [record] = h.records()
        self.assertEqual((record.downstream, record.flags), ("203.0.113.7:40001", ()))

    def test_v1_tcp6_peer_logged(self) -> None:
        """The v1 TCP6 source is logged in brackets."""
        h = pp_harness()
        client, _ct = h.connect_client(BALANCER)
        client.dataReceived(v1("2001:db8::7", "fdaa::1", sport=40002))
        end(client)
        self.assertEqual(h.records()[0].downstream, "[2001:db8::7]:40002")

    def test_header_over_several_chunks(self) -> None:
        """A header split over several chunks is read whole before the dial."""
        h = pp_harness()
        client, _ct = h.connect_client(BALANCER)
        header = v1("203.0.113.7", sport=40003)
        for i in range(0, len(header), 7):
            self.assertEqual(h.reactor.tcpClients, [])
            client.dataReceived(header[i : i + 7])
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertEqual(client.session.peer_address, IPv4Address("TCP", "203.0.113.7", 40003))

    def test_bytes_after_header_reach_upstream_first(self) -> None:
        """Bytes sent with the header, then before and after the upstream connects, arrive in order."""
        h = pp_harness()
        client, _ct = h.connect_client(BALANCER)
        client.dataReceived(v1() + b"first ")
        client.dataReceived(b"second ")
        _up, ut = h.accept_upstream()
        client.dataReceived(b"third")
        self.assertEqual(ut.value(), b"first second third")

    def test_header_bytes_counted_as_received(self) -> None:
        """Every byte the client sent, the header included, counts as received from downstream."""
        h = pp_harness()
        client, _ct = h.connect_client(BALANCER)
        header = v2()
        client.dataReceived(header + b"12345")
        h.accept_upstream()
        self.assertEqual(client.session.bytes_received, len(header) + 5)

    def test_client_reads_until_header_then_paused_until_upstream(self) -> None:
        """The client leg reads while the header is awaited, is paused while dialling, and resumes after."""
        h = pp_harness()
        client, ct = h.connect_client(BALANCER)
        self.assertEqual(ct.producerState, "producing")
        client.dataReceived(v1())
        self.assertEqual(ct.producerState, "paused")
        h.accept_upstream()
        self.assertEqual(ct.producerState, "producing")

    def test_data_path_unchanged_after_header(self) -> None:
        """Once spliced, chunks go straight to the other transport's write, as on other listeners."""
        for h in (pp_harness(), Harness()):
            client, ct = h.connect_client(BALANCER)
            if h.listener.config.proxy_protocol:
                client.dataReceived(v1())
            up, ut = h.accept_upstream()
            self.assertEqual(client.forward, ut.write)
            self.assertEqual(up.forward, ct.write)

    def test_v2_tcp4_and_tcp6(self) -> None:
        """v2 TCP4 and TCP6 sources are the logged peers."""
        for header, expected in ((v2("198.51.100.9", sport=1234), "198.51.100.9:1234"),
                                 (v2("2001:db8::9", "fdaa::1", sport=1235), "[2001:db8::9]:1235")):
            h = pp_harness()
            client, _ct = h.connect_client(BALANCER)
            client.dataReceived(header)
            self.assertEqual(len(h.reactor.tcpClients), 1)
            end(client)
            self.assertEqual(h.records()[0].downstream, expected)

    def test_v2_local_keeps_real_peer(self) -> None:
        """A v2 LOCAL header (the balancer's own check) is admitted under the real peer."""
        h = pp_harness()
        client, _ct = h.connect_client(BALANCER)
        client.dataReceived(SIGNATURE + b"\x20\x00\x00\x00")
        self.assertEqual(len(h.reactor.tcpClients), 1)
        end(client)
        self.assertEqual(h.records()[0].downstream, "[fdaa:0:1::2]:61000")

    def test_v1_unknown_keeps_real_peer(self) -> None:
        """A v1 UNKNOWN header is admitted under the real peer."""
        h = pp_harness()
        client, _ct = h.connect_client(BALANCER)
        client.dataReceived(b"PROXY UNKNOWN\r\n")
        self.assertEqual(client.session.peer_address, BALANCER)
        self.assertEqual(len(h.reactor.tcpClients), 1)

    def test_allow_sources_uses_header_address(self) -> None:
        """allow_sources admits by the header's source, not by the balancer's address."""
        h = pp_harness(allow_sources=(ipaddress.ip_network("203.0.113.0/24"),))
        client, ct = h.connect_client(BALANCER)  # fdaa::: outside the list
        client.dataReceived(v1("203.0.113.7"))
        self.assertFalse(ct.disconnecting)
        self.assertEqual(len(h.reactor.tcpClients), 1)

    def test_allow_sources_refuses_header_address(self) -> None:
        """A header source outside allow_sources is refused without a dial (RBAC), though the balancer is inside."""
        h = pp_harness(allow_sources=(ipaddress.ip_network("fdaa::/16"),))
        client, ct = h.connect_client(BALANCER)
        client.dataReceived(v2("203.0.113.7", sport=40004) + b"query")
        self.assertTrue(ct.disconnecting)
        self.assertEqual(h.reactor.tcpClients, [])
        end(client)
        [record] = h.records()
        self.assertEqual((record.downstream, record.flags), ("203.0.113.7:40004", ("RBAC",)))
        self.assertEqual((rejected(h), h.listener.connections_total), ({"source": 1}, 1))

    def test_admission_counted_once_after_header(self) -> None:
        """max_connections applies at the header, and each connection is counted once."""
        h = pp_harness(max_connections=1)
        first, _ = h.connect_client(BALANCER)
        second, second_transport = h.connect_client(BALANCER)
        self.assertEqual((h.listener.connections_total, h.listener.active), (0, 0))
        first.dataReceived(v1())
        second.dataReceived(v1())
        self.assertTrue(second_transport.disconnecting)
        end(second)
        self.assertEqual(h.records()[0].flags, ("OM",))
        self.assertEqual((h.listener.connections_total, h.listener.active), (2, 1))
        self.assertEqual(len(h.reactor.tcpClients), 1)

    def assert_refused_dpe(self, h: Harness, client, ct) -> None:  # type: ignore[no-untyped-def]
        self.assertTrue(ct.disconnecting)
        self.assertEqual(h.reactor.tcpClients, [])
        end(client)
        [record] = h.records()
        self.assertEqual((record.downstream, record.flags), ("[fdaa:0:1::2]:61000", ("DPE",)))
        self.assertEqual(rejected(h), {"proxy_protocol": 1})
        self.assertEqual((h.listener.connections_total, h.listener.active), (1, 0))
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_garbage_refused(self) -> None:
        """A client that starts with anything but a header is closed at once, DPE, no dial."""
        h = pp_harness()
        client, ct = h.connect_client(BALANCER)
        client.dataReceived(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")  # a Postgres SSLRequest
        self.assert_refused_dpe(h, client, ct)

    def test_oversized_v1_refused(self) -> None:
        """A v1 line with no CRLF in its first 107 bytes is refused, DPE."""
        h = pp_harness()
        client, ct = h.connect_client(BALANCER)
        client.dataReceived(b"PROXY TCP4 " + b"9" * 60)
        self.assertFalse(ct.disconnecting)
        client.dataReceived(b"9" * 60)
        self.assert_refused_dpe(h, client, ct)

    def test_oversized_v2_refused(self) -> None:
        """A v2 header announcing more than 536 bytes is refused, DPE."""
        h = pp_harness()
        client, ct = h.connect_client(BALANCER)
        client.dataReceived(SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 4000))
        self.assert_refused_dpe(h, client, ct)

    def test_invalid_header_refused(self) -> None:
        """A complete but invalid header is refused, DPE."""
        h = pp_harness()
        client, ct = h.connect_client(BALANCER)
        client.dataReceived(b"PROXY TCP4 203.0.113.7 10.0.0.1 99999 5432\r\n")
        self.assert_refused_dpe(h, client, ct)

    def test_eof_before_header_refused(self) -> None:
        """An EOF before the header is complete closes the client, DPE."""
        h = pp_harness()
        client, ct = h.connect_client(BALANCER)
        client.dataReceived(v1()[:10])
        client.readConnectionLost()
        self.assert_refused_dpe(h, client, ct)

    def test_header_timeout(self) -> None:
        """A client that does not finish its header within HEADER_TIMEOUT is closed, DPE."""
        h = pp_harness()
        client, ct = h.connect_client(BALANCER)
        client.dataReceived(v1()[:10])
        h.reactor.advance(HEADER_TIMEOUT - 0.1)
        self.assertFalse(ct.disconnecting)
        h.reactor.advance(0.1)
        self.assert_refused_dpe(h, client, ct)

    def test_header_cancels_timeout(self) -> None:
        """A complete header cancels the header timeout."""
        h = pp_harness()
        client, ct = h.connect_client(BALANCER)
        client.dataReceived(v1())
        h.accept_upstream()
        self.assertEqual(h.reactor.getDelayedCalls(), [])
        h.reactor.advance(HEADER_TIMEOUT * 2)
        self.assertFalse(ct.disconnecting)

    def test_bytes_after_refusal_ignored(self) -> None:
        """Bytes arriving after a refusal, before the close completes, are dropped quietly."""
        h = pp_harness()
        client, ct = h.connect_client(BALANCER)
        client.dataReceived(b"GET / HTTP/1.1\r\n")
        client.dataReceived(v1() + b"more")
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual(client.pending, [])
        self.assert_refused_dpe(h, client, ct)

    def test_reset_before_header(self) -> None:
        """A client reset before its header ends the session (DC), counted but not rejected."""
        h = pp_harness()
        client, _ct = h.connect_client(BALANCER)
        client.dataReceived(b"PROXY")
        client.connectionLost(Failure(ConnectionLost()))
        [record] = h.records()
        self.assertEqual(record.flags, ("DC",))
        self.assertEqual((rejected(h), h.listener.connections_total), ({}, 1))
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_eof_after_header_replayed(self) -> None:
        """An EOF after the header (before the upstream) is passed on once the upstream connects."""
        h = pp_harness()
        client, _ct = h.connect_client(BALANCER)
        client.dataReceived(v1() + b"request")
        client.readConnectionLost()
        _up, ut = h.accept_upstream()
        self.assertEqual(ut.value(), b"request")
        self.assertTrue(ut.write_closed)

    def test_listener_without_proxy_protocol_takes_header_as_data(self) -> None:
        """On a listener without proxy_protocol, a header is just bytes: dialled at once, passed through."""
        h = Harness()
        client, _ct = h.connect_client(BALANCER)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        client.dataReceived(v1())
        _up, ut = h.accept_upstream()
        self.assertEqual(ut.value(), v1())
        self.assertEqual(client.session.peer_address, BALANCER)

    @given(st.one_of(
        st.binary(max_size=600),
        st.sampled_from([v1(), v2(), v2("2001:db8::7", "::1"), b"PROXY UNKNOWN\r\n"]).flatmap(
            lambda header: st.tuples(st.integers(0, len(header)), st.binary(max_size=8), st.binary(max_size=40))
            .map(lambda t, header=header: header[: t[0]] + t[1] + header[t[0] + len(t[1]):] + t[2])),
    ), st.lists(st.integers(1, 50), max_size=20))
    @settings(max_examples=300, deadline=None)
    def test_any_prefix_dials_or_closes(self, data: bytes, cuts: list[int]) -> None:
        """Whatever a client sends, dataReceived never raises and the session ends in a dial or a clean close."""
        h = pp_harness()
        client, ct = h.connect_client(BALANCER)
        position = 0
        for size in cuts + [len(data)]:
            chunk, position = data[position : position + size], position + size
            if chunk:
                client.dataReceived(chunk)
        dialled = bool(h.reactor.tcpClients)
        if not dialled and not ct.disconnecting:
            h.reactor.advance(HEADER_TIMEOUT)  # an incomplete header: the timeout decides
        self.assertTrue(bool(h.reactor.tcpClients) != ct.disconnecting)
        self.assertLessEqual(len(h.reactor.tcpClients), 1)
        end(client)
        [record] = h.records()
        self.assertIn(record.flags, [(), ("DPE",)])
        self.assertEqual(h.reactor.getDelayedCalls(), [])


class TrustedSenderTests(SynchronousTestCase):
    """``proxy_protocol_trusted``: only listed peers may send a header; the rest are closed unread."""

    FLY = (ipaddress.ip_network("fdaa::/16"),)

    def test_untrusted_peer_closed_before_reading(self) -> None:
        """A peer outside the list is closed at once, unread and undialled: DPE, reason proxy_protocol_untrusted."""
        h = pp_harness(proxy_protocol_trusted=self.FLY)
        client, ct = h.connect_client(IPv4Address("TCP", "198.51.100.20", 40000))
        self.assertTrue(ct.disconnecting)
        self.assertEqual(ct.producerState, "paused")
        self.assertEqual(h.listener.awaiting, set())
        self.assertEqual(h.reactor.getDelayedCalls(), [])
        # Whatever it manages to send is never parsed: its claimed source is not taken.
        client.dataReceived(v1("203.0.113.7"))
        self.assertEqual(h.reactor.tcpClients, [])
        end(client)
        [record] = h.records()
        self.assertEqual((record.downstream, record.flags), ("198.51.100.20:40000", ("DPE",)))
        self.assertEqual(rejected(h), {"proxy_protocol_untrusted": 1})
        self.assertEqual((h.listener.connections_total, h.listener.active), (1, 0))

    def test_untrusted_refusal_logged(self) -> None:
        """The refusal is logged with the listener and the real peer."""
        h = pp_harness(proxy_protocol_trusted=self.FLY)
        events: list[dict] = []
        h.listener.log = Logger(observer=events.append)  # type: ignore[misc]
        h.connect_client(IPv4Address("TCP", "198.51.100.20", 40000))
        [event] = events
        self.assertIn("not a trusted PROXY protocol sender", event["log_format"])
        self.assertEqual((event["listener"], event["peer"]), ("direct", "198.51.100.20:40000"))

    def test_trusted_peer_header_used(self) -> None:
        """A listed peer's header is read as before: the header's source is the client, and allow_sources checks it."""
        h = pp_harness(proxy_protocol_trusted=self.FLY, allow_sources=(ipaddress.ip_network("203.0.113.0/24"),))
        client, ct = h.connect_client(BALANCER)
        self.assertFalse(ct.disconnecting)
        client.dataReceived(v1("203.0.113.7", sport=40001))
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertEqual(client.session.peer_address, IPv4Address("TCP", "203.0.113.7", 40001))

    def test_trusted_peer_ipv4_mapped(self) -> None:
        """An IPv4 sender on a dual-stack socket is matched against IPv4 CIDRs."""
        h = pp_harness(proxy_protocol_trusted=(ipaddress.ip_network("172.16.0.0/12"),))
        client, ct = h.connect_client(IPv6Address("TCP", "::ffff:172.19.0.1", 40000))
        self.assertFalse(ct.disconnecting)
        client.dataReceived(v1())
        self.assertEqual(len(h.reactor.tcpClients), 1)

    def test_without_key_any_peer_may_send(self) -> None:
        """Without proxy_protocol_trusted every peer's header is read, as before."""
        h = pp_harness()
        client, ct = h.connect_client(IPv4Address("TCP", "198.51.100.20", 40000))
        client.dataReceived(v1())
        self.assertFalse(ct.disconnecting)
        self.assertEqual(len(h.reactor.tcpClients), 1)

    def test_untrusted_reason_known_at_zero(self) -> None:
        """proxy_protocol_untrusted is a known reason, exported at zero before the first refusal."""
        self.assertEqual(pp_harness().listener.rejected["proxy_protocol_untrusted"], 0)
