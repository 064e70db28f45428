"""The checks that need the whole file: names, references, listen clashes, self-dials.

Run once every section is read, over the :class:`FileFacts` the readers
gathered; each problem is reported at the line that carries it.
"""

from __future__ import annotations

import difflib
from ipaddress import ip_address

from egressproxy.config.context import FileFacts
from egressproxy.config.model import ListenAddress
from egressproxy.config.reader import Named, Reader
from egressproxy.config.syntax import ip_literal
from egressproxy.config.yamlnodes import line, render_path
from egressproxy.config.ownsocket import OwnSocket

__all__ = [
    "check_cluster_refs",
    "check_dials",
    "check_listens",
    "check_names",
    "check_shareable_listens",
    "own_sockets",
    "run_listener_checks",
]


def check_names(r: Reader, kind: str, names: list[Named]) -> None:
    first: dict[str, Named] = {}
    for named in names:
        if named.value in first:
            earlier = first[named.value]
            r.report(
                named.node, named.path,
                f"duplicate {kind} name {named.value!r} (first at "
                f"{render_path(earlier.path)}, line {line(earlier.node)})",
            )
        else:
            first[named.value] = named


def check_cluster_refs(r: Reader, facts: FileFacts) -> None:
    defined = list(dict.fromkeys(named.value for named in facts.cluster_names))
    for ref in facts.cluster_refs:
        if ref.value in defined:
            continue
        listing = ", ".join(defined) if defined else "none"
        close = difflib.get_close_matches(ref.value, defined, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        r.report(ref.node, ref.path, f"unknown cluster {ref.value!r} (defined clusters: {listing}){hint}")


def check_shareable_listens(r: Reader, facts: FileFacts, workers: int) -> None:
    """Each worker binds every listener itself (SO_REUSEPORT): only a named host:port can be shared."""
    for listen, node, path in facts.listens:
        if node is None or path[0] != "listeners":
            continue
        if listen.port is None:
            r.report(node, path, (
                f"{listen.text!r} cannot be shared by {workers} workers (each binds "
                f"its own socket with SO_REUSEPORT); use a host:port address or set workers: 1"
            ))
        elif listen.port == 0:
            r.report(node, path, (
                f"port 0 cannot be shared by {workers} workers (each would get a "
                f"different port); name a port or set workers: 1"
            ))


def check_listens(r: Reader, facts: FileFacts) -> None:
    # Defaults first, then file order: of two clashing addresses the later
    # one written carries the error and names the other.
    claims = sorted(facts.listens, key=lambda claim: 0 if claim[1] is None else line(claim[1]))
    for index, (listen, node, path) in enumerate(claims):
        if node is None:
            continue  # the defaults do not clash with each other
        for other, other_node, other_path in claims[:index]:
            if not _overlaps(listen, other):
                continue
            where = render_path(other_path)
            if other_node is None:
                service = other_path[0]
                message = (
                    f"{listen.text!r} overlaps the default {where} "
                    f"{other.text!r}; give {service} another address "
                    f"({service}: {{listen: ...}}) or turn it off "
                    f"({service}: false)"
                )
            else:
                if path[0] == other_path[0] == "listeners":
                    needs = "each listener needs its own address"
                else:
                    needs = "listeners, admin and metrics each need their own address"
                message = (
                    f"{listen.text!r} overlaps {where} {other.text!r} "
                    f"(line {line(other_node)}); {needs}"
                )
            r.report(node, path, message)
            break


def _overlaps(a: ListenAddress, b: ListenAddress) -> bool:
    """Whether two listen addresses would fight over the same port.

    Port 0 (ephemeral) never clashes. On Linux a listening wildcard socket
    blocks specific addresses of its family on the same port, and a dual-stack
    ``::`` socket blocks both families.
    """
    if a.description is not None or b.description is not None:
        return a.description == b.description
    if a.port != b.port or a.port == 0:
        return False
    assert a.host is not None and b.host is not None
    if a.host == b.host:
        return True
    first, second = ip_address(a.host), ip_address(b.host)
    if a.dual_stack or b.dual_stack:
        return True
    if first.version != second.version:
        return False
    return first.is_unspecified or second.is_unspecified


def own_sockets(facts: FileFacts) -> list[OwnSocket]:
    """The proxy's own listening sockets with a known address and port (not 0)."""
    names = {named.path[:2]: named.value for named in facts.listener_names}
    sockets: list[OwnSocket] = []
    for listen, _node, path in facts.listens:
        if listen.host is None or not listen.port:
            continue
        if path[0] == "listeners":
            name = names.get(path[:2])
            what = f"listener {name!r}" if name else "listener"
        else:
            what = f"{path[0]} service"
        sockets.append(OwnSocket(what, listen.text, listen.host, listen.port))
    return sockets


def check_dials(r: Reader, facts: FileFacts) -> None:
    """Never dial yourself: no endpoint may be one of the proxy's own sockets.

    The host counts when it is known without DNS: an IP literal, a name
    ``hosts:`` pins, or ``localhost`` (and names under it). A wildcard
    listen address is reached on loopback too.
    """
    pins = facts.pins
    for address, node, path in facts.dials:
        host = address.host.lower()
        shown = str(address)
        if host in pins:
            candidates = [ip_address(pins[host])]
            shown += f" (pinned to {pins[host]} by hosts:)"
        elif ip_literal(host) is not None:
            candidates = [ip_address(host)]
        elif host == "localhost" or host.endswith(".localhost"):
            candidates = [ip_address("127.0.0.1"), ip_address("::1")]
        else:
            continue
        for own in facts.own_sockets:
            if any(own.reached_by(ip, address.port) for ip in candidates):
                if own.what.startswith("listener"):
                    harm = "the proxy would connect to itself in a loop"
                else:
                    harm = f"the proxy would hand its clients to its own {own.what}"
                r.report(node, path, (
                    f"{shown} is this proxy's own {own}: {harm}; point it at "
                    f"the server the proxy should reach"
                ))
                break


def run_listener_checks(facts: FileFacts) -> None:
    """The modes' end-of-file checks (e.g. the forward proxies' allowlists), in listener order."""
    for listener, check in facts.listener_checks:
        check(listener, facts)
