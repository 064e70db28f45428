"""
The measurements: each drives one peer's port once and returns plain numbers.

What this module owns: running pgbench, iperf3 and psql with bounded timeouts
and parsing what they print, and the held-connection client (many TCP
connections through a port to the echo server, each proved end to end by an
echo, held while the caller measures the proxy, then closed). It does not
start peers or upstreams and does not aggregate samples.

Every call is bounded: subprocesses get a timeout, and the held-connection
client has a per-connection timeout and an overall deadline, after which the
connections not yet made count as failures.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
_PROCESSED = re.compile(r"^number of transactions actually processed: ([0-9]+)", re.MULTILINE)
_FAILED = re.compile(r"^number of failed transactions: ([0-9]+)", re.MULTILINE)
_PSQL_TIME = re.compile(r"^Time: ([0-9.]+) ms", re.MULTILINE)


def client_env() -> dict[str, str]:
    """
    The environment for libpq tools: no PG* variables, English messages.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.pop("LANGUAGE", None)
    env["LC_ALL"] = "C.UTF-8"
    return env


class MeasurementError(Exception):
    """A tool failed; the message carries its output."""


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            errors="replace",
            stdin=subprocess.DEVNULL,
            env=client_env(),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise MeasurementError(f"{argv[0]} timed out after {timeout:.0f}s") from e


def pgbench(dsn: str, script: str, clients: int, threads: int, seconds: int, connect_each: bool) -> dict[str, Any]:
    """
    ``pgbench`` running ``script`` for ``seconds``; tps, latency and failures.

    With ``connect_each`` (``-C``) every transaction opens its own connection,
    TLS handshake included, so tps is the connect rate.
    """
    argv = ["pgbench", "-n", "-f", script, "-T", str(seconds), "-c", str(clients), "-j", str(threads)]
    if connect_each:
        argv.append("-C")
    argv.append(dsn)
    result = _run(argv, timeout=seconds + 60)
    out = result.stdout + result.stderr
    tps = _TPS.search(out)
    if result.returncode != 0 or tps is None:
        raise MeasurementError(f"pgbench exited {result.returncode}:\n{out[-2000:]}")
    latency = _LATENCY.search(out)
    processed = _PROCESSED.search(out)
    failed = _FAILED.search(out)
    return {
        "tps": float(tps.group(1)),
        "latency_ms": float(latency.group(1)) if latency else None,
        "transactions": int(processed.group(1)) if processed else None,
        "failed": int(failed.group(1)) if failed else 0,
    }


def iperf3(port: int, seconds: int) -> dict[str, Any]:
    """
    One iperf3 TCP stream to 127.0.0.1:``port``; what the server received.
    """
    result = _run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"], timeout=seconds + 60)
    try:
        report = json.loads(result.stdout)
    except ValueError:
        raise MeasurementError(f"iperf3 exited {result.returncode}, no JSON:\n{result.stdout[-1000:]}{result.stderr[-1000:]}")
    if "error" in report or result.returncode != 0:
        raise MeasurementError(f"iperf3 exited {result.returncode}: {report.get('error')}")
    end = report["end"]
    return {
        "gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
        "sent_gbit_s": end["sum_sent"]["bits_per_second"] / 1e9,
        "retransmits": end["sum_sent"].get("retransmits"),
    }


def copy_out(dsn: str, table: str, nbytes: int) -> dict[str, Any]:
    """
    ``COPY table TO STDOUT`` through psql into /dev/null; MB/s of COPY data.

    The time is psql's ``\\timing`` for the COPY alone, so the connection and
    TLS handshake, which the connect-rate test measures, are left out.
    """
    argv = [
        "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-o", "/dev/null", "-d", dsn,
        "-c", "\\timing on", "-c", f"COPY {table} TO STDOUT",
    ]
    started = time.perf_counter()
    result = _run(argv, timeout=600)
    wall = time.perf_counter() - started
    timing = _PSQL_TIME.search(result.stdout)
    if result.returncode != 0 or timing is None:
        raise MeasurementError(f"psql exited {result.returncode}:\n{result.stdout[-1000:]}{result.stderr[-1000:]}")
    seconds = float(timing.group(1)) / 1000
    return {"mb_s": nbytes / seconds / 1e6, "seconds": seconds, "wall_seconds": wall, "bytes": nbytes}


