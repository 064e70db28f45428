"""A close-on-accept gate for tests: what some providers put in front of a database.

Run it inside a test's network namespace::

    python -m tests.integration.closegate --listen 10.77.0.10:6432 --to 10.77.0.10:5432 --allow 10.77.0.20   # in the test's netns

It accepts every TCP connection; one whose source address is not in
``--allow`` is closed at once, before a byte is read or written (the client
sees "server closed the connection unexpectedly"); an allowed one is relayed
both ways to ``--to``.  It prints ``ready HOST:PORT`` once listening and
appends ``closed ADDR`` or ``relayed ADDR`` per connection to stdout.

Bounded: at most 16 relays at once (beyond that, new ones are closed), each
relay ends when either side closes or after 60 s idle, and ``--max-seconds``
(default 300) ends the gate by itself.  SIGTERM ends it at once.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
import time

MAX_RELAYS = 16
IDLE_SECONDS = 60.0


def split(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy ``source`` to ``sink`` until EOF or error, then half-close ``sink``."""
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    try:
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def relay(client: socket.socket, target: tuple[str, int], slots: threading.Semaphore) -> None:
    try:
        upstream = socket.create_connection(target, timeout=5)
        for s in (client, upstream):
            s.settimeout(IDLE_SECONDS)
        other = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        other.start()
        pump(client, upstream)
        other.join(IDLE_SECONDS)
        upstream.close()
    except OSError:
        pass
    finally:
        client.close()
        slots.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    parser.add_argument("--to", required=True, help="HOST:PORT to relay allowed sources to")
    parser.add_argument("--allow", action="append", default=[], help="a source address to relay (repeatable)")
    parser.add_argument("--max-seconds", type=float, default=300.0)
    args = parser.parse_args(argv)
    host, port = split(args.listen)
    target = split(args.to)
    allowed = set(args.allow)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(16)
    server.settimeout(0.5)
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    slots = threading.Semaphore(MAX_RELAYS)
    print(f"ready {host}:{port}", flush=True)
    end = time.monotonic() + args.max_seconds
    while not stopping and time.monotonic() < end:
        try:
            client, peer = server.accept()
        except (socket.timeout, InterruptedError):
            continue
        source = peer[0]
        if source not in allowed or not slots.acquire(blocking=False):
            client.close()
            print(f"closed {source}", flush=True)
            continue
        print(f"relayed {source}", flush=True)
        threading.Thread(target=relay, args=(client, target, slots), daemon=True).start()
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
