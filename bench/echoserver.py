"""
The upstream for the held-connection benchmarks: accept, echo, hold.

Runs as its own process (``python3 bench/echoserver.py``) so that its memory
and descriptors are never counted as a proxy's. It listens on 127.0.0.1 on an
ephemeral port, prints ``listening PORT`` on stdout once bound, then echoes
every byte back on every connection and closes a connection when its peer
sends EOF. It holds as many connections as the descriptor limit allows (the
soft limit is raised to the hard one at start), so PostgreSQL's
``max_connections`` plays no part in those tests.

Limits: loopback only; no TLS; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import sys


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _serve() -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_serve())
    sys.exit(0)


if __name__ == "__main__":
    main()
