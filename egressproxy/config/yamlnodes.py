"""YAML as the reader sees it: a loader that refuses duplicate keys, and node helpers.

The reader walks PyYAML's composed node tree itself (not the constructed
Python objects), so every value keeps its line for messages.
"""

from __future__ import annotations

import yaml

from egressproxy.config.syntax import Path

__all__ = [
    "Loader",
    "flag",
    "is_null",
    "kind",
    "line",
    "render_path",
    "syntax_error",
    "value_of",
]


class Loader(yaml.SafeLoader):
    """A ``SafeLoader`` that refuses duplicate mapping keys.

    PyYAML keeps the last of two equal keys without a word, which turns a
    copy-paste slip into a silently different proxy. :func:`parse_config` walks
    the composed node tree itself (so it can report every duplicate with its line
    and path); this override makes the class safe for plain ``yaml.load`` too.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # unhashable: the base class reports it
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r} (first at line {first_line[key]})",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def render_path(path: Path) -> str:
    """``("clusters", 1, "endpoints", 0)`` -> ``clusters[1].endpoints[0]``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif text:
            text += f".{part}"
        else:
            text = part
    return text


def line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return "a single value"


def flag(value: object) -> object:
    """The text ``true``/``false`` (what ``${VAR}`` yields) as a bool; others unchanged."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def value_of(node: yaml.Node, key: str) -> yaml.Node | None:
    """The value node of ``key`` in a mapping node (the first, as the reader takes it), or None."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                return value_node
    return None


def is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def syntax_error(source: str, text: str, error: yaml.MarkedYAMLError) -> str:
    """One line for a YAML syntax error: where it broke, and where the broken part began.

    PyYAML puts errors found at the end of the stream on the line after the
    last; that is clamped to the last line so the number exists in the file.
    """
    mark = error.problem_mark or error.context_mark
    last_line = max(1, len(text.splitlines()))
    where = min(mark.line + 1, last_line) if mark else 1
    problem, context = error.problem or "", error.context or ""
    if problem.startswith("but ") and context:
        # The composer's "expected a single document ... but found another".
        problem, context = f"{context}, {problem}", ""
    message = f"{source}:{where}: invalid YAML: {problem or context}"
    if mark and error.problem_mark:
        if mark.line + 1 > last_line:
            message += " (at the end of the file)"
        else:
            message += f" (column {mark.column + 1})"
    if problem and context:
        message += f", {context}"
        if error.context_mark:
            message += f" that starts at line {error.context_mark.line + 1}"
    return message
