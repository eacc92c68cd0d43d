"""The validated policy model: frozen values built once per policy file, valid by construction.

Everything after loading works on these objects. A :class:`Snapshot` is immutable; a hot reload
builds a new one and swaps it in whole, so a call sees one consistent configuration from its
first attempt to its last.

Durations are float seconds. Percentages are floats in [0, 100].

Every class has ``__slots__``: a policy of 10,000 services holds tens of thousands of these
objects for as long as it is in force, and a slotted instance has no per-instance dict.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from meshlib.errors import Problem

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


@dataclass(frozen=True, slots=True)
class HTTPMatch:
    """One SMI HTTPRouteGroup match. ``None`` fields match anything.

    ``path_regex`` is anchored at the start of the path (SMI semantics), compiled with RE2.
    ``methods`` holds upper-case method names; ``"*"`` in the manifest becomes ``None``.
    ``headers`` maps lower-case header names to RE2 patterns matched against the value.
    """

    name: str
    path_regex: Pattern | None = None
    methods: frozenset[str] | None = None
    headers: tuple[tuple[str, Pattern], ...] = ()


@dataclass(frozen=True, slots=True)
class RouteGroup:
    """SMI HTTPRouteGroup."""

    name: str
    namespace: str
    matches: tuple[HTTPMatch, ...]
    origin: Origin | None = None


@dataclass(frozen=True, slots=True)
class TCPRoute:
    name: str
    namespace: str
    ports: tuple[int, ...] = ()
    origin: Origin | None = None


@dataclass(frozen=True, slots=True)
class UDPRoute:
    """SMI UDPRoute (specs.smi-spec.io/v1alpha4): parsed so a TrafficTarget may name it; meshlib
    carries HTTP only, so it admits no request (see authz)."""

    name: str
    namespace: str
    ports: tuple[int, ...] = ()
    origin: Origin | None = None


@dataclass(frozen=True, slots=True)
class SplitBackend:
    service: str  # service key "name.namespace"
    weight: int  # relative; v1alpha1 quantities are converted to milli-units


@dataclass(frozen=True, slots=True)
class SplitMatchRef:
    """A reference from a TrafficSplit to (all or some) matches of an HTTPRouteGroup."""

    group: str  # route group key "name.namespace"
    names: tuple[str, ...] = ()  # empty: every match of the group


@dataclass(frozen=True, slots=True)
class Split:
    """SMI TrafficSplit. Requests that do not match ``matches`` (when set) go to the root."""

    name: str
    namespace: str
    root: str  # service key
    backends: tuple[SplitBackend, ...]
    matches: tuple[SplitMatchRef, ...] = ()
    origin: Origin | None = None


@dataclass(frozen=True, slots=True)
class TrafficTargetRule:
    kind: str  # "HTTPRouteGroup" | "TCPRoute" | "UDPRoute"
    name: str
    matches: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TrafficTarget:
    """SMI TrafficTarget (parsed and validated here; enforced by the inbound side)."""

    name: str
    namespace: str
    destination: tuple[str, str]  # (service account, namespace)
    sources: tuple[tuple[str, str], ...]
    rules: tuple[TrafficTargetRule, ...]
    origin: Origin | None = None


class AuthzAction(str, enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"


@dataclass(frozen=True, slots=True)
class AuthzSource:
    """One ``from`` entry of an AuthorizationPolicy rule: every set field must match (AND);
    within a field any value may match (OR). ``None``: the field is not constrained.

    Values are glob patterns: exact, ``prefix*``, ``*suffix`` or ``*`` (present).
    ``principals`` are SPIFFE IDs without the scheme (``td/ns/x/sa/y``, Istio style).
    """

    principals: tuple[str, ...] | None = None
    namespaces: tuple[str, ...] | None = None
    request_principals: tuple[str, ...] | None = None  # "iss/sub" of the validated JWT


@dataclass(frozen=True, slots=True)
class AuthzOperation:
    """One ``to`` entry: upper-case methods and path globs (matched on the normalised path)."""

    methods: frozenset[str] | None = None
    paths: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class AuthzCondition:
    """One ``when`` entry: the JWT claim at ``claim`` (nested names) has one of ``values``."""

    key: str  # as written, e.g. "request.auth.claims[iss]"
    claim: tuple[str, ...]
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AuthorizationPolicyRule:
    """A rule matches when its ``sources``, ``operations`` and ``conditions`` all match; an
    empty ``sources`` (or ``operations``) matches any source (operation)."""

    sources: tuple[AuthzSource, ...] = ()
    operations: tuple[AuthzOperation, ...] = ()
    conditions: tuple[AuthzCondition, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    """meshlib/v1 AuthorizationPolicy (Istio semantics: DENY beats ALLOW; once an ALLOW policy
    applies to a destination, a request must match one). ``service`` ``None``: every service of
    ``namespace``."""

    name: str
    namespace: str
    service: str | None  # service key "name.namespace" when set
    action: AuthzAction
    rules: tuple[AuthorizationPolicyRule, ...]
    origin: Origin | None = None


@dataclass(frozen=True, slots=True)
class JwtLocation:
    """Where a token is read from: header ``name`` (lower-case), value ``prefix`` + token."""

    name: str = "authorization"
    prefix: str = "Bearer "


@dataclass(frozen=True, slots=True)
class JwtRule:
    """One ``jwtRules`` entry of a RequestAuthentication: how tokens of ``issuer`` verify.

    Exactly one JWKS source is set: ``jwks_uri`` (fetched), ``jwks`` (inline JSON text) or
    ``jwks_file`` (re-read when it changes). ``audiences`` empty: ``aud`` is not checked.
    ``algorithms`` are asymmetric JWS algorithms only (never ``none``, never HS*).
    """

    issuer: str
    audiences: tuple[str, ...] = ()
    jwks_uri: str | None = None
    jwks: str | None = None
    jwks_file: str | None = None
    from_headers: tuple[JwtLocation, ...] = (JwtLocation(),)
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    clock_skew: float = 60.0


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    """meshlib/v1 RequestAuthentication: JWT origin authentication for ``service`` (a service
    key) or, when ``None``, every service of ``namespace``."""

    name: str
    namespace: str
    service: str | None
    rules: tuple[JwtRule, ...]
    origin: Origin | None = None


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
class ParentRef:
    name: str
    namespace: str  # default: the route's namespace
    group: str = GATEWAY_GROUP
    kind: str = "Gateway"
    section_name: str | None = None
    port: int | None = None

    @property
    def mode(self) -> ParentMode:
        return ParentMode.MESH if self.kind == "Service" else ParentMode.INGRESS


@dataclass(frozen=True, slots=True)
class PathMatch:
    type: PathMatchType = PathMatchType.PATH_PREFIX
    value: str = "/"
    #: Compiled (RE2, anchored at both ends) for RegularExpression; None otherwise.
    regex: Pattern | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """A header or query parameter match; header names are lower-cased, query names are not."""

    name: str
    value: str
    type: ValueMatchType = ValueMatchType.EXACT
    regex: Pattern | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path: PathMatch = PathMatch()
    headers: tuple[ValueMatch, ...] = ()
    query_params: tuple[ValueMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PathModifier:
    type: PathModifierType
    value: str


@dataclass(frozen=True, slots=True)
class BackendRef:
    name: str
    namespace: str  # default: the route's namespace
    port: int | None = None
    weight: int = 1
    group: str = ""
    kind: str = "Service"
    filters: tuple[HTTPRouteFilter, ...] = ()

    @property
    def resolvable(self) -> bool:
        """Whether the mesh can send to it: a core Service with a port. Requests given to an
        unresolvable backend get 500 (the spec's rule for an invalid backendRef's share)."""
        return self.group == "" and self.kind == "Service" and self.port is not None


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
class HTTPRouteFilter:
    type: FilterType
    config: FilterConfig


@dataclass(frozen=True, slots=True)
class RouteTimeouts:
    """Seconds; 0 disables the timeout (the spec's ``0s``), None leaves the mesh's default."""

    request: float | None = None
    backend_request: float | None = None


@dataclass(frozen=True, slots=True)
class HTTPRouteRule:
    matches: tuple[RouteMatch, ...] = (RouteMatch(),)
    filters: tuple[HTTPRouteFilter, ...] = ()
    backend_refs: tuple[BackendRef, ...] = ()
    timeouts: RouteTimeouts = RouteTimeouts()
    name: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    name: str
    namespace: str
    parent_refs: tuple[ParentRef, ...]
    hostnames: tuple[str, ...]
    rules: tuple[HTTPRouteRule, ...]
    origin: Origin
    #: ``metadata.creationTimestamp`` (RFC 3339, UTC), when the manifest carries one.
    created: str | None = None

    @property
    def key(self) -> str:
        """``name.namespace``, as every other kind is keyed."""
        return f"{self.name}.{self.namespace}"

    def label(self, rule: HTTPRouteRule) -> str:
        """The route label of one of this route's rules: the rule's ``name``, else the route's
        name. It names the route in decisions and metrics, and TrafficPolicy/FaultInjection
        ``spec.target.route`` selects rules by it."""
        return rule.name or self.name

    def services(self) -> tuple[str, ...]:
        """Keys of the mesh Services this route attaches to (its ``kind: Service`` parents)."""
        return tuple(
            dict.fromkeys(
                f"{p.name}.{p.namespace}" for p in self.parent_refs if p.mode is ParentMode.MESH
            )
        )


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
