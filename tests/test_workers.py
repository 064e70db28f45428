"""Tests for egressproxy.app.workers and egressproxy.observe.snapshot: shared limits, counters, the pool, the pipes."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import attrs
from twisted.internet import main
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from egressproxy.observe import snapshot
from egressproxy.app import workers
from egressproxy.config import Config, parse_config
from egressproxy.upstream.dial import CONNECT_FAILURE_REASONS
from egressproxy.datapath.listener import REJECT_REASONS
from egressproxy.app.service import EgressService
from egressproxy.app.workers import (
    MAX_SNAPSHOT_LINE,
    RESTART_DELAY,
    SNAPSHOT_FD,
    SNAPSHOT_INTERVAL,
    ParentWatch,
    SnapshotSender,
    WorkerPool,
    WorkerProcess,
    share_limits,
    worker_argv,
)
from tests.test_metrics import busy_service

LIMITS = """\
listeners:
  - name: direct
    listen: "127.0.0.1:6432"
    cluster: pg
    max_connections: 10
  - name: tiny
    listen: "127.0.0.1:6433"
    cluster: api
    max_connections: 2
clusters:
  - name: pg
    endpoints: ["db.example.test:5432"]
    max_connections: 100
    max_pending: 2
  - name: api
    endpoints: ["api.example.test:443"]
    max_connections: 1
    max_pending: 3
drain_timeout: 7
"""

#: Bounds every loop over a pipe: far more rounds than a pipe buffer ever needs.
MAX_ROUNDS = 10000


def limits_config() -> Config:
    return parse_config(LIMITS, "t.yaml", {})


def zero_buckets() -> list[int]:
    return [0] * 14


# -- share_limits ----------------------------------------------------------------


class ShareLimitsTests(SynchronousTestCase):
    """share_limits: each worker's part of the connection limits."""

    def test_one_worker_unchanged(self) -> None:
        """With one worker the config is returned as it is."""
        config = limits_config()
        self.assertIs(share_limits(config, 1), config)

    def test_listener_limits_divided(self) -> None:
        """Three workers get a third of each listener's max_connections, at least 1."""
        shared = share_limits(limits_config(), 3)
        self.assertEqual([(l.name, l.max_connections) for l in shared.listeners], [("direct", 3), ("tiny", 1)])

    def test_per_source_limits_divided(self) -> None:
        """Three workers get a third of each listener's max_connections_per_source (default half), at least 1."""
        shared = share_limits(limits_config(), 3)
        self.assertEqual(
            [(l.name, l.max_connections_per_source) for l in shared.listeners], [("direct", 1), ("tiny", 1)]
        )
        text = LIMITS.replace("max_connections: 10\n", "max_connections: 10\n    max_connections_per_source: 9\n", 1)
        shared = share_limits(parse_config(text, "t.yaml", {}), 3)
        self.assertEqual(shared.listeners[0].max_connections_per_source, 3)

    def test_cluster_limits_divided(self) -> None:
        """Three workers get a third of each cluster's max_connections and max_pending, at least 1."""
        shared = share_limits(limits_config(), 3)
        self.assertEqual(
            [(c.name, c.max_connections, c.max_pending) for c in shared.clusters],
            [("pg", 33, 1), ("api", 1, 1)],
        )

    def test_other_fields_unchanged(self) -> None:
        """Only the three limits change: every other field of listeners, clusters and the config stays."""
        config = limits_config()
        shared = share_limits(config, 3)
        self.assertEqual(
            [
                attrs.evolve(l, max_connections=o.max_connections, max_connections_per_source=o.max_connections_per_source)
                for l, o in zip(shared.listeners, config.listeners)
            ],
            list(config.listeners),
        )
        self.assertEqual(
            [
                attrs.evolve(c, max_connections=o.max_connections, max_pending=o.max_pending)
                for c, o in zip(shared.clusters, config.clusters)
            ],
            list(config.clusters),
        )
        self.assertEqual(attrs.evolve(shared, listeners=config.listeners, clusters=config.clusters), config)

    def test_original_not_modified(self) -> None:
        """The config passed in keeps its own limits."""
        config = limits_config()
        share_limits(config, 3)
        self.assertEqual([l.max_connections for l in config.listeners], [10, 2])
        self.assertEqual([(c.max_connections, c.max_pending) for c in config.clusters], [(100, 2), (1, 3)])

    def test_total_never_exceeds_limit(self) -> None:
        """For limits of at least N, N workers' shares add up to no more than the limit."""
        config = limits_config()
        for count in (2, 3, 4, 7):
            shared = share_limits(config, count)
            for original, mine in zip(config.listeners, shared.listeners):
                if original.max_connections >= count:
                    self.assertLessEqual(mine.max_connections * count, original.max_connections)
                self.assertGreaterEqual(mine.max_connections, 1)
            for original_c, mine_c in zip(config.clusters, shared.clusters):
                for field in ("max_connections", "max_pending"):
                    limit, part = getattr(original_c, field), getattr(mine_c, field)
                    if limit >= count:
                        self.assertLessEqual(part * count, limit)
                    self.assertGreaterEqual(part, 1)


class WorkerArgvTests(SynchronousTestCase):
    """worker_argv: the command line of a child worker."""

    def test_argv(self) -> None:
        """The child runs twistd egressproxy in the foreground on the absolute config path with its index."""
        argv = worker_argv("egress.yaml", 2)
        self.assertEqual(argv[-5:], ["egressproxy", "--config", os.path.abspath("egress.yaml"), "--worker", "2"])
        self.assertIn("-n", argv)
        self.assertIn("--pidfile=", argv)


# -- snapshot ----------------------------------------------------------------------


