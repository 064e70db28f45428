"""The generic YAML node reader: structure, scalars, ``${ENV}``, typed converters.

Converters take ``(node, path)`` and either return a value or record the
problem (``FILE:LINE: key.path: message``) and raise :class:`Invalid`; a
section reader catches that per field (:class:`FieldReader`) so one bad
value never hides the next.  Most converters are one shape, "a scalar,
text, parsed, or a message": :meth:`Reader.parsed`.  What the keys mean
belongs to the section readers (``listeners.py``, ``clusters.py``,
``settings.py``) and to each mode's package.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import attrs
import yaml

from egressproxy.config.parse import parse_duration, parse_network
from egressproxy.config.syntax import NAME_RE, IPNetwork, Path, show
from egressproxy.config.yamlnodes import Loader, flag, kind, line, render_path

__all__ = ["FieldReader", "Fields", "Invalid", "Named", "Reader"]

T = TypeVar("T")

_REF_RE = re.compile(r"\$(?:\$|\{(?P<body>[^}]*)\}|(?P<open>\{))?")
_VAR_RE = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?\Z", re.S)
_NETWORK_HINT = "expected a CIDR such as 10.0.0.0/8 or fdaa::/16, or a single IP address"


class Invalid(Exception):
    """A value was rejected; the problem has already been recorded."""


class Fields(dict[str, yaml.Node]):
    """The known keys of one mapping, each with its value node.

    ``key_nodes`` holds each key's own node, for errors about a key being there
    at all; ``suggested`` holds the known keys that an unknown key was taken
    for a misspelling of, so a rule that requires one of them stays quiet (the
    suggestion already says what to fix).
    """

    def __init__(self) -> None:
        super().__init__()
        self.key_nodes: dict[str, yaml.Node] = {}
        self.suggested: set[str] = set()

    def has(self, key: str) -> bool:
        """Whether ``key`` is written, or an unknown key was taken for it."""
        return key in self or key in self.suggested


@attrs.define
class Named:
    """A name read from the file, remembered for the cross checks."""

    value: str
    node: yaml.Node
    path: Path


class Reader:
    """Reads values out of one file's nodes and collects its errors, sorted by line later."""

    def __init__(self, source: str, environ: Mapping[str, str], loader: Loader) -> None:
        self.source = source
        self.environ = environ
        self.loader = loader
        self.errors: list[tuple[int, str]] = []

    # -- reporting ----------------------------------------------------------

    def report(self, node: yaml.Node, path: Path, message: str) -> None:
        where = render_path(path)
        prefix = f"{self.source}:{line(node)}: "
        self.errors.append((line(node), prefix + (f"{where}: " if where else "") + message))

    def fail(self, node: yaml.Node, path: Path, message: str) -> NoReturn:
        self.report(node, path, message)
        raise Invalid()

    # -- structure ----------------------------------------------------------

    def mapping(
        self, node: yaml.Node, path: Path, allowed: Sequence[str], required: Sequence[str] = ()
    ) -> Fields:
        """Read a mapping with a fixed set of keys; report unknown and missing ones."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(
                node, path, f"expected a mapping with keys {', '.join(allowed)}, got {self.got(node)}"
            )
        result = Fields()
        for key, (key_node, value_node) in self.entries(node, path).items():
            if key in allowed:
                result[key] = value_node
                result.key_nodes[key] = key_node
                continue
            close = difflib.get_close_matches(key, allowed, n=1)
            if close:
                result.suggested.add(close[0])
                hint = f"; did you mean {close[0]!r}?"
            else:
                hint = f" (expected one of: {', '.join(allowed)})"
            self.report(key_node, path, f"unknown key {key!r}{hint}")
        for key in required:
            if not result.has(key):
                self.report(node, path, f"missing required key {key!r}")
        return result

    def entries(self, node: yaml.MappingNode, path: Path) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """The string-keyed entries of a mapping, first occurrence winning.

        Duplicates and non-string keys are reported here, once, with their line.
        """
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.construct(key_node, path)
            if not isinstance(key, str):
                got = show(key) if isinstance(key_node, yaml.ScalarNode) else kind(key_node)
                self.report(key_node, path, f"keys must be text, got {got}")
                continue
            if key in entries:
                first = line(entries[key][0])
                self.report(key_node, path + (key,), f"duplicate key {key!r} (first at line {first})")
                continue
            entries[key] = (key_node, value_node)
        return entries

    def each(self, items: list[yaml.Node], path: Path, build: Callable[[yaml.Node, Path], T]) -> tuple[T, ...]:
        """Build every item of a list, reporting each bad one; then one :class:`Invalid` if any was."""
        built: list[T] = []
        failed = False
        for index, item in enumerate(items):
            try:
                built.append(build(item, path + (index,)))
            except Invalid:
                failed = True
        if failed:
            raise Invalid()
        return tuple(built)

    def sequence(self, node: yaml.Node, path: Path, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, path, f"expected a list of {what}, got {self.got(node)}")
        return list(node.value)

    def non_empty_sequence(self, node: yaml.Node, path: Path, what: str, when_empty: str) -> list[yaml.Node]:
        """A list of ``what`` that may not be empty; ``when_empty`` says why and what to do."""
        items = self.sequence(node, path, what)
        if not items:
            self.fail(node, path, when_empty)
        return items

    def named_entry(
        self, node: yaml.Node, path: Path, keys: Sequence[str], required: Sequence[str], names: list[Named]
    ) -> tuple[Fields, FieldReader, str | None] | None:
        """Open one named list entry: its fields, a reader, and its name (recorded in ``names``)."""
        try:
            fields = self.mapping(node, path, keys, required)
        except Invalid:
            return None
        read = FieldReader(fields, path, required)
        name = read("name", self.name)
        if name is not None:
            names.append(Named(name, fields["name"], path + ("name",)))
        return fields, read, name

    def build(self, node: yaml.Node, path: Path, cls: Callable[..., T], **kw: Any) -> T | None:
        """Build a model object; a validator failure becomes an ordinary error.

        The reader checks everything first, so this only fires if the two lines
        of defence disagree; reporting beats a traceback.
        """
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            self.report(node, path, str(e))
            return None

    def built(self, node: yaml.Node, path: Path, cls: Callable[..., T], **kw: Any) -> T:
        """:meth:`build`, raising :class:`Invalid` when it fails."""
        result = self.build(node, path, cls, **kw)
        if result is None:
            raise Invalid()
        return result

    # -- scalars ------------------------------------------------------------

    def construct(self, node: yaml.Node, path: Path) -> object:
        """The Python value of a scalar node, before interpolation."""
        if not isinstance(node, yaml.ScalarNode):
            return node  # the caller's type check reports it
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e)
            self.fail(node, path, f"cannot read this value: {problem}")

    def scalar(self, node: yaml.Node, path: Path, expected: str, *, secret: bool = False) -> object:
        """A scalar's value with ``${...}`` expanded in strings.

        With ``secret``, interpolation errors do not quote the text.
        """
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, path, f"expected {expected}, got {kind(node)}")
        value = self.construct(node, path)
        if isinstance(value, str):
            value = self.interpolate(value, node, path, secret=secret)
        return value

    def interpolate(self, text: str, node: yaml.Node, path: Path, *, secret: bool = False) -> str:
        """Expand ``${VAR}``, ``${VAR:-default}`` and ``$$``; report unset variables.

        A ``$`` followed by anything else is kept as written, so passwords with
        a dollar sign survive; ``${`` without its ``}`` is an error. With
        ``secret`` (passwords) the errors name variables but never quote the
        text around them.
        """
        problems: list[str] = []

        def expand(match: re.Match[str]) -> str:
            token = match.group(0)
            if token == "$$":
                return "$"
            if match.group("open"):
                where = "the value" if secret else repr(text)
                problems.append(f"unterminated '${{' in {where}; write $$ for a literal $")
                return token
            body = match.group("body")
            if body is None:
                return token
            var = _VAR_RE.match(body)
            if not var:
                reference = "in the value" if secret else repr(token)
                problems.append(
                    f"invalid reference {reference}: expected ${{NAME}} or "
                    f"${{NAME:-default}} (NAME is letters, digits and _); "
                    f"write $$ for a literal $"
                )
                return token
            name, default = var.group("name"), var.group("default")
            value = self.environ.get(name)
            if value:
                return value
            if default is not None:
                return default
            if value is not None:
                return value  # set but empty, and no default to prefer
            problems.append(
                f"environment variable {name} is not set; set {name} or write ${{{name}:-default}}"
            )
            return token

        result = _REF_RE.sub(expand, text)
        for problem in problems:
            self.report(node, path, problem)
        if problems:
            raise Invalid()
        return result

    def got(self, node: yaml.Node) -> str:
        """What a node holds, for "expected X, got Y"."""
        if isinstance(node, yaml.ScalarNode):
            try:
                return show(self.loader.construct_object(node, deep=True))
            except yaml.YAMLError:
                return repr(node.value)
        return kind(node)

    # -- typed converters ---------------------------------------------------

    def parsed(
        self, node: yaml.Node, path: Path, expected: str, parse: Callable[[str], T], wrong: str | None = None
    ) -> T:
        """Text through ``parse``: the shape most values have.

        Not a scalar: ``expected EXPECTED, got a list``; a scalar that is not
        text: ``WRONG, got 5`` (``WRONG`` is ``expected EXPECTED`` unless
        given); a ``ValueError`` from ``parse``: its message as it is.
        """
        return self.convert(node, path, self.scalar(node, path, expected), parse, wrong or f"expected {expected}")

    def convert(self, node: yaml.Node, path: Path, value: object, parse: Callable[[str], T], wrong: str) -> T:
        """The second half of :meth:`parsed`, for a scalar value already read."""
        if not isinstance(value, str):
            self.fail(node, path, f"{wrong}, got {show(value)}")
        try:
            return parse(value)
        except ValueError as e:
            self.fail(node, path, str(e))

    def choice(
        self, node: yaml.Node, path: Path, expected: str, choices: Sequence[object], wrong: str | None = None
    ) -> Any:
        """One of ``choices``; else ``WRONG, got X`` (``WRONG`` is ``expected EXPECTED`` unless given)."""
        value = self.scalar(node, path, expected)
        if value not in choices:
            self.fail(node, path, f"{wrong or f'expected {expected}'}, got {show(value)}")
        return value

    def text(self, node: yaml.Node, path: Path, expected: str = "text") -> str:
        return self.parsed(node, path, expected, str)

    def name(self, node: yaml.Node, path: Path) -> str:
        expected = "a name of lower-case letters, digits, '_' and '-'"

        def check(value: str) -> str:
            if not NAME_RE.match(value):
                raise ValueError(f"expected {expected}, got {value!r}")
            return value

        return self.parsed(node, path, expected, check)

    def integer(self, node: yaml.Node, path: Path, low: int, high: int | None) -> int:
        """An int within bounds; digit strings count, since ``${VAR}`` yields text."""
        expected = f"a whole number >= {low}" if high is None else f"a whole number {low}-{high}"
        value = self.scalar(node, path, expected)
        if isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(node, path, f"expected {expected}, got {show(value)}")
        if value < low or (high is not None and value > high):
            self.fail(node, path, f"expected {expected}, got {value}")
        return value

    def positive(self, node: yaml.Node, path: Path) -> int:
        return self.integer(node, path, 1, None)

    def boolean(self, node: yaml.Node, path: Path) -> bool:
        """true or false; the text ``true``/``false`` counts, as ``${VAR}`` yields text."""
        value = flag(self.scalar(node, path, "true or false"))
        if not isinstance(value, bool):
            self.fail(node, path, f"expected true or false, got {show(value)}")
        return value

    def duration(self, node: yaml.Node, path: Path) -> float:
        value = self.scalar(node, path, "a duration")
        try:
            return parse_duration(value)
        except ValueError as e:
            self.fail(node, path, str(e))

    def positive_duration(self, node: yaml.Node, path: Path, example: str) -> float:
        seconds = self.duration(node, path)
        if seconds <= 0:
            self.fail(node, path, f"must be greater than 0 (e.g. {example})")
        return seconds

    def network(self, node: yaml.Node, path: Path) -> IPNetwork:
        """A CIDR, or a single IP address (a /32 or /128)."""
        return self.parsed(node, path, "a CIDR", parse_network, _NETWORK_HINT)

    def file(self, node: yaml.Node, path: Path) -> str:
        """The path of an existing file (relative paths: to the working directory)."""
        value = self.text(node, path, "a file path")
        if not value:
            self.fail(node, path, "expected a file path, got ''")
        if os.path.isdir(value):
            self.fail(node, path, f"{value!r} is a directory, not a file")
        if not os.path.isfile(value):
            self.fail(node, path, f"no such file: {value!r}")
        return value

    def written(self, node: yaml.Node) -> list[str]:
        """The expanded text of each item of a list already read without error."""
        return [self.interpolate(str(item.value), item, ()) for item in node.value]


class FieldReader:
    """Reads optional and required fields of one mapping, remembering failures."""

    def __init__(self, fields: Mapping[str, yaml.Node], path: Path, required: Sequence[str]) -> None:
        self.fields = fields
        self.path = path
        self.ok = all(key in fields for key in required)

    def __call__(self, key: str, convert: Callable[[yaml.Node, Path], T], default: T | None = None) -> T | None:
        node = self.fields.get(key)
        if node is None:
            return default
        try:
            return convert(node, self.path + (key,))
        except Invalid:
            self.ok = False
            return default
