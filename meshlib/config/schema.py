"""The structure of every policy document kind, as JSON Schema fragments: one source of truth.

The loader checks documents against these fragments (field names, types, bounds, enums) before
it converts values, and :func:`json_schema` publishes the same fragments for editors.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from meshlib.config.fragments import (
    ACCESS_VERSIONS,
    DEFS,
    DURATION,
    GATEWAY_API,
    MAX_WEIGHT,
    MESHLIB_API,
    NONEMPTY,
    PERCENT,
    SPECS_VERSIONS,
    SPLIT_VERSIONS,
    STRING,
    STRING_MAP,
    Schema,
    array,
    enum,
    integer,
    obj,
)
from meshlib.config.values import MAX_REGEX_LENGTH

# --- TrafficPolicy: one table drives the schema, the conversion and the model field names ------


@dataclass(frozen=True)
class PolicyField:
    """One leaf of ``TrafficPolicy.spec``: where it is in YAML and what it sets in the model."""

    yaml_path: str  # camelCase path under spec, e.g. "retries.perTryTimeout"
    model_name: str  # dotted EffectivePolicy attribute, e.g. "retries.per_try_timeout"
    schema: Schema
    #: "plain" | "duration" | "retry_on" | "lb_kind" | "hedge_delay" | "mtls_mode"
    convert: str = "plain"
    bounds: tuple[float, float] | None = None  # for durations: seconds (inclusive)
    required: bool = False  # required when its parent object is present


RETRY_ON = (
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "refused-stream",
    "timeout",
    "retriable-4xx",
    "retriable-status-codes",
    "429",
)
DAY = 86400.0
MS = 0.001

POLICY_FIELDS: tuple[PolicyField, ...] = (
    PolicyField("timeout", "timeout", DURATION, "duration", (MS, DAY)),
    PolicyField("streamIdleTimeout", "stream_idle_timeout", DURATION, "duration", (MS, DAY)),
    PolicyField(
        "retries.attempts",
        "retries.attempts",
        integer(0, description="retries after the first try; above 4 clamped to 4"),
    ),
    PolicyField(
        "retries.perTryTimeout", "retries.per_try_timeout", DURATION, "duration", (MS, DAY)
    ),
    PolicyField(
        "retries.retryOn",
        "retries.retry_on",
        {
            "anyOf": [
                {"title": "a comma-separated string", "type": "string"},
                {"title": "a list of conditions", "type": "array", "items": STRING},
            ],
            "description": "conditions: " + ", ".join(RETRY_ON) + " or a 3-digit status code",
        },
        "retry_on",
    ),
    PolicyField("retries.retryable", "retries.retryable", {"type": "boolean"}),
    PolicyField(
        "retries.backoff.baseInterval", "retries.backoff.base", DURATION, "duration", (MS, DAY)
    ),
    PolicyField(
        "retries.backoff.maxInterval", "retries.backoff.cap", DURATION, "duration", (MS, DAY)
    ),
    PolicyField(
        "retries.budget.ratio",
        "retries.budget.ratio",
        {"type": "number", "minimum": 0, "maximum": 10},
    ),
    PolicyField(
        "retries.budget.minRetriesPerSecond",
        "retries.budget.min_per_second",
        {"type": "number", "minimum": 0, "maximum": 10000},
    ),
    PolicyField("retries.budget.ttl", "retries.budget.ttl", DURATION, "duration", (1.0, 60.0)),
    PolicyField(
        "circuitBreaker.consecutiveFailures",
        "circuit_breaker.consecutive_failures",
        integer(1, 1_000_000),
    ),
    PolicyField(
        "circuitBreaker.openDuration",
        "circuit_breaker.open_duration",
        DURATION,
        "duration",
        (MS, DAY),
    ),
    PolicyField(
        "outlierDetection.consecutiveFailures",
        "outlier_detection.consecutive_failures",
        integer(1, 1_000_000),
    ),
    PolicyField(
        "outlierDetection.baseEjectionTime",
        "outlier_detection.base_ejection_time",
        DURATION,
        "duration",
        (MS, DAY),
    ),
    PolicyField(
        "outlierDetection.maxEjectionTime",
        "outlier_detection.max_ejection_time",
        DURATION,
        "duration",
        (MS, DAY),
    ),
    PolicyField(
        "outlierDetection.maxEjectionPercent", "outlier_detection.max_ejection_percent", PERCENT
    ),
    PolicyField("outlierDetection.panicThreshold", "outlier_detection.panic_threshold", PERCENT),
    PolicyField(
        "loadBalancer.type",
        "load_balancer.kind",
        enum("p2c-ewma", "round-robin", "random"),
        "lb_kind",
    ),
    PolicyField("loadBalancer.decay", "load_balancer.decay", DURATION, "duration", (MS, DAY)),
    PolicyField(
        "rateLimit.requestsPerSecond",
        "rate_limit",
        {"type": "number", "exclusiveMinimum": 0, "maximum": 1_000_000},
        required=True,
    ),
    PolicyField("rateLimit.burst", "rate_limit", integer(1, 10_000_000)),
    PolicyField("connectionPool.maxConnections", "connection_pool.max_connections", integer(1)),
    PolicyField("connectionPool.maxKeepalive", "connection_pool.max_keepalive", integer(0)),
    PolicyField("hedging.enabled", "hedging.enabled", {"type": "boolean"}),
    PolicyField(
        "hedging.delay",
        "hedging.delay",
        {"anyOf": [{"title": "'p95'", "type": "string", "const": "p95"}, DURATION]},
        "hedge_delay",
        (MS, DAY),
    ),
    PolicyField("hedging.maxAttempts", "hedging.max_attempts", integer(2, 5)),
    # Per namespace or service (never mesh-wide: that is Mesh.spec.mtls; never per route: TLS
    # is a property of the connection, not of the request).
    PolicyField("mtls.mode", "mtls", enum("strict", "permissive", "disable"), "mtls_mode"),
)

TARGET = obj(
    {
        "namespace": {"$ref": "#/$defs/namespace"},
        "service": NONEMPTY,
        "route": NONEMPTY,
    },
    description="absent: the whole mesh; {namespace}; {service}; {service, route}",
)


def _policy_spec() -> Schema:
    spec = obj({"target": TARGET})
    for pf in POLICY_FIELDS:
        parent = spec
        *parents, leaf = pf.yaml_path.split(".")
        for part in parents:
            parent = parent["properties"].setdefault(part, obj({}))
        parent["properties"][leaf] = pf.schema
        if pf.required:
            parent.setdefault("required", []).append(leaf)
    return spec


# --- documents ---------------------------------------------------------------------------------


def _doc(api: str, kind: str, body: dict[str, Schema], *required: str) -> Schema:
    props: dict[str, Schema] = {
        "apiVersion": {"const": api},
        "kind": {"const": kind},
        "metadata": {"$ref": "#/$defs/metadata"},
    }
    props.update(body)
    return obj(props, "apiVersion", "kind", "metadata", *required)


def _split(version: int) -> Schema:
    if version == 1:
        weight: Schema = {
            "anyOf": [
                # The quantity syntax is checked by the loader, which can say what is wrong.
                {"title": "a quantity such as '500m'", "type": "string"},
                {"title": "a number", "type": "number", "minimum": 0, "maximum": MAX_WEIGHT},
            ]
        }
    else:
        weight = integer(0, MAX_WEIGHT, "relative weight (whole number)")
    spec: dict[str, Schema] = {
        "service": NONEMPTY,
        "backends": array(obj({"service": NONEMPTY, "weight": weight}, "service", "weight"), 1),
    }
    if version >= 3:
        spec["matches"] = array(
            obj({"kind": enum("HTTPRouteGroup"), "name": NONEMPTY}, "kind", "name")
        )
    return obj(spec, "service", "backends")


def _http_match() -> Schema:
    header_map: Schema = {
        "title": "a map of header name to regex",
        "type": "object",
        "additionalProperties": STRING,
    }
    header_list: Schema = {
        "title": "a list of single-entry maps",
        "type": "array",
        "items": {**header_map, "minProperties": 1, "maxProperties": 1},
    }
    return obj(
        {
            "name": NONEMPTY,
            "pathRegex": {"type": "string", "maxLength": MAX_REGEX_LENGTH},
            "methods": array(NONEMPTY, 1),
            "headers": {"anyOf": [header_map, header_list]},
        },
        "name",
    )


def _route_group(version: int) -> Schema:
    matches = array(_http_match(), 1)
    if version <= 2:
        return _doc(SPECS_VERSIONS[version - 1], "HTTPRouteGroup", {"matches": matches}, "matches")
    body = {"spec": obj({"matches": matches}, "matches")}
    return _doc(SPECS_VERSIONS[version - 1], "HTTPRouteGroup", body, "spec")


def _tcp_route(version: int) -> Schema:
    api = SPECS_VERSIONS[version - 1]
    if version <= 2:
        return _doc(api, "TCPRoute", {})
    if version == 3:
        return _doc(api, "TCPRoute", {"spec": obj({})})
    ports = obj({"ports": array(integer(1, 65535))})
    return _doc(api, "TCPRoute", {"spec": obj({"matches": ports})})


def _udp_route() -> Schema:
    """UDPRoute exists in specs.smi-spec.io/v1alpha4 only (SMI 0.6.0, with TrafficTarget
    v1alpha3); its shape is TCPRoute's."""
    ports = obj({"ports": array(integer(1, 65535))})
    return _doc(SPECS_VERSIONS[3], "UDPRoute", {"spec": obj({"matches": ports})})