def listener_entry(**values: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"connections": 0, "active": 0, "rejected": {}, "received": 0, "sent": 0}
    entry.update(values)
    return entry


def cluster_entry(**values: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "active": 0, "connections": 0, "failures": {}, "overflows": 0, "buckets": zero_buckets(), "sum": 0.0,
    }
    entry.update(values)
    return entry


def numbered(n: int) -> snapshot.Snapshot:
    """A minimal valid snapshot told apart by ``n``."""
    return {"listeners": {"direct": {"connections": n}}, "clusters": {}}


def numbered_line(n: int) -> bytes:
    return json.dumps(numbered(n)).encode()


def sample() -> snapshot.Snapshot:
    """A worker's snapshot with something in every field."""
    buckets = zero_buckets()
    buckets[2] = 3
    buckets[13] = 1
    return {
        "listeners": {
            "direct": listener_entry(connections=5, active=2, rejected={"source": 1}, received=100, sent=200),
        },
        "clusters": {
            "pg": cluster_entry(
                active=2, connections=6, failures={"refused": 4, "dns": 1}, overflows=3, buckets=buckets, sum=12.5
            ),
        },
    }


class TakeTests(SynchronousTestCase):
    """snapshot.take over real ListenerRuntime and UpstreamCluster objects."""

    def setUp(self) -> None:
        self.service = busy_service()
        self.taken = snapshot.take(self.service)

    def test_sections(self) -> None:
        """A snapshot has every listener and every cluster of the service by name."""
        self.assertEqual(sorted(self.taken), ["clusters", "listeners"])
        self.assertEqual(sorted(self.taken["listeners"]), ["direct", "vendor"])
        self.assertEqual(sorted(self.taken["clusters"]), ["api", "pg"])

    def test_busy_listener(self) -> None:
        """A listener's counters, gauge and bytes include its live session."""
        rejected = dict.fromkeys(REJECT_REASONS, 0)
        rejected.update({"source": 2, "max_connections": 1})
        self.assertEqual(
            self.taken["listeners"]["direct"],
            {
                "connections": 12, "active": 1, "rejected": rejected, "received": 1284, "sent": 2892,
                "login_refused": {}, "reported": {},
            },
        )

    def test_quiet_listener(self) -> None:
        """A listener without connections has zeros everywhere."""
        self.assertEqual(
            self.taken["listeners"]["vendor"],
            {
                "connections": 0, "active": 0, "rejected": dict.fromkeys(REJECT_REASONS, 0), "received": 0, "sent": 0,
                "login_refused": {}, "reported": {},
            },
        )

    def test_busy_cluster(self) -> None:
        """A cluster's active count, connections, failures, overflows and per-bucket connect times."""
        entry = self.taken["clusters"]["pg"]
        failures = dict.fromkeys(CONNECT_FAILURE_REASONS, 0)
        failures.update({"refused": 2, "timeout": 1})
        buckets = zero_buckets()
        buckets[2] = 2  # 0.003 twice: le 0.005
        buckets[7] = 1  # 0.2: le 0.25
        buckets[13] = 1  # 20.0: +Inf
        self.assertEqual(
            {key: value for key, value in entry.items() if key != "sum"},
            {"active": 3, "connections": 4, "failures": failures, "overflows": 5, "buckets": buckets},
        )
        self.assertAlmostEqual(entry["sum"], 20.206)

    def test_full_cluster(self) -> None:
        """The one-connection cluster counts its connection and its 0.01s connect (le 0.01)."""
        entry = self.taken["clusters"]["api"]
        buckets = zero_buckets()
        buckets[3] = 1
        self.assertEqual(
            {key: value for key, value in entry.items() if key != "sum"},
            {"active": 1, "connections": 1, "failures": dict.fromkeys(CONNECT_FAILURE_REASONS, 0), "overflows": 0,
             "buckets": buckets},
        )
        self.assertAlmostEqual(entry["sum"], 0.01)

    def test_copies(self) -> None:
        """Changing a snapshot's reason maps or buckets leaves the runtimes alone."""
        self.taken["listeners"]["direct"]["rejected"]["source"] = 99
        self.taken["clusters"]["pg"]["failures"]["refused"] = 99
        self.taken["clusters"]["pg"]["buckets"][0] = 99
        self.assertEqual(self.service.listeners["direct"].rejected["source"], 2)
        self.assertEqual(self.service.clusters["pg"].connect_failures["refused"], 2)
        self.assertEqual(self.service.clusters["pg"].connect_seconds.counts[0], 0)

    def test_json_round_trip(self) -> None:
        """A snapshot survives JSON unchanged, as it travels over the pipe."""
        self.assertEqual(json.loads(json.dumps(self.taken)), self.taken)

    def test_empty(self) -> None:
        """empty() has both sections and nothing in them."""
        self.assertEqual(snapshot.empty(), {"listeners": {}, "clusters": {}})


