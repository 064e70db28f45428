"""Unit tests of the HTTP request head parser, body framing and the proxy's own answers."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.modes.http_connect.httpreq import (
    MAX_FIELDS,
    MAX_HEAD,
    MAX_REQUEST_LINE,
    BodyReader,
    Framing,
    HeadParser,
    RequestError,
    RequestHead,
    body_framing,
    forward_head,
    response,
    split_absolute_http,
)


def parse(data: bytes) -> tuple[RequestHead, bytes]:
    result = HeadParser().feed(data)
    assert result is not None, "head incomplete"
    return result


def status_of(data: bytes) -> int | None:
    """The status a parser refuses ``data`` with, or None if it accepts or waits."""
    try:
        HeadParser().feed(data)
    except RequestError as e:
        return e.status
    return None


class HeadParserTests(SynchronousTestCase):
    def test_connect(self) -> None:
        """A CONNECT head parses into method, target, version and fields."""
        head, rest = parse(b"CONNECT api.vendor.com:443 HTTP/1.1\r\nHost: api.vendor.com:443\r\n\r\n")
        self.assertEqual((head.method, head.target, head.version), ("CONNECT", "api.vendor.com:443", "HTTP/1.1"))
        self.assertEqual(head.fields, ((b"Host", b"api.vendor.com:443"),))
        self.assertEqual(rest, b"")

    def test_rest_after_head(self) -> None:
        """Bytes after the empty line are returned, not parsed."""
        _head, rest = parse(b"CONNECT a.example:443 HTTP/1.1\r\n\r\n\x16\x03\x01")
        self.assertEqual(rest, b"\x16\x03\x01")

    def test_incomplete_waits(self) -> None:
        """Without the empty line the parser waits."""
        self.assertIsNone(HeadParser().feed(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\n"))

    def test_one_byte_at_a_time(self) -> None:
        """Feeding one byte at a time gives the same head."""
        data = b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\nX-One: 1\r\n\r\nbody"
        parser = HeadParser()
        results = [parser.feed(data[i : i + 1]) for i in range(len(data) - 4)]
        self.assertEqual(results[:-1], [None] * (len(results) - 1))
        self.assertEqual(results[-1], (parse(data)[0], b""))

    def test_bare_lf_and_leading_empty_lines(self) -> None:
        """Bare LF line ends and empty lines before the request line are accepted."""
        head, _ = parse(b"\r\n\nCONNECT a.example:443 HTTP/1.0\nX: y\n\n")
        self.assertEqual((head.method, head.version, head.values("x")), ("CONNECT", "HTTP/1.0", [b"y"]))

    def test_values_case_insensitive(self) -> None:
        """values() finds fields whatever their case, in order, trimmed."""
        head, _ = parse(b"GET http://a/ HTTP/1.1\r\nX-A: 1\r\nx-a:\t2 \r\n\r\n")
        self.assertEqual(head.values("X-a"), [b"1", b"2"])

    def test_garbage_request_lines(self) -> None:
        """Garbage request lines are 400."""
        for line in (b"hello", b"GET", b"GET /", b"GET  / HTTP/1.1", b"GET / HTTP/1.1 x", b"G(T / HTTP/1.1",
                     b"GET / http/1.1", b"GET / HTTP/1", b"\x16\x03\x01\x02\x00 x y", b"GET /\x7f HTTP/1.1",
                     b"GET / HTTP/1.1\x00"):
            with self.subTest(line=line):
                self.assertEqual(status_of(line + b"\r\n\r\n"), 400)

    def test_other_versions_505(self) -> None:
        """A well-formed version other than 1.0 and 1.1 is 505."""
        self.assertEqual(status_of(b"PRI * HTTP/2.0\r\n\r\n"), 505)
        self.assertEqual(status_of(b"GET http://a/ HTTP/0.9\r\n\r\n"), 505)

    def test_smuggling_shapes(self) -> None:
        """obs-fold, space before the colon, bare CR and control characters are 400."""
        for fields in (b"X: a\r\n b", b"X : a", b"X\r: a", b"X: a\rb", b"X: a\x01", b": a", b"X a", b"X\x00: a"):
            with self.subTest(fields=fields):
                self.assertEqual(status_of(b"GET http://a/ HTTP/1.1\r\n" + fields + b"\r\n\r\n"), 400)

    def test_long_request_line_414(self) -> None:
        """A request line longer than the limit is 414, before its end arrives."""
        self.assertEqual(status_of(b"GET http://a/" + b"x" * MAX_REQUEST_LINE), 414)

    def test_large_head_431(self) -> None:
        """A head larger than the limit is 431, before its end arrives."""
        self.assertEqual(status_of(b"GET http://a/ HTTP/1.1\r\nX: " + b"x" * MAX_HEAD), 431)

    def test_one_mebibyte_header_431(self) -> None:
        """A 1 MiB field is refused with 431 on its first 16 KiB."""
        parser = HeadParser()
        parser.feed(b"CONNECT a.example:443 HTTP/1.1\r\nX-Big: ")
        with self.assertRaises(RequestError) as caught:
            for _ in range(64):
                parser.feed(b"x" * 16384)
        self.assertEqual(caught.exception.status, 431)

    def test_too_many_fields_431(self) -> None:
        """More than MAX_FIELDS field lines is 431."""
        fields = b"".join(b"X-%d: y\r\n" % i for i in range(MAX_FIELDS + 1))
        self.assertEqual(status_of(b"GET http://a/ HTTP/1.1\r\n" + fields + b"\r\n"), 431)
        fields = b"".join(b"X-%d: y\r\n" % i for i in range(MAX_FIELDS))
        self.assertIsNone(status_of(b"GET http://a/ HTTP/1.1\r\n" + fields + b"\r\n"))

    def test_started(self) -> None:
        """started says whether any byte arrived."""
        parser = HeadParser()
        self.assertFalse(parser.started)
        parser.feed(b"G")
        self.assertTrue(parser.started)

    @settings(max_examples=300)
    @given(st.binary(max_size=2048), st.integers(1, 64))
    def test_random_bytes(self, data: bytes, step: int) -> None:
        """Random bytes give a head, a wait or a RequestError, however they are split."""
        outcomes = []
        for size in (len(data) or 1, step):
            parser = HeadParser()
            try:
                result = None
                for i in range(0, len(data), size):
                    result = parser.feed(data[i : i + size])
                    if result is not None:
                        break
                outcomes.append(("head", result[0]) if result else ("wait", None))
            except RequestError as e:
                outcomes.append(("error", e.status))
        self.assertEqual(outcomes[0], outcomes[1])

    @given(st.lists(st.sampled_from([b"GET", b" ", b"http://a/", b"HTTP/1.1", b"\r\n", b"\n", b"X: y", b":",
                                     b"\r", b"\t", b"\x00", b"CONNECT", b"a:1"]), max_size=40))
    def test_token_soup(self, parts: list[bytes]) -> None:
        """Shuffled HTTP tokens parse or fail with 400/414/431/505, never otherwise."""
        try:
            HeadParser().feed(b"".join(parts) + b"\r\n\r\n")
        except RequestError as e:
            self.assertIn(e.status, (400, 414, 431, 505))


class TargetTests(SynchronousTestCase):
    def test_absolute_http(self) -> None:
        """An http:// URL splits into authority and origin-form."""
        self.assertEqual(split_absolute_http("http://a.example:8080/p/q?x=1"), ("a.example:8080", "/p/q?x=1"))
        self.assertEqual(split_absolute_http("HTTP://a.example"), ("a.example", "/"))
        self.assertEqual(split_absolute_http("http://a.example?x"), ("a.example", "/?x"))
        self.assertEqual(split_absolute_http("http://[::1]:80/"), ("[::1]:80", "/"))

    def test_other_targets_400(self) -> None:
        """https:// URLs, origin-form, asterisk and fragments are 400."""
        for target in ("https://a.example/", "/path", "*", "ftp://a/", "http://a/#frag", "a.example:443"):
            with self.subTest(target=target):
                with self.assertRaises(RequestError) as caught:
                    split_absolute_http(target)
                self.assertEqual(caught.exception.status, 400)


