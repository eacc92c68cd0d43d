"""Checks a YAML value against the JSON Schema subset used in schema.py, with lines and hints.

A general JSON Schema validator reports "Additional properties are not allowed"; users need
"spec.backends[0].weigth: unknown field (did you mean 'weight'?)" at the right line. Only the
keywords schema.py uses are implemented.

Checking is done twice only when needed, as reading is (yamlsafe's fast and checked passes):
:func:`passes` answers only whether a value breaks nothing, with one test compiled per schema
node and no paths or lines; :func:`check` then names every finding of a value that does not pass.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from meshlib.config.fragments import DEFS
from meshlib.config.values import parse_duration, shown
from meshlib.config.yamlsafe import YMap, YSeq, field_path


@dataclass(frozen=True)
class Finding:
    line: int
    field: str
    message: str


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'weight'?)`` or an empty string."""
    import difflib  # only a rejected file needs a hint: not loaded by a clean policy

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__  # pragma: no cover - YAML timestamps and binary


_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean (true/false)",
    "object": "a mapping",
    "array": "a list",
}


def _has_type(value: Any, json_type: str) -> bool:
    if json_type == "string":
        return isinstance(value, str)
    if json_type == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if json_type == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if json_type == "boolean":
        return isinstance(value, bool)
    if json_type == "object":
        return isinstance(value, Mapping)
    if json_type == "array":
        return isinstance(value, list)
    return False  # pragma: no cover


