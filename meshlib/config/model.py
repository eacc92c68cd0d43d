"""The validated policy model: frozen values built once per policy file, valid by construction.

Everything after loading works on these objects. A :class:`Snapshot` is immutable; a hot reload
builds a new one and swaps it in whole, so a call sees one consistent configuration from its
first attempt to its last.

Durations are float seconds. Percentages are floats in [0, 100].

Every class has ``__slots__``: a policy of 10,000 services holds tens of thousands of these
objects for as long as it is in force, and a slotted instance has no per-instance dict.

The classes of the HTTPRoute, SMI, AuthorizationPolicy and RequestAuthentication kinds live in
:mod:`~meshlib.config.routemodel`, :mod:`~meshlib.config.smimodel`,
:mod:`~meshlib.config.authzmodel` and :mod:`~meshlib.config.authnmodel`, loaded with their
kind's builder: Python 3.11 compiles each generated dataclass method separately, and creating
those 27 classes was ≈ 40 % of this module's import for a policy that uses none of them
(start-up, issue 15). Their names are importable from here as before, loaded on first access.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from meshlib.errors import Problem

if TYPE_CHECKING:
    from meshlib.config.authnmodel import (
        JwtLocation as JwtLocation,
        JwtRule as JwtRule,
        RequestAuthentication as RequestAuthentication,
    )
    from meshlib.config.authzmodel import (
        AuthorizationPolicy as AuthorizationPolicy,
        AuthorizationPolicyRule as AuthorizationPolicyRule,
        AuthzAction as AuthzAction,
        AuthzCondition as AuthzCondition,
        AuthzOperation as AuthzOperation,
        AuthzSource as AuthzSource,
    )
    from meshlib.config.routemodel import (
        BackendRef as BackendRef,
        HTTPRoute as HTTPRoute,
        HTTPRouteFilter as HTTPRouteFilter,
        HTTPRouteRule as HTTPRouteRule,
        ParentRef as ParentRef,
        PathMatch as PathMatch,
        PathModifier as PathModifier,
        RouteMatch as RouteMatch,
        RouteTimeouts as RouteTimeouts,
        ValueMatch as ValueMatch,
    )
    from meshlib.config.smimodel import (
        HTTPMatch as HTTPMatch,
        RouteGroup as RouteGroup,
        Split as Split,
        SplitBackend as SplitBackend,
        SplitMatchRef as SplitMatchRef,
        TCPRoute as TCPRoute,
        TrafficTarget as TrafficTarget,
        TrafficTargetRule as TrafficTargetRule,
        UDPRoute as UDPRoute,
    )

#: Where each class moved to a kind's own model module lives: ``from meshlib.config.model import
#: HTTPRoute`` keeps working, and loads that module then (PEP 562).
_MOVED = {
    "HTTPMatch": "meshlib.config.smimodel",
    "RouteGroup": "meshlib.config.smimodel",
    "TCPRoute": "meshlib.config.smimodel",
    "UDPRoute": "meshlib.config.smimodel",
    "SplitBackend": "meshlib.config.smimodel",
    "SplitMatchRef": "meshlib.config.smimodel",
    "Split": "meshlib.config.smimodel",
    "TrafficTargetRule": "meshlib.config.smimodel",
    "TrafficTarget": "meshlib.config.smimodel",
    "AuthzAction": "meshlib.config.authzmodel",
    "AuthzSource": "meshlib.config.authzmodel",
    "AuthzOperation": "meshlib.config.authzmodel",
    "AuthzCondition": "meshlib.config.authzmodel",
    "AuthorizationPolicyRule": "meshlib.config.authzmodel",
    "AuthorizationPolicy": "meshlib.config.authzmodel",
    "JwtLocation": "meshlib.config.authnmodel",
    "JwtRule": "meshlib.config.authnmodel",
    "RequestAuthentication": "meshlib.config.authnmodel",
    "ParentRef": "meshlib.config.routemodel",
    "PathMatch": "meshlib.config.routemodel",
    "ValueMatch": "meshlib.config.routemodel",
    "RouteMatch": "meshlib.config.routemodel",
    "PathModifier": "meshlib.config.routemodel",
    "BackendRef": "meshlib.config.routemodel",
    "HTTPRouteFilter": "meshlib.config.routemodel",
    "RouteTimeouts": "meshlib.config.routemodel",
    "HTTPRouteRule": "meshlib.config.routemodel",
    "HTTPRoute": "meshlib.config.routemodel",
}


def __getattr__(name: str) -> object:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain global
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MOVED})


#: Default ``streamIdleTimeout``, seconds: Envoy's ``stream_idle_timeout`` default, long enough
#: for server-sent events and watch streams that send a heartbeat every minute or so.
STREAM_IDLE_TIMEOUT = 300.0


class Pattern(Protocol):
    """A compiled, linear-time regular expression (google-re2)."""

    @property
    def pattern(self) -> str: ...

    def search(self, text: str) -> Any: ...

    def match(self, text: str) -> Any: ...


class MTLSMode(str, enum.Enum):
    STRICT = "strict"
    PERMISSIVE = "permissive"
    DISABLE = "disable"


class AccessControl(str, enum.Enum):
    OPEN = "open"
    AUDIT = "audit"
    ENFORCE = "enforce"


class Egress(str, enum.Enum):
    ALLOW_ANY = "allow-any"
    REGISTRY_ONLY = "registry-only"


class LoadBalancerKind(str, enum.Enum):
    P2C_EWMA = "p2c-ewma"  # power of two choices over peak-EWMA latency (default)
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a resource came from in the policy file (for error messages and `explain`)."""

    file: str
    document: int
    line: int