class AddTests(SynchronousTestCase):
    """snapshot.add: sums of counters, reason maps and histograms."""

    def test_sums_counters(self) -> None:
        """Counters and gauges of the same listener and cluster are added up."""
        total = snapshot.add(sample(), sample())
        self.assertEqual(
            {key: total["listeners"]["direct"][key] for key in ("connections", "active", "received", "sent")},
            {"connections": 10, "active": 4, "received": 200, "sent": 400},
        )
        self.assertEqual(
            {key: total["clusters"]["pg"][key] for key in ("active", "connections", "overflows", "sum")},
            {"active": 4, "connections": 12, "overflows": 6, "sum": 25.0},
        )

    def test_sums_reasons(self) -> None:
        """Reason maps are added per reason; a reason only one side has is kept."""
        into = sample()
        other = sample()
        other["listeners"]["direct"]["rejected"] = {"source": 2, "max_connections": 7}
        other["clusters"]["pg"]["failures"] = {"timeout": 1}
        snapshot.add(into, other)
        self.assertEqual(into["listeners"]["direct"]["rejected"], {"source": 3, "max_connections": 7})
        self.assertEqual(into["clusters"]["pg"]["failures"], {"refused": 4, "dns": 1, "timeout": 1})

    def test_sums_buckets(self) -> None:
        """Histogram buckets are added bucket by bucket."""
        into = sample()
        other = sample()
        other["clusters"]["pg"]["buckets"] = list(range(14))
        snapshot.add(into, other)
        expected = list(range(14))
        expected[2] += 3
        expected[13] += 1
        self.assertEqual(into["clusters"]["pg"]["buckets"], expected)

    def test_returns_target(self) -> None:
        """add returns the snapshot it added into."""
        into = sample()
        self.assertIs(snapshot.add(into, sample()), into)

    def test_new_names_added(self) -> None:
        """Without only_known, a listener or cluster the target lacks is added."""
        into = snapshot.empty()
        snapshot.add(into, sample())
        self.assertEqual(into, sample())

    def test_no_aliasing(self) -> None:
        """Names added from another snapshot are copies: changing the sum leaves the source alone."""
        source = sample()
        into = snapshot.add(snapshot.empty(), source)
        snapshot.add(into, sample())
        into["clusters"]["pg"]["buckets"][0] = 99
        into["listeners"]["direct"]["rejected"]["source"] = 99
        self.assertEqual(source, sample())

    def test_only_known(self) -> None:
        """With only_known, listeners and clusters the target lacks are skipped; known ones still add."""
        into = sample()
        other = sample()
        other["listeners"]["removed"] = listener_entry(connections=50)
        other["clusters"]["gone"] = cluster_entry(overflows=9)
        snapshot.add(into, other, only_known=True)
        self.assertEqual(sorted(into["listeners"]), ["direct"])
        self.assertEqual(sorted(into["clusters"]), ["pg"])
        self.assertEqual(into["listeners"]["direct"]["connections"], 10)

    def test_missing_sections(self) -> None:
        """A snapshot without sections adds nothing; a target without them gets them."""
        into = sample()
        snapshot.add(into, {})
        self.assertEqual(into, sample())
        bare: Any = {}
        snapshot.add(bare, sample())
        self.assertEqual(bare, sample())

    def test_malformed_sections_and_entries(self) -> None:
        """Sections or entries that are not dicts are skipped without raising."""
        into = sample()
        snapshot.add(into, {"listeners": [1, 2], "clusters": {"pg": "x", "api": None, "other": [3]}})  # type: ignore[dict-item]
        self.assertEqual(into, sample())

    def test_other_bucket_length(self) -> None:
        """Buckets of another length are not added: the target keeps its own, other fields still add."""
        into = sample()
        other = sample()
        other["clusters"]["pg"]["buckets"] = [1, 2, 3]
        snapshot.add(into, other)
        self.assertEqual(into["clusters"]["pg"]["buckets"], sample()["clusters"]["pg"]["buckets"])
        self.assertEqual(into["clusters"]["pg"]["overflows"], 6)

    def test_non_numbers_ignored(self) -> None:
        """Booleans, strings and nulls in place of counters are not added."""
        into = sample()
        other = {"listeners": {"direct": {"connections": True, "received": "12", "sent": None}}, "clusters": {}}
        snapshot.add(into, other)
        self.assertEqual(into, sample())


class RetireTests(SynchronousTestCase):
    """snapshot.retire: what an exited worker still contributes."""

    def test_drops_gauges(self) -> None:
        """The active gauges of listeners and clusters are dropped."""
        retired = snapshot.retire(sample())
        self.assertNotIn("active", retired["listeners"]["direct"])
        self.assertNotIn("active", retired["clusters"]["pg"])

    def test_keeps_counters(self) -> None:
        """Every other field is kept as it was."""
        retired = snapshot.retire(sample())
        expected = sample()
        del expected["listeners"]["direct"]["active"]
        del expected["clusters"]["pg"]["active"]
        self.assertEqual(retired, expected)

    def test_input_unchanged(self) -> None:
        """The snapshot retired keeps its gauges."""
        original = sample()
        snapshot.retire(original)
        self.assertEqual(original, sample())

    def test_retired_adds_without_gauges(self) -> None:
        """Adding a retired snapshot to a live one adds its counters but not its gauges."""
        total = snapshot.add(sample(), snapshot.retire(sample()))
        self.assertEqual(total["listeners"]["direct"]["active"], 2)
        self.assertEqual(total["listeners"]["direct"]["connections"], 10)
        self.assertEqual(total["clusters"]["pg"]["active"], 2)
        self.assertEqual(total["clusters"]["pg"]["overflows"], 6)


# -- the main worker's side: WorkerProcess and WorkerPool --------------------------------


class FakeProcessTransport:
    """A spawned child as its protocol sees it: a pid and the signals sent to it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []
        self.ended = False

    def signalProcess(self, signum: int) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(signum)


class ProcessReactor(MemoryReactorClock):
    """A MemoryReactorClock that records spawnProcess calls instead of forking."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []

    def spawnProcess(self, processProtocol, executable, args, env=None, path=None, uid=None, gid=None,  # type: ignore[no-untyped-def]
                     usePTY=0, childFDs=None):
        transport = FakeProcessTransport(1000 + len(self.spawned))
        self.spawned.append(
            dict(protocol=processProtocol, executable=executable, args=args, env=env, childFDs=childFDs,
                 transport=transport)
        )
        processProtocol.makeConnection(transport)
        return transport