def _traffic_target(version: int) -> Schema:
    subject = obj(
        {
            "kind": enum("ServiceAccount"),
            "name": NONEMPTY,
            "namespace": {"$ref": "#/$defs/namespace"},
        },
        "kind",
        "name",
    )
    destination = copy.deepcopy(subject)
    destination["properties"]["port"] = {
        "anyOf": [integer(1, 65535), {"type": "string", "pattern": "^[0-9]+$"}]
    }
    kinds = (
        ("HTTPRouteGroup", "TCPRoute", "UDPRoute")
        if version >= 3
        else ("HTTPRouteGroup", "TCPRoute")
    )
    rule = obj(
        {"kind": enum(*kinds), "name": NONEMPTY, "matches": array(NONEMPTY)},
        "kind",
        "name",
    )
    body: dict[str, Schema] = {
        "destination": destination,
        "rules" if version >= 2 else "specs": array(rule, 1),
        "sources": array(subject, 1),
    }
    api = ACCESS_VERSIONS[version - 1]
    if version == 1:
        return _doc(api, "TrafficTarget", body, "destination", "specs", "sources")
    return _doc(
        api, "TrafficTarget", {"spec": obj(body, "destination", "rules", "sources")}, "spec"
    )


def _meshlib_docs() -> dict[str, Callable[[], Schema]]:
    """The meshlib/v1 kinds, each a function that builds its document's schema."""

    def endpoint() -> Schema:
        return obj(
            {
                "address": {
                    "type": "string",
                    "minLength": 1,
                    "description": "host:port, IPv6 as [::1]:80",
                },
                "weight": integer(1, MAX_WEIGHT, "relative weight, default 1"),
                "labels": STRING_MAP,
            },
            "address",
        )

    def service() -> Schema:
        spec = obj(
            {
                "serviceAccount": {"$ref": "#/$defs/namespace"},
                "port": integer(1, 65535),
                "endpoints": array(endpoint()),
            }
        )
        return _doc(MESHLIB_API, "Service", {"spec": spec})

    def mesh() -> Schema:
        spec = obj(
            {
                "trustDomain": {"$ref": "#/$defs/name"},
                "mtls": enum("strict", "permissive", "disable"),
                "accessControl": enum("open", "audit", "enforce"),
                "egress": enum("allow-any", "registry-only"),
                "accessLog": obj(
                    {"enabled": {"type": "boolean"}, "format": enum("json", "text")},
                    description="one log line per call and inbound request (meshlib.access)",
                ),
                "tracing": obj(
                    {
                        "sampling": {
                            "type": "number",
                            "minimum": 0,
                            "maximum": 1,
                            "description": "fraction of traces started here that are sampled",
                        }
                    }
                ),
            }
        )
        return _doc(MESHLIB_API, "Mesh", {"spec": spec})

    def fault() -> Schema:
        spec = obj(
            {
                "target": TARGET,
                "match": obj({"headers": STRING_MAP}),
                "delay": obj({"fixed": DURATION, "percent": PERCENT}, "fixed"),
                "abort": obj({"status": integer(200, 599), "percent": PERCENT}, "status"),
            },
            "target",
        )
        return _doc(MESHLIB_API, "FaultInjection", {"spec": spec}, "spec")

    def mirror() -> Schema:
        spec = obj(
            {"service": NONEMPTY, "mirror": NONEMPTY, "percent": PERCENT}, "service", "mirror"
        )
        return _doc(MESHLIB_API, "TrafficMirror", {"spec": spec}, "spec")

    def authorization_policy() -> Schema:
        from meshlib.config.authzkind import authorization_policy_spec

        spec = authorization_policy_spec()
        return _doc(MESHLIB_API, "AuthorizationPolicy", {"spec": spec})

    def request_authentication() -> Schema:
        from meshlib.config.authnkind import request_authentication_spec

        spec = request_authentication_spec()
        return _doc(MESHLIB_API, "RequestAuthentication", {"spec": spec}, "spec")

    return {
        "Mesh": mesh,
        "Service": service,
        "TrafficPolicy": lambda: _doc(
            MESHLIB_API, "TrafficPolicy", {"spec": _policy_spec()}, "spec"
        ),
        "FaultInjection": fault,
        "TrafficMirror": mirror,
        "AuthorizationPolicy": authorization_policy,
        "RequestAuthentication": request_authentication,
    }