class FramingTests(SynchronousTestCase):
    def framing(self, fields: bytes, version: bytes = b"HTTP/1.1") -> Framing:
        return body_framing(parse(b"POST http://a/ " + version + b"\r\n" + fields + b"\r\n")[0])

    def test_no_body(self) -> None:
        """No Content-Length and no Transfer-Encoding: no body."""
        self.assertEqual(self.framing(b""), Framing(0))

    def test_content_length(self) -> None:
        """Content-Length gives the length; identical repeats are accepted."""
        self.assertEqual(self.framing(b"Content-Length: 12\r\n"), Framing(12))
        self.assertEqual(self.framing(b"Content-Length: 12, 12\r\nContent-Length: 12\r\n"), Framing(12))

    def test_chunked(self) -> None:
        """Transfer-Encoding ending in chunked is chunked."""
        self.assertEqual(self.framing(b"Transfer-Encoding: gzip, Chunked\r\n"), Framing(None))

    def test_ambiguous_framing_400(self) -> None:
        """Conflicting, unparsable or ambiguous framing is 400."""
        for fields, version in (
            (b"Content-Length: 1\r\nContent-Length: 2\r\n", b"HTTP/1.1"),
            (b"Content-Length: -1\r\n", b"HTTP/1.1"),
            (b"Content-Length: 0x10\r\n", b"HTTP/1.1"),
            (b"Content-Length: \r\n", b"HTTP/1.1"),
            (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"HTTP/1.1"),
            (b"Transfer-Encoding: chunked, gzip\r\n", b"HTTP/1.1"),
            (b"Transfer-Encoding: chunked\r\n", b"HTTP/1.0"),
        ):
            with self.subTest(fields=fields):
                with self.assertRaises(RequestError) as caught:
                    self.framing(fields, version)
                self.assertEqual(caught.exception.status, 400)