@dataclass(frozen=True, slots=True)
class MeshSettings:
    trust_domain: str = "cluster.local"
    mtls: MTLSMode = MTLSMode.DISABLE
    access_control: AccessControl = AccessControl.OPEN
    egress: Egress = Egress.ALLOW_ANY
    access_log: str | None = None  # spec.accessLog format ("json" | "text") when enabled
    #: Fraction of traces meshlib starts (no incoming context) that are sampled, 0..1.
    tracing_sampling: float = 1.0


#: The labels of an endpoint that has none: one shared, read-only mapping rather than an empty
#: dict per endpoint (most endpoints of a large static policy carry no labels).
NO_LABELS: Mapping[str, str] = MappingProxyType({})


def _no_labels() -> Mapping[str, str]:
    return NO_LABELS


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str  # "host:port"
    weight: int = 1
    labels: Mapping[str, str] = field(default_factory=_no_labels)
    # ``host`` and ``port`` split ``address`` on first use (a call reads them per attempt), so
    # the endpoints of services this process never calls pay for no second string.
    _host: str | None = field(default=None, init=False, repr=False, compare=False)
    _port: int | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def host(self) -> str:
        host = self._host
        if host is None:
            host = self.address.rsplit(":", 1)[0].strip("[]")
            object.__setattr__(self, "_host", host)  # a cache, not a change: frozen for users
        return host

    @property
    def port(self) -> int:
        port = self._port
        if port is None:
            port = int(self.address.rsplit(":", 1)[1])
            object.__setattr__(self, "_port", port)
        return port


@dataclass(frozen=True, slots=True)
class ServiceDef:
    name: str
    namespace: str
    endpoints: tuple[Endpoint, ...]
    service_account: str | None = None
    port: int | None = None
    origin: Origin | None = None
    #: The canonical name ``name.namespace`` (read on every call, and the snapshot's key).
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.name}.{self.namespace}")


# --- resilience policy --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    ratio: float = 0.2  # retries may add this fraction of calls...
    min_per_second: float = 10.0  # ...plus this many per second...
    ttl: float = 10.0  # ...counted over this window


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    base: float = 0.025
    cap: float = 0.250


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    #: Maximum number of *retries* (Istio semantics): attempts=3 means up to 4 tries.
    #: ``None`` means unconfigured: 2 retries, only for failures that never reached the server.
    attempts: int | None = None
    per_try_timeout: float | None = None
    #: Conditions: "5xx", "gateway-error", "reset", "connect-failure", "timeout", "429",
    #: "retriable-status-codes" and plain status codes such as "503".
    retry_on: frozenset[str] = frozenset()
    #: The route is marked retryable: retryOn applies to every method, not just idempotent ones.
    retryable: bool = False
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    budget: BudgetPolicy = field(default_factory=BudgetPolicy)


