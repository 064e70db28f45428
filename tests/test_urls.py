"""``egressproxy urls``: the strings consumers paste, per listener shape; never a password."""

from __future__ import annotations

import io

from twisted.trial.unittest import SynchronousTestCase

from egressproxy.app import urls
from egressproxy.app.cli import main
from egressproxy.config import parse_config

CONFIG = """
listeners:
  - {name: direct, listen: ":5432", mode: tcp, cluster: pg}
  - {name: routed, listen: ":5433", mode: postgres, routes: [{sni: "db.example.cloud", cluster: pg}, {sni: "*.pg.example.cloud", upstream: "{sni}:5432"}]}
  - {name: app, listen: ":5434", mode: postgres, tls: originate, cluster: pg}
  - {name: vendor, listen: ":3128", mode: http_connect, allow_destinations: ["api.vendor.com:443"], users: [{name: app, password: "s3cret-value"}]}
  - {name: socks, listen: ":1080", mode: socks5, allow_destinations: ["api.vendor.com:443"]}
clusters:
  - {name: pg, endpoints: ["db.example.cloud:5432"]}
"""


def run(*argv: str, config: str = CONFIG, tmp: str) -> tuple[int, str, str]:
    path = tmp + ".yaml"
    with open(path, "w", encoding="utf-8") as f:
        f.write(config)
    out, err = io.StringIO(), io.StringIO()
    code = main(["urls", "--config", path, *argv], stdout=out, stderr=err, environ={})
    return code, out.getvalue(), err.getvalue()


class UrlsTests(SynchronousTestCase):
    def test_tcp_listener_uses_host_and_numeric_hostaddr(self) -> None:
        code, out, _ = run("--address", "fdaa:0:1:a7b::2", tmp=self.mktemp())
        self.assertEqual(code, 0)
        self.assertIn(
            "host=db.example.cloud hostaddr=fdaa:0:1:a7b::2 port=5432 dbname=<dbname> user=<user> "
            "sslmode=verify-full sslrootcert=/etc/ssl/certs/ca-certificates.crt", out)
        self.assertIn("postgresql://<user>:<password>@db.example.cloud:5432/<dbname>?hostaddr=fdaa:0:1:a7b::2&", out)

    def test_routes_give_one_block_per_name(self) -> None:
        _, out, _ = run("--address", "10.1.2.3", tmp=self.mktemp())
        self.assertIn("host=db.example.cloud hostaddr=10.1.2.3 port=5433", out)
        self.assertIn("host=<name>.pg.example.cloud hostaddr=10.1.2.3 port=5433", out)

    def test_originate_is_plaintext_and_brackets_ipv6_in_uris(self) -> None:
        _, out, _ = run("--address", "fdaa::2", tmp=self.mktemp())
        self.assertIn("host=fdaa::2 port=5434 dbname=<dbname> user=<user> sslmode=disable", out)
        self.assertIn("postgresql://<user>:<password>@[fdaa::2]:5434/<dbname>?sslmode=disable", out)
        self.assertIn("jdbc:postgresql://[fdaa::2]:5434/<dbname>?sslmode=disable", out)

    def test_forward_proxies(self) -> None:
        _, out, _ = run("--address", "fdaa::2", tmp=self.mktemp())
        self.assertIn("HTTPS_PROXY=http://<user>:<password>@[fdaa::2]:3128", out)
        self.assertIn("ALL_PROXY=socks5h://[fdaa::2]:1080", out)

    def test_passwords_never_printed(self) -> None:
        _, out, err = run("--address", "fdaa::2", tmp=self.mktemp())
        self.assertNotIn("s3cret-value", out + err)

    def test_app_name_is_used_where_drivers_resolve(self) -> None:
        config = parse_config(CONFIG, "t.yaml", {})
        text = urls.render(config, urls.proxy_address(app="my-egress", resolved="fdaa:0:1::9"))
        self.assertIn("host=db.example.cloud hostaddr=fdaa:0:1::9 port=5432", text)
        self.assertIn("host=my-egress.flycast port=5434", text)
        self.assertIn("HTTPS_PROXY=http://<user>:<password>@my-egress.flycast:3128", text)

    def test_address_must_be_numeric(self) -> None:
        code, _, err = run("--address", "my-egress.flycast", tmp=self.mktemp())
        self.assertEqual(code, 2)
        self.assertIn("not a numeric address", err)

    def test_unresolvable_app(self) -> None:
        """A name that does not resolve is explained (the resolver is stubbed: tests send no DNS queries)."""
        def fail(app: str) -> str:
            raise OSError("Name or service not known")

        self.patch(urls, "resolve_app", fail)
        code, _, err = run("--app", "no-such-app.invalid", tmp=self.mktemp())
        self.assertEqual(code, 1)
        self.assertIn("cannot resolve no-such-app.invalid.flycast", err)


class VersionTests(SynchronousTestCase):
    def test_version(self) -> None:
        out = io.StringIO()
        self.assertEqual(main(["--version"], stdout=out, stderr=io.StringIO(), environ={}), 0)
        self.assertRegex(out.getvalue(), r"^egressproxy \d+\.\d+\.\d+")
