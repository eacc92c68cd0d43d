"""The schema check's fast answer (``checker.passes``) agrees with the full check
(``checker.check``) on every value: the loader skips the full check of a document that passes,
so a value it wrongly passed would load with an error nobody reported (issue 15, item 4).

The corpus is every documented example, test manifest and inline test policy of a known
kind, each also mutated (seeded) at one node: a value of another type or out of range, a key
removed or added, a list emptied or grown. The speed itself is measured in
benchmarks/config_load.py, never here."""

from __future__ import annotations

import math
import random
import re
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshlib.config.checker import Finding, check, passes
from meshlib.config.schema import DOCUMENT_SCHEMAS
from meshlib.config.yamlsafe import read_documents

ROOT = Path(__file__).resolve().parents[2]
SEED = 15
MUTATIONS_PER_DOCUMENT = 100


def _texts() -> Iterator[str]:
    for page in sorted((ROOT / "docs").rglob("*.md")):
        yield from re.findall(r"```yaml\n(.*?)```", page.read_text(), re.S)
    for manifest in sorted([*ROOT.glob("examples/**/*.yaml"), *ROOT.glob("tests/**/*.yaml")]):
        yield manifest.read_text()
    for version in (1, 3, 4):  # no example writes a TCPRoute out: each version's own
        spec = {1: "", 3: "spec: {}\n", 4: "spec:\n  matches:\n    ports: [3306, 6446]\n"}
        yield f"apiVersion: specs.smi-spec.io/v1alpha{version}\nkind: TCPRoute\n" + (
            "metadata: {name: db}\n" + spec[version]
        )
    for module in sorted(ROOT.glob("tests/**/*.py")):  # the policies the tests write inline
        for text in re.findall(r'"""\\?\n(.*?)"""', module.read_text(), re.S):
            if "kind:" in text:
                yield textwrap.dedent(text)