def fake_argv(index: int) -> list[str]:
    return ["/usr/bin/worker", "--worker", str(index)]


def end(worker: WorkerProcess, reason: Exception | None = None) -> None:
    """The child exits: its transport stops taking signals and its protocol hears of it."""
    worker.transport.ended = True  # type: ignore[union-attr]
    worker.processEnded(Failure(reason if reason is not None else ProcessTerminated(exitCode=1)))


class WorkerProcessDataTests(SynchronousTestCase):
    """WorkerProcess.childDataReceived: snapshot lines from a child's descriptor 3."""

    def setUp(self) -> None:
        self.worker = WorkerProcess(WorkerPool(ProcessReactor(), 2, fake_argv), 1)

    def feed(self, *chunks: bytes, fd: int = SNAPSHOT_FD) -> None:
        for chunk in chunks:
            self.worker.childDataReceived(fd, chunk)

    def test_starts_empty(self) -> None:
        """Before any line arrives a worker's snapshot is empty."""
        self.assertEqual(self.worker.snapshot, snapshot.empty())

    def test_whole_line(self) -> None:
        """A complete JSON line becomes the worker's snapshot."""
        self.feed(json.dumps(sample()).encode() + b"\n")
        self.assertEqual(self.worker.snapshot, sample())

    def test_split_line(self) -> None:
        """A line split over two chunks is used once its end arrives."""
        line = json.dumps(sample()).encode() + b"\n"
        self.feed(line[:20])
        self.assertEqual(self.worker.snapshot, snapshot.empty())
        self.feed(line[20:])
        self.assertEqual(self.worker.snapshot, sample())

    def test_byte_by_byte(self) -> None:
        """A line arriving one byte at a time is assembled."""
        line = json.dumps(sample()).encode() + b"\n"
        self.feed(*(line[i:i + 1] for i in range(len(line))))
        self.assertEqual(self.worker.snapshot, sample())

    def test_last_valid_line_wins(self) -> None:
        """Of several complete lines in one chunk, the last valid one is kept."""
        self.feed(numbered_line(1) + b"\n" + numbered_line(2) + b"\n" + numbered_line(3) + b"\n")
        self.assertEqual(self.worker.snapshot, numbered(3))

    def test_unfinished_line_not_used(self) -> None:
        """A line without its newline yet does not replace the last complete one."""
        self.feed(numbered_line(1) + b"\n" + numbered_line(2))
        self.assertEqual(self.worker.snapshot, numbered(1))
        self.feed(b"\n")
        self.assertEqual(self.worker.snapshot, numbered(2))

    def test_garbage_after_valid_line(self) -> None:
        """A garbage line after a valid one leaves the valid one in place."""
        self.feed(numbered_line(1) + b"\n" + numbered_line(2) + b"\nnot json\n")
        self.assertEqual(self.worker.snapshot, numbered(2))

    def test_garbage_ignored(self) -> None:
        """Lines that are not snapshots (garbage, lists, bad UTF-8, wrong shapes or kinds, deep nesting) are ignored."""
        self.feed(numbered_line(1) + b"\n")
        self.feed(b"garbage\n", b"\n", b"[1, 2]\n", b'"text"\n', b"\xff\xfe\n", b'{"n": \n')
        self.feed(b'{"listeners": [1]}\n', b'{"listeners": {"a": 5}}\n')
        self.feed(b'{"listeners": {"a": {"rejected": {"source": "x"}}}}\n')
        self.feed(b'{"listeners": {"a": {"connections": {"x": 1}}}}\n')
        self.feed(b'{"listeners": {"a": {"rejected": 3}}}\n')
        self.feed(b'{"clusters": {"pg": {"buckets": [1, "a"]}}}\n')
        self.feed(b'{"clusters": {"pg": {"sum": true}}}\n')
        self.feed(b"[" * 100000 + b"\n")
        self.assertEqual(self.worker.snapshot, numbered(1))

    def test_unknown_fields_dropped(self) -> None:
        """Fields this build does not know are left out; the known ones are kept."""
        self.feed(b'{"listeners": {"a": {"connections": 4, "future": [1]}}, "later": {}}\n')
        self.assertEqual(self.worker.snapshot, {"listeners": {"a": {"connections": 4}}, "clusters": {}})

    def test_other_descriptors_ignored(self) -> None:
        """Data on descriptors other than 3 neither becomes a snapshot nor joins a partial line."""
        self.feed(numbered_line(1) + b"\n", fd=1)
        self.feed(numbered_line(2) + b"\n", fd=2)
        self.assertEqual(self.worker.snapshot, snapshot.empty())
        self.feed(numbered_line(3))
        self.feed(b"junk\n", fd=1)
        self.feed(b"\n")
        self.assertEqual(self.worker.snapshot, numbered(3))

    def test_overlong_partial_dropped(self) -> None:
        """A partial line longer than MAX_SNAPSHOT_LINE is dropped; the lines after it still count."""
        first = numbered_line(1) + b"\n"
        self.patch(workers, "MAX_SNAPSHOT_LINE", len(first))
        self.feed(first)
        self.feed(numbered_line(2)[:-2] + b" " * len(first))
        self.assertEqual(self.worker._partial, b"")
        self.feed(b"}}\n")
        self.assertEqual(self.worker.snapshot, numbered(1))
        self.feed(numbered_line(3) + b"\n")
        self.assertEqual(self.worker.snapshot, numbered(3))

    def test_partial_at_limit_kept(self) -> None:
        """A partial line of exactly MAX_SNAPSHOT_LINE bytes is kept."""
        prefix = numbered_line(2)[:-2]
        self.patch(workers, "MAX_SNAPSHOT_LINE", len(prefix))
        self.feed(prefix)
        self.assertEqual(self.worker._partial, prefix)
        self.feed(b"}}\n")
        self.assertEqual(self.worker.snapshot, numbered(2))

    def test_default_limit(self) -> None:
        """A partial line may be several megabytes before it is dropped."""
        self.assertGreaterEqual(MAX_SNAPSHOT_LINE, 1024 * 1024)