@dataclass(frozen=True, slots=True)
class CircuitBreakerPolicy:
    consecutive_failures: int = 5
    open_duration: float = 30.0  # then half-open with a single probe


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_failures: int = 5
    base_ejection_time: float = 30.0  # × number of times ejected
    max_ejection_time: float = 300.0
    max_ejection_percent: float = 50.0
    panic_threshold: float = 50.0  # below this % healthy, use all endpoints


@dataclass(frozen=True, slots=True)
class LoadBalancerPolicy:
    kind: LoadBalancerKind = LoadBalancerKind.P2C_EWMA
    decay: float = 10.0  # peak-EWMA decay time constant, seconds


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    requests_per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class ConnectionPoolPolicy:
    max_connections: int | None = None  # concurrent calls in flight to the destination
    max_keepalive: int | None = None


@dataclass(frozen=True, slots=True)
class HedgingPolicy:
    enabled: bool = False
    delay: float | None = None  # fixed delay; None means "the observed p95"
    max_attempts: int = 2


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    """The merged resilience policy for one (service, route), every field resolved.

    ``sources`` maps a dotted field name (``"retries.attempts"``) to the scope it came from:
    ``"route"``, ``"service"``, ``"namespace"``, ``"mesh"`` (each followed by the policy name,
    e.g. ``"service:reviews-policy"``) or ``"default"``.
    """

    #: Overall deadline over all attempts and the response body (a streamed one: its headers);
    #: None = no deadline.
    timeout: float | None = None
    #: Longest wait for each read of a response body (the only bound on a streamed one).
    stream_idle_timeout: float | None = STREAM_IDLE_TIMEOUT
    retries: RetryPolicy = field(default_factory=RetryPolicy)
    circuit_breaker: CircuitBreakerPolicy = field(default_factory=CircuitBreakerPolicy)
    outlier_detection: OutlierPolicy = field(default_factory=OutlierPolicy)
    load_balancer: LoadBalancerPolicy = field(default_factory=LoadBalancerPolicy)
    rate_limit: RateLimitPolicy | None = None
    connection_pool: ConnectionPoolPolicy = field(default_factory=ConnectionPoolPolicy)
    hedging: HedgingPolicy = field(default_factory=HedgingPolicy)
    #: The destination's mTLS mode: a namespace or service TrafficPolicy, else Mesh.spec.mtls.
    mtls: MTLSMode = MTLSMode.DISABLE
    sources: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PolicyTarget:
    """``spec.target`` of a meshlib policy. All ``None``: the whole mesh."""

    namespace: str | None = None
    service: str | None = None  # service key "name.namespace" when set
    route: str | None = None  # route (HTTPRouteGroup match) name when set

    @property
    def scope(self) -> str:
        if self.route is not None:
            return "route"
        if self.service is not None:
            return "service"
        if self.namespace is not None:
            return "namespace"
        return "mesh"


@dataclass(frozen=True, slots=True)
class TrafficPolicyDoc:
    """One TrafficPolicy resource: the fields it sets, flattened to dotted names.

    ``fields`` maps e.g. ``"retries.attempts"`` → ``3``, ``"timeout"`` → ``2.0`` with values
    already converted (durations to seconds, enums to enum members).
    """

    name: str
    namespace: str
    target: PolicyTarget
    fields: Mapping[str, Any]
    origin: Origin | None = None


@dataclass(frozen=True, slots=True)
class DelayFault:
    fixed: float
    percent: float


@dataclass(frozen=True, slots=True)
class AbortFault:
    status: int
    percent: float


@dataclass(frozen=True, slots=True)
class FaultRule:
    """FaultInjection: applied before the call leaves the process."""

    name: str
    namespace: str
    target: PolicyTarget
    delay: DelayFault | None = None
    abort: AbortFault | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case name → exact value
    origin: Origin | None = None
    #: Percent of attempts failed as "connection refused" (set by meshlib.testing, not by files).
    refuse_percent: float = 0.0


@dataclass(frozen=True, slots=True)
class MirrorRule:
    name: str
    namespace: str
    service: str  # service key whose traffic is copied
    mirror: str  # service key that receives copies
    percent: float
    origin: Origin | None = None


