"""The registry API's answers as values: what the server sends and the client reads, in one place
so the two cannot drift (the JSON shapes are docs/control-plane.md, "The API").

Each value has ``to_json`` (the server's body) and ``from_json`` (the client's parse, which
raises :class:`WireError` naming the field when a body is not what the API promises).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from meshlib.config.model import Endpoint

#: Response headers of a blocking query (CONTROL-PLANE.md §3).
INDEX_HEADER = "X-Mesh-Index"
EPOCH_HEADER = "X-Mesh-Epoch"
AUTHORITATIVE_HEADER = "X-Mesh-Authoritative"
#: The prefix of a join string: ``meshlib-join:v1:<registry URL>:<root SPKI sha256>:<token>``
#: (``meshctl token create --join`` writes it, :func:`meshlib.control.remote.parse_join` reads it).
JOIN_PREFIX = "meshlib-join:v1:"
#: Seconds the registry's server keeps an idle connection (``registry serve``'s uvicorn
#: ``timeout_keep_alive``), and seconds a client keeps one for reuse: the client lets go first.
#: With both at uvicorn's and httpx's default of 5 s, a beat sent on a connection idle for just
#: under 5 s raced the server's close and failed ("Server disconnected"), and beats every few
#: seconds paid a new mutual-TLS handshake whenever their interval passed 5 s.
SERVER_KEEP_ALIVE = 75
CLIENT_KEEP_ALIVE = 60.0
#: Request header naming the policy's source in error messages (``PUT /v1/policy``).
SOURCE_HEADER = "X-Mesh-Source"


#: The namespace of the registry's own identities (its server SVID and meshctl's).
REGISTRY_NAMESPACE = "meshlib-system"


def registry_id(trust_domain: str) -> str:
    """The SPIFFE ID the registry serves with; clients pin it."""
    return f"spiffe://{trust_domain}/ns/{REGISTRY_NAMESPACE}/sa/registry"


def admin_id(trust_domain: str) -> str:
    """The registry's default admin: meshctl's SPIFFE ID (``registry init`` issues its SVID)."""
    return f"spiffe://{trust_domain}/ns/{REGISTRY_NAMESPACE}/sa/meshctl"


class WireError(ValueError):
    """A registry answer that does not have the promised shape."""


def _get(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in body:
        raise WireError(f"{where}: field {name!r} is missing")
    value = body[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise WireError(f"{where}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _optional(body: Mapping[str, Any], name: str, kind: type, where: str) -> Any:
    if body.get(name) is None:
        return None
    return _get(body, name, kind, where)


def _object(body: object, where: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise WireError(f"{where}: expected a JSON object, got {type(body).__name__}")
    return body


def _labels(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise WireError(f"{where}: labels must be a map of strings")
    return dict(value)


def host_port(address: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets (the policy file's endpoint address form)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass(frozen=True)
class RegisteredEndpoint:
    """One live instance of a service as a blocking query returns it."""

    id: str
    address: str
    port: int
    labels: Mapping[str, str] = field(default_factory=dict)
    metrics_port: int | None = None

    def endpoint(self) -> Endpoint:
        """The policy model's endpoint (weight 1; labels kept for subset routing)."""
        return Endpoint(host_port(self.address, self.port), 1, dict(self.labels))

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "address": self.address,
            "port": self.port,
            "labels": dict(self.labels),
            "metrics_port": self.metrics_port,
        }

    @classmethod
    def from_json(cls, body: object, where: str = "endpoint") -> RegisteredEndpoint:
        obj = _object(body, where)
        return cls(
            _get(obj, "id", str, where),
            _get(obj, "address", str, where),
            _get(obj, "port", int, where),
            _labels(obj.get("labels"), where),
            _optional(obj, "metrics_port", int, where),
        )


@dataclass(frozen=True)
class EndpointsAnswer:
    """A full snapshot of one service's live instances (never a delta)."""

    namespace: str
    service: str
    index: int
    epoch: str
    authoritative: bool
    endpoints: tuple[RegisteredEndpoint, ...]

    @property
    def key(self) -> str:
        """The service key the policy model uses: ``name.namespace``."""
        return f"{self.service}.{self.namespace}"

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "service": self.service,
            "index": self.index,
            "epoch": self.epoch,
            "authoritative": self.authoritative,
            "endpoints": [e.to_json() for e in self.endpoints],
        }

    @classmethod
    def from_json(cls, body: object) -> EndpointsAnswer:
        where = "endpoints answer"
        obj = _object(body, where)
        items = _get(obj, "endpoints", list, where)
        return cls(
            _get(obj, "namespace", str, where),
            _get(obj, "service", str, where),
            _get(obj, "index", int, where),
            _get(obj, "epoch", str, where),
            _get(obj, "authoritative", bool, where),
            tuple(
                RegisteredEndpoint.from_json(item, f"{where}: endpoints[{i}]")
                for i, item in enumerate(items)
            ),
        )