class WorkerPoolTests(SynchronousTestCase):
    """WorkerPool: spawning, restarts, counters of exited children, signals and stop."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.patch(workers, "log", Logger(namespace="egressproxy.app.workers", observer=self.events.append))
        self.reactor = ProcessReactor()
        self.pool = WorkerPool(self.reactor, 3, fake_argv, env={"PATH": "/bin"})

    def errors(self) -> list[dict[str, Any]]:
        return [event for event in self.events if event["log_level"] == LogLevel.error]

    def worker(self, index: int) -> WorkerProcess:
        return self.pool.live[index]

    def signals(self, index: int) -> list[int]:
        return self.worker(index).transport.signals  # type: ignore[union-attr]

    def test_start_spawns_children(self) -> None:
        """start() with count 3 spawns workers 1 and 2 (the main worker is 0)."""
        self.pool.start()
        self.assertEqual(sorted(self.pool.live), [1, 2])
        self.assertEqual([call["args"] for call in self.reactor.spawned], [fake_argv(1), fake_argv(2)])
        self.assertEqual([call["executable"] for call in self.reactor.spawned], ["/usr/bin/worker"] * 2)

    def test_spawn_descriptors(self) -> None:
        """Children get a pipe from us on 0, our stdout and stderr, and a pipe to us on 3."""
        self.pool.start()
        for call in self.reactor.spawned:
            self.assertEqual(call["childFDs"], {0: "w", 1: 1, 2: 2, 3: "r"})

    def test_spawn_environment(self) -> None:
        """Children get the environment given to the pool."""
        self.pool.start()
        self.assertEqual([call["env"] for call in self.reactor.spawned], [{"PATH": "/bin"}] * 2)

    def test_default_environment(self) -> None:
        """Without env the pool passes a copy of this process's environment."""
        pool = WorkerPool(self.reactor, 2, fake_argv)
        self.assertEqual(pool.env, dict(os.environ))
        self.assertIsNot(pool.env, os.environ)

    def test_pids(self) -> None:
        """Each worker knows its child's pid and index."""
        self.pool.start()
        self.assertEqual([(w.index, w.pid) for w in self.pool.live.values()], [(1, 1000), (2, 1001)])

    def test_count_one_spawns_nothing(self) -> None:
        """With one worker in all there are no children."""
        pool = WorkerPool(self.reactor, 1, fake_argv)
        pool.start()
        self.assertEqual((self.reactor.spawned, pool.live), ([], {}))

    def test_unexpected_exit_logged(self) -> None:
        """A child exiting while not stopping is logged as an error with its index and pid."""
        self.pool.start()
        end(self.worker(1))
        [event] = self.errors()
        self.assertEqual((event["index"], event["pid"]), (1, 1000))
        self.assertIsInstance(event["status"], ProcessTerminated)

    def test_unexpected_exit_restarted(self) -> None:
        """An exited child is started again RESTART_DELAY later, and restarts counts it."""
        self.pool.start()
        old = self.worker(1)
        end(old)
        self.assertEqual((sorted(self.pool.live), self.pool.restarts), ([2], 1))
        self.reactor.advance(RESTART_DELAY / 2)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(RESTART_DELAY / 2)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual(self.reactor.spawned[-1]["args"], fake_argv(1))
        self.assertIsNot(self.worker(1), old)
        self.assertEqual(self.worker(1).pid, 1002)
        self.assertEqual(self.worker(1).snapshot, snapshot.empty())

    def test_restart_counts(self) -> None:
        """Every unexpected exit counts one restart."""
        self.pool.start()
        end(self.worker(1))
        end(self.worker(2))
        self.reactor.advance(RESTART_DELAY)
        end(self.worker(1))
        self.reactor.advance(RESTART_DELAY)
        self.assertEqual((self.pool.restarts, sorted(self.pool.live), len(self.reactor.spawned)), (3, [1, 2], 5))

    def test_exit_status_any(self) -> None:
        """A child that exits with status 0 while not stopping is restarted too."""
        self.pool.start()
        end(self.worker(2), ProcessDone(0))
        self.reactor.advance(RESTART_DELAY)
        self.assertEqual((sorted(self.pool.live), self.pool.restarts), ([1, 2], 1))

    def test_exited_counters_retired(self) -> None:
        """An exited child's counters go into retired, without its gauges."""
        self.pool.start()
        self.worker(1).snapshot = sample()
        end(self.worker(1))
        self.assertEqual(self.pool.retired, snapshot.retire(sample()))

    def test_retired_accumulates(self) -> None:
        """The counters of several exited children add up in retired."""
        self.pool.start()
        self.worker(1).snapshot = sample()
        self.worker(2).snapshot = sample()
        end(self.worker(1))
        end(self.worker(2))
        self.assertEqual(self.pool.retired, snapshot.add(snapshot.retire(sample()), snapshot.retire(sample())))

    def test_retired_not_aliased(self) -> None:
        """Later additions to retired leave the exited worker's snapshot alone."""
        self.pool.start()
        first = self.worker(1)
        first.snapshot = sample()
        self.worker(2).snapshot = sample()
        end(first)
        end(self.worker(2))
        self.assertEqual(first.snapshot, sample())

    def test_snapshots(self) -> None:
        """snapshots() is retired followed by each live child's latest snapshot."""
        self.pool.start()
        self.worker(1).snapshot = sample()
        self.worker(2).snapshot = {"listeners": {}, "clusters": {"pg": cluster_entry(overflows=1)}}
        end(self.worker(1))
        self.reactor.advance(RESTART_DELAY)
        self.worker(1).snapshot = {"listeners": {"direct": listener_entry(connections=1)}, "clusters": {}}
        retired, *live = self.pool.snapshots()
        self.assertEqual(retired, snapshot.retire(sample()))
        self.assertCountEqual(live, [
            {"listeners": {}, "clusters": {"pg": cluster_entry(overflows=1)}},
            {"listeners": {"direct": listener_entry(connections=1)}, "clusters": {}},
        ])

    def test_snapshots_before_start(self) -> None:
        """Before any child, snapshots() is just the empty retired one."""
        self.assertEqual(self.pool.snapshots(), [snapshot.empty()])

    def test_signal_reaches_every_worker(self) -> None:
        """signal(SIGHUP) is sent to every live child."""
        self.pool.start()
        self.pool.signal(signal.SIGHUP)
        self.assertEqual([self.signals(1), self.signals(2)], [[signal.SIGHUP], [signal.SIGHUP]])

    def test_signal_not_sent_to_exited(self) -> None:
        """A child that has exited is no longer signalled."""
        self.pool.start()
        first = self.worker(1)
        end(first)
        self.pool.signal(signal.SIGHUP)
        self.assertEqual((first.transport.signals, self.signals(2)), ([], [signal.SIGHUP]))  # type: ignore[union-attr]

    def test_signal_exited_already(self) -> None:
        """A child that ended before its exit was reported does not make signal() raise."""
        self.pool.start()
        self.worker(1).transport.ended = True  # type: ignore[union-attr]
        self.pool.signal(signal.SIGHUP)
        self.assertEqual(self.signals(2), [signal.SIGHUP])

    def test_stop_terminates_all(self) -> None:
        """stop() sends SIGTERM to every live child."""
        self.pool.start()
        self.pool.stop(10.0)
        self.assertEqual([self.signals(1), self.signals(2)], [[signal.SIGTERM], [signal.SIGTERM]])

    def test_stop_waits_for_all(self) -> None:
        """stop()'s Deferred fires only once every child has exited, and then no kill is pending."""
        self.pool.start()
        first, second = self.worker(1), self.worker(2)
        d = self.pool.stop(10.0)
        self.assertNoResult(d)
        end(first, ProcessDone(0))
        self.assertNoResult(d)
        end(second, ProcessDone(0))
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stop_no_restart(self) -> None:
        """Children exiting during stop are not restarted and not logged as errors."""
        self.pool.start()
        first, second = self.worker(1), self.worker(2)
        self.pool.stop(10.0)
        end(first, ProcessDone(0))
        end(second, ProcessTerminated(signal=signal.SIGTERM))
        self.reactor.advance(RESTART_DELAY * 20)
        self.assertEqual((self.pool.live, len(self.reactor.spawned), self.pool.restarts), ({}, 2, 0))
        self.assertEqual(self.errors(), [])

    def test_stop_retires_counters(self) -> None:
        """Children exiting during stop still leave their counters in retired."""
        self.pool.start()
        first, second = self.worker(1), self.worker(2)
        first.snapshot = sample()
        self.pool.stop(10.0)
        end(first, ProcessDone(0))
        end(second, ProcessDone(0))
        self.assertEqual(self.pool.retired, snapshot.retire(sample()))

    def test_stop_kills_stragglers(self) -> None:
        """A child still running `timeout` after stop() gets SIGKILL; one that exited does not."""
        self.pool.start()
        first, second = self.worker(1), self.worker(2)
        d = self.pool.stop(10.0)
        end(first, ProcessDone(0))
        self.reactor.advance(9.5)
        self.assertEqual(second.transport.signals, [signal.SIGTERM])  # type: ignore[union-attr]
        self.reactor.advance(0.5)
        self.assertEqual(second.transport.signals, [signal.SIGTERM, signal.SIGKILL])  # type: ignore[union-attr]
        self.assertEqual(first.transport.signals, [signal.SIGTERM])  # type: ignore[union-attr]
        self.assertEqual([event["index"] for event in self.errors()], [2])
        self.assertNoResult(d)
        end(second, ProcessTerminated(signal=signal.SIGKILL))
        self.successResultOf(d)

    def test_stop_without_workers(self) -> None:
        """stop() with no live child fires at once."""
        self.successResultOf(self.pool.stop(10.0))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stop_during_restart_delay(self) -> None:
        """stop() while the only exited child awaits its restart fires at once, and no restart follows."""
        pool = WorkerPool(self.reactor, 2, fake_argv)
        pool.start()
        end(pool.live[1])
        self.successResultOf(pool.stop(10.0))
        self.reactor.advance(RESTART_DELAY * 2)
        self.assertEqual((pool.live, len(self.reactor.spawned)), ({}, 1))

    def test_start_after_stop(self) -> None:
        """Once stopping, the pool spawns nothing more."""
        self.pool.stop(1.0)
        self.pool.start()
        self.assertEqual(self.reactor.spawned, [])


