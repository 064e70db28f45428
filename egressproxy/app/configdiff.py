"""What a reload changed, in one line that names it: the summary ``reload()`` logs and ``POST /reload`` returns.

An operator who sends SIGHUP wants to see that the edit they made is the
edit that was applied, so the summary names listeners, clusters and the
config fields that differ, e.g.::

    listeners added: pg2; removed: old; rebound: direct ([::]:5432 -> [::]:5433);
    changed: pooled (allow_sources, max_connections); clusters added: x;
    changed: pg_direct (endpoints, connect_timeout); removed: y; top level: access_log

(one line; wrapped here).  Fields are the attrs fields of
:class:`ListenerConfig`, :class:`ClusterConfig` and :class:`Config`, in
declaration order; a listener or cluster field that is itself an attrs
object of the same class on both sides (``health_check``, a mode's
``options``) is named down one level (``health_check.interval``), top-level
ones are not (``access_log``).  ``listen`` is reported as "rebound" with
both addresses, not as a changed field.  Nothing changed: ``no changes``.

Pure: two configs in, a string out.  Applying the change is ``runtimes.py``'s
job; this module only describes it.
"""

from __future__ import annotations

from typing import Any, Sequence

import attrs

from egressproxy.config import Config

#: Config fields described by their own groups (or, ``source``, the same file on every reload).
_NOT_TOP_LEVEL = ("source", "listeners", "clusters")


def changed_fields(old: Any, new: Any, skip: Sequence[str] = (), nested: bool = True) -> list[str]:
    """Names of the attrs fields whose values differ, in declaration order.

    A differing field holding attrs objects of one class on both sides is
    named per changed sub-field (``health_check.timeout``) when ``nested``.
    """
    names = []
    for field in attrs.fields(type(old)):
        if field.name in skip:
            continue
        before, after = getattr(old, field.name), getattr(new, field.name)
        if before == after:
            continue
        if nested and attrs.has(type(before)) and type(before) is type(after):
            inner = changed_fields(before, after, nested=False)
            if inner:
                names.extend(f"{field.name}.{name}" for name in inner)
                continue
        names.append(field.name)
    return names


def _by_name(items: Sequence[Any]) -> dict[str, Any]:
    return {item.name: item for item in items}


def _changed(old: dict[str, Any], new: dict[str, Any], skip: Sequence[str] = ()) -> list[str]:
    """``name (field, field)`` for each item in both whose fields (but ``skip``) differ."""
    out = []
    for name, item in new.items():
        if name in old:
            fields = changed_fields(old[name], item, skip)
            if fields:
                out.append(f"{name} ({', '.join(fields)})")
    return out


def _group(label: str, parts: list[tuple[str, list[str]]]) -> str:
    """``label kind: a, b; kind: c`` for the non-empty kinds; '' if all are empty."""
    shown = [f"{kind}: {', '.join(names)}" for kind, names in parts if names]
    return f"{label} {'; '.join(shown)}" if shown else ""


def describe_changes(old: Config, new: Config) -> str:
    """One line naming what differs between ``old`` and ``new`` (see the module notes)."""
    old_l, new_l = _by_name(old.listeners), _by_name(new.listeners)
    old_c, new_c = _by_name(old.clusters), _by_name(new.clusters)
    rebound = [
        f"{name} ({old_l[name].listen} -> {listener.listen})"
        for name, listener in new_l.items()
        if name in old_l and listener.listen != old_l[name].listen
    ]
    listeners = _group("listeners", [
        ("added", [n for n in new_l if n not in old_l]),
        ("removed", [n for n in old_l if n not in new_l]),
        ("rebound", rebound),
        ("changed", _changed(old_l, new_l, skip=("listen",))),
    ])
    clusters = _group("clusters", [
        ("added", [n for n in new_c if n not in old_c]),
        ("changed", _changed(old_c, new_c)),
        ("removed", [n for n in old_c if n not in new_c]),
    ])
    top = changed_fields(old, new, skip=_NOT_TOP_LEVEL, nested=False)
    top_level = f"top level: {', '.join(top)}" if top else ""
    return "; ".join(part for part in (listeners, clusters, top_level) if part) or "no changes"