def _plain(value: Any) -> Any:
    """The value as plain dicts and lists (the check reads either), free to mutate."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _corpus() -> list[tuple[Any, Mapping[str, Any]]]:
    found = []
    for text in _texts():
        try:
            docs, _ = read_documents(text)
        except yaml.YAMLError:  # pragma: no cover - the reader reports, never raises
            continue
        for doc in docs:
            value = doc.value
            if not isinstance(value, dict):
                continue
            schema = DOCUMENT_SCHEMAS.get(value.get("kind"), {}).get(value.get("apiVersion"))
            if schema is not None:
                found.append((_plain(value), schema))
    return found


CORPUS = _corpus()


def _scalars(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _scalars(item)
    elif isinstance(value, list):
        for item in value:
            yield from _scalars(item)
    else:
        yield value


#: Values of every kind at the edges the schemas draw, and every scalar of the corpus (enum
#: members, durations, addresses, names): a mutation then hits valid values too.
TRICKY: list[Any] = [
    None, True, False, 0, 1, -1, 2**70, 0.5, -0.0, 1e300, math.inf, math.nan, "", "x",
    "a" * 400, "2s", "-1s", "0", "1.5", "GET", "*", "/", "10.0.0.1:80", [], [1], {}, {"a": 1},
    {"name": "x"}, [{"name": "x"}],
]  # fmt: skip
TRICKY += sorted({repr(s): s for v, _ in CORPUS for s in _scalars(v)}.values(), key=repr)


def _nodes(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _nodes(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _nodes(item, (*path, i))


def _mutated(value: Any, rng: random.Random) -> Any:
    value = _plain(value)
    path, node = rng.choice(list(_nodes(value)))
    parent = value
    for step in path[:-1]:
        parent = parent[step]
    choice = rng.randrange(5)
    if choice == 0 and isinstance(node, dict) and node:
        del node[rng.choice(list(node))]
    elif choice == 1 and isinstance(node, dict):
        node[rng.choice(["weigth", "name", "port", "extra", rng.choice(list(node) or ["a"])])] = (
            rng.choice(TRICKY)
        )
    elif choice == 2 and isinstance(node, list):
        if node and rng.random() < 0.5:
            node.append(_plain(rng.choice(node)))
        else:
            node.clear()
    elif path:
        parent[path[-1]] = _plain(rng.choice(TRICKY))
    else:
        return _plain(rng.choice(TRICKY))
    return value


def _agree(value: Any, schema: Mapping[str, Any]) -> None:
    findings: list[Finding] = []
    check(value, schema, "", 1, findings)
    assert passes(value, schema) is (not findings), (value, findings)


def test_the_corpus_is_large_and_holds_every_kind() -> None:
    assert len(CORPUS) > 60
    kinds = {value["kind"] for value, _ in CORPUS}
    assert kinds >= set(DOCUMENT_SCHEMAS) - {"UDPRoute"}, set(DOCUMENT_SCHEMAS) - kinds


def test_every_example_passes_exactly_when_the_full_check_finds_nothing() -> None:
    for value, schema in CORPUS:
        _agree(value, schema)


def test_every_mutated_example_passes_exactly_when_the_full_check_finds_nothing() -> None:
    rng = random.Random(SEED)
    failing = 0
    for value, schema in CORPUS:
        for _ in range(MUTATIONS_PER_DOCUMENT):
            mutated = _mutated(value, rng)
            _agree(mutated, schema)
            failing += not passes(mutated, schema)
    # Both answers are exercised: many mutations break the schema, many do not.
    total = len(CORPUS) * MUTATIONS_PER_DOCUMENT
    assert total // 10 < failing < total - total // 10


NUMBER = {"type": "integer", "minimum": 1, "maximum": 10}
STRING = {"type": "string", "minLength": 1, "maxLength": 3, "pattern": "^[a-z]+$"}


@pytest.mark.parametrize(
    ("schema", "value"),
    [
        (NUMBER, 1),
        (NUMBER, 10),
        (NUMBER, 0),
        (NUMBER, 11),
        (NUMBER, True),
        (NUMBER, 2.0),
        (NUMBER, "3"),
        (NUMBER, None),
        ({"type": "number", "exclusiveMinimum": 0}, 0),
        ({"type": "number", "exclusiveMinimum": 0}, 0.1),
        ({"type": "number"}, math.nan),
        ({"type": "number"}, -math.inf),
        ({"type": "number"}, 1e308),
        ({"minimum": 0}, -1),
        ({"minimum": 0}, "-1"),
        ({"minimum": 0}, False),
        (STRING, "ab"),
        (STRING, ""),
        (STRING, "abcd"),
        (STRING, "aB"),
        (STRING, 1),
        ({"type": "string", "enum": ["GET", "PUT"]}, "GET"),
        ({"type": "string", "enum": ["GET"]}, "get"),
        ({"type": "string", "format": "duration"}, "1.5s"),
        ({"type": "string", "format": "duration"}, "1x"),
        ({"type": "string", "format": "duration", "pattern": "^z$"}, "2s"),
        ({"const": 1}, 1),
        ({"const": 1}, True),
        ({"const": 1}, 1.0),
        ({"const": "a"}, "b"),
        ({"type": "boolean"}, True),
        ({"type": "boolean"}, 1),
        ({"type": "boolean"}, "yes"),
        ({"type": "array", "minItems": 1, "items": NUMBER}, []),
        ({"type": "array", "items": NUMBER}, [1, 0]),
        ({"type": "array", "items": NUMBER}, [1, 2]),
        ({"type": "array"}, {}),
        ({"items": NUMBER}, "not a list"),
        ({"type": "object", "required": ["a"]}, {}),
        ({"type": "object", "minProperties": 1}, {}),
        ({"type": "object", "maxProperties": 1}, {"a": 1, "b": 2}),
        ({"type": "object", "properties": {"a": NUMBER}, "additionalProperties": False}, {"b": 1}),
        ({"type": "object", "properties": {"a": NUMBER}, "additionalProperties": False}, {"a": 5}),
        ({"type": "object", "additionalProperties": STRING}, {"x": "ab", "y": "toolong"}),
        ({"type": "object", "additionalProperties": STRING}, {"x": "ab"}),
        ({"type": "object"}, []),
        ({"type": "object"}, None),
        ({"anyOf": [NUMBER, STRING]}, 5),
        ({"anyOf": [NUMBER, STRING]}, "ab"),
        ({"anyOf": [NUMBER, STRING]}, 50),
        ({"anyOf": [NUMBER, STRING]}, [5]),
        ({"$ref": "#/$defs/duration"}, "2s"),
        ({"$ref": "#/$defs/duration"}, "2"),
        ({}, object()),
        ({"properties": {"a": NUMBER}}, {"a": 0}),
    ],
)
def test_each_keyword_passes_exactly_when_the_full_check_finds_nothing(
    schema: Mapping[str, Any], value: Any
) -> None:
    _agree(value, schema)