# -- a child worker's side: SnapshotSender and ParentWatch ---------------------------------


class StubService:
    """The little SnapshotSender reads of a service: no listeners, no clusters, a clock."""

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.listeners: dict[str, Any] = {}

    def all_clusters(self) -> dict[str, Any]:
        return {}


class StubListener:
    """What snapshot.take reads of a listener runtime, as plain attributes."""

    connections_total = 1
    active = 0
    rejected: dict[str, int] = {"source": 0, "max_connections": 0}
    login_refused: dict[str, int] = {"28P01": 2}
    reported: dict[str, int] = {"destination": 3}
    bytes_received = 123456789
    bytes_sent = 987654321


EMPTY_LINE = b'{"listeners":{},"clusters":{}}\n'


class PipeMixin:
    """Real pipes, closed again by cleanup (each exactly once)."""

    def make_pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self.closed: set[int] = getattr(self, "closed", set())
        for fd in (r, w):
            self.addCleanup(self.close_fd, fd)  # type: ignore[attr-defined]
        return r, w

    def close_fd(self, fd: int) -> None:
        if fd not in self.closed:
            self.closed.add(fd)
            os.close(fd)

    def read_all(self, fd: int) -> bytes:
        """Everything the pipe holds now (the read end is made non-blocking)."""
        os.set_blocking(fd, False)
        data = b""
        for _ in range(MAX_ROUNDS):
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return data
            if not chunk:
                return data
            data += chunk
        raise AssertionError("pipe never ran dry")

    def fill(self, fd: int) -> int:
        """Write filler bytes until the (non-blocking) pipe takes no more; how many were written."""
        os.set_blocking(fd, False)
        total = 0
        for size in (65536, 4096, 1):
            for _ in range(MAX_ROUNDS):
                try:
                    total += os.write(fd, b"." * size)
                except BlockingIOError:
                    break
            else:
                raise AssertionError("pipe never filled")
        return total