# --- Gateway API HTTPRoute (gateway.networking.k8s.io/v1; built by meshlib.config.httproute) --

GATEWAY_GROUP = "gateway.networking.k8s.io"


class ParentMode(str, enum.Enum):
    MESH = "mesh"  # parent is a Service (GAMMA): the route applies to calls to that service
    INGRESS = "ingress"  # parent is a Gateway: the route applies to requests entering it


class PathMatchType(str, enum.Enum):
    EXACT = "Exact"
    PATH_PREFIX = "PathPrefix"
    REGULAR_EXPRESSION = "RegularExpression"


class ValueMatchType(str, enum.Enum):
    EXACT = "Exact"
    REGULAR_EXPRESSION = "RegularExpression"


class FilterType(str, enum.Enum):
    REQUEST_HEADER_MODIFIER = "RequestHeaderModifier"
    RESPONSE_HEADER_MODIFIER = "ResponseHeaderModifier"
    REQUEST_MIRROR = "RequestMirror"
    REQUEST_REDIRECT = "RequestRedirect"
    URL_REWRITE = "URLRewrite"


class PathModifierType(str, enum.Enum):
    REPLACE_FULL_PATH = "ReplaceFullPath"
    REPLACE_PREFIX_MATCH = "ReplacePrefixMatch"


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RequestMirror:
    backend: BackendRef
    percent: float = 100.0  # from ``percent`` or ``fraction``; 100 when neither is given


@dataclass(frozen=True, slots=True)
class RequestRedirect:
    scheme: str | None = None  # None: the request's scheme
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status_code: int = 302


@dataclass(frozen=True, slots=True)
class URLRewrite:
    hostname: str | None = None
    path: PathModifier | None = None


FilterConfig = HeaderModifier | RequestMirror | RequestRedirect | URLRewrite


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One immutable, validated configuration.

    ``services`` is keyed by service key (``name.namespace``); ``route_groups`` by
    ``name.namespace``; ``splits`` by the root service key (at most one split per root).
    """

    version: int
    digest: str  # sha256 of the source text(s)
    files: tuple[str, ...]  # the file names read, or ("<string>",)
    mesh: MeshSettings
    services: Mapping[str, ServiceDef]
    route_groups: Mapping[str, RouteGroup]
    splits: Mapping[str, Split]
    traffic_policies: tuple[TrafficPolicyDoc, ...]
    faults: tuple[FaultRule, ...]
    mirrors: tuple[MirrorRule, ...]
    traffic_targets: tuple[TrafficTarget, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    request_authentications: tuple[RequestAuthentication, ...] = ()
    tcp_routes: Mapping[str, TCPRoute] = field(default_factory=dict)
    udp_routes: Mapping[str, UDPRoute] = field(default_factory=dict)
    #: Gateway API HTTPRoutes, in load order (files, then documents): load order is their age
    #: for precedence when ``metadata.creationTimestamp`` is not set.
    http_routes: tuple[HTTPRoute, ...] = ()
    #: The texts read, as (file name, text): :attr:`raw_documents` is read from them on demand,
    #: so the snapshot in force does not hold a second, position-annotated copy of every
    #: document (the parsed YAML trees were three quarters of a large policy's memory).
    texts: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)
    #: Accepted-with-a-note findings (e.g. retry attempts clamped), shown by ``meshctl validate``.
    warnings: tuple[Problem, ...] = ()

    @property
    def raw_documents(self) -> tuple[Mapping[str, Any], ...]:
        """The documents as parsed mappings, in load order (files, then documents): read
        again from :attr:`texts` at each access (for ``meshctl`` and the admin page, not for
        calls). The texts were valid when loaded, so every document is a mapping."""
        from meshlib.config.yamlsafe import read_documents  # PyYAML loads on first use

        return tuple(
            doc.value
            for _, text in self.texts
            for doc in read_documents(text.removeprefix("\ufeff"))[0]
            if isinstance(doc.value, Mapping)
        )

    @property
    def source(self) -> str:
        """The file names as one line, for messages (``files`` keeps them apart)."""
        return ", ".join(self.files)