def _http_route() -> Schema:
    from meshlib.config.httproute import http_route_schema

    return http_route_schema()


def _document_schemas() -> dict[str, Callable[[], dict[str, Schema]]]:
    """Each kind, in the order the schemas are published, and how its versions are built."""
    docs: dict[str, Callable[[], dict[str, Schema]]] = {
        "TrafficSplit": lambda: {
            api: _doc(api, "TrafficSplit", {"spec": _split(i + 1)}, "spec")
            for i, api in enumerate(SPLIT_VERSIONS)
        },
        "HTTPRouteGroup": lambda: {
            api: _route_group(i + 1) for i, api in enumerate(SPECS_VERSIONS)
        },
        "TCPRoute": lambda: {api: _tcp_route(i + 1) for i, api in enumerate(SPECS_VERSIONS)},
        "UDPRoute": lambda: {SPECS_VERSIONS[3]: _udp_route()},
        "TrafficTarget": lambda: {
            api: _traffic_target(i + 1) for i, api in enumerate(ACCESS_VERSIONS)
        },
        "HTTPRoute": lambda: {GATEWAY_API: _http_route()},
    }
    for kind, build in _meshlib_docs().items():
        docs[kind] = _one_version(MESHLIB_API, build)
    return docs


def _one_version(api: str, build: Callable[[], Schema]) -> Callable[[], dict[str, Schema]]:
    return lambda: {api: build()}


