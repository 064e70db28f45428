"""FLY_REGION and FLY_MACHINE_ID on access lines and in ``egressproxy_info``; nothing when unset."""

from __future__ import annotations

import io
import json

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from egressproxy import __version__
from egressproxy.observe.accesslog import AccessRecord, make_access_logger
from egressproxy.observe.metrics import EgressCollector
from egressproxy.observe.origin import NO_ORIGIN, Origin

RECORD = AccessRecord(
    start=1780819893.49, listener="direct", prefix="DIRECT", downstream="[fdaa:0:1::3]:63276",
    upstream="db.example.cloud:5432", bytes_received=1284, bytes_sent=892, duration_ms=45,
)
ON_FLY = Origin.from_environ({"FLY_REGION": " ams ", "FLY_MACHINE_ID": "148e21ea7e5389"})


def logged(format: str, origin: Origin) -> str:
    stream = io.StringIO()
    make_access_logger(stream, format, origin).info("{record}", record=RECORD)
    return stream.getvalue()


class OriginTests(SynchronousTestCase):
    def test_read_from_environment(self) -> None:
        self.assertEqual(ON_FLY, Origin("ams", "148e21ea7e5389"))
        self.assertEqual(Origin.from_environ({}), NO_ORIGIN)

    def test_text_line(self) -> None:
        """The Envoy fields stay first; the Machine's fields end the line."""
        self.assertEqual(
            logged("text", ON_FLY),
            '[2026-06-07T08:11:33.490Z] DIRECT [fdaa:0:1::3]:63276 db.example.cloud:5432 1284 892 45 "-"'
            " region=ams machine=148e21ea7e5389\n",
        )

    def test_only_region(self) -> None:
        self.assertTrue(logged("text", Origin("iad", "")).endswith('"-" region=iad\n'))

    def test_json_line(self) -> None:
        fields = json.loads(logged("json", ON_FLY))
        self.assertEqual((fields["fly_region"], fields["fly_machine_id"]), ("ams", "148e21ea7e5389"))
        self.assertEqual(fields["upstream_host"], "db.example.cloud:5432")

    def test_off_fly_unchanged(self) -> None:
        """Without the variables the lines are exactly what they were."""
        self.assertTrue(logged("text", NO_ORIGIN).endswith(' 45 "-"\n'))
        self.assertNotIn("fly_region", json.loads(logged("json", NO_ORIGIN)))


class _Service:
    """The least a collector reads: no listeners, clusters or workers."""

    listeners: dict = {}  # type: ignore[type-arg]
    retired: list = []  # type: ignore[type-arg]
    reloads = {"success": 0, "error": 0}
    egress = None

    def __init__(self, origin: Origin) -> None:
        self.origin = origin

    def all_clusters(self) -> dict:  # type: ignore[type-arg]
        return {}

    def worker_snapshots(self) -> list:  # type: ignore[type-arg]
        return []


class InfoMetricTests(SynchronousTestCase):
    def info(self, origin: Origin) -> dict[str, str]:
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        registry.register(EgressCollector(_Service(origin)))  # type: ignore[arg-type]
        text = generate_latest(registry).decode()
        (sample,) = [
            s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "egressproxy_info"
        ]
        self.assertEqual(sample.value, 1)
        return sample.labels

    def test_labels(self) -> None:
        self.assertEqual(
            self.info(ON_FLY), {"version": __version__, "region": "ams", "machine_id": "148e21ea7e5389"}
        )

    def test_off_fly(self) -> None:
        self.assertEqual(self.info(NO_ORIGIN), {"version": __version__, "region": "", "machine_id": ""})
