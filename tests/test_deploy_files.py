"""Tests for the deployment files: fly.toml, Dockerfile, .dockerignore, docs.

The reference deployment is four files written against one config: the image
ships ``egressproxy.example.yaml``, ``fly.toml`` publishes its listeners and
scrapes its metrics service, and the README's deploy guide tells an operator what
to type. Nothing here can run Fly or Docker, so these tests hold the files to
the config instead: every port, path and timing that appears in two places
must agree. Docker is not needed; the Dockerfile is read as text.
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import os
import re
import shlex
import tomllib
from ipaddress import ip_address
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from egressproxy.config import Config, ListenerConfig, load_config, parse_duration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_CONFIG = os.path.join(ROOT, "egressproxy.example.yaml")
FLY_TOML = os.path.join(ROOT, "fly.toml")
DOCKERFILE = os.path.join(ROOT, "Dockerfile")
DOCKERIGNORE = os.path.join(ROOT, ".dockerignore")
README = os.path.join(ROOT, "README.md")


def deploy_guide() -> str:
    """The README's "Deploy on Fly.io" section, up to the next top-level heading."""
    text = read(README)
    start = text.index("## Deploy on Fly.io")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]
SETUP_CFG = os.path.join(ROOT, "setup.cfg")

#: The environment the bundled config is read against (Fly secrets in production).
ENVIRON = {"PG_HOST": "db.example.com"}
#: Fly refuses a kill_timeout above five minutes.
FLY_MAX_KILL_TIMEOUT = 300.0


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def bundled_config() -> Config:
    return load_config(BUNDLED_CONFIG, ENVIRON)


def fly_toml() -> dict[str, Any]:
    with open(FLY_TOML, "rb") as f:
        return tomllib.load(f)