def count_copy_bytes(dsn: str, table: str) -> int:
    """
    The size of ``COPY table TO STDOUT``, counted once over ``dsn``.
    """
    argv = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", f"COPY {table} TO STDOUT"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client_env())
    assert proc.stdout is not None
    total = 0
    try:
        while chunk := proc.stdout.read(1 << 20):
            total += len(chunk)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise MeasurementError(f"psql exited {proc.returncode}: {err.decode(errors='replace')}")
    return total


async def _held(
    port: int,
    count: int,
    concurrency: int,
    timeout: float,
    deadline_seconds: float,
    measure: Callable[[], Mapping[str, Any]],
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_seconds
    semaphore = asyncio.Semaphore(concurrency)
    failures: Counter[str] = Counter()
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def one(i: int) -> None:
        async with semaphore:
            if loop.time() > deadline:
                failures["not tried (deadline)"] += 1
                return
            writer: asyncio.StreamWriter | None = None
            kept = False
            try:
                async with asyncio.timeout(timeout):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    token = i.to_bytes(4, "big")
                    writer.write(token)
                    echoed = await reader.readexactly(4)
                if echoed == token:
                    held.append((reader, writer))
                    kept = True
                else:
                    failures["wrong echo"] += 1
            except TimeoutError:
                failures["timeout"] += 1
            except asyncio.IncompleteReadError:
                failures["closed before echo"] += 1
            except OSError as e:
                failures[f"{type(e).__name__}: {e.strerror or e}"] += 1
            finally:
                if writer is not None and not kept:
                    writer.close()

    started = loop.time()
    await asyncio.gather(*(one(i) for i in range(count)))
    open_seconds = loop.time() - started
    accepted = len(held)
    measured = dict(measure())

    # The connections are still alive after the measurement: echo once more.
    alive = 0

    async def again(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            async with asyncio.timeout(timeout):
                writer.write(b"!")
                return await reader.readexactly(1) == b"!"
        except (TimeoutError, asyncio.IncompleteReadError, OSError):
            return False

    for batch_start in range(0, len(held), concurrency):
        batch = held[batch_start:batch_start + concurrency]
        alive += sum(await asyncio.gather(*(again(r, w) for r, w in batch)))

    for _reader, writer in held:
        writer.close()
    for batch_start in range(0, len(held), concurrency):
        batch = held[batch_start:batch_start + concurrency]
        try:
            async with asyncio.timeout(30):
                await asyncio.gather(*(w.wait_closed() for _r, w in batch), return_exceptions=True)
        except TimeoutError:
            failures["close timed out"] += 1
    return {
        "target": count,
        "accepted": accepted,
        "alive_after_measure": alive,
        "open_seconds": open_seconds,
        "failures": dict(failures),
        **measured,
    }


def held_connections(
    port: int,
    count: int,
    measure: Callable[[], Mapping[str, Any]],
    concurrency: int = 200,
    timeout: float = 20.0,
    deadline_seconds: float = 180.0,
) -> dict[str, Any]:
    """
    Open ``count`` connections to ``port``, each proved by an echo; call ``measure``; close.

    ``accepted`` counts connections whose 4-byte token came back through the
    port; ``measure()`` runs while they are all held, its keys are merged into
    the result; ``alive_after_measure`` counts those that echo again after it.
    At most ``concurrency`` connects are in flight at once.
    """
    return asyncio.run(_held(port, count, concurrency, timeout, deadline_seconds, measure))
