"""``GET /doctor`` from a running proxy (InProcessProxy): the report as text or JSON, 200 or 503, one run at a time."""

from __future__ import annotations

import json

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from tests.integration.pgserver import shared_server
from tests.integration.proxy import InProcessProxy, inline


def proxy_yaml(port: int, ca_file: str) -> str:
    return (
        "listeners:\n"
        "  - name: pg\n"
        '    listen: "[::]:0"\n'
        "    mode: postgres\n"
        "    cluster: db\n"
        "clusters:\n"
        "  - name: db\n"
        f'    endpoints: ["db.egress.test:{port}"]\n'
        f'    tls: {{ca_file: "{ca_file}"}}\n'
        'hosts: {"db.egress.test": "127.0.0.1"}\n'
    )


class DoctorHttpTests(TestCase):
    timeout = 60

    async def get(self, proxy: InProcessProxy, accept: str | None = None) -> tuple[int, str, bytes]:
        port = proxy.service.http_ports["admin"].getHost().port
        headers = Headers({b"accept": [accept.encode()]}) if accept else Headers()
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/doctor".encode(), headers)
        body = await readBody(response)
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode()
        return response.code, content_type, body

    @inline
    async def test_text_and_json(self) -> None:
        """A healthy proxy answers 200 with the text report, and JSON when asked; its listener counts as bound."""
        server = shared_server()
        proxy = InProcessProxy(self, proxy_yaml(server.port, server.ca_path))
        code, content_type, body = await self.get(proxy)
        text = body.decode()
        self.assertEqual(code, 200, text)
        self.assertTrue(content_type.startswith("text/plain"))
        self.assertIn("✓ listen", text)
        self.assertIn(f"bound by this proxy (port {proxy.port('pg')})", text)
        self.assertIn("✓ tls chain", text)
        self.assertIn("all checks passed", text)
        code, content_type, body = await self.get(proxy, "application/json")
        self.assertEqual((code, content_type), (200, "application/json"))
        report = json.loads(body)
        self.assertTrue(report["ok"])
        self.assertEqual([c["status"] for c in report["checks"] if c["step"] == "sslrequest"], ["ok"])

    @inline
    async def test_failure_503_and_one_run_at_a_time(self) -> None:
        """An upstream that never answers the SSLRequest makes 503; a second request meanwhile gets 429."""
        silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(silent.stopListening)
        proxy = InProcessProxy(self, proxy_yaml(silent.getHost().port, shared_server().ca_path))
        first = defer.ensureDeferred(self.get(proxy))
        await deferLater(reactor, 0.5, lambda: None)
        code, _, body = await self.get(proxy)
        self.assertEqual(code, 429, body)
        code, _, body = await first
        text = body.decode()
        self.assertEqual(code, 503, text)
        self.assertIn("✗ sslrequest", text)
        self.assertIn("no answer to the SSLRequest", text)
