"""A hardened YAML reader: plain dicts and lists that remember the line of every key and item.

PyYAML's own loaders silently keep the last of two duplicate keys, expand aliases (the
"billion laughs" bomb) and throw away line numbers. Here libyaml (when available) only
*composes* node trees; this module turns nodes into values itself, so it can reject aliases,
merge keys, duplicate and non-string keys and deep nesting before building anything, and keep
the 1-based line of each field for error messages.

Reading is done twice only when needed: a fast pass builds the values and the lines the checks
need, and nothing else (no field paths, no columns); a document it cannot build plainly (an
alias, a bad key, a bad value...) is read again by the checked pass, which names the problem
exactly, and the columns of a file's fields are read again only when a problem asks for one.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from meshlib.config.values import clipped, shown

MAX_DEPTH = 64
#: Documents in one file. Per file, like the loader's byte cap: it bounds what one read of one
#: file builds (the byte cap alone would allow over a million empty ones). A larger policy is
#: split into files in a directory, read as one policy (``Mesh.from_file``, ``meshctl validate``).
MAX_DOCUMENTS = 1000

_BaseLoader: type[yaml.SafeLoader]
try:  # libyaml composes ~10x faster than the pure-Python parser; same node trees and marks
    _BaseLoader = yaml.CSafeLoader  # type: ignore[assignment]
except AttributeError:  # pragma: no cover - libyaml missing
    _BaseLoader = yaml.SafeLoader


_STR = "tag:yaml.org,2002:str"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
#: Plain scalars starting with anything else are strings under every YAML 1.1 implicit resolver.
_MAYBE_TYPED = frozenset("0123456789-+.~nNtTfFyYoO=<")


class _Loader(_BaseLoader):  # type: ignore[valid-type,misc]
    """Resolves the common cases (a plain word, any quoted scalar, a mapping or a list)
    without the regex scan or the generic dispatch.

    PyYAML calls ``resolve`` in Python for every node, even under libyaml; on large files
    this is a noticeable share of the load time.
    """

    def resolve(self, kind: type[yaml.Node], value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode:
            if implicit is not None:
                if implicit[0]:
                    if value and value[0] not in _MAYBE_TYPED:
                        return _STR
                elif implicit[1]:
                    return _STR
        elif not self.yaml_path_resolvers:  # an untagged mapping or list: its default tag
            return _MAP if kind is yaml.MappingNode else _SEQ
        return super().resolve(kind, value, implicit)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_/-]+")


@functools.lru_cache(maxsize=4096)  # the same few paths recur in every document of a policy
def field_path(parent: str, key: str) -> str:
    """The path of ``key`` under ``parent`` as problems name it: ``spec.port``; a key that is
    empty or holds a dot is quoted, so the path still says which key
    (``metadata.labels['app.kubernetes.io/name']``, ``['']``)."""
    if _PLAIN_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{shown(key)}]"


class YMap(dict[str, Any]):
    """A YAML mapping: a dict with the line of the mapping and of each key."""

    __slots__ = ("key_lines", "line")

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[str, int] = {}

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class YSeq(list[Any]):
    """A YAML sequence: a list with the line of the sequence and of each item."""

    __slots__ = ("item_lines", "line")

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []

    def line_of(self, index: int) -> int:
        return self.item_lines[index] if 0 <= index < len(self.item_lines) else self.line


@dataclass(frozen=True)
class YamlProblem:
    """Something wrong at the YAML level (before any kind is looked at)."""

    line: int
    document: int  # 1-based; 0 when the stream as a whole is wrong
    field: str
    message: str
    column: int = 0


class PositionSource:
    """The field positions of every document of one YAML text, read again on first request.

    Only a problem needs a column, so the fast pass does not record them: the documents of one
    read share this source, and the first document asked for a column re-reads the text (once
    for all of them) with the checked pass, which records the position of every field."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._found: dict[int, dict[str, tuple[int, int]]] | None = None

    def positions(self, index: int) -> dict[str, tuple[int, int]]:
        if self._found is None:
            found: dict[int, dict[str, tuple[int, int]]] = {}
            _read(self._text, checked=True, positions=found)
            self._found = found  # a race only reads the same text twice, to the same result
        return self._found.get(index, {})


