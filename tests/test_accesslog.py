"""Tests for egressproxy.observe.accesslog: the Envoy-shaped line, JSON, timestamps, the logger."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.observe.accesslog import (
    AccessRecord,
    format_json,
    format_text,
    format_timestamp,
    make_access_logger,
)

# 2026-06-07T08:11:33Z as seconds since the epoch.
START = 1780819893


def record(**overrides: object) -> AccessRecord:
    values: dict[str, object] = dict(
        start=START + 0.49,
        listener="direct",
        prefix="DIRECT",
        downstream="[fdaa:0:1::3]:63276",
        upstream="db.example.cloud:5432",
        bytes_received=1284,
        bytes_sent=892,
        duration_ms=45,
        flags=(),
    )
    values.update(overrides)
    return AccessRecord(**values)  # type: ignore[arg-type]


class FormatTimestampTests(SynchronousTestCase):
    """format_timestamp: UTC with milliseconds."""

    def test_utc_with_milliseconds(self) -> None:
        """Seconds since the epoch render as a UTC ISO time with three decimals and a Z."""
        self.assertEqual(format_timestamp(START + 0.49), "2026-06-07T08:11:33.490Z")

    def test_whole_second(self) -> None:
        """A whole second renders with .000 milliseconds."""
        self.assertEqual(format_timestamp(START), "2026-06-07T08:11:33.000Z")

    def test_rounds_to_nearest_millisecond(self) -> None:
        """A fraction rounds to the nearest millisecond rather than truncating."""
        self.assertEqual(format_timestamp(12.3456), "1970-01-01T00:00:12.346Z")

    def test_rounding_up_carries_into_the_next_second(self) -> None:
        """A fraction that rounds to 1000 ms becomes .000 of the next second."""
        self.assertEqual(format_timestamp(0.9995), "1970-01-01T00:00:01.000Z")

    def test_rounding_up_carries_across_a_minute(self) -> None:
        """Carrying into the next second also carries the minute and hour."""
        self.assertEqual(format_timestamp(3599.9999), "1970-01-01T01:00:00.000Z")


class FormatTextTests(SynchronousTestCase):
    """format_text: Envoy's default TCP access-log line."""

    def test_line_without_flags(self) -> None:
        """A record without flags renders as Envoy's line with "-" for the flags."""
        self.assertEqual(
            format_text(record()),
            '[2026-06-07T08:11:33.490Z] DIRECT [fdaa:0:1::3]:63276 db.example.cloud:5432 1284 892 45 "-"',
        )

    def test_one_flag(self) -> None:
        """A single flag is quoted on its own."""
        self.assertEqual(
            format_text(record(flags=("NR",), bytes_received=0, bytes_sent=0, duration_ms=0, upstream="-")),
            '[2026-06-07T08:11:33.490Z] DIRECT [fdaa:0:1::3]:63276 - 0 0 0 "NR"',
        )

    def test_several_flags_joined_by_commas(self) -> None:
        """Several flags are joined by commas, in order, inside one pair of quotes."""
        self.assertEqual(
            format_text(record(flags=("UF", "DC"))),
            '[2026-06-07T08:11:33.490Z] DIRECT [fdaa:0:1::3]:63276 db.example.cloud:5432 1284 892 45 "UF,DC"',
        )

    def test_no_newline(self) -> None:
        """The line carries no newline of its own."""
        self.assertNotIn("\n", format_text(record()))

    def test_forward_fields(self) -> None:
        """A forward listener's line ends in user= and dialled= after the eight Envoy fields."""
        self.assertEqual(
            format_text(record(upstream="api.vendor.com:443", user="app", upstream_address="[2001:db8::7]:443")),
            '[2026-06-07T08:11:33.490Z] DIRECT [fdaa:0:1::3]:63276 api.vendor.com:443 1284 892 45 "-" '
            "user=app dialled=[2001:db8::7]:443",
        )

    def test_forward_fields_none(self) -> None:
        """Without a user or a connected upstream the forward fields are "-"."""
        self.assertTrue(
            format_text(record(flags=("UAEX",), user="-", upstream_address="-")).endswith('"UAEX" user=- dialled=-')
        )


