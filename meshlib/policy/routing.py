"""Route matching, split lookup and scope merging over one snapshot: pure and cached.

A :class:`Router` is built once per :class:`~meshlib.config.model.Snapshot` and never changes;
its caches are per snapshot, so a hot reload simply builds a new router.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from meshlib.config.model import (
    EffectivePolicy,
    FaultRule,
    MirrorRule,
    MTLSMode,
    PolicyTarget,
    ServiceDef,
    Snapshot,
)
from meshlib.policy.routes import RouteIndex

if TYPE_CHECKING:
    from meshlib.config.smimodel import HTTPMatch, Split

#: Suffixes under which a service is also reachable, Kubernetes style.
_CLUSTER_SUFFIXES = (".svc.cluster.local", ".svc")

#: Scope precedence, most specific first (DESIGN.md §3).
_SCOPE_ORDER = ("route", "service", "namespace", "mesh")


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """The route a request matched and the split that applies to it (if any)."""

    name: str | None  # the HTTPRouteGroup match name; None when no named route matched
    split: Split | None  # the split to apply, or None to send to the root service


_NO_ROUTE = RouteMatch(None, None)


class _URL(Protocol):
    @property
    def path(self) -> str: ...


class _HasURL(Protocol):
    @property
    def url(self) -> _URL: ...


def match_http(match: HTTPMatch, method: str, path: str, headers: Mapping[str, str]) -> bool:
    """Whether one SMI HTTP match accepts the request (header names lower-case)."""
    if match.methods is not None and method not in match.methods:
        return False
    if match.path_regex is not None and match.path_regex.match(path) is None:
        return False
    for name, pattern in match.headers:
        value = headers.get(name)
        if value is None or pattern.search(value) is None:
            return False
    return True


class _Targeted(Protocol):
    @property
    def target(self) -> PolicyTarget: ...


_T = TypeVar("_T", bound=_Targeted)


class _TargetIndex(Generic[_T]):
    """Rules with a target (TrafficPolicies, FaultInjections) by what their target names,
    built on first use: a service's first merge after a reload reads the rules that may apply
    to it, not all of them (services x rules in all, otherwise)."""

    __slots__ = ("_by_target", "_rules")

    def __init__(self, rules: tuple[_T, ...]) -> None:
        self._rules = rules
        self._by_target: dict[str | None, list[tuple[int, _T]]] | None = None

    def candidates(self, service_key: str) -> list[_T]:
        """The rules whose target may apply to ``service_key`` (mesh-wide, its namespace's,
        its own), in snapshot order: ties between equal scopes keep going to the first, as
        when every rule was scanned."""
        index = self._by_target
        if index is None:
            index = {}
            for order, rule in enumerate(self._rules):
                target = rule.target
                # Keyed by the service key, else "namespace." (no service key ends with a
                # dot), else None for the whole mesh.
                key = (
                    target.service
                    if target.service is not None
                    else None
                    if target.namespace is None
                    else f"{target.namespace}."
                )
                index.setdefault(key, []).append((order, rule))
            self._by_target = index  # built twice at worst by racing threads: same content
        namespace = service_key.split(".", 1)[1]
        found = [
            *index.get(None, ()),
            *index.get(f"{namespace}.", ()),
            *index.get(service_key, ()),
        ]
        found.sort(key=lambda entry: entry[0])
        return [rule for _, rule in found]


class Router:
    """Answers, for one snapshot: which service is this host, which route and split apply to
    this request, and what merged policy holds for (service, route)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.services = snapshot.services
        self._hosts: dict[tuple[str, str], ServiceDef | None] = {}
        self._policies: dict[tuple[str, str | None], EffectivePolicy] = {}
        self._faults: dict[tuple[str, str | None], tuple[FaultRule, ...]] = {}
        #: TrafficPolicies and FaultInjections by what their target names (on first use).
        self._policy_index = _TargetIndex(snapshot.traffic_policies)
        self._fault_index = _TargetIndex(snapshot.faults)
        self._routes = self._index_routes(snapshot)
        #: Gateway API HTTPRoutes attached to services (mesh mode); None when there are none,
        #: so a call's only cost without them is one ``is None``.
        self.http: RouteIndex | None = RouteIndex(snapshot) if snapshot.http_routes else None
        self._mirrors: dict[str, tuple[MirrorRule, ...]] = {}
        #: Per-snapshot memo for values callers derive from this router (the call sequence
        #: keeps its per-(service, route) plans here, so they die with the snapshot).
        self.derived: dict[Any, Any] = {}
        for mirror in snapshot.mirrors:
            self._mirrors[mirror.service] = (*self._mirrors.get(mirror.service, ()), mirror)

    # -- discovery ------------------------------------------------------------------------------

    def resolve(self, host: str, namespace: str) -> ServiceDef | None:
        """The mesh service a host name refers to, or None for hosts outside the mesh.

        ``reviews`` (caller's namespace), ``reviews.shop`` and ``reviews.shop.svc.cluster.local``
        all resolve; the result is cached per (host, namespace).
        """
        key = (host, namespace)
        try:
            return self._hosts[key]
        except KeyError:
            pass
        name = host.lower().rstrip(".")
        for suffix in _CLUSTER_SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        if "." in name:
            service = self.services.get(name)
        else:
            service = self.services.get(f"{name}.{namespace}")
        if len(self._hosts) < 10_000:  # bounded: arbitrary host names must not grow memory
            self._hosts[key] = service
        return service

    # -- routing --------------------------------------------------------------------------------

    @staticmethod
    def _index_routes(
        snapshot: Snapshot,
    ) -> dict[str, tuple[tuple[HTTPMatch, Split | None], ...]]:
        """For each service, the ordered (match, split) pairs that can apply to it.

        Candidate routes come from the service's split ``matches`` and from policy targets
        naming (service, route). The split's matches come first, in manifest order.
        """
        by_name: dict[tuple[str, str], HTTPMatch] = {}  # (namespace, match name) -> match
        for group in snapshot.route_groups.values():
            for m in group.matches:
                by_name.setdefault((group.namespace, m.name), m)
        out: dict[str, list[tuple[HTTPMatch, Split | None]]] = {}
        for root, split in snapshot.splits.items():
            for ref in split.matches:
                ref_group = snapshot.route_groups.get(ref.group)
                if ref_group is None:
                    continue
                for m in ref_group.matches:
                    if not ref.names or m.name in ref.names:
                        out.setdefault(root, []).append((m, split))
        targets: list[PolicyTarget] = [p.target for p in snapshot.traffic_policies]
        targets += [f.target for f in snapshot.faults]
        for target in targets:
            if target.service is None or target.route is None:
                continue
            namespace = target.service.split(".", 1)[1]
            match = by_name.get((namespace, target.route))
            if match is None:
                continue
            entries = out.setdefault(target.service, [])
            if all(existing.name != match.name for existing, _ in entries):
                entries.append((match, None))
        return {k: tuple(v) for k, v in out.items()}

    def route(
        self, service: ServiceDef, method: str, path: str, headers: Mapping[str, str]
    ) -> RouteMatch:
        """The first route matching the request, and the split to use.

        A split with ``matches`` applies only to requests matching one of them; a split
        without ``matches`` applies to every request of its root service.
        """
        key = service.key
        split = self.snapshot.splits.get(key)
        for match, match_split in self._routes.get(key, ()):
            if match_http(match, method, path, headers):
                if match_split is None and split is not None and not split.matches:
                    match_split = split
                return RouteMatch(match.name, match_split)
        if split is not None and not split.matches:
            return RouteMatch(None, split)
        return _NO_ROUTE

    def route_for(
        self, service: ServiceDef, method: str, request: _HasURL, headers: Mapping[str, str]
    ) -> RouteMatch:
        """:meth:`route` for a request, skipping the path decode for services that have no
        route to match (the common case): their answer is the same for every request."""
        if service.key in self._routes:
            return self.route(service, method, request.url.path, headers)
        split = self.snapshot.splits.get(service.key)
        return _NO_ROUTE if split is None else RouteMatch(None, split)

    def has_routes(self, service_key: str) -> bool:
        return service_key in self._routes

    # -- policy ---------------------------------------------------------------------------------

    def policy(self, service_key: str, route: str | None) -> EffectivePolicy:
        """The merged resilience policy for (service, route): most specific scope wins,
        field by field; cached."""
        key = (service_key, route)
        cached = self._policies.get(key)
        if cached is None:
            cached = self._policies[key] = self._merge(service_key, route)
        return cached

    def _applies(self, target: PolicyTarget, service_key: str, route: str | None) -> str | None:
        scope = target.scope
        if scope == "mesh":
            return scope
        if scope == "namespace":
            return scope if service_key.split(".", 1)[1] == target.namespace else None
        if target.service != service_key:
            return None
        if scope == "service":
            return scope
        return scope if route is not None and target.route == route else None

    def _merge(self, service_key: str, route: str | None) -> EffectivePolicy:
        chosen: dict[str, tuple[int, Any, str]] = {}  # field -> (rank, value, source)
        for doc in self._policy_index.candidates(service_key):
            scope = self._applies(doc.target, service_key, route)
            if scope is None:
                continue
            rank = _SCOPE_ORDER.index(scope)
            for fname, value in doc.fields.items():
                current = chosen.get(fname)
                if current is None or rank < current[0]:
                    chosen[fname] = (rank, value, f"{scope}:{doc.namespace}/{doc.name}")
        mesh_mtls = self.snapshot.mesh.mtls  # mesh-wide mTLS is Mesh.spec.mtls, not a policy
        if "mtls" not in chosen and mesh_mtls is not MTLSMode.DISABLE:
            chosen["mtls"] = (len(_SCOPE_ORDER), mesh_mtls, "mesh:Mesh.spec.mtls")
        policy = EffectivePolicy()
        sources: dict[str, str] = {}
        for fname, (_, value, source) in sorted(chosen.items()):
            policy = _set_field(policy, fname.split("."), value)
            sources[fname] = source
        return dataclasses.replace(policy, sources=sources)

    def faults(self, service_key: str, route: str | None) -> tuple[FaultRule, ...]:
        """Fault rules that apply to calls to (service, route)."""
        key = (service_key, route)
        cached = self._faults.get(key)
        if cached is None:
            cached = tuple(
                f
                for f in self._fault_index.candidates(service_key)
                if self._applies(f.target, service_key, route) is not None
            )
            self._faults[key] = cached
        return cached

    def mirrors(self, service_key: str) -> tuple[MirrorRule, ...]:
        return self._mirrors.get(service_key, ())


def _set_field(obj: Any, path: list[str], value: Any) -> Any:
    """Return a copy of the frozen dataclass ``obj`` with the dotted field ``path`` set."""
    head = path[0]
    if len(path) == 1:
        return dataclasses.replace(obj, **{head: value})
    return dataclasses.replace(obj, **{head: _set_field(getattr(obj, head), path[1:], value)})