class SnapshotSenderTests(PipeMixin, SynchronousTestCase):
    """SnapshotSender: one JSON line per interval over a non-blocking pipe."""

    def setUp(self) -> None:
        self.r, self.w = self.make_pipe()
        self.service = StubService()
        self.sender = SnapshotSender(self.service, fd=self.w)  # type: ignore[arg-type]

    def test_non_blocking(self) -> None:
        """The sender makes its descriptor non-blocking."""
        self.assertFalse(os.get_blocking(self.w))

    def test_send_one_line(self) -> None:
        """send() writes the service's snapshot as one compact JSON line."""
        self.sender.send()
        self.assertEqual(self.read_all(self.r), EMPTY_LINE)
        self.assertEqual(self.sender.pending, b"")

    def test_send_real_runtimes(self) -> None:
        """The line is snapshot.take of the service."""
        service = busy_service()
        r, w = self.make_pipe()
        SnapshotSender(service, fd=w).send()  # type: ignore[arg-type]
        data = self.read_all(r)
        self.assertEqual(data.count(b"\n"), 1)
        self.assertTrue(data.endswith(b"\n"))
        self.assertEqual(json.loads(data), json.loads(json.dumps(snapshot.take(service))))

    def test_start_sends_now_and_every_interval(self) -> None:
        """start() sends at once, then again every SNAPSHOT_INTERVAL."""
        self.sender.start()
        self.addCleanup(self.sender._loop.stop)
        self.assertEqual(self.read_all(self.r), EMPTY_LINE)
        self.service.reactor.advance(SNAPSHOT_INTERVAL / 2)
        self.assertEqual(self.read_all(self.r), b"")
        self.service.reactor.advance(SNAPSHOT_INTERVAL / 2)
        self.assertEqual(self.read_all(self.r), EMPTY_LINE)
        self.service.reactor.advance(SNAPSHOT_INTERVAL)
        self.assertEqual(self.read_all(self.r), EMPTY_LINE)

    def test_stop_sends_last_line(self) -> None:
        """stop() ends the timer and sends the final counts."""
        self.sender.start()
        self.read_all(self.r)
        self.sender.stop()
        self.assertEqual(self.read_all(self.r), EMPTY_LINE)
        self.service.reactor.advance(SNAPSHOT_INTERVAL * 5)
        self.assertEqual(self.read_all(self.r), b"")
        self.assertEqual(self.service.reactor.getDelayedCalls(), [])

    def test_full_pipe_keeps_line_pending(self) -> None:
        """With the pipe full, send() returns at once and keeps the whole line pending."""
        filled = self.fill(self.w)
        self.sender.send()
        self.assertEqual(self.sender.pending, EMPTY_LINE)
        self.assertFalse(self.sender.broken)
        self.assertEqual(len(self.read_all(self.r)), filled)

    def test_pending_line_sent_first(self) -> None:
        """After the pipe drains, the next send() finishes the pending line; later ones send new lines."""
        filled = self.fill(self.w)
        self.sender.send()
        pending = self.sender.pending
        self.service.listeners["new"] = StubListener()
        self.sender.send()  # still full: the pending line waits, no new one is made
        self.assertIs(self.sender.pending, pending)
        drained = self.read_all(self.r)
        self.assertEqual(drained, b"." * filled)
        self.sender.send()
        line = self.read_all(self.r)
        self.assertEqual(line, EMPTY_LINE)
        self.assertEqual(json.loads(line), snapshot.empty())
        self.sender.send()
        self.assertEqual(json.loads(self.read_all(self.r))["listeners"]["new"]["received"], 123456789)

    def test_long_line_finished_across_sends(self) -> None:
        """A line longer than the pipe is written in parts over several sends and reads back whole."""
        for i in range(3000):
            self.service.listeners[f"listener{i}"] = StubListener()
        expected = json.loads(json.dumps(snapshot.take(self.service)))
        data = b""
        for _ in range(MAX_ROUNDS):
            self.sender.send()
            data += self.read_all(self.r)
            if not self.sender.pending:
                break
            self.service.listeners["late"] = StubListener()  # not in the line being finished
        else:
            self.fail("the line was never finished")
        self.assertGreater(len(data), 65536)
        self.assertEqual(data.count(b"\n"), 1)
        self.assertTrue(data.endswith(b"\n"))
        self.assertEqual(json.loads(data), expected)

    def test_closed_pipe_marks_broken(self) -> None:
        """With the read end closed, send() marks the sender broken and does not raise."""
        self.close_fd(self.r)
        self.sender.send()
        self.assertTrue(self.sender.broken)

    def test_broken_stops_writing(self) -> None:
        """Once broken, send() writes nothing more."""
        self.close_fd(self.r)
        self.sender.send()
        writes: list[tuple[int, bytes]] = []
        self.patch(os, "write", lambda fd, data: writes.append((fd, data)) or len(data))
        self.sender.send()
        self.sender.stop()
        self.assertEqual(writes, [])