@dataclass(frozen=True)
class YamlDocument:
    index: int  # 1-based position in the stream
    line: int
    value: Any  # YMap, YSeq, scalar or None for an empty document
    #: Field path (``spec.backends[1].weight``, as problems name fields) → 1-based line and
    #: column where its value starts: what lets a problem point at ``file:line:col``.
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Where the positions are read when they were not recorded with the value (the fast
    #: pass): :meth:`column_of` asks it. None: ``positions`` is all there is.
    source: PositionSource | None = field(default=None, compare=False, repr=False)

    def column_of(self, path: str, line: int) -> int:
        """The column of the value at ``path`` if it starts on ``line``; 0 if unknown (a
        missing field, or a problem reported on another line than the value's)."""
        positions = self.positions if self.source is None else self.source.positions(self.index)
        found = positions.get(path)
        return found[1] if found is not None and found[0] == line else 0


class _Reject(Exception):
    def __init__(self, line: int, field: str, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.field = field
        self.message = message


class _Builder:
    """Turns one composed document into YMap/YSeq/scalars, enforcing the safety rules."""

    def __init__(self) -> None:
        self._constructor = SafeConstructor()
        # A node object reached twice is an alias: libyaml hands back the anchored node itself.
        self._seen: set[int] = set()
        self.positions: dict[str, tuple[int, int]] = {}

    def build(self, node: yaml.Node, path: str, depth: int, where: int = 0) -> Any:
        """``where`` is the line of the key or list holding ``node``: an alias has no line
        of its own (libyaml hands back the anchored node), so errors about it use this one."""
        line = node.start_mark.line + 1
        if id(node) in self._seen:
            raise _Reject(
                where or line, path, "YAML aliases (*name) are not allowed; repeat the value"
            )
        self._seen.add(id(node))
        self.positions[path] = (line, node.start_mark.column + 1)
        if depth > MAX_DEPTH:
            raise _Reject(line, path, f"nesting deeper than {MAX_DEPTH} levels is not allowed")
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, depth, line)
        if isinstance(node, yaml.SequenceNode):
            seq = YSeq(line)
            for i, item in enumerate(node.value):
                seq.append(self.build(item, f"{path}[{i}]", depth + 1, line))
                seq.item_lines.append(item.start_mark.line + 1)
            return seq
        assert isinstance(node, yaml.ScalarNode)
        return self._scalar(node, path, line)

    def _mapping(self, node: yaml.MappingNode, path: str, depth: int, line: int) -> YMap:
        result = YMap(line)
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _Reject(key_line, path, "YAML merge keys (<<) are not allowed")
            if not isinstance(key_node, yaml.ScalarNode):
                raise _Reject(key_line, path, "mapping keys must be plain strings")
            key = self._scalar(key_node, path, key_line)
            if not isinstance(key, str):
                raise _Reject(
                    key_line,
                    path,
                    f"mapping key {shown(key_node.value)} is not a string "
                    f"(quote it: '{clipped(key_node.value)}')",
                )
            child = field_path(path, key)
            if key in result:
                raise _Reject(
                    key_line,
                    child,
                    f"duplicate key {shown(key)} (first at line {result.key_lines[key]})",
                )
            result.key_lines[key] = key_line
            result[key] = self.build(value_node, child, depth + 1, key_line)
        return result

    def _scalar(self, node: yaml.ScalarNode, path: str, line: int) -> Any:
        if node.tag == _STR:  # the common case, without the generic dispatch
            return node.value
        construct = self._constructor.yaml_constructors.get(node.tag)
        if construct is None:
            raise _Reject(line, path, f"unsupported YAML tag {node.tag}")
        try:
            return construct(self._constructor, node)
        except (yaml.YAMLError, ValueError) as exc:
            reason = clipped(str(exc))
            raise _Reject(
                line, path, f"bad {node.tag.rsplit(':', 1)[-1]} value: {reason}"
            ) from None


class _Unplain(Exception):
    """The fast pass met what only the checked pass (:class:`_Builder`) reports exactly."""


_new_map = dict.__new__
_new_seq = list.__new__


class _FastBuilder:
    """Builds the same values and lines as :class:`_Builder` for a document that breaks no
    rule, with no field paths or positions and one call per node; raises :class:`_Unplain` at
    anything else (an alias, a merge or non-string or duplicate key, an unsupported tag, a bad
    value, deep nesting), and the checked pass then reads the document again to name it."""

    def __init__(self, aliases_possible: bool) -> None:
        self._constructor = SafeConstructor()
        #: Node ids built so far; None when the text holds no '&', so no anchor and no alias.
        self._seen: set[int] | None = set() if aliases_possible else None

    def build(self, node: yaml.Node, depth: int) -> Any:
        if self._seen is not None:
            if id(node) in self._seen:
                raise _Unplain
            self._seen.add(id(node))
        if depth > MAX_DEPTH:
            raise _Unplain
        kind = node.__class__
        if kind is yaml.ScalarNode:
            if node.tag == _STR:
                return node.value
            construct = self._constructor.yaml_constructors.get(node.tag)
            if construct is None:
                raise _Unplain
            try:
                return construct(self._constructor, node)
            except (yaml.YAMLError, ValueError):
                raise _Unplain from None
        if kind is yaml.MappingNode:
            result = _new_map(YMap)
            result.line = node.start_mark.line + 1
            key_lines: dict[str, int] = {}
            result.key_lines = key_lines
            for key_node, value_node in node.value:
                if key_node.__class__ is not yaml.ScalarNode or key_node.tag != _STR:
                    raise _Unplain
                key = key_node.value
                if key in key_lines:
                    raise _Unplain
                key_lines[key] = key_node.start_mark.line + 1
                result[key] = self.build(value_node, depth + 1)
            return result
        if kind is yaml.SequenceNode:
            seq = _new_seq(YSeq)
            seq.line = node.start_mark.line + 1
            seq.item_lines = [item.start_mark.line + 1 for item in node.value]
            seq.extend([self.build(item, depth + 1) for item in node.value])
            return seq
        raise _Unplain  # pragma: no cover - libyaml composes only the three kinds


def read_documents(text: str) -> tuple[list[YamlDocument], list[YamlProblem]]:
    """Parse a multi-document YAML stream; return its documents or the problems found.

    A syntax error ends the stream (nothing after it can be trusted); safety violations inside
    one document are reported for that document and the next documents are still read.
    """
    return _read(text, checked=False, positions=None)


def _read(
    text: str, *, checked: bool, positions: dict[int, dict[str, tuple[int, int]]] | None
) -> tuple[list[YamlDocument], list[YamlProblem]]:
    """:func:`read_documents`; ``checked``: every document by the checked pass, recording the
    positions of its fields into ``positions`` (by document index) as well as its own."""
    source = None if checked else PositionSource(text)
    aliases_possible = "&" in text
    docs: list[YamlDocument] = []
    problems: list[YamlProblem] = []
    loader = _Loader(text)
    index = 0
    try:
        for node in _compose_all(loader):
            index += 1
            if index > MAX_DOCUMENTS:
                line = node.start_mark.line + 1 if node is not None else 0
                problems.append(
                    YamlProblem(
                        line,
                        0,
                        "",
                        f"more than {MAX_DOCUMENTS} documents in one file: split the policy into "
                        "files in a directory (Mesh.from_file and meshctl validate read a "
                        "directory as one policy)",
                    )
                )
                break
            if node is None:
                continue
            line = node.start_mark.line + 1
            if source is not None:
                try:
                    value = _FastBuilder(aliases_possible).build(node, 0)
                except _Unplain:
                    pass
                else:
                    if value is not None:  # an empty document (a stray '---') is no error
                        docs.append(YamlDocument(index, line, value, source=source))
                    continue
            builder = _Builder()
            try:
                value = builder.build(node, "", 0)
            except _Reject as rej:
                problems.append(YamlProblem(rej.line, index, rej.field, rej.message))
                continue
            if positions is not None:
                positions[index] = builder.positions
            if value is not None:  # an empty document (a stray '---') is not an error
                docs.append(YamlDocument(index, line, value, builder.positions))
    except yaml.reader.ReaderError as exc:
        problems.append(_reader_problem(exc, index + 1, text))
    except yaml.MarkedYAMLError as exc:
        problems.append(_syntax_problem(exc, index + 1, text))
    except yaml.YAMLError as exc:  # pragma: no cover - unmarked errors are rare
        problems.append(YamlProblem(0, index + 1, "", f"invalid YAML: {exc}"))
    finally:
        loader.dispose()
    return docs, problems


def _compose_all(loader: yaml.SafeLoader) -> Iterator[yaml.Node | None]:
    while loader.check_node():
        yield loader.get_node()


def _syntax_problem(exc: yaml.MarkedYAMLError, document: int, text: str) -> YamlProblem:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else 0
    column = mark.column + 1 if mark is not None else 0
    problem = exc.problem or "syntax error"
    if "maximum nesting depth" in problem:
        message = f"nesting deeper than {MAX_DEPTH} levels is not allowed"
    else:
        context = f" {exc.context}" if exc.context else ""
        message = f"invalid YAML: {problem}{context}".rstrip()
        if mark is not None and _char_at(text, mark.line, mark.column) == "\t":
            message += " (a tab: indent with spaces, YAML does not allow tabs there)"
    return YamlProblem(line, document, "", message, column)


def line_column(text: str | bytes, index: int) -> tuple[int, int]:
    """The 1-based line and column of offset ``index`` in ``text`` (columns count characters
    of a str, bytes of bytes)."""
    newline: Any = b"\n" if isinstance(text, bytes) else "\n"
    return text.count(newline, 0, index) + 1, index - text.rfind(newline, 0, index)


def _reader_problem(exc: yaml.reader.ReaderError, document: int, text: str) -> YamlProblem:
    """A character YAML does not allow (a control character): libyaml reports no mark, only
    the offset of the character in the UTF-8 encoding of the text."""
    prefix = text.encode("utf-8")[: exc.position].decode("utf-8", "replace")
    line, column = line_column(prefix, len(prefix))
    char = exc.character
    what = f"U+{char:04X}" if isinstance(char, int) else shown(char)
    return YamlProblem(line, document, "", f"invalid YAML: character {what}: {exc.reason}", column)


def _char_at(text: str, line: int, column: int) -> str:
    start = 0
    for _ in range(line):
        start = text.find("\n", start) + 1
        if start == 0:
            return ""
    index = start + column
    return text[index] if index < len(text) else ""