@dataclass(frozen=True)
class PolicyAnswer:
    """One policy version as ``GET /v1/policy`` returns it (version 0, text "" before any)."""

    version: int
    text: str
    digest: str | None = None
    author: str | None = None
    created_at: float | None = None
    rollback_of: int | None = None
    #: From the response headers, not the body.
    epoch: str = ""
    authoritative: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "digest": self.digest,
            "text": self.text,
            "author": self.author,
            "created_at": self.created_at,
            "rollback_of": self.rollback_of,
        }

    @classmethod
    def from_json(
        cls, body: object, *, epoch: str = "", authoritative: bool = True
    ) -> PolicyAnswer:
        where = "policy answer"
        obj = _object(body, where)
        created = _optional(obj, "created_at", (int, float), where)  # type: ignore[arg-type]
        return cls(
            _get(obj, "version", int, where),
            _get(obj, "text", str, where),
            _optional(obj, "digest", str, where),
            _optional(obj, "author", str, where),
            None if created is None else float(created),
            _optional(obj, "rollback_of", int, where),
            epoch,
            authoritative,
        )


@dataclass(frozen=True)
class BundleAnswer:
    """The CA's published trust bundle and CRLs as ``GET /v1/ca/bundle`` returns them: ``bundle``
    is the ``bundle.pem`` text with its sequence line, ``crls`` the PEM CRLs ("" for none).
    ``index`` moves whenever either changes; ``epoch`` (a response header) names the registry
    process the index belongs to (the bundle index is not persisted)."""

    index: int
    sequence: int
    bundle: str
    crls: str = ""
    #: From the response headers, not the body.
    epoch: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "sequence": self.sequence,
            "bundle": self.bundle,
            "crls": self.crls,
        }

    @classmethod
    def from_json(cls, body: object, *, epoch: str = "") -> BundleAnswer:
        where = "bundle answer"
        obj = _object(body, where)
        return cls(
            _get(obj, "index", int, where),
            _get(obj, "sequence", int, where),
            _get(obj, "bundle", str, where),
            _get(obj, "crls", str, where),
            epoch,
        )


def _number(obj: Mapping[str, Any], name: str, where: str) -> float:
    value = _get(obj, name, (int, float), where)
    if isinstance(value, bool):
        raise WireError(f"{where}: field {name!r} has the wrong type (bool)")
    return float(value)


@dataclass(frozen=True)
class InstanceInfo:
    """One registered instance as ``GET /v1/instances`` lists it (``meshctl get instances``)."""

    id: str
    namespace: str
    service: str
    address: str
    port: int
    labels: Mapping[str, str]
    metrics_port: int | None
    identity: str
    ttl: float
    #: Seconds since its last heartbeat, when the registry answered.
    last_heartbeat_age: float
    applied_version: int | None = None
    rejected_version: int | None = None
    #: The client's loader error for ``rejected_version``.
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "namespace": self.namespace,
            "service": self.service,
            "address": self.address,
            "port": self.port,
            "labels": dict(self.labels),
            "metrics_port": self.metrics_port,
            "identity": self.identity,
            "ttl": self.ttl,
            "last_heartbeat_age": self.last_heartbeat_age,
            "applied_version": self.applied_version,
            "rejected_version": self.rejected_version,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, body: object, where: str = "instance") -> InstanceInfo:
        obj = _object(body, where)
        return cls(
            _get(obj, "id", str, where),
            _get(obj, "namespace", str, where),
            _get(obj, "service", str, where),
            _get(obj, "address", str, where),
            _get(obj, "port", int, where),
            _labels(obj.get("labels"), where),
            _optional(obj, "metrics_port", int, where),
            _get(obj, "identity", str, where),
            _number(obj, "ttl", where),
            _number(obj, "last_heartbeat_age", where),
            _optional(obj, "applied_version", int, where),
            _optional(obj, "rejected_version", int, where),
            _optional(obj, "error", str, where),
        )


