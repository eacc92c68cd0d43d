"""The Gateway API HTTPRoute kind's part of the policy model (gateway.networking.k8s.io/v1),
built by :mod:`meshlib.config.httproute`.

Kept out of :mod:`meshlib.config.model`, which re-exports every name, so a policy without
HTTPRoutes does not pay for creating these dataclasses at import (start-up, issue 15). The
enums and the four filter configurations stay in the model: the call path's route code
(:mod:`meshlib.policy.routes`, loaded with every mesh) tests filters against them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meshlib.config.model import (
    GATEWAY_GROUP,
    ParentMode,
    PathMatchType,
    ValueMatchType,
)

if TYPE_CHECKING:
    from meshlib.config.model import (
        FilterConfig,
        FilterType,
        Origin,
        PathModifierType,
        Pattern,
    )


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