class DocumentSchemas(Mapping[str, dict[str, Schema]]):
    """kind → apiVersion → schema, each kind's built when it is first looked up.

    A kind's schema comes from its own module (``HTTPRoute``'s from ``config/httproute``,
    ``AuthorizationPolicy``'s from ``config/authzkind``, ...): building every schema up front
    imported every kind's module, which a policy of Services never uses (start-up, issue 15).
    The kinds themselves are known at once, so an unknown kind is told apart without building
    anything. Safe across threads: a kind is built once, under a lock."""

    def __init__(self, builders: Mapping[str, Callable[[], dict[str, Schema]]]) -> None:
        self._builders = dict(builders)
        self._built: dict[str, dict[str, Schema]] = {}
        self._lock = threading.Lock()

    def __getitem__(self, kind: str) -> dict[str, Schema]:
        versions = self._built.get(kind)
        if versions is not None:
            return versions
        build = self._builders[kind]  # KeyError for an unknown kind, as a dict's
        with self._lock:
            versions = self._built.get(kind)
            if versions is None:
                versions = self._built[kind] = build()
        return versions

    def get(  # type: ignore[override]  # Mapping.get takes any default type
        self, kind: str, default: dict[str, Schema] | None = None
    ) -> dict[str, Schema] | None:
        # Mapping's own get goes through __getitem__ and an exception for an unknown kind:
        # this runs once per document of a policy (10,000 for a large mesh).
        versions = self._built.get(kind)
        if versions is not None:
            return versions
        return self[kind] if kind in self._builders else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)

    def __contains__(self, kind: object) -> bool:
        return kind in self._builders


#: kind → apiVersion → JSON Schema of the whole document.
DOCUMENT_SCHEMAS = DocumentSchemas(_document_schemas())


def json_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of one policy document, for editors and CI linters."""
    variants = [
        copy.deepcopy(schema)
        for versions in DOCUMENT_SCHEMAS.values()
        for schema in versions.values()
    ]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://meshlib.dev/schemas/policy.json",
        "title": "meshlib policy document",
        "description": "One document of a meshlib policy file (meshlib/v1, SMI, Gateway API).",
        "oneOf": variants,
        "$defs": copy.deepcopy(DEFS),
    }