def listener_port(listener: ListenerConfig) -> int:
    """The TCP port a listener binds; raw endpoint descriptions have none to publish."""
    port = listener.listen.port
    if port is None:
        raise AssertionError(f"listener {listener.name} has no TCP port for fly.toml to publish")
    return port


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, with continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    if pending:
        raise AssertionError(f"Dockerfile ends inside a continued line: {pending!r}")
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The instructions of the last stage, the one that becomes the image."""
    starts = [index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    if not starts:
        raise AssertionError("Dockerfile has no FROM")
    return instructions[starts[-1]:]


def env_values(stage: list[tuple[str, str]]) -> dict[str, str]:
    """The ``ENV KEY=value`` settings of one stage."""
    values: dict[str, str] = {}
    for keyword, arguments in stage:
        if keyword != "ENV":
            continue
        for token in shlex.split(arguments):
            key, sep, value = token.partition("=")
            if not sep:
                raise AssertionError(f"ENV without '=': {arguments!r} (use ENV KEY=value)")
            values[key] = value
    return values


def context_copies(stage: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """``(sources, destination)`` for each COPY from the build context (not ``--from``)."""
    copies: list[tuple[list[str], str]] = []
    for keyword, arguments in stage:
        if keyword != "COPY":
            continue
        words = shlex.split(arguments)
        if any(word.startswith("--from") for word in words):
            continue
        words = [word for word in words if not word.startswith("--")]
        copies.append((words[:-1], words[-1]))
    return copies


class FlyTomlTests(SynchronousTestCase):
    """fly.toml publishes, checks and stops the proxy the bundled config describes."""

    def setUp(self) -> None:
        self.fly = fly_toml()
        self.config = bundled_config()
        self.services = self.fly.get("services", [])

    def service_for(self, listener: ListenerConfig) -> dict[str, Any]:
        port = listener_port(listener)
        for service in self.services:
            if service.get("internal_port") == port:
                return service
        raise AssertionError(f"no [[services]] with internal_port = {port} for listener {listener.name}")

    def test_every_listener_is_a_service(self) -> None:
        """Each [[services]] internal_port is a listener's port, and each listener port has a service."""
        service_ports = sorted(service["internal_port"] for service in self.services)
        listener_ports = sorted(listener_port(listener) for listener in self.config.listeners)
        self.assertEqual(service_ports, listener_ports)

    def test_services_pass_raw_tcp(self) -> None:
        """Each service is TCP on the listener's own port, with no handler unless the listener reads PROXY."""
        for listener in self.config.listeners:
            service = self.service_for(listener)
            self.assertEqual(service.get("protocol"), "tcp")
            expected = ["proxy_proto"] if listener.proxy_protocol else []
            ports = service.get("ports", [])
            self.assertEqual(
                [(port.get("port"), port.get("handlers")) for port in ports],
                [(listener_port(listener), expected)],
                f"service for listener {listener.name}",
            )

    def test_services_have_tcp_checks(self) -> None:
        """Every service has a TCP check with an interval, a timeout and a grace period."""
        for service in self.services:
            checks = service.get("tcp_checks", [])
            self.assertTrue(checks, f"service {service['internal_port']} has no tcp_checks")
            for check in checks:
                for key in ("interval", "timeout", "grace_period"):
                    self.assertIn(key, check)
                self.assertLess(parse_duration(check["timeout"]), parse_duration(check["interval"]))

    def test_tcp_checks_never_reach_the_database(self) -> None:
        """Every listener a tcp_check connects to dials only once the client speaks.

        A check connects and hangs up without a byte. A postgres listener
        reads the first packet before dialling; a tcp listener does so only
        with ``upstream_connect: on_first_byte`` (the default, ``immediate``,
        would open a connection to the provider per check).
        """
        checked = {service["internal_port"] for service in self.services if service.get("tcp_checks")}
        targets = [listener for listener in self.config.listeners if listener_port(listener) in checked]
        self.assertEqual(len(targets), len(checked), "a tcp_check targets a port no listener has")
        for listener in targets:
            quiet = listener.mode == "postgres" or (
                listener.mode == "tcp" and listener.options.upstream_connect == "on_first_byte"
            )
            self.assertTrue(quiet, f"listener {listener.name} ({listener.mode}) would dial the database per check")

    def test_machines_keep_running(self) -> None:
        """Every service keeps two Machines running and never stops them for being idle."""
        for service in self.services:
            self.assertIn(service.get("auto_stop_machines"), ("off", False))
            self.assertEqual(service.get("min_machines_running"), 2)

    def test_concurrency_stays_under_the_breakers(self) -> None:
        """Fly's per-Machine hard limit counts connections and stays within the listener and breaker limits."""
        for listener in self.config.listeners:
            concurrency = self.service_for(listener).get("concurrency")
            self.assertIsNotNone(concurrency, f"listener {listener.name}: Fly's default limits apply")
            self.assertEqual(concurrency["type"], "connections")
            self.assertLessEqual(concurrency["soft_limit"], concurrency["hard_limit"])
            cluster = self.config.cluster(listener.cluster)
            self.assertLessEqual(concurrency["hard_limit"], cluster.max_connections)
            self.assertLessEqual(concurrency["hard_limit"], listener.max_connections)

    def test_metrics_scraped_from_the_metrics_service(self) -> None:
        """[metrics] scrapes /metrics on the port of the config's metrics service, which listens on all interfaces."""
        metrics = self.config.metrics
        self.assertIsNotNone(metrics, "the bundled config disables the metrics service")
        assert metrics is not None
        self.assertEqual(self.fly["metrics"], {"port": metrics.listen.port, "path": "/metrics"})
        assert metrics.listen.host is not None
        self.assertTrue(ip_address(metrics.listen.host).is_unspecified, metrics.listen.text)

    def test_ready_check_on_the_metrics_port(self) -> None:
        """A top-level HTTP check GETs /ready on the metrics port."""
        metrics = self.config.metrics
        assert metrics is not None
        checks = [
            check
            for check in self.fly.get("checks", {}).values()
            if check.get("type") == "http" and check.get("path") == "/ready"
        ]
        self.assertEqual(len(checks), 1, "one [checks.<name>] with type http and path /ready")
        check = checks[0]
        self.assertEqual(check["port"], metrics.listen.port)
        self.assertEqual(check.get("method", "get").lower(), "get")
        for key in ("interval", "timeout", "grace_period"):
            self.assertIn(key, check)

    def test_kill_timeout_outlasts_the_drain(self) -> None:
        """Fly sends SIGTERM and waits longer than shutdown_delay plus drain_timeout, within its limit."""
        self.assertEqual(self.fly.get("kill_signal"), "SIGTERM")
        kill_timeout = parse_duration(self.fly["kill_timeout"])
        self.assertGreater(kill_timeout, self.config.shutdown_delay + self.config.drain_timeout)
        self.assertLessEqual(kill_timeout, FLY_MAX_KILL_TIMEOUT)

    def test_admin_stays_private(self) -> None:
        """The admin service listens on loopback and no service or check of fly.toml points at it."""
        admin = self.config.admin
        if admin is None:
            return
        assert admin.listen.host is not None and admin.listen.port is not None
        self.assertTrue(ip_address(admin.listen.host).is_loopback, admin.listen.text)
        published = {service["internal_port"] for service in self.services}
        published |= {check.get("port") for check in self.fly.get("checks", {}).values()}
        published.add(self.fly["metrics"]["port"])
        self.assertNotIn(admin.listen.port, published)


