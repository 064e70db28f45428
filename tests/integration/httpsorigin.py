"""A tiny HTTPS origin for tests: a made-up API name, a certificate from the test's CA.

Run it inside a test's network namespace::

    python -m tests.integration.httpsorigin --cert C --key K --listen 10.77.0.40:443 [--max-seconds 600]   # in the test's netns

Every GET answers ``200`` with ``hello from <Host header>`` and a newline;
it prints ``ready HOST:PORT`` on stdout once listening.  It stands in for an
allowlisted vendor API (``api.egress.test``) so curl can verify the real
name's certificate end to end through the egress app.  Bounded: it ends by
itself after ``--max-seconds``; SIGTERM ends it at once.
"""

from __future__ import annotations

import argparse
import http.server
import ssl
import sys
import threading


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with a short greeting naming the Host it was asked for."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = f"hello from {self.headers.get('Host', '-').split(':')[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write("origin: " + format % args + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    timer = threading.Timer(args.max_seconds, server.shutdown)
    timer.daemon = True
    timer.start()
    print(f"ready {host}:{port}", flush=True)
    server.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