class ParentWatchTests(PipeMixin, SynchronousTestCase):
    """ParentWatch: standard input from the main worker; end-of-file means it is gone."""

    def setUp(self) -> None:
        self.r, self.w = self.make_pipe()
        self.reactor = MemoryReactorClock()
        self.gone: list[None] = []
        self.watch = ParentWatch(self.reactor, lambda: self.gone.append(None), fd=self.r)
        self.reactor.addReader(self.watch)

    def test_descriptor(self) -> None:
        """The watch reads the given descriptor, made non-blocking."""
        self.assertEqual(self.watch.fileno(), self.r)
        self.assertFalse(os.get_blocking(self.r))

    def test_nothing_to_read(self) -> None:
        """With nothing in the pipe doRead returns None."""
        self.assertIsNone(self.watch.doRead())
        self.assertFalse(self.watch.gone)

    def test_data_ignored(self) -> None:
        """Data arriving on the pipe is read and ignored."""
        os.write(self.w, b"hello")
        self.assertIsNone(self.watch.doRead())
        self.assertIsNone(self.watch.doRead())
        self.assertFalse(self.watch.gone)
        self.assertEqual(self.gone, [])

    def test_end_of_file(self) -> None:
        """Once the write end is closed doRead returns CONNECTION_DONE."""
        os.write(self.w, b"x")
        self.close_fd(self.w)
        self.assertIsNone(self.watch.doRead())
        self.assertIs(self.watch.doRead(), main.CONNECTION_DONE)
        self.assertTrue(self.watch.gone)

    def test_gone_calls_on_gone_once(self) -> None:
        """After end-of-file, connectionLost stops reading and calls on_gone once."""
        self.close_fd(self.w)
        reason = self.watch.doRead()
        self.watch.connectionLost(Failure(reason))  # type: ignore[arg-type]
        self.assertEqual(self.gone, [None])
        self.assertNotIn(self.watch, self.reactor.readers)

    def test_shutdown_not_gone(self) -> None:
        """connectionLost without an ended pipe (reactor shutdown) stops reading but does not call on_gone."""
        self.watch.connectionLost(Failure(main.CONNECTION_LOST))
        self.assertEqual(self.gone, [])
        self.assertNotIn(self.watch, self.reactor.readers)

    def test_read_error(self) -> None:
        """A read error other than would-block counts as the main worker gone (CONNECTION_LOST)."""
        fd = os.open(os.getcwd(), os.O_RDONLY)  # reading a directory fails with EISDIR
        self.addCleanup(os.close, fd)
        watch = ParentWatch(self.reactor, lambda: self.gone.append(None), fd=fd)
        self.assertIs(watch.doRead(), main.CONNECTION_LOST)
        watch.connectionLost(Failure(main.CONNECTION_LOST))
        self.assertEqual(self.gone, [None])


class DataflowTests(PipeMixin, SynchronousTestCase):
    """A SnapshotSender's pipe read by a WorkerProcess, as between a child and the main worker."""

    def test_sender_to_worker(self) -> None:
        """What a sender writes becomes the receiving worker's snapshot, chunk by chunk."""
        service = busy_service()
        r, w = self.make_pipe()
        sender = SnapshotSender(service, fd=w)  # type: ignore[arg-type]
        worker = WorkerProcess(WorkerPool(ProcessReactor(), 2, fake_argv), 1)
        sender.send()
        data = self.read_all(r)
        for i in range(0, len(data), 7):
            worker.childDataReceived(SNAPSHOT_FD, data[i:i + 7])
        self.assertEqual(worker.snapshot, json.loads(json.dumps(snapshot.take(service))))


class ServiceShareTests(SynchronousTestCase):
    """An EgressService of ``workers: 2`` runs its share of every limit, dynamic clusters included."""

    def test_service_limits_shared(self) -> None:
        """Listener, cluster and a forward proxy's dynamic cluster limits are halved with two workers."""
        config = parse_config(
            "workers: 2\n"
            "admin: false\n"
            "metrics: false\n"
            "listeners:\n"
            '  - {name: t, listen: "127.0.0.1:7000", cluster: c, max_connections: 100}\n'
            '  - {name: fwd, listen: "127.0.0.1:7001", mode: http_connect, allow_destinations: ["api.egress.test:443"]}\n'
            "clusters:\n"
            '  - {name: c, endpoints: ["127.0.0.1:7002"], max_connections: 10, max_pending: 3}\n',
            "t.yaml",
            {},
        )
        service = EgressService(config, MemoryReactorClock())
        self.assertEqual(service.listeners["t"].config.max_connections, 50)
        self.assertEqual(
            (service.clusters["c"].breaker.max_connections, service.clusters["c"].breaker.max_pending), (5, 1)
        )
        dynamic = service.dynamic["fwd"].breaker
        self.assertEqual((dynamic.max_connections, dynamic.max_pending), (1024 // 2, 128 // 2))