class DockerfileTests(SynchronousTestCase):
    """The image runs twistd as a non-root user on the bundled config."""

    def setUp(self) -> None:
        self.instructions = dockerfile_instructions(read(DOCKERFILE))
        self.stage = final_stage(self.instructions)
        self.env = env_values(self.stage)

    def config_path(self) -> str:
        path = self.env.get("EGRESSPROXY_CONFIG")
        self.assertIsNotNone(path, "the image sets no EGRESSPROXY_CONFIG")
        assert path is not None
        return path

    def index_of(self, keyword: str, contains: str = "") -> int:
        for index, (word, arguments) in enumerate(self.stage):
            if word == keyword and contains in arguments:
                return index
        raise AssertionError(f"no {keyword} {contains!r} in the final stage")

    def test_slim_python_base(self) -> None:
        """Every stage starts from a slim Python 3.11+ image."""
        bases = [arguments.split()[0] for keyword, arguments in self.instructions if keyword == "FROM"]
        self.assertTrue(bases)
        for base in bases:
            self.assertRegex(base, r"^python:3\.(1[1-9])-slim")

    def test_installs_the_project(self) -> None:
        """The project is installed with pip from the copied source tree, without a download cache."""
        runs = [arguments for keyword, arguments in self.instructions if keyword == "RUN"]
        self.assertTrue(
            any(re.search(r"pip install --no-cache-dir \.(\s|$)", run) for run in runs), runs
        )

    def test_runs_as_a_system_user(self) -> None:
        """The last USER is a non-root account that useradd --system created."""
        users = [arguments for keyword, arguments in self.stage if keyword == "USER"]
        self.assertTrue(users, "the image runs as root")
        user = users[-1].split(":")[0]
        self.assertNotIn(user, ("root", "0"))
        created = [
            arguments
            for keyword, arguments in self.stage
            if keyword == "RUN" and "useradd" in arguments and "--system" in arguments
        ]
        self.assertTrue(any(shlex.split(run)[-1] == user for run in created), created)

    def test_plugin_cache_built_as_root(self) -> None:
        """Twisted's plugin cache is rebuilt after the install and before the switch to the unprivileged user."""
        rebuild = self.index_of("RUN", "getPlugins(IPlugin)")
        self.assertLess(rebuild, self.index_of("USER"))
        self.assertGreater(rebuild, self.index_of("COPY", "/opt/venv"))

    def test_config_copied_where_the_image_reads_it(self) -> None:
        """The bundled config is copied to the path EGRESSPROXY_CONFIG names."""
        self.assertIn((["egressproxy.example.yaml"], self.config_path()), context_copies(self.stage))

    def test_command_is_twistd_in_the_foreground(self) -> None:
        """CMD runs twistd -n egressproxy without a pidfile on the configured file."""
        commands = [arguments for keyword, arguments in self.stage if keyword == "CMD"]
        self.assertEqual(len(commands), 1)
        self.assertEqual(
            json.loads(commands[0]),
            ["twistd", "-n", "--pidfile=", "egressproxy", "--config", self.config_path()],
        )
        self.assertNotIn("ENTRYPOINT", [keyword for keyword, _ in self.stage])

    def test_output_is_unbuffered(self) -> None:
        """Python writes log and access lines to stdout as they happen."""
        self.assertEqual(self.env.get("PYTHONUNBUFFERED"), "1")

    def test_exposes_listeners_and_metrics(self) -> None:
        """EXPOSE lists the listener ports and the metrics port, and not the admin port."""
        config = bundled_config()
        exposed = {
            int(word.split("/")[0])
            for keyword, arguments in self.stage
            if keyword == "EXPOSE"
            for word in arguments.split()
        }
        expected = {listener_port(listener) for listener in config.listeners}
        if config.metrics is not None:
            expected.add(config.metrics.listen.port)
        self.assertEqual(exposed, expected)

    def test_dockerignore_admits_only_what_is_copied(self) -> None:
        """The build context excludes everything but the Dockerfile and what COPY takes from it."""
        patterns = [
            line.strip()
            for line in read(DOCKERIGNORE).splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        self.assertEqual(patterns[0], "*")
        admitted = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
        copied = {
            source.rstrip("/")
            for sources, _ in context_copies(self.instructions)
            for source in sources
        }
        self.assertEqual(admitted, copied | {"Dockerfile"})
        self.assertIn("**/dropin.cache", patterns)

    def test_setup_cfg_finds_every_package(self) -> None:
        """setup.cfg finds every package under egressproxy/ and names the twistd plugin, so pip install . is complete."""
        parser = configparser.ConfigParser()
        parser.read(SETUP_CFG, encoding="utf-8")
        self.assertEqual(parser.get("options", "packages").strip(), "find:")
        include = parser.get("options.packages.find", "include").split()
        packages = set()
        for directory, _, files in os.walk(os.path.join(ROOT, "egressproxy")):
            if "__init__.py" in files:
                packages.add(os.path.relpath(directory, ROOT).replace(os.sep, "."))
        # setuptools matches each include pattern against the dotted package name.
        missed = {name for name in packages if not any(fnmatch.fnmatchcase(name, p) for p in include)}
        self.assertEqual(missed, set())
        modules = parser.get("options", "py_modules").split()
        self.assertIn("twisted.plugins.egressproxy_plugin", modules)
        for module in modules:
            self.assertTrue(os.path.isfile(os.path.join(ROOT, *module.split(".")) + ".py"), module)


class DeployDocTests(SynchronousTestCase):
    """The README's deploy guide uses the names and ports that fly.toml and the config define."""

    def setUp(self) -> None:
        self.doc = deploy_guide()
        self.fly = fly_toml()

    def test_commands_name_the_fly_toml_app(self) -> None:
        """Every --app / -a in the guide names the app fly.toml deploys (or a consumer app)."""
        names = set(re.findall(r"(?:--app|-a)\s+([A-Za-z0-9][A-Za-z0-9-]*)", self.doc))
        self.assertIn(self.fly["app"], names)
        self.assertEqual(names - {self.fly["app"], "my-api"}, set())

    def test_fly_proxy_targets_published_ports(self) -> None:
        """fly proxy is only pointed at listener ports and the metrics port, never at loopback-only admin."""
        config = bundled_config()
        reachable = {listener_port(listener) for listener in config.listeners}
        if config.metrics is not None:
            reachable.add(config.metrics.listen.port)
        remote = {int(port) for port in re.findall(r"fly proxy \d+:(\d+)", self.doc)}
        self.assertTrue(remote)
        self.assertEqual(remote - reachable, set())

    def test_required_variables_are_set_as_secrets(self) -> None:
        """Each ${VAR} the bundled config needs without a default is set with fly secrets set."""
        required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", read(BUNDLED_CONFIG)))
        self.assertTrue(required)
        for name in required:
            self.assertRegex(self.doc, rf"fly secrets set {name}=")
        self.assertEqual(required - set(ENVIRON), set())

    def test_deploy_has_no_public_ips(self) -> None:
        """The guide deploys with --no-public-ips and allocates a private flycast address."""
        self.assertIn("fly deploy --no-public-ips", self.doc)
        self.assertIn("fly ips allocate-v6 --private", self.doc)
        self.assertIn("fly ips allocate-egress", self.doc)
