"""Checks a YAML value against the JSON Schema subset used in schema.py, with lines and hints.

A general JSON Schema validator reports "Additional properties are not allowed"; users need
"spec.backends[0].weigth: unknown field (did you mean 'weight'?)" at the right line. Only the
keywords schema.py uses are implemented.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
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
