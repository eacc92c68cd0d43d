"""The ingress gateway's own configuration: the Gateway API ``Gateway`` kind
(gateway.networking.k8s.io/v1), the HTTPRoutes whose parents are such a Gateway, and the
Kubernetes ``v1`` ``Secret`` (type ``kubernetes.io/tls``) and ``ConfigMap`` (``ca.crt``) they
refer to, read from unchanged manifests into frozen models.

The shape follows :mod:`meshlib.config.httproute`: structure is checked by the loader's schema
checker (unknown fields refused with the usual messages), then builders apply the upstream
CRD's defaults, limits and CEL rules (upstream ``apis/v1/gateway_types.go`` at the commit named
in tests/data/gateway-api/README.md), what meshlib's gateway cannot serve is refused with a
"not supported" message instead of being ignored, and references are checked across documents.
Every problem names file, line and field path; :func:`load_gateway_config` raises one
ConfigError listing all of them. Secrets stay here: they never enter the mesh policy.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from meshlib.config.documents import (
    DocContext,
    as_int,
    as_str,
    at,
    limited,
    limited_maps,
)
from meshlib.config.fragments import (
    GATEWAY_API,
    STRING,
    Schema,
    array,
    enum as enum_schema,
    integer,
    obj,
)
from meshlib.config.httproute import build_http_route, http_route_schema
from meshlib.config.loader import checked_context, source_documents
from meshlib.config.model import GATEWAY_GROUP, Origin, ParentMode
from meshlib.config.routemodel import HTTPRoute
from meshlib.config.values import shown
from meshlib.config.yamlsafe import YamlDocument, YMap, YSeq
from meshlib.errors import ConfigError, Problem

__all__ = [
    "MAX_CA_REFS",
    "MAX_CERTIFICATE_REFS",
    "MAX_LISTENERS",
    "MAX_ROUTE_KINDS",
    "MAX_TLS_OPTIONS",
    "CaBundle",
    "ClientValidation",
    "Gateway",
    "GatewayConfig",
    "Listener",
    "ListenerProtocol",
    "ListenerTLS",
    "NamespacesFrom",
    "ObjectRef",
    "TlsSecret",
    "hostnames_intersect",
    "load_gateway_config",
]

#: Upstream CRD limits (``maxItems`` / ``maxProperties`` in gateway_types.go).
MAX_LISTENERS = 64
MAX_CERTIFICATE_REFS = 64
MAX_TLS_OPTIONS = 16
MAX_ROUTE_KINDS = 8
MAX_CA_REFS = 16
MAX_PER_PORT = 64

TLS_SECRET_TYPE = "kubernetes.io/tls"
CA_KEY = "ca.crt"

#: Upstream patterns (shared_types.go): Hostname, SectionName, Namespace, Kind, Group.
_HOSTNAME = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_SECTION_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_NAMESPACE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_KIND = r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"
_GROUP = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_PROTOCOL = (
    r"^[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"
    r"|[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\/[A-Za-z0-9]+$"
)

#: Upstream fields meshlib's gateway does not implement: refused by name, never ignored.
_UNSUPPORTED_SPEC = {
    "addresses": "the addresses to listen on are given to 'meshctl gateway serve --listen'",
    "infrastructure": "there is no infrastructure to provision for an in-process gateway",
    "allowedListeners": "ListenerSets are not read",
    "defaultScope": "routes attach to a Gateway only through their parentRefs",
}


class ListenerProtocol(str, enum.Enum):
    HTTP = "HTTP"
    HTTPS = "HTTPS"


class NamespacesFrom(str, enum.Enum):
    SAME = "Same"  # upstream default
    ALL = "All"


class ValidationMode(str, enum.Enum):
    ALLOW_VALID_ONLY = "AllowValidOnly"  # the only mode served; upstream default


@dataclass(frozen=True)
class ObjectRef:
    """A reference to a Secret (``certificateRefs``) or a ConfigMap (``caCertificateRefs``),
    its namespace resolved (default: the Gateway's)."""

    kind: str
    name: str
    namespace: str
    group: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class ListenerTLS:
    certificate_refs: tuple[ObjectRef, ...]


@dataclass(frozen=True)
class Listener:
    name: str
    port: int
    protocol: ListenerProtocol
    hostname: str | None = None  # None: every host name
    tls: ListenerTLS | None = None
    namespaces_from: NamespacesFrom = NamespacesFrom.SAME
    #: Route kinds allowed; empty means the protocol's default (HTTPRoute for HTTP and HTTPS).
    kinds: tuple[tuple[str, str], ...] = ()

    def allows(self, route_namespace: str, gateway_namespace: str) -> bool:
        """Whether an HTTPRoute in ``route_namespace`` may attach (``allowedRoutes``)."""
        kind_ok = not self.kinds or (GATEWAY_GROUP, "HTTPRoute") in self.kinds
        ns_ok = self.namespaces_from is NamespacesFrom.ALL or route_namespace == gateway_namespace
        return kind_ok and ns_ok


@dataclass(frozen=True)
class ClientValidation:
    """``spec.tls.frontend`` (default or perPort): the CA bundles client certificates must chain
    to. Only ``AllowValidOnly`` is served (a handshake without a valid certificate fails)."""

    ca_refs: tuple[ObjectRef, ...]
    mode: ValidationMode = ValidationMode.ALLOW_VALID_ONLY


@dataclass(frozen=True)
class Gateway:
    name: str
    namespace: str
    class_name: str
    listeners: tuple[Listener, ...]
    origin: Origin
    client_validation: ClientValidation | None = None  # spec.tls.frontend.default
    per_port_validation: tuple[tuple[int, ClientValidation], ...] = ()

    def validation_for(self, port: int) -> ClientValidation | None:
        """The client-certificate validation of HTTPS listeners on ``port``: the perPort entry
        if there is one, else the default (upstream: perPort overrides the default)."""
        for p, validation in self.per_port_validation:
            if p == port:
                return validation
        return self.client_validation

    def listener(self, name: str) -> Listener | None:
        return next((item for item in self.listeners if item.name == name), None)


@dataclass(frozen=True)
class TlsSecret:
    """A ``kubernetes.io/tls`` Secret, its certificate chain and key checked to be a pair."""

    name: str
    namespace: str
    cert_pem: bytes
    key_pem: bytes = field(repr=False)  # never in reprs, logs or exceptions
    origin: Origin = field(default=Origin("<gateway>", 0, 0))

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificates(self.cert_pem)[0]


@dataclass(frozen=True)
class CaBundle:
    """A ConfigMap's ``ca.crt``: one or more PEM CA certificates."""

    name: str
    namespace: str
    ca_pem: bytes
    origin: Origin = field(default=Origin("<gateway>", 0, 0))


@dataclass(frozen=True)
class GatewayConfig:
    gateways: tuple[Gateway, ...]
    http_routes: tuple[HTTPRoute, ...]  # in load order; every parent is one of ``gateways``
    secrets: Mapping[tuple[str, str], TlsSecret]  # (namespace, name) →
    configmaps: Mapping[tuple[str, str], CaBundle]

    def routes_of(self, gateway: Gateway) -> tuple[HTTPRoute, ...]:
        return tuple(
            r
            for r in self.http_routes
            if any(
                p.mode is ParentMode.INGRESS
                and p.name == gateway.name
                and p.namespace == gateway.namespace
                for p in r.parent_refs
            )
        )


# --- schemas: structure only -------------------------------------------------------------------


def _metadata() -> Schema:
    return obj(
        {
            "name": {"$ref": "#/$defs/name"},
            "namespace": {"$ref": "#/$defs/namespace"},
            "labels": {"type": "object", "additionalProperties": STRING},
            "annotations": {"type": "object", "additionalProperties": STRING},
        },
        "name",
    )


def _object_ref(*required: str) -> Schema:
    return obj(
        {
            "group": {"type": "string", "maxLength": 253, "pattern": _GROUP},
            "kind": {"type": "string", "minLength": 1, "maxLength": 63, "pattern": _KIND},
            "name": {"type": "string", "minLength": 1, "maxLength": 253},
            "namespace": {"type": "string", "maxLength": 63, "pattern": _NAMESPACE},
        },
        *required,
    )


def _validation() -> Schema:
    return obj(
        {
            "caCertificateRefs": array(_object_ref("group", "kind", "name"), min_items=1),
            "mode": enum_schema("AllowValidOnly", "AllowInsecureFallback"),
        },
        "caCertificateRefs",
    )


def gateway_schema() -> Schema:
    """The whole ``Gateway`` document, closed at every level."""
    listener = obj(
        {
            "name": {"type": "string", "maxLength": 253, "pattern": _SECTION_NAME},
            "hostname": {
                "type": "string",
                "minLength": 1,
                "maxLength": 253,
                "title": "a lower-case host name, optionally starting with '*.'",
                "pattern": _HOSTNAME,
            },
            "port": integer(1, 65535),
            "protocol": {"type": "string", "maxLength": 255, "pattern": _PROTOCOL},
            "tls": obj(
                {
                    "mode": enum_schema("Terminate", "Passthrough"),
                    "certificateRefs": array(_object_ref("name")),
                    "options": {
                        "type": "object",
                        "additionalProperties": {"type": "string", "maxLength": 4096},
                    },
                }
            ),
            "allowedRoutes": obj(
                {
                    "namespaces": obj(
                        {
                            "from": enum_schema("All", "Selector", "Same"),
                            "selector": {"type": "object"},
                        }
                    ),
                    "kinds": array(
                        obj(
                            {
                                "group": {"type": "string", "maxLength": 253, "pattern": _GROUP},
                                "kind": {
                                    "type": "string",
                                    "minLength": 1,
                                    "maxLength": 63,
                                    "pattern": _KIND,
                                },
                            },
                            "kind",
                        )
                    ),
                }
            ),
        },
        "name",
        "port",
        "protocol",
    )
    tls_config = obj({"validation": _validation()})
    spec = obj(
        {
            "gatewayClassName": {"type": "string", "minLength": 1, "maxLength": 253},
            "listeners": array(listener, min_items=1),
            "tls": obj(
                {
                    "frontend": obj(
                        {
                            "default": tls_config,
                            "perPort": array(
                                obj({"port": integer(1, 65535), "tls": tls_config}, "port", "tls")
                            ),
                        },
                        "default",
                    ),
                    "backend": {"type": "object"},
                }
            ),
            **{key: {} for key in _UNSUPPORTED_SPEC},
        },
        "gatewayClassName",
        "listeners",
    )
    return obj(
        {
            "apiVersion": {"const": GATEWAY_API},
            "kind": {"const": "Gateway"},
            "metadata": _metadata(),
            "spec": spec,
        },
        "apiVersion",
        "kind",
        "metadata",
        "spec",
    )


def _data_map() -> Schema:
    return {"type": "object", "additionalProperties": STRING}


def secret_schema() -> Schema:
    return obj(
        {
            "apiVersion": {"const": "v1"},
            "kind": {"const": "Secret"},
            "metadata": _metadata(),
            "type": {"type": "string"},
            "data": _data_map(),
            "stringData": _data_map(),
            "immutable": {"type": "boolean"},
        },
        "apiVersion",
        "kind",
        "metadata",
        "type",
    )


def configmap_schema() -> Schema:
    return obj(
        {
            "apiVersion": {"const": "v1"},
            "kind": {"const": "ConfigMap"},
            "metadata": _metadata(),
            "data": _data_map(),
            "binaryData": _data_map(),
            "immutable": {"type": "boolean"},
        },
        "apiVersion",
        "kind",
        "metadata",
    )


#: kind → (apiVersion, schema)
_KINDS: dict[str, tuple[str, Schema]] = {
    "Gateway": (GATEWAY_API, gateway_schema()),
    "HTTPRoute": (GATEWAY_API, http_route_schema()),
    "Secret": ("v1", secret_schema()),
    "ConfigMap": ("v1", configmap_schema()),
}


# --- builders ----------------------------------------------------------------------------------


def _not_supported(ctx: DocContext, path: str, line: int, what: str, why: str = "") -> None:
    ctx.error(
        path, line, f"{what} is not supported by meshlib's gateway" + (f": {why}" if why else "")
    )


def build_gateway(ctx: DocContext) -> Gateway | None:
    spec, _ = at(ctx.doc, "spec")
    if not isinstance(spec, YMap):
        return None
    before = len(ctx.problems)
    for key, why in _UNSUPPORTED_SPEC.items():
        if key in spec:
            _not_supported(ctx, f"spec.{key}", spec.line_of(key), f"spec.{key}", why)
    listeners = _listeners(ctx, spec)
    default, per_port = _frontend(ctx, spec)
    class_name = as_str(spec.get("gatewayClassName"))
    if len(ctx.problems) > before or class_name is None:
        return None
    return Gateway(ctx.name, ctx.namespace, class_name, listeners, ctx.origin, default, per_port)


def _listeners(ctx: DocContext, spec: YMap) -> tuple[Listener, ...]:
    out: list[Listener] = []
    names: dict[str, int] = {}
    combos: dict[tuple[int, str, str | None], int] = {}
    protocols_on_port: dict[int, tuple[ListenerProtocol, int]] = {}
    for i, item in limited_maps(ctx, spec, "listeners", "spec.listeners", MAX_LISTENERS):
        path = f"spec.listeners[{i}]"
        name, port = as_str(item.get("name")), as_int(item.get("port"))
        protocol, hostname = as_str(item.get("protocol")), as_str(item.get("hostname"))
        if name is None or port is None or protocol is None:
            continue  # reported by the structural check
        # Upstream CEL: "Listener name must be unique within the Gateway".
        if name in names:
            ctx.error(
                f"{path}.name",
                item.line_of("name"),
                f"listener name {shown(name)} is used twice (also spec.listeners[{names[name]}]); "
                "a listener name must be unique within the Gateway",
            )
        names.setdefault(name, i)
        # Upstream CEL: "Combination of port, protocol and hostname must be unique".
        combo = (port, protocol, hostname)
        if combo in combos:
            ctx.error(
                path,
                item.line,
                f"port {port}, protocol {protocol} and hostname {shown(hostname or '(none)')} "
                f"are those of spec.listeners[{combos[combo]}]; the combination must be unique",
            )
        combos.setdefault(combo, i)
        if protocol not in {p.value for p in ListenerProtocol}:
            _not_supported(
                ctx,
                f"{path}.protocol",
                item.line_of("protocol"),
                f"protocol {shown(protocol)}",
                "use HTTP or HTTPS",
            )
            continue
        kind = ListenerProtocol(protocol)
        # One socket per port: HTTP and HTTPS cannot share it (upstream: ProtocolConflict).
        other = protocols_on_port.get(port)
        if other is not None and other[0] is not kind:
            ctx.error(
                f"{path}.protocol",
                item.line_of("protocol"),
                f"port {port} is {other[0].value} for spec.listeners[{other[1]}]; one port "
                "serves one protocol",
            )
        protocols_on_port.setdefault(port, (kind, i))
        tls = _listener_tls(ctx, item, path, kind)
        namespaces_from, kinds = _allowed_routes(ctx, item, path)
        out.append(Listener(name, port, kind, hostname, tls, namespaces_from, kinds))
    return tuple(out)


def _listener_tls(
    ctx: DocContext, item: YMap, path: str, protocol: ListenerProtocol
) -> ListenerTLS | None:
    raw = item.get("tls")
    if protocol is ListenerProtocol.HTTP:
        if "tls" in item:  # upstream CEL: "tls must not be specified for protocols ['HTTP', ...]"
            ctx.error(f"{path}.tls", item.line_of("tls"), "an HTTP listener must not have tls")
        return None
    if not isinstance(raw, YMap):
        if "tls" not in item:
            ctx.error(
                f"{path}.tls",
                item.line,
                "an HTTPS listener needs tls with at least one certificateRef",
            )
        return None
    tpath = f"{path}.tls"
    if raw.get("mode", "Terminate") == "Passthrough":
        _not_supported(
            ctx,
            f"{tpath}.mode",
            raw.line_of("mode"),
            "tls mode Passthrough",
            "an HTTPS listener terminates TLS (mode Terminate)",
        )
    options = limited(ctx, raw, "options", f"{tpath}.options", MAX_TLS_OPTIONS)
    if isinstance(options, YMap):
        for key in options:
            # No option is defined: silently ignoring one (a minimum version, ciphers) would
            # serve weaker TLS than the file asks for.
            _not_supported(
                ctx,
                f"{tpath}.options.{key}",
                options.line_of(key),
                f"tls option {shown(key)}",
                "meshlib defines no tls.options (TLS 1.2 is the minimum version; client "
                "certificates are configured in spec.tls.frontend)",
            )
    refs = _refs(ctx, raw, "certificateRefs", tpath, MAX_CERTIFICATE_REFS, "Secret")
    # Upstream CEL: Terminate needs certificateRefs or options; meshlib defines no option that
    # supplies a certificate, so it needs a certificateRef.
    if "certificateRefs" not in raw or (
        isinstance(raw.get("certificateRefs"), YSeq) and not raw["certificateRefs"]
    ):
        ctx.error(
            f"{tpath}.certificateRefs",
            raw.line,
            "an HTTPS listener needs at least one certificateRef (a kubernetes.io/tls Secret)",
        )
    return ListenerTLS(refs)


def _refs(
    ctx: DocContext, parent: YMap, key: str, path: str, limit: int, kind: str
) -> tuple[ObjectRef, ...]:
    """The usable references listed in ``parent[key]`` (at ``path``), each checked by _ref."""
    items = limited_maps(ctx, parent, key, f"{path}.{key}", limit)
    built = (_ref(ctx, ref, f"{path}.{key}[{j}]", kind) for j, ref in items)
    return tuple(ref for ref in built if ref is not None)


def _ref(ctx: DocContext, ref: YMap, path: str, kind: str) -> ObjectRef | None:
    """A Secret (default kind, upstream SecretObjectReference) or ConfigMap reference in the
    Gateway's namespace; anything else is reported."""
    name = as_str(ref.get("name"))
    group, got_kind = ref.get("group", ""), ref.get("kind", kind)
    if name is None or not isinstance(group, str) or not isinstance(got_kind, str):
        return None
    if group not in ("", "core") or got_kind != kind:
        where = f"{path}.kind" if got_kind != kind else f"{path}.group"
        line = ref.line_of("kind" if got_kind != kind else "group")
        shown_kind = f"{group}/{got_kind}" if group else got_kind
        _not_supported(
            ctx, where, line, f"a reference to {shown(shown_kind)}", f"refer to a core {kind}"
        )
        return None
    namespace = as_str(ref.get("namespace")) or ctx.namespace
    if namespace != ctx.namespace:
        # Upstream allows it only with a ReferenceGrant, which meshlib does not read.
        ctx.error(
            f"{path}.namespace",
            ref.line_of("namespace"),
            f"the {kind} is in namespace {shown(namespace)}, not the Gateway's "
            f"{shown(ctx.namespace)}: a cross-namespace reference needs a ReferenceGrant, "
            f"which meshlib's gateway does not read; put the {kind} in {shown(ctx.namespace)}",
        )
        return None
    return ObjectRef(kind, name, namespace)


def _allowed_routes(
    ctx: DocContext, item: YMap, path: str
) -> tuple[NamespacesFrom, tuple[tuple[str, str], ...]]:
    raw = item.get("allowedRoutes")
    if not isinstance(raw, YMap):
        return NamespacesFrom.SAME, ()
    apath = f"{path}.allowedRoutes"
    from_ = NamespacesFrom.SAME
    namespaces = raw.get("namespaces")
    if isinstance(namespaces, YMap):
        value = namespaces.get("from", "Same")
        if value == "Selector":
            _not_supported(
                ctx,
                f"{apath}.namespaces.from",
                namespaces.line_of("from"),
                "namespaces.from Selector",
                "namespaces have no labels here; use Same or All",
            )
        elif value in {f.value for f in NamespacesFrom}:
            from_ = NamespacesFrom(value)
    kinds: list[tuple[str, str]] = []
    for j, entry in limited_maps(ctx, raw, "kinds", f"{apath}.kinds", MAX_ROUTE_KINDS):
        group, kind = entry.get("group", GATEWAY_GROUP), as_str(entry.get("kind"))
        if not isinstance(group, str) or kind is None:
            continue
        # Upstream: a kind the implementation does not support is an InvalidRouteKinds error.
        if (group, kind) != (GATEWAY_GROUP, "HTTPRoute"):
            _not_supported(
                ctx,
                f"{apath}.kinds[{j}]",
                raw["kinds"].line_of(j),
                f"route kind {shown(f'{group}/{kind}' if group else kind)}",
                f"an HTTP or HTTPS listener takes {GATEWAY_GROUP}/HTTPRoute",
            )
            continue
        kinds.append((group, kind))
    return from_, tuple(kinds)


def _frontend(
    ctx: DocContext, spec: YMap
) -> tuple[ClientValidation | None, tuple[tuple[int, ClientValidation], ...]]:
    tls = spec.get("tls")
    if not isinstance(tls, YMap):
        return None, ()
    if "backend" in tls:
        _not_supported(
            ctx,
            "spec.tls.backend",
            tls.line_of("backend"),
            "spec.tls.backend",
            "calls into the mesh use the gateway's own SVID (mesh mTLS)",
        )
    frontend = tls.get("frontend")
    if not isinstance(frontend, YMap):
        return None, ()
    fpath = "spec.tls.frontend"
    default = _client_validation(ctx, frontend.get("default"), f"{fpath}.default")
    per_port: list[tuple[int, ClientValidation]] = []
    seen: dict[int, int] = {}
    for i, entry in limited_maps(ctx, frontend, "perPort", f"{fpath}.perPort", MAX_PER_PORT):
        port = as_int(entry.get("port"))
        if port is None:
            continue
        # Upstream CEL: "Port for TLS configuration must be unique within the Gateway".
        if port in seen:
            ctx.error(
                f"{fpath}.perPort[{i}].port",
                entry.line_of("port"),
                f"port {port} is configured twice (also {fpath}.perPort[{seen[port]}])",
            )
            continue
        seen[port] = i
        validation = _client_validation(ctx, entry.get("tls"), f"{fpath}.perPort[{i}].tls")
        if validation is not None:
            per_port.append((port, validation))
    return default, tuple(per_port)


def _client_validation(ctx: DocContext, raw: object, path: str) -> ClientValidation | None:
    if not isinstance(raw, YMap):
        return None
    validation = raw.get("validation")
    if not isinstance(validation, YMap):
        return None
    vpath = f"{path}.validation"
    if validation.get("mode") == "AllowInsecureFallback":
        _not_supported(
            ctx,
            f"{vpath}.mode",
            validation.line_of("mode"),
            "mode AllowInsecureFallback",
            "a listener with client validation accepts only valid client certificates",
        )
        return None
    refs = _refs(ctx, validation, "caCertificateRefs", vpath, MAX_CA_REFS, "ConfigMap")
    return ClientValidation(refs) if refs else None


def _decoded(ctx: DocContext, kind: str) -> dict[str, tuple[bytes, str, int]]:
    """A Secret's or ConfigMap's entries: key → (bytes, field path, line). ``data`` of a Secret
    (and ``binaryData`` of a ConfigMap) is base64; ``stringData`` / ConfigMap ``data`` is text
    and wins over base64 data of the same key (Kubernetes' merge rule)."""
    out: dict[str, tuple[bytes, str, int]] = {}
    encoded = "data" if kind == "Secret" else "binaryData"
    plain = "stringData" if kind == "Secret" else "data"
    raw = ctx.doc.get(encoded)
    if isinstance(raw, YMap):
        for key, value in raw.items():
            if not isinstance(value, str):
                continue
            try:
                out[key] = (
                    base64.b64decode(value, validate=True),
                    f"{encoded}.{key}",
                    raw.line_of(key),
                )
            except (binascii.Error, ValueError):
                ctx.error(f"{encoded}.{key}", raw.line_of(key), "is not valid base64")
    raw = ctx.doc.get(plain)
    if isinstance(raw, YMap):
        for key, value in raw.items():
            if isinstance(value, str):
                out[key] = (value.encode("utf-8"), f"{plain}.{key}", raw.line_of(key))
    return out


def _certificates(ctx: DocContext, pem: bytes, path: str, line: int) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        ctx.error(path, line, "is not a PEM certificate (-----BEGIN CERTIFICATE-----)")
        return []


def _public_der(key: object) -> bytes | None:
    public_bytes = getattr(key, "public_bytes", None)
    if public_bytes is None:
        return None
    der = public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der if isinstance(der, bytes) else None


def build_secret(ctx: DocContext) -> TlsSecret | None:
    secret_type, type_line = at(ctx.doc, "type")
    if secret_type != TLS_SECRET_TYPE:
        if isinstance(secret_type, str):
            ctx.error(
                "type",
                type_line,
                f"a Secret in the gateway config must be of type {TLS_SECRET_TYPE}, got "
                f"{shown(secret_type)}",
            )
        return None
    entries = _decoded(ctx, "Secret")
    missing = [k for k in ("tls.crt", "tls.key") if k not in entries]
    for entry in missing:
        ctx.error(
            "data", ctx.line, f"a {TLS_SECRET_TYPE} Secret needs {entry} (in data or stringData)"
        )
    if missing:
        return None
    cert_pem, cert_path, cert_line = entries["tls.crt"]
    key_pem, key_path, key_line = entries["tls.key"]
    chain = _certificates(ctx, cert_pem, cert_path, cert_line)
    try:
        key: PrivateKeyTypes | None = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        # The message never quotes the key (it is a secret).
        ctx.error(key_path, key_line, "is not an unencrypted PEM private key")
        key = None
    if not chain or key is None:
        return None
    if _public_der(key.public_key()) != _public_der(chain[0].public_key()):
        ctx.error(
            key_path,
            key_line,
            f"the private key does not match the certificate in {cert_path} "
            f"(subject {chain[0].subject.rfc4514_string()})",
        )
        return None
    return TlsSecret(ctx.name, ctx.namespace, cert_pem, key_pem, ctx.origin)


def build_configmap(ctx: DocContext) -> CaBundle | None:
    entries = _decoded(ctx, "ConfigMap")
    if CA_KEY not in entries:
        # A ConfigMap without ca.crt is only wrong if referenced: checked with the references.
        return CaBundle(ctx.name, ctx.namespace, b"", ctx.origin)
    pem, path, line = entries[CA_KEY]
    if not _certificates(ctx, pem, path, line):
        return None
    return CaBundle(ctx.name, ctx.namespace, pem, ctx.origin)


# --- the whole file ----------------------------------------------------------------------------


@dataclass
class _Loaded:
    gateways: list[tuple[Gateway, DocContext]] = field(default_factory=list)
    routes: list[tuple[HTTPRoute, DocContext]] = field(default_factory=list)
    secrets: dict[tuple[str, str], TlsSecret] = field(default_factory=dict)
    configmaps: dict[tuple[str, str], CaBundle] = field(default_factory=dict)
    contexts: list[DocContext] = field(default_factory=list)
    #: (kind, namespace, name) → where first declared, for duplicate checks.
    declared: dict[tuple[str, str, str], Origin] = field(default_factory=dict)


def load_gateway_config(sources: Sequence[tuple[str, str]]) -> GatewayConfig:
    """Gateway config files ``(name, text)`` → a :class:`GatewayConfig`, or one ConfigError
    listing every problem in every file (structure, limits, PEM, references)."""
    problems: list[Problem] = []
    loaded = _Loaded()
    for name, text in sources:
        read = source_documents(name, text, problems, "the gateway config has no documents")
        for doc in read[1] if read is not None else ():
            ctx = _document(name, doc, problems)
            if ctx is not None:
                loaded.contexts.append(ctx)
                _build(ctx, loaded)
    _check_references(loaded)
    for ctx in loaded.contexts:
        problems.extend(ctx.problems)
    if problems:
        order = {name: i for i, (name, _) in enumerate(sources)}
        problems.sort(key=lambda p: (order.get(p.file, -1), p.document, p.line))
        raise ConfigError(problems)
    return GatewayConfig(
        tuple(g for g, _ in loaded.gateways),
        tuple(r for r, _ in loaded.routes),
        MappingProxyType(dict(loaded.secrets)),
        MappingProxyType(dict(loaded.configmaps)),
    )


def _document(file: str, doc: YamlDocument, problems: list[Problem]) -> DocContext | None:
    def fail(path: str, line: int, message: str) -> None:
        problems.append(Problem(file, line, doc.index, path, message))

    value = doc.value
    if not isinstance(value, YMap):
        fail("", doc.line, "a document must be a mapping with apiVersion, kind and metadata")
        return None
    kind, kind_line = at(value, "kind")
    api, api_line = at(value, "apiVersion")
    if not isinstance(kind, str) or kind not in _KINDS:
        known = ", ".join(_KINDS)
        got = "missing kind" if kind is None else f"kind {shown(kind)} is not read here"
        fail("kind", kind_line, f"{got}; a gateway config holds: {known}")
        return None
    version, schema = _KINDS[kind]
    if api != version:
        fail("apiVersion", api_line, f"{kind} needs apiVersion {version}, got {shown(api)}")
        return None
    return checked_context(file, doc, schema, problems)


def _build(ctx: DocContext, loaded: _Loaded) -> None:
    if ctx.name:
        key = (ctx.kind, ctx.namespace, ctx.name)
        first = loaded.declared.get(key)
        if first is not None:
            ctx.error(
                "metadata.name",
                at(ctx.doc, "metadata.name")[1],
                f"{ctx.kind} {ctx.namespace}/{ctx.name} is declared twice (first at "
                f"{first.file}:{first.line})",
            )
            return
        loaded.declared[key] = ctx.origin
    if ctx.kind == "Gateway":
        gateway = build_gateway(ctx)
        if gateway is not None:
            loaded.gateways.append((gateway, ctx))
    elif ctx.kind == "HTTPRoute":
        route = build_http_route(ctx)
        if route is not None:
            loaded.routes.append((route, ctx))
    elif ctx.kind == "Secret":
        secret = build_secret(ctx)
        if secret is not None:
            loaded.secrets[secret.namespace, secret.name] = secret
    else:
        bundle = build_configmap(ctx)
        if bundle is not None:
            loaded.configmaps[bundle.namespace, bundle.name] = bundle


def _check_references(loaded: _Loaded) -> None:
    """certificateRefs → Secrets, caCertificateRefs → ConfigMaps with ca.crt, route parents →
    Gateways and their listeners (sectionName, port, allowedRoutes)."""
    for gateway, ctx in loaded.gateways:
        for i, listener in enumerate(gateway.listeners):
            for j, ref in enumerate(listener.tls.certificate_refs if listener.tls else ()):
                if ref.key not in loaded.secrets and (
                    ("Secret", ref.namespace, ref.name) not in loaded.declared
                ):
                    path = f"spec.listeners[{i}].tls.certificateRefs[{j}]"
                    ctx.error(
                        f"{path}.name",
                        _line(ctx, path, "name"),
                        f"no Secret {ref.namespace}/{ref.name} in the gateway config",
                    )
        validations = [("spec.tls.frontend.default", gateway.client_validation)]
        validations += [
            (f"spec.tls.frontend.perPort[{i}].tls", v)
            for i, (_, v) in enumerate(gateway.per_port_validation)
        ]
        for vpath, validation in validations:
            for j, ref in enumerate(validation.ca_refs if validation else ()):
                bundle = loaded.configmaps.get(ref.key)
                path = f"{vpath}.validation.caCertificateRefs[{j}]"
                declared = ("ConfigMap", ref.namespace, ref.name) in loaded.declared
                if bundle is None and not declared:
                    message = f"no ConfigMap {ref.namespace}/{ref.name} in the gateway config"
                elif bundle is not None and not bundle.ca_pem:
                    message = f"ConfigMap {ref.namespace}/{ref.name} has no {CA_KEY}"
                else:
                    continue
                ctx.error(f"{path}.name", _line(ctx, path, "name"), message)
    gateways = {(g.namespace, g.name): g for g, _ in loaded.gateways}
    declared_gateways = {(ns, name) for kind, ns, name in loaded.declared if kind == "Gateway"}
    for route, ctx in loaded.routes:
        for i, parent in enumerate(route.parent_refs):
            path = f"spec.parentRefs[{i}]"
            line = _line(ctx, path, "name")
            if parent.mode is ParentMode.MESH or parent.group != GATEWAY_GROUP:
                ctx.error(
                    path,
                    line,
                    f"parent {shown(parent.kind)} {parent.name} is not a Gateway: a route for "
                    "a mesh Service belongs in the mesh policy, not the gateway config",
                )
                continue
            target = gateways.get((parent.namespace, parent.name))
            if target is None:
                if (parent.namespace, parent.name) not in declared_gateways:
                    ctx.error(
                        f"{path}.name",
                        line,
                        f"no Gateway {parent.namespace}/{parent.name} in the gateway config",
                    )
                continue  # a Gateway with problems of its own: reported there
            _check_attachment(ctx, route, target, parent.section_name, parent.port, path)


def _check_attachment(
    ctx: DocContext,
    route: HTTPRoute,
    gateway: Gateway,
    section: str | None,
    port: int | None,
    path: str,
) -> None:
    candidates = list(gateway.listeners)
    if section is not None:
        listener = gateway.listener(section)
        if listener is None:
            names = ", ".join(item.name for item in gateway.listeners)
            ctx.error(
                f"{path}.sectionName",
                _line(ctx, path, "sectionName"),
                f"Gateway {gateway.namespace}/{gateway.name} has no listener "
                f"{shown(section)}; its listeners: {names}",
            )
            return
        candidates = [listener]
    if port is not None:
        candidates = [item for item in candidates if item.port == port]
        if not candidates:
            ctx.error(
                f"{path}.port",
                _line(ctx, path, "port"),
                f"no listener of Gateway {gateway.namespace}/{gateway.name}"
                + (f" named {shown(section)}" if section else "")
                + f" is on port {port}",
            )
            return
    allowed = [item for item in candidates if item.allows(route.namespace, gateway.namespace)]
    # Upstream (HTTPRoute.hostnames): with hostnames on both sides, at least one must
    # intersect or the route is not accepted.
    if (
        allowed
        and route.hostnames
        and not any(
            item.hostname is None
            or any(hostnames_intersect(item.hostname, h) for h in route.hostnames)
            for item in allowed
        )
    ):
        listed = ", ".join(str(item.hostname) for item in allowed)
        ctx.error(
            "spec.hostnames",
            _line(ctx, "spec", "hostnames"),
            f"no hostname of the route intersects those of the listeners it attaches to "
            f"({listed}) on Gateway {gateway.namespace}/{gateway.name}",
        )
    if not allowed:
        ctx.error(
            path,
            _line(ctx, path, "name"),
            f"no listener of Gateway {gateway.namespace}/{gateway.name} allows routes from "
            f"namespace {shown(route.namespace)} (allowedRoutes.namespaces.from is Same unless "
            "set to All)",
        )


def hostnames_intersect(a: str, b: str) -> bool:
    """Whether two Gateway API hostnames share a name; ``*.`` is a suffix match of one label
    or more (upstream Listener.hostname and HTTPRoute.hostnames)."""
    if a == b:
        return True
    if a.startswith("*.") and b.endswith(a[1:]):
        return True
    return b.startswith("*.") and a.endswith(b[1:])


def _line(ctx: DocContext, path: str, key: str) -> int:
    """The line of ``key`` inside the mapping at ``path`` (``a.b[2].c``), or the document's."""
    node: object = ctx.doc
    line = ctx.line
    for part in path.replace("]", "").replace("[", ".").split("."):
        if isinstance(node, YMap) and part in node:
            line = node.line_of(part)
            node = node[part]
        elif isinstance(node, YSeq) and part.isdigit() and int(part) < len(node):
            line = node.line_of(int(part))
            node = node[int(part)]
        else:
            return line
    return node.line_of(key) if isinstance(node, YMap) and key in node else line