@dataclass(frozen=True)
class ServiceInfo:
    """One service as ``GET /v1/services`` lists it."""

    namespace: str
    service: str
    instances: int
    index: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # every field, each a JSON scalar

    @classmethod
    def from_json(cls, body: object, where: str = "service") -> ServiceInfo:
        obj = _object(body, where)
        return cls(
            _get(obj, "namespace", str, where),
            _get(obj, "service", str, where),
            _get(obj, "instances", int, where),
            _get(obj, "index", int, where),
        )


@dataclass(frozen=True)
class ReplicaHealth:
    """A replica's view of its shared store (``GET /v1/status`` in replica mode): the last
    health check passed (``store_ok``) and the mirror's list and watch are running
    (``watch_ok``). Either false: answers are non-authoritative and writes answer 503."""

    store_ok: bool
    watch_ok: bool


@dataclass(frozen=True)
class RegistryStatusInfo:
    """``GET /v1/status``: the registry's epoch, state and counts (``meshctl registry status``)."""

    epoch: str
    #: ``warming``, ``serving`` or ``preserving``.
    state: str
    #: Why it is preserving, else None.
    reason: str | None
    authoritative: bool
    instances: int
    services: int
    policy_version: int
    #: ``sqlite:/path`` or ``memory``.
    store: str
    uptime_seconds: float
    refusals: int
    watchers: int
    #: Replica mode only (several registries over one etcd); None for a lone registry.
    replica: ReplicaHealth | None = None

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)  # every field, each a JSON scalar (``replica`` an object)
        if self.replica is None:
            del body["replica"]  # a lone registry's answer is as it always was
        return body

    @classmethod
    def from_json(cls, body: object) -> RegistryStatusInfo:
        where = "status answer"
        obj = _object(body, where)
        return cls(
            _get(obj, "epoch", str, where),
            _get(obj, "state", str, where),
            _optional(obj, "reason", str, where),
            _get(obj, "authoritative", bool, where),
            _get(obj, "instances", int, where),
            _get(obj, "services", int, where),
            _get(obj, "policy_version", int, where),
            _get(obj, "store", str, where),
            _number(obj, "uptime_seconds", where),
            _get(obj, "refusals", int, where),
            _get(obj, "watchers", int, where),
            _replica(obj.get("replica"), where),
        )


def _replica(value: object, where: str) -> ReplicaHealth | None:
    if value is None:
        return None
    obj = _object(value, f"{where}: replica")
    return ReplicaHealth(
        _get(obj, "store_ok", bool, f"{where}: replica"),
        _get(obj, "watch_ok", bool, f"{where}: replica"),
    )


@dataclass(frozen=True)
class TokenIssued:
    """``POST /v1/tokens``: a new join token; ``token`` is the only time its secret is shown."""

    token: str
    id: str
    spiffe_id: str
    expires_at: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # every field, each a JSON scalar

    @classmethod
    def from_json(cls, body: object) -> TokenIssued:
        where = "token answer"
        obj = _object(body, where)
        return cls(
            _get(obj, "token", str, where),
            _get(obj, "id", str, where),
            _get(obj, "spiffe_id", str, where),
            _number(obj, "expires_at", where),
        )


@dataclass(frozen=True)
class TokenInfo:
    """One join token as ``GET /v1/tokens`` lists it (never its secret nor its hash)."""

    id: str
    spiffe_id: str
    #: ``unused``, ``used``, ``expired`` or ``revoked``.
    state: str
    created_at: float
    expires_at: float
    created_by: str
    used_at: float | None = None
    used_by_serial: str | None = None
    revoked_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # every field, each a JSON scalar

    @classmethod
    def from_json(cls, body: object, where: str = "token") -> TokenInfo:
        obj = _object(body, where)
        used_at = None if obj.get("used_at") is None else _number(obj, "used_at", where)
        revoked_at = None if obj.get("revoked_at") is None else _number(obj, "revoked_at", where)
        return cls(
            _get(obj, "id", str, where),
            _get(obj, "spiffe_id", str, where),
            _get(obj, "state", str, where),
            _number(obj, "created_at", where),
            _number(obj, "expires_at", where),
            _get(obj, "created_by", str, where),
            used_at,
            _optional(obj, "used_by_serial", str, where),
            revoked_at,
        )