class BodyReaderTests(SynchronousTestCase):
    def test_length(self) -> None:
        """A Content-Length body ends after its bytes; the rest is not taken."""
        reader = BodyReader(Framing(5))
        self.assertEqual(reader.feed(b"abc"), 3)
        self.assertFalse(reader.done)
        self.assertEqual(reader.feed(b"deXYZ"), 2)
        self.assertTrue(reader.done)
        self.assertEqual(reader.feed(b"more"), 0)

    def test_empty(self) -> None:
        """A zero-length body is done at once."""
        self.assertTrue(BodyReader(Framing(0)).done)

    def test_chunked(self) -> None:
        """A chunked body ends after its last chunk and trailers, in any split."""
        body = b"5;ext=1\r\nhello\r\n1a\r\n" + b"x" * 26 + b"\r\n0\r\nTrailer: t\r\n\r\n"
        for size in (1, 3, 7, len(body)):
            with self.subTest(size=size):
                reader = BodyReader(Framing(None))
                taken = 0
                data = body + b"NEXT"
                for i in range(0, len(data), size):
                    taken += reader.feed(data[i : i + size])
                    if reader.done:
                        break
                self.assertTrue(reader.done)
                self.assertEqual(taken, len(body))

    def test_bare_lf_chunks(self) -> None:
        """Chunk lines may end in a bare LF."""
        reader = BodyReader(Framing(None))
        self.assertEqual(reader.feed(b"2\nhi\n0\n\nX"), 8)
        self.assertTrue(reader.done)

    def test_bad_chunks_400(self) -> None:
        """Malformed sizes, over-long data and over-long lines are 400."""
        for data in (b"zz\r\n", b"\r\n", b"2\r\nhello\r\n", b"-1\r\n", b"1" * 5000, b"2\r\nhi\r\n0\r\nX: \x00\r\n\r\n"):
            with self.subTest(data=data[:20]):
                with self.assertRaises(RequestError):
                    BodyReader(Framing(None)).feed(data)


class ForwardHeadTests(SynchronousTestCase):
    def test_rewrite(self) -> None:
        """Origin-form target, Host from the URL, hop-by-hop and Proxy-* gone, Connection: close added."""
        head, _ = parse(
            b"POST http://a.example:8080/p?q=1 HTTP/1.1\r\n"
            b"Host: wrong.example\r\n"
            b"Proxy-Authorization: Basic c2VjcmV0\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"Connection: keep-alive, X-Hop\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"X-Hop: 1\r\n"
            b"TE: trailers\r\n"
            b"Upgrade: websocket\r\n"
            b"Content-Length: 4\r\n"
            b"X-End-To-End: kept\r\n\r\n"
        )
        self.assertEqual(
            forward_head(head, "/p?q=1", "a.example:8080"),
            b"POST /p?q=1 HTTP/1.1\r\nHost: a.example:8080\r\nContent-Length: 4\r\n"
            b"X-End-To-End: kept\r\nConnection: close\r\n\r\n",
        )

    def test_framing_never_dropped(self) -> None:
        """Content-Length and Transfer-Encoding stay even when Connection names them."""
        head, _ = parse(b"POST http://a/ HTTP/1.1\r\nConnection: content-length\r\nContent-Length: 1\r\n\r\n")
        self.assertIn(b"Content-Length: 1\r\n", forward_head(head, "/", "a"))

    def test_version_kept(self) -> None:
        """The client's HTTP version is kept (the response is passed back untouched)."""
        head, _ = parse(b"GET http://a/ HTTP/1.0\r\n\r\n")
        self.assertTrue(forward_head(head, "/", "a").startswith(b"GET / HTTP/1.0\r\n"))


class ResponseTests(SynchronousTestCase):
    def test_shape(self) -> None:
        """An answer has a status line, a text body of the stated length and Connection: close."""
        data = response(407, "proxy credentials required", [("Proxy-Authenticate", 'Basic realm="egressproxy"')])
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"HTTP/1.1 407 Proxy Authentication Required")
        self.assertIn(b'Proxy-Authenticate: Basic realm="egressproxy"', lines)
        self.assertIn(b"Connection: close", lines)
        self.assertIn(b"Content-Length: %d" % len(body), lines)
