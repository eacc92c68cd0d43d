"""The published JSON Schema agrees with the loader: valid documents pass, strict errors fail."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import test_cfg_meshlib as mesh_tests
import test_cfg_smi as smi_tests
import yaml
from cfgdocs import SERVICES, load

from meshlib.config.loader import load_text
from meshlib.config.schema import DOCUMENT_SCHEMAS, json_schema

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "policy-reference.md"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _examples() -> list[str]:
    """Every valid example of the config tests, each a list of documents after SERVICES."""
    groups = [
        [smi_tests.SPLIT_V1],
        *([smi_tests.split(v)] for v in (2, 3, 4)),
        [smi_tests.ROUTES_V4, smi_tests.TARGET_V1],
        [
            smi_tests.split(3, 0, 100, "  matches:\n  - kind: HTTPRouteGroup\n    name: ab-test\n"),
            smi_tests.ROUTES_V4,
        ],
        [mesh_tests.policy(mesh_tests.FULL_POLICY), mesh_tests.FAULT, mesh_tests.MIRROR],
    ]
    for version in (1, 2, 3, 4):
        body = {1: "", 2: "", 3: "spec: {}\n", 4: "spec:\n  matches:\n    ports: [1]\n"}[version]
        groups.append(
            [
                f"apiVersion: specs.smi-spec.io/v1alpha{version}\nkind: TCPRoute\n"
                f"metadata: {{name: db}}\n{body}"
            ]
        )
    return ["".join("---\n" + d.strip("\n") + "\n" for d in g) for g in groups]


@pytest.mark.parametrize("docs", _examples())
def test_examples_validate_against_schema(
    validator: jsonschema.Draft202012Validator, docs: str
) -> None:
    snap = load(docs)  # the loader accepts them...
    for raw in snap.raw_documents:  # ...and so does the published schema
        errors = [e.message for e in validator.iter_errors(_plain(raw))]
        assert not errors, (raw.get("kind"), errors[:3])


def test_reference_example_validates(validator: jsonschema.Draft202012Validator) -> None:
    text = REFERENCE.read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    full = max(blocks, key=len)
    snap = load_text(full, source=str(REFERENCE))
    assert len(snap.raw_documents) >= 8
    for raw in snap.raw_documents:
        assert not list(validator.iter_errors(_plain(raw)))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("weight: 90", "weigth: 90"),
        ("kind: TrafficSplit", "kind: TrafficSplitt"),
        ("service: reviews\n", "service: reviews\n  extra: 1\n"),
        ("weight: 90", "weight: -1"),
        ("weight: 90", "weight: 1.5"),
    ],
)
def test_strict_errors_fail_schema(
    validator: jsonschema.Draft202012Validator, old: str, new: str
) -> None:
    doc = yaml.safe_load(smi_tests.split(2).replace(old, new, 1))
    assert list(validator.iter_errors(doc))


def test_policy_unknown_field_fails_schema(validator: jsonschema.Draft202012Validator) -> None:
    doc = yaml.safe_load(mesh_tests.policy("retries: {attemps: 3}"))
    assert list(validator.iter_errors(doc))
    doc = yaml.safe_load(mesh_tests.policy("retries: {attempts: 3}"))
    assert not list(validator.iter_errors(doc))


def test_schema_covers_every_kind_and_version() -> None:
    variants = json_schema()["oneOf"]
    pairs = {
        (v["properties"]["kind"]["const"], v["properties"]["apiVersion"]["const"]) for v in variants
    }
    assert pairs == {(k, a) for k, versions in DOCUMENT_SCHEMAS.items() for a in versions}
    assert ("TrafficSplit", "split.smi-spec.io/v1alpha1") in pairs
    assert len({k for k, _ in pairs}) == 13
    assert ("HTTPRoute", "gateway.networking.k8s.io/v1") in pairs


def test_services_fixture_validates(validator: jsonschema.Draft202012Validator) -> None:
    for doc in yaml.safe_load_all(SERVICES):
        assert not list(validator.iter_errors(doc))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
