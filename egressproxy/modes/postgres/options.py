"""The options of a ``mode: postgres`` listener."""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from egressproxy.config.checks import tuple_of
from egressproxy.modes.registry import ModeOptions

__all__ = ["ClientTLS", "PostgresOptions", "PostgresRoute"]


@attrs.frozen
class PostgresRoute:
    """Route Postgres connections by the TLS server name (SNI) the client sends.

    ``sni`` is an exact name or ``*.suffix`` (one or more labels before the
    suffix).  Exactly one target: ``cluster`` (a configured cluster) or
    ``upstream``, a ``HOST:PORT`` template in which ``{sni}`` stands for the
    name the client sent (``"{sni}:5432"``).  Names that match no route are
    never dialled.
    """

    sni: str
    cluster: str | None = None
    upstream: str | None = None


@attrs.frozen
class ClientTLS:
    """The certificate a ``tls: originate`` listener shows clients that ask for TLS."""

    cert: str
    key: str


@attrs.frozen
class PostgresOptions(ModeOptions):
    """How a postgres listener treats TLS, and where it routes."""

    #: ``passthrough`` (TLS end to end, routing by SNI) or ``originate``.
    tls: str = attrs.field(default="passthrough", validator=attrs.validators.in_(("passthrough", "originate")))
    #: Refuse plaintext startups (with a Postgres ErrorResponse).
    require_tls: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    routes: tuple[PostgresRoute, ...] = attrs.field(default=(), validator=tuple_of(PostgresRoute, non_empty=False))
    client_tls: ClientTLS | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(ClientTLS))
    )

    def clusters_named(self) -> Iterable[tuple[str, str]]:
        for route in self.routes:
            if route.cluster is not None:
                yield f"routes {route.sni!r} to", route.cluster