def resolve(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    return DEFS[ref.rsplit("/", 1)[-1]]


def _child_line(container: Any, key: str | int, default: int) -> int:
    if isinstance(container, YMap) and isinstance(key, str):
        return container.line_of(key)
    if isinstance(container, YSeq) and isinstance(key, int):
        return container.line_of(key)
    return default


def check(value: Any, schema: Mapping[str, Any], path: str, line: int, out: list[Finding]) -> None:
    """Append to ``out`` every way ``value`` (at ``path``, ``line``) breaks ``schema``."""
    schema = resolve(schema)
    if "anyOf" in schema:
        _check_any_of(value, schema, path, line, out)
        return
    if "const" in schema and value != schema["const"]:
        out.append(Finding(line, path, f"must be {schema['const']!r}, got {shown(value)}"))
        return
    json_type = schema.get("type")
    if json_type is not None and not _has_type(value, json_type):
        if json_type == "integer" and isinstance(value, float) and not isinstance(value, bool):
            msg = f"must be a whole number, got {shown(value)}"
        else:
            wanted = schema.get("title") or _TYPE_WORDS[json_type]
            msg = f"must be {wanted}, got {type_name(value)}"
            if value is None:
                msg += " (the field is empty)"
        out.append(Finding(line, path, msg))
        return
    if isinstance(value, (dict, Mapping)):  # dict first: a YMap skips the ABC check
        _check_object(value, schema, path, line, out)
    elif isinstance(value, list):
        _check_array(value, schema, path, line, out)
    elif isinstance(value, str):
        _check_string(value, schema, path, line, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_number(value, schema, path, line, out)


def _check_any_of(
    value: Any, schema: Mapping[str, Any], path: str, line: int, out: list[Finding]
) -> None:
    attempts: list[tuple[Mapping[str, Any], list[Finding]]] = []
    for branch in schema["anyOf"]:
        found: list[Finding] = []
        check(value, branch, path, line, found)
        if not found:
            return
        attempts.append((resolve(branch), found))
    typed = [f for b, f in attempts if "type" in b and _has_type(value, b["type"])]
    if len(typed) == 1:
        out.extend(typed[0])
        return
    words = [b.get("title") or _TYPE_WORDS.get(b.get("type", ""), "?") for b, _ in attempts]
    out.append(Finding(line, path, f"must be {' or '.join(words)}, got {shown(value)}"))


def _check_object(
    value: Mapping[str, Any], schema: Mapping[str, Any], path: str, line: int, out: list[Finding]
) -> None:
    props: Mapping[str, Any] = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key in schema.get("required", ()):
        if key not in value:
            where = field_path(path, key)
            out.append(Finding(line, where, f"missing required field {key!r}"))
    if "minProperties" in schema and len(value) < schema["minProperties"]:
        out.append(Finding(line, path, f"must have at least {schema['minProperties']} entry"))
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        out.append(Finding(line, path, f"must have at most {schema['maxProperties']} entry"))
    # The lines of the keys as _child_line gives them, looked up once rather than per key.
    key_lines: dict[str, int] = value.key_lines if isinstance(value, YMap) else {}
    own_line = value.line if isinstance(value, YMap) else line
    for key, item in value.items():
        where = field_path(path, key)
        item_line = key_lines.get(key, own_line)
        if key in props:
            check(item, props[key], where, item_line, out)
        elif extra is False:
            hint = suggest(key, list(props)) or (
                f"; known fields: {', '.join(props)}" if props else "; no fields are allowed here"
            )
            # The key is the user's text, as long as they made it: shown clipped, like values.
            out.append(Finding(item_line, where, f"unknown field {shown(key)}{hint}"))
        elif isinstance(extra, Mapping):
            check(item, extra, where, item_line, out)


def _check_array(
    value: list[Any], schema: Mapping[str, Any], path: str, line: int, out: list[Finding]
) -> None:
    min_items = schema.get("minItems")
    if min_items and len(value) < min_items:
        out.append(Finding(line, path, f"must have at least {min_items} item(s)"))
    items = schema.get("items")
    if items is not None:
        for i, item in enumerate(value):
            check(item, items, f"{path}[{i}]", _child_line(value, i, line), out)


def _check_string(
    value: str, schema: Mapping[str, Any], path: str, line: int, out: list[Finding]
) -> None:
    if "enum" in schema and value not in schema["enum"]:
        choices = schema["enum"]
        out.append(
            Finding(
                line,
                path,
                f"{shown(value)} is not one of {', '.join(choices)}{suggest(value, choices)}",
            )
        )
        return
    if schema.get("minLength") and len(value) < schema["minLength"]:
        out.append(Finding(line, path, "must not be empty"))
        return
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        out.append(
            Finding(
                line,
                path,
                f"is {len(value)} characters long, at most {schema['maxLength']} are allowed",
            )
        )
        return
    if schema.get("format") == "duration":
        try:
            parse_duration(value)
        except ValueError as exc:
            out.append(Finding(line, path, str(exc)))
        return
    pattern = schema.get("pattern")
    if pattern is not None and not re.search(pattern, value):
        wanted = schema.get("title") or f"a string matching {pattern}"
        out.append(Finding(line, path, f"{shown(value)} is not {wanted}"))


def _check_number(
    value: float, schema: Mapping[str, Any], path: str, line: int, out: list[Finding]
) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        out.append(Finding(line, path, f"must be a finite number, got {value!r}"))
        return
    # Python compares an int of any size with these bounds exactly; nothing converts it here,
    # and the value is shown (a repr) only when a bound fails.
    if "minimum" in schema and value < schema["minimum"]:
        out.append(Finding(line, path, f"must be at least {schema['minimum']}, got {shown(value)}"))
    elif "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        out.append(
            Finding(
                line, path, f"must be greater than {schema['exclusiveMinimum']}, got {shown(value)}"
            )
        )
    elif "maximum" in schema and value > schema["maximum"]:
        out.append(Finding(line, path, f"must be at most {schema['maximum']}, got {shown(value)}"))


#: A compiled test: True exactly when :func:`check` would report nothing for the value.
_Test = Callable[[Any], bool]
#: Compiled tests by schema identity; each entry holds its schema, so the id is never reused
#: while the entry lives. Only the module-level document schemas reach it: a bounded set.
_TESTS: dict[int, tuple[Mapping[str, Any], _Test]] = {}


def passes(value: Any, schema: Mapping[str, Any]) -> bool:
    """Whether ``check(value, schema, ...)`` would report nothing; no paths, lines or messages.

    The loader asks this first and runs :func:`check` only for a value that does not pass, so
    a clean policy (the common case) builds no field path and looks up no line."""
    return _test(schema)(value)


def document_findings(value: Any, schema: Mapping[str, Any], line: int) -> list[Finding]:
    """Every way a whole document's ``value`` (at ``line``) breaks ``schema``, as :func:`check`
    reports them; a value that :func:`passes` (the common case) is not walked a second time."""
    out: list[Finding] = []
    if not passes(value, schema):
        check(value, schema, "", line, out)
    return out


def _test(schema: Mapping[str, Any]) -> _Test:
    entry = _TESTS.get(id(schema))
    if entry is not None and entry[0] is schema:
        return entry[1]
    test = _compile(resolve(schema))
    _TESTS[id(schema)] = (schema, test)  # a race compiles twice, to equal tests
    return test


def _is_mapping(value: Any) -> bool:
    # dict first: a YMap is one, and the Mapping ABC check costs several times more
    return isinstance(value, (dict, Mapping))


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: _has_type, one function per JSON type: what the compiled tests call.
_TYPE_TESTS: dict[str, _Test] = {
    "string": lambda value: isinstance(value, str),
    "integer": _is_integer,
    "number": _is_number,
    "boolean": lambda value: isinstance(value, bool),
    "object": _is_mapping,
    "array": lambda value: isinstance(value, list),
}


def _never(value: Any) -> bool:
    return False


def _always(value: Any) -> bool:
    return True


def _compile(schema: Mapping[str, Any]) -> _Test:
    """The test of one resolved schema node, mirroring :func:`check` keyword by keyword.

    Child schemas are compiled when a value first reaches them (a recursive ``$ref`` compiles
    once); the value's kind picks the keywords that apply, as in :func:`check`."""
    if "anyOf" in schema:
        branches = tuple(schema["anyOf"])
        return lambda value: any(_test(b)(value) for b in branches)
    of_object = _object_test(schema)
    of_array = _array_test(schema)
    of_string = _string_test(schema)
    of_number = _number_test(schema)

    def by_kind(value: Any) -> bool:
        if isinstance(value, dict):
            return of_object(value)
        if isinstance(value, list):
            return of_array(value)
        if isinstance(value, str):
            return of_string(value)
        if _is_number(value):
            return of_number(value)
        if isinstance(value, Mapping):
            return of_object(value)
        return True

    json_type = schema.get("type")
    kind_test: _Test = by_kind
    if json_type is not None:
        has_type = _TYPE_TESTS.get(json_type, _never)
        # A value of the declared type is of one kind only: its keywords, without the dispatch.
        kinds: dict[str, _Test] = {
            "string": of_string,
            "integer": of_number,
            "number": of_number,
            "array": of_array,
            "boolean": _always,
        }
        kind = kinds.get(json_type, by_kind)

        def kind_test(value: Any) -> bool:
            return has_type(value) and kind(value)

    if "const" not in schema:
        return kind_test
    const = schema["const"]

    def const_test(value: Any) -> bool:
        if value != const:  # as check() compares
            return False
        return kind_test(value)

    return const_test


def _object_test(schema: Mapping[str, Any]) -> _Test:
    props: Mapping[str, Any] = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    closed = extra is False
    extra_schema = extra if isinstance(extra, Mapping) else None
    required = tuple(schema.get("required", ()))
    min_props = schema.get("minProperties")
    max_props = schema.get("maxProperties")
    known: dict[str, _Test] = {}  # a property's test by key, once reached (bounded: props)

    def test(value: Mapping[str, Any]) -> bool:
        for key in required:
            if key not in value:
                return False
        if min_props is not None and len(value) < min_props:
            return False
        if max_props is not None and len(value) > max_props:
            return False
        for key, item in value.items():
            child = known.get(key)
            if child is None:
                if key.__class__ is not str:  # check() fails on it (field_path): let it
                    return False
                if key in props:
                    child = known[key] = _test(props[key])
                elif closed:
                    return False
                elif extra_schema is None:
                    continue
                else:
                    child = _test(extra_schema)
            if not child(item):
                return False
        return True

    return test


def _array_test(schema: Mapping[str, Any]) -> _Test:
    min_items = schema.get("minItems")
    items = schema.get("items")

    def test(value: list[Any]) -> bool:
        if min_items and len(value) < min_items:
            return False
        if items is None:
            return True
        child = _test(items)
        return all([child(item) for item in value])

    return test


def _string_test(schema: Mapping[str, Any]) -> _Test:
    has_enum = "enum" in schema
    enum: Any = schema.get("enum")
    min_length = schema.get("minLength")
    has_max = "maxLength" in schema
    max_length: Any = schema.get("maxLength")
    duration = schema.get("format") == "duration"
    pattern = schema.get("pattern")
    # re.search compiles the same pattern to the same program: one compile here, not per value.
    search = re.compile(pattern).search if pattern is not None and not duration else None

    def test(value: str) -> bool:
        if has_enum and value not in enum:
            return False
        if min_length and len(value) < min_length:
            return False
        if has_max and len(value) > max_length:
            return False
        if duration:
            try:
                parse_duration(value)
            except ValueError:
                return False
            return True
        return search is None or search(value) is not None

    return test


def _number_test(schema: Mapping[str, Any]) -> _Test:
    low: Any = schema.get("minimum")
    above: Any = schema.get("exclusiveMinimum")
    high: Any = schema.get("maximum")
    has_low, has_above, has_high = (
        "minimum" in schema,
        "exclusiveMinimum" in schema,
        "maximum" in schema,
    )

    def test(value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if has_low and value < low:
            return False
        if has_above and value <= above:
            return False
        return not (has_high and value > high)

    return test
