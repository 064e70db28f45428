"""The twistd plugin's options and service factory: assembly only.

The config is loaded and validated in ``Options.postOptions``, so a bad file
makes ``twistd`` print every error and exit before anything is bound.
"""

from __future__ import annotations

import os

from twisted.application.service import IService
from twisted.python import usage

from egressproxy import __version__
from egressproxy.config import Config, ConfigError, load_config
from egressproxy.app.limits import raise_fd_limit

DEFAULT_CONFIG = "egressproxy.yaml"


def default_config_path(environ: dict[str, str] | os._Environ[str]) -> str:
    """``$EGRESSPROXY_CONFIG``, else ``./egressproxy.yaml``."""
    return environ.get("EGRESSPROXY_CONFIG") or DEFAULT_CONFIG


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run egressproxy: TCP listeners forwarding to upstream clusters. "
        "Without --config, $EGRESSPROXY_CONFIG, then ./egressproxy.yaml."
    )
    optParameters = [
        ["config", "c", None, "Path to the YAML configuration file."],
        ["worker", None, 0, "Internal: set by the main worker on the extra workers of `workers: N`.", int],
    ]

    loaded: Config

    def postOptions(self) -> None:
        path = self["config"] or default_config_path(os.environ)
        self["config"] = path
        if not os.path.exists(path):
            raise usage.UsageError(f"config file {path!r} not found (give --config FILE or set EGRESSPROXY_CONFIG)")
        try:
            self.loaded = load_config(path, os.environ)
        except ConfigError as e:
            raise usage.UsageError(f"invalid configuration:\n{e}") from None


def makeService(options: Options, reactor=None) -> IService:  # type: ignore[no-untyped-def]
    """Build the service tree; only here may the global reactor be used."""
    if reactor is None:
        from twisted.internet import reactor  # noqa: PLC0415
    from egressproxy.app.service import EgressService

    before, after = raise_fd_limit()
    service = EgressService(options.loaded, reactor, worker_index=options["worker"])
    service.log.info(
        "egressproxy {version} starting (config {source}, worker {index}){origin}",
        version=__version__, source=options.loaded.source, index=options["worker"],
        origin=service.origin.text_fields(),
    )
    if options.loaded.expected_egress_ips is not None:
        service.log.info(
            "expecting to egress from {ips}{region}",
            ips=", ".join(options.loaded.expected_egress_ips),
            region=f" (region {service.origin.region})" if service.origin.region else "",
        )
    if after != before:
        service.log.info("file descriptor limit raised from {before} to {after}", before=before, after=after)
    # Under twistd, a drain (SIGTERM, SIGINT, POST /drain) ends the process
    # once complete, and SIGHUP reloads the config file.
    service.exit_after_drain = reactor.stop
    service.handle_signals = True
    service.spawn_workers = True
    return service
