"""JSON Schema building blocks shared by the document tables: constants, ``$defs`` and small
constructors for closed objects, bounded integers, enums and lists.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

MESHLIB_API = "meshlib/v1"
SPLIT_VERSIONS = tuple(f"split.smi-spec.io/v1alpha{i}" for i in (1, 2, 3, 4))
SPECS_VERSIONS = tuple(f"specs.smi-spec.io/v1alpha{i}" for i in (1, 2, 3, 4))
ACCESS_VERSIONS = tuple(f"access.smi-spec.io/v1alpha{i}" for i in (1, 2, 3))
GATEWAY_API = "gateway.networking.k8s.io/v1"
MAX_WEIGHT = 2**31 - 1

DURATION: Schema = {"$ref": "#/$defs/duration"}
STRING: Schema = {"type": "string"}
NONEMPTY: Schema = {"type": "string", "minLength": 1}
STRING_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
PERCENT: Schema = {"type": "number", "minimum": 0, "maximum": 100}

DEFS: dict[str, Schema] = {
    "duration": {
        "title": "a duration string such as '250ms', '2s', '1m30s'",
        "type": "string",
        "format": "duration",
        "pattern": r"^(0|([0-9]+(\.[0-9]+)?(ms|s|m|h))+)$",
    },
    "name": {
        "title": "a lower-case DNS name (a-z, 0-9, '-' and '.')",
        "type": "string",
        "maxLength": 253,
        "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
    },
    "namespace": {
        "title": "a lower-case DNS label (a-z, 0-9 and '-')",
        "type": "string",
        "maxLength": 63,
        "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
    },
    "metadata": {
        "type": "object",
        "properties": {
            "name": {"$ref": "#/$defs/name"},
            "namespace": {"$ref": "#/$defs/namespace"},
            "labels": STRING_MAP,
            "annotations": STRING_MAP,
        },
        "required": ["name"],
        "additionalProperties": False,
    },
}


def obj(properties: dict[str, Schema], *required: str, description: str = "") -> Schema:
    """A closed object: unknown fields are errors (CFG-3)."""
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    if description:
        schema["description"] = description
    return schema


def integer(
    minimum: int | None = None, maximum: int | None = None, description: str = ""
) -> Schema:
    schema: Schema = {"type": "integer"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    if description:
        schema["description"] = description
    return schema


def enum(*values: str, description: str = "") -> Schema:
    schema: Schema = {"type": "string", "enum": list(values)}
    if description:
        schema["description"] = description
    return schema


def array(items: Schema, min_items: int = 0) -> Schema:
    schema: Schema = {"type": "array", "items": items}
    if min_items:
        schema["minItems"] = min_items
    return schema