class FormatJsonTests(SynchronousTestCase):
    """format_json: one JSON object keyed by Envoy's operator names."""

    def test_keys_and_values(self) -> None:
        """The object holds exactly the record's fields under Envoy's names."""
        self.assertEqual(
            json.loads(format_json(record(flags=("UF", "DC")))),
            {
                "start_time": "2026-06-07T08:11:33.490Z",
                "listener": "direct",
                "prefix": "DIRECT",
                "downstream_remote_address": "[fdaa:0:1::3]:63276",
                "upstream_host": "db.example.cloud:5432",
                "bytes_received": 1284,
                "bytes_sent": 892,
                "duration_ms": 45,
                "response_flags": "UF,DC",
            },
        )

    def test_forward_keys(self) -> None:
        """A forward listener's object adds user and upstream_address; others do not have them."""
        fields = json.loads(format_json(record(user="app", upstream_address="203.0.113.9:443")))
        self.assertEqual((fields["user"], fields["upstream_address"]), ("app", "203.0.113.9:443"))
        self.assertEqual(json.loads(format_json(record(user="-", upstream_address="-")))["user"], "-")
        self.assertNotIn("user", json.loads(format_json(record())))

    def test_no_flags_is_dash(self) -> None:
        """A record without flags has response_flags "-"."""
        self.assertEqual(json.loads(format_json(record()))["response_flags"], "-")

    def test_single_line(self) -> None:
        """The object is compact and on one line."""
        text = format_json(record())
        self.assertNotIn("\n", text)
        self.assertNotIn(", ", text)


class MakeAccessLoggerTests(SynchronousTestCase):
    """make_access_logger: a Logger that writes records, one per line, to a stream."""

    def test_text_line_per_record(self) -> None:
        """Each record emitted becomes exactly one text line on the stream."""
        stream = io.StringIO()
        log = make_access_logger(stream, "text")
        log.info("{record}", record=record())
        log.info("{record}", record=record(flags=("UF",)))
        self.assertEqual(
            stream.getvalue(),
            '[2026-06-07T08:11:33.490Z] DIRECT [fdaa:0:1::3]:63276 db.example.cloud:5432 1284 892 45 "-"\n'
            '[2026-06-07T08:11:33.490Z] DIRECT [fdaa:0:1::3]:63276 db.example.cloud:5432 1284 892 45 "UF"\n',
        )

    def test_text_is_the_default(self) -> None:
        """Without a format the logger writes the text line."""
        stream = io.StringIO()
        make_access_logger(stream).info("{record}", record=record())
        self.assertEqual(stream.getvalue(), format_text(record()) + "\n")

    def test_json_line_per_record(self) -> None:
        """With format json each record becomes one JSON object on its own line."""
        stream = io.StringIO()
        log = make_access_logger(stream, "json")
        log.info("{record}", record=record())
        log.info("{record}", record=record(listener="pooled"))
        lines = stream.getvalue().split("\n")
        self.assertEqual(lines[2:], [""])
        self.assertEqual(
            [json.loads(line)["listener"] for line in lines[:2]],
            ["direct", "pooled"],
        )

    def test_event_without_record_writes_nothing(self) -> None:
        """An event that carries no AccessRecord writes nothing to the stream."""
        stream = io.StringIO()
        make_access_logger(stream).info("not an access record {x}", x=1)
        self.assertEqual(stream.getvalue(), "")

    def test_does_not_reach_global_publisher(self) -> None:
        """Access records are not seen by the global log publisher."""
        seen: list[dict] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        # The observer does see an ordinary Logger's events, so its silence below means something.
        Logger(namespace="egressproxy.test.control").info("control")
        self.assertEqual([e["log_namespace"] for e in seen], ["egressproxy.test.control"])

        make_access_logger(io.StringIO()).info("{record}", record=record())
        self.assertEqual(
            [e for e in seen if e.get("log_namespace") == "egressproxy.access" or "record" in e], []
        )
