"""A canary for tests: records every TCP connection it accepts, on any number of addresses.

Run it inside a test's network namespace::

    ip netns exec NS python -m tests.integration.canary --log FILE --listen 10.0.0.5:8080 --listen [fd00::5]:8080 ...

Each accepted connection appends one line ``LOCAL <- PEER`` to ``--log``
(``10.0.0.5:8080 <- 10.0.0.5:41234``, addresses of the netns) before anything is read, so a test can
prove an address was never dialled (no line) or was (a line).  Then, if the
peer sends an HTTP request head, it answers ``200`` with the body
``canary LOCAL`` and closes; anything else (a Postgres SSLRequest, ...) is
closed at its first byte, and a silent peer after 3 s.  ``ready`` is printed on stdout
once every address is bound.

Bounded: at most 64 connections open at once (more are logged and closed),
8 KiB read per connection, 3 s per connection, and ``--max-seconds``
(default 600) ends it by itself.  SIGTERM ends it at once.
"""

from __future__ import annotations

import argparse
import ipaddress
import selectors
import signal
import socket
import sys
import time

MAX_OPEN = 64
MAX_READ = 8192
CONNECTION_SECONDS = 3.0


def split_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen(16)
    sock.setblocking(False)
    return sock


def serve(addresses: list[tuple[str, int]], log_path: str, max_seconds: float) -> None:
    selector = selectors.DefaultSelector()
    for host, port in addresses:
        selector.register(listen(host, port), selectors.EVENT_READ, show(host, port))
    log = open(log_path, "a", encoding="utf-8", buffering=1)
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    #: connection -> (its listening address, bytes read, deadline)
    open_: dict[socket.socket, tuple[str, bytearray, float]] = {}
    print("ready", flush=True)
    end = time.monotonic() + max_seconds

    def close(conn: socket.socket) -> None:
        selector.unregister(conn)
        open_.pop(conn, None)
        conn.close()

    while not stopping and time.monotonic() < end:
        for key, _ in selector.select(timeout=0.25):
            if key.fileobj in open_:
                conn = key.fileobj
                local, buffer, deadline = open_[conn]  # type: ignore[index]
                try:
                    data = conn.recv(MAX_READ)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if not data:
                    close(conn)  # type: ignore[arg-type]
                    continue
                buffer += data
                if not buffer[:1].isalpha():
                    close(conn)  # not HTTP (a Postgres SSLRequest, ...): nothing to answer
                    continue
                if b"\r\n\r\n" in buffer or len(buffer) >= MAX_READ:
                    if buffer[:1].isalpha():
                        body = f"canary {local}\n".encode()
                        head = (
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                            f"Content-Length: {len(body)}\r\n\r\n"
                        ).encode()
                        conn.setblocking(True)  # type: ignore[union-attr]
                        conn.settimeout(CONNECTION_SECONDS)  # type: ignore[union-attr]
                        try:
                            conn.sendall(head + body)  # type: ignore[union-attr]
                        except OSError:
                            pass
                    close(conn)  # type: ignore[arg-type]
                continue
            listener: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                conn, peer = listener.accept()
            except BlockingIOError:
                continue
            log.write(f"{key.data} <- {show(peer[0], peer[1])}\n")
            if len(open_) >= MAX_OPEN:
                conn.close()
                continue
            conn.setblocking(False)
            open_[conn] = (key.data, bytearray(), time.monotonic() + CONNECTION_SECONDS)
            selector.register(conn, selectors.EVENT_READ)
        now = time.monotonic()
        for conn, (_, _, deadline) in list(open_.items()):
            if now > deadline:
                close(conn)
    log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--log", required=True, help="append one line per accepted connection here")
    parser.add_argument("--listen", action="append", required=True, help="HOST:PORT ([v6]:PORT); repeat")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop by itself after this long")
    args = parser.parse_args(argv)
    serve([split_listen(text) for text in args.listen], args.log, args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
