"""The tunnel's options: URLs, destinations, ${ENV} passwords, precedence, and errors that name the fix."""

from __future__ import annotations

import argparse
import io
import os

from twisted.trial.unittest import SynchronousTestCase

from egressproxy.app import cli
from egressproxy.tunnel.options import ENV_DESTINATIONS, ENV_VIA, add_arguments, from_arguments
from egressproxy.tunnel.parse import Destination, Path, TunnelUsageError, expand, parse_destination, parse_via


def parse(argv: list[str], environ: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser(prog="egressproxy-tunnel")
    add_arguments(parser)
    return from_arguments(parser.parse_args(argv), environ or {})


class ViaTests(SynchronousTestCase):
    def test_socks5_with_literal_credentials(self) -> None:
        """A socks5 URL gives the user, the password (percent-decoded), the host and the port."""
        path = parse_via("socks5://app:p%40ss/w:rd@my-egress.flycast:1080", {})
        self.assertEqual(path, Path("socks5", "my-egress.flycast", 1080, "app", "p@ss/w:rd"))

    def test_password_from_the_environment(self) -> None:
        """``${NAME}`` in the password is read from the environment, used exactly as set."""
        path = parse_via("socks5://app:${EGRESS_PASSWORD}@10.0.0.1:1080", {"EGRESS_PASSWORD": "a%b@c:${d}"})
        self.assertEqual(path.password, "a%b@c:${d}")

    def test_default_and_dollar(self) -> None:
        """``${NAME:-default}`` falls back to the default and ``$$`` is a literal dollar."""
        self.assertEqual(expand("${UNSET:-x}$$y", {}, "w"), "x$y")

    def test_unset_variable_names_it_and_hides_the_text(self) -> None:
        """An unset variable is an error naming it and how to set it, never quoting the password."""
        with self.assertRaises(TunnelUsageError) as caught:
            parse_via("socks5://app:Xq7${EGRESS_PASSWORD}Zk9@h:1080", {})
        message = str(caught.exception)
        self.assertIn("EGRESS_PASSWORD is not set", message)
        self.assertIn("fly secrets set EGRESS_PASSWORD", message)
        self.assertNotIn("Xq7", message)
        self.assertNotIn("Zk9", message)

    def test_str_never_shows_the_password(self) -> None:
        """A path prints its scheme, user and address, not its password."""
        path = parse_via("socks5://app:hunter2@[fdaa::3]:1080", {})
        self.assertEqual(str(path), "socks5://app@[fdaa::3]:1080")
        self.assertNotIn("hunter2", repr(path))

    def test_socks5h_and_tcp(self) -> None:
        """``socks5h`` is socks5; ``tcp://HOST:PORT`` takes no credentials."""
        self.assertEqual(parse_via("socks5h://h:1", {}).scheme, "socks5")
        self.assertEqual(parse_via("tcp://my-egress.flycast:5432/", {}), Path("tcp", "my-egress.flycast", 5432))
        with self.assertRaises(TunnelUsageError) as caught:
            parse_via("tcp://u:p@h:5432", {})
        self.assertIn("tcp:// paths take no credentials", str(caught.exception))

    def test_bad_scheme_does_not_echo_credentials(self) -> None:
        """An unknown scheme says what is accepted and does not print the credentials."""
        with self.assertRaises(TunnelUsageError) as caught:
            parse_via("http://app:hunter2@h:8080", {})
        self.assertIn("socks5://[USER:PASSWORD@]HOST:PORT", str(caught.exception))
        self.assertNotIn("hunter2", str(caught.exception))

    def test_missing_port(self) -> None:
        """A URL without a port says to write HOST:PORT."""
        with self.assertRaises(TunnelUsageError) as caught:
            parse_via("socks5://my-egress.flycast", {})
        self.assertIn("has no port; write HOST:PORT", str(caught.exception))


class DestinationTests(SynchronousTestCase):
    def test_name_and_ipv6(self) -> None:
        """``HOST:PORT`` and ``[V6]:PORT`` parse; names are lowercased."""
        self.assertEqual(parse_destination("DB.Example.com:5432"), Destination("db.example.com", 5432))
        self.assertEqual(parse_destination("[fd00::5]:443"), Destination("fd00::5", 443))
        self.assertEqual(str(Destination("fd00::5", 443)), "[fd00::5]:443")

    def test_errors(self) -> None:
        """A scheme, a bad port or a bad name is refused with an example of the right form."""
        for text, expected in (
            ("postgres://db:5432", "HOST:PORT only"),
            ("db.example.com", "has no port"),
            ("db.example.com:0", "is not 1-65535"),
            ("db..example.com:5432", "is not a host name"),
        ):
            with self.assertRaises(TunnelUsageError, msg=text) as caught:
                parse_destination(text)
            self.assertIn(expected, str(caught.exception))


class PrecedenceTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_environment(self) -> None:
        """Without flags, the comma-separated environment variables are used, in order."""
        options = parse([], {ENV_VIA: "socks5://a:${P}@e1:1080, socks5://a:${P}@e2:1080",
                             ENV_DESTINATIONS: "db.example.com:5432,api.example.com:443", "P": "pw"})
        self.assertEqual([p.host for p in options.paths], ["e1", "e2"])
        self.assertEqual([str(d) for d in options.destinations], ["db.example.com:5432", "api.example.com:443"])

    def test_command_line_then_file_then_environment(self) -> None:
        """The command line wins over the file, which wins over the environment."""
        config = self.write("via: ['socks5://f:1']\ndestinations: [file.example:1]\ntransparent: true\nconnect_timeout: 2\n")
        environ = {ENV_VIA: "socks5://env:1", ENV_DESTINATIONS: "env.example:1"}
        options = parse(["--config", config, "--dest", "cli.example:2"], environ)
        self.assertEqual([p.host for p in options.paths], ["f"])
        self.assertEqual([d.host for d in options.destinations], ["cli.example"])
        self.assertTrue(options.transparent)
        self.assertEqual(options.connect_timeout, 2.0)
        options = parse([], environ)
        self.assertEqual(([p.host for p in options.paths], options.transparent), (["env"], False))

    def test_unknown_file_key_suggests(self) -> None:
        """An unknown key in the file is an error with the closest key."""
        config = self.write("destination: [db:1]\n")
        with self.assertRaises(TunnelUsageError) as caught:
            parse(["--config", config, "--via", "socks5://h:1"])
        self.assertIn("did you mean 'destinations'?", str(caught.exception))

    def test_command_after_double_dash(self) -> None:
        """The words after ``--`` are the command, options of its own included."""
        options = parse(["--via", "socks5://h:1", "--dest", "d:1", "--", "psql", "--via", "-c", "select 1"])
        self.assertEqual(options.command, ("psql", "--via", "-c", "select 1"))
        self.assertEqual(parse(["--via", "socks5://h:1", "--dest", "d:1", "bin/server"]).command, ("bin/server",))

    def test_tcp_path_needs_exactly_one_destination(self) -> None:
        """A tcp:// path with two destinations is refused, naming socks5:// as the way to several."""
        with self.assertRaises(TunnelUsageError) as caught:
            parse(["--via", "tcp://e:5432", "--dest", "a:5432", "--dest", "b:5432"])
        self.assertIn("carries exactly one destination (got 2)", str(caught.exception))
        self.assertIn("socks5://", str(caught.exception))

    def test_missing_and_conflicting(self) -> None:
        """No path, no destination, a duplicate destination or --check with a COMMAND are errors."""
        for argv, expected in (
            ([], "no path to the egress app"),
            (["--via", "socks5://h:1"], "no destination"),
            (["--via", "socks5://h:1", "--dest", "a:1", "--dest", "A:1"], "given twice"),
            (["--via", "socks5://h:1", "--dest", "a:1", "--check", "--", "true"], "--check dials each destination"),
            (["--via", "socks5://h:1", "--dest", "a:1", "--connect-timeout", "0"], "above 0"),
        ):
            with self.assertRaises(TunnelUsageError, msg=str(argv)) as caught:
                parse(argv)
            self.assertIn(expected, str(caught.exception))


class ConsoleScriptTests(SynchronousTestCase):
    def test_usage_error_exits_2(self) -> None:
        """``egressproxy tunnel`` with no path prints one line naming the fix and exits 2."""
        out, err = io.StringIO(), io.StringIO()
        environ = {k: v for k, v in os.environ.items() if not k.startswith("EGRESSPROXY_TUNNEL")}
        status = cli.main(["tunnel", "--dest", "db:5432"], stdout=out, stderr=err, environ=environ)
        self.assertEqual(status, 2)
        self.assertIn(f"or set {ENV_VIA}", err.getvalue())
        self.assertEqual(out.getvalue(), "")

    def test_help_lists_the_options(self) -> None:
        """``egressproxy tunnel --help`` shows --via, --dest, --transparent and --check."""
        out = io.StringIO()
        self.assertEqual(cli.main(["tunnel", "--help"], stdout=out, stderr=io.StringIO()), 0)
        for option in ("--via URL", "--dest HOST:PORT", "--transparent", "--check", "-- COMMAND"):
            self.assertIn(option, out.getvalue())
