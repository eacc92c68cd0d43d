"""Checks across documents: names that must exist, must be unique, or must not chain (CFG-8).

Nothing that points nowhere is accepted: a dangling reference would silently black-hole
traffic, so it is a load error instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshlib.config.documents import DocContext, as_str, at, maps
from meshlib.config.model import (
    FaultRule,
    MeshSettings,
    MirrorRule,
    PolicyTarget,
    RequestMirror,
    ServiceDef,
    Snapshot,
    TrafficPolicyDoc,
)
from meshlib.config.schema import POLICY_FIELDS
from meshlib.config.values import service_key, shown
from meshlib.errors import Problem

if TYPE_CHECKING:
    from meshlib.config.authnmodel import RequestAuthentication
    from meshlib.config.authzmodel import AuthorizationPolicy
    from meshlib.config.routemodel import BackendRef, HTTPRoute, HTTPRouteFilter
    from meshlib.config.smimodel import RouteGroup, Split, TCPRoute, TrafficTarget, UDPRoute

_YAML_PATH = {pf.model_name: pf.yaml_path for pf in POLICY_FIELDS}
_YAML_PATH["rate_limit"] = "rateLimit"


@dataclass
class Parsed:
    """Every document's model object next to its context, before cross-checks."""

    contexts: list[DocContext] = field(default_factory=list)
    meshes: list[tuple[MeshSettings, DocContext]] = field(default_factory=list)
    services: list[tuple[ServiceDef, DocContext]] = field(default_factory=list)
    route_groups: list[tuple[RouteGroup, DocContext]] = field(default_factory=list)
    tcp_routes: list[tuple[TCPRoute, DocContext]] = field(default_factory=list)
    udp_routes: list[tuple[UDPRoute, DocContext]] = field(default_factory=list)
    splits: list[tuple[Split, DocContext]] = field(default_factory=list)
    policies: list[tuple[TrafficPolicyDoc, DocContext]] = field(default_factory=list)
    faults: list[tuple[FaultRule, DocContext]] = field(default_factory=list)
    mirrors: list[tuple[MirrorRule, DocContext]] = field(default_factory=list)
    targets: list[tuple[TrafficTarget, DocContext]] = field(default_factory=list)
    authz_policies: list[tuple[AuthorizationPolicy, DocContext]] = field(default_factory=list)
    request_authentications: list[tuple[RequestAuthentication, DocContext]] = field(
        default_factory=list
    )
    http_routes: list[tuple[HTTPRoute, DocContext]] = field(default_factory=list)


def where(ctx: DocContext) -> str:
    return f"{ctx.kind} {shown(ctx.name)} (document {ctx.index}, {ctx.file}:{ctx.line})"


def check_references(p: Parsed) -> None:
    """Report every cross-document problem into the documents' contexts."""
    _unique_names(p.contexts)
    for _, ctx in p.meshes[1:]:
        ctx.error(
            "kind", ctx.line, f"only one Mesh document is allowed; first: {where(p.meshes[0][1])}"
        )
    services = {s.key for s, _ in p.services}
    routes = _route_names(p.route_groups)
    groups = {f"{g.name}.{g.namespace}": g for g, _ in p.route_groups}
    _splits(p.splits, services, groups)
    labels = _http_routes(p.http_routes, services, {s.root: c for s, c in p.splits})
    for policy, ctx in p.policies:
        _target_exists(ctx, policy.target, services, routes, labels)
    _conflicts(p.policies)
    for fault, ctx in p.faults:
        _target_exists(ctx, fault.target, services, routes, labels)
    for mirror, ctx in p.mirrors:
        for attr in ("service", "mirror"):
            key = getattr(mirror, attr)
            if key not in services:
                ctx.error(f"spec.{attr}", at(ctx.doc, f"spec.{attr}")[1], _no_service(key))
    # Connection-level routes, by kind: a TrafficTarget rule names them without matches.
    l4_routes = {
        "TCPRoute": {f"{t.name}.{t.namespace}" for t, _ in p.tcp_routes},
        "UDPRoute": {f"{u.name}.{u.namespace}" for u, _ in p.udp_routes},
    }
    for target, ctx in p.targets:
        _traffic_target(ctx, target, groups, l4_routes, p.services)
    scoped: list[tuple[AuthorizationPolicy | RequestAuthentication, DocContext]] = [
        *p.authz_policies,
        *p.request_authentications,
    ]
    for authz, ctx in scoped:
        if authz.service is not None and authz.service not in services:
            ctx.error(
                "spec.target.service",
                at(ctx.doc, "spec.target.service")[1],
                _no_service(authz.service),
            )


def _no_service(key: str) -> str:
    name, ns = key.split(".", 1)
    return (
        f"service {shown(name)} is not declared in namespace {shown(ns)} (add a Service document)"
    )


def _unique_names(contexts: Iterable[DocContext]) -> None:
    first: dict[tuple[str, str, str], DocContext] = {}
    for ctx in contexts:
        if not ctx.name:
            continue
        key = (ctx.kind, ctx.namespace, ctx.name)
        if key in first:
            ctx.error(
                "metadata.name",
                at(ctx.doc, "metadata.name")[1],
                f"duplicate {ctx.kind} {shown(ctx.name)} in namespace {shown(ctx.namespace)}; "
                f"first: {where(first[key])}",
            )
        else:
            first[key] = ctx


def _route_names(groups: list[tuple[RouteGroup, DocContext]]) -> dict[str, set[str]]:
    """Namespace → match names; a name used in two groups of one namespace is an error."""
    owner: dict[tuple[str, str], DocContext] = {}
    names: dict[str, set[str]] = {}
    for group, ctx in groups:
        base = "matches" if ctx.version <= 2 else "spec.matches"
        for i, item, _ in maps(at(ctx.doc, base)[0]):
            name = item.get("name")
            if not isinstance(name, str):
                continue
            key = (group.namespace, name)
            prior = owner.get(key)
            if prior is not None and prior is not ctx:
                ctx.error(
                    f"{base}[{i}].name",
                    item.line_of("name"),
                    f"route name {shown(name)} is already used in namespace "
                    f"{shown(group.namespace)} by "
                    f"{where(prior)}; route names must be unique per namespace",
                )
            owner.setdefault(key, ctx)
            names.setdefault(group.namespace, set()).add(name)
    return names


def _backend_item(ctx: DocContext, key: str) -> tuple[str, int]:
    for i, item, _ in maps(at(ctx.doc, "spec.backends")[0]):
        ref = item.get("service")
        try:
            if isinstance(ref, str) and service_key(ref, ctx.namespace) == key:
                return f"spec.backends[{i}].service", item.line_of("service")
        except ValueError:
            continue
    return "spec.backends", at(ctx.doc, "spec.backends")[1]  # pragma: no cover


def _splits(
    splits: list[tuple[Split, DocContext]], services: set[str], groups: dict[str, RouteGroup]
) -> None:
    roots: dict[str, DocContext] = {}
    for split, ctx in splits:
        if split.root in roots:
            ctx.error(
                "spec.service",
                at(ctx.doc, "spec.service")[1],
                f"{split.root} already has a TrafficSplit: {where(roots[split.root])}; "
                "merge them into one",
            )
        roots.setdefault(split.root, ctx)
    for split, ctx in splits:
        if split.root not in services:
            ctx.error("spec.service", at(ctx.doc, "spec.service")[1], _no_service(split.root))
        for backend in split.backends:
            path, line = _backend_item(ctx, backend.service)
            if backend.service not in services:
                ctx.error(path, line, _no_service(backend.service))
            other = roots.get(backend.service)
            if other is not None:
                ctx.error(
                    path,
                    line,
                    f"backend {backend.service} is itself split by {where(other)}; "
                    "splits may not chain (SMI splits are not hierarchical)",
                )
        for i, ref in enumerate(split.matches):
            if ref.group not in groups:
                name, ns = ref.group.split(".", 1)
                ctx.error(
                    f"spec.matches[{i}].name",
                    maps(at(ctx.doc, "spec.matches")[0])[i][2],
                    f"HTTPRouteGroup {shown(name)} does not exist in namespace {shown(ns)}",
                )


def _target_exists(
    ctx: DocContext,
    target: PolicyTarget,
    services: set[str],
    routes: dict[str, set[str]],
    labels: Mapping[str, set[str]],
) -> None:
    if target.service is None:
        return
    if target.service not in services:
        ctx.error(
            "spec.target.service",
            at(ctx.doc, "spec.target.service")[1],
            _no_service(target.service),
        )
        return
    ns = target.service.split(".", 1)[1]
    route = target.route
    if route is None or route in routes.get(ns, set()):
        return
    if route in labels.get(target.service, set()):
        return
    ctx.error(
        "spec.target.route",
        at(ctx.doc, "spec.target.route")[1],
        f"no HTTPRouteGroup in namespace {shown(ns)} has a match named {shown(route)}, and no "
        f"HTTPRoute attached to {target.service} has a rule named so (a rule's route name is "
        "its name, else its HTTPRoute's name)",
    )


def _http_routes(
    routes: list[tuple[HTTPRoute, DocContext]],
    services: set[str],
    split_roots: Mapping[str, DocContext],
) -> dict[str, set[str]]:
    """Check HTTPRoutes against the services; return service key → the route labels that
    TrafficPolicy/FaultInjection targets may name for it.

    A mesh parent must be a declared Service (a route attached to nothing would be silently
    lost). A backend that cannot be sent to is only a warning: the spec answers its share of
    the requests with 500, and a route may legitimately point at a Service not deployed yet.
    """
    labels: dict[str, set[str]] = {}
    for route, ctx in routes:
        # A built route kept every item of its lists (any bad one fails the whole route), so
        # the model's indices are the manifest's.
        parent_items = maps(at(ctx.doc, "spec.parentRefs")[0])
        for (i, item, _), parent in zip(parent_items, route.parent_refs, strict=True):
            if parent.kind != "Service":
                continue
            key = f"{parent.name}.{parent.namespace}"
            path, line = f"spec.parentRefs[{i}].name", item.line_of("name")
            if key not in services:
                ctx.error(path, line, _no_service(key))
                continue
            if key in split_roots:
                ctx.error(
                    path,
                    line,
                    f"{key} is also the root of {where(split_roots[key])}: route it with either "
                    "the HTTPRoute or the TrafficSplit (an HTTPRoute's backendRefs weights are "
                    "its split)",
                )
            labels.setdefault(key, set()).update(route.label(rule) for rule in route.rules)
        rule_items = maps(at(ctx.doc, "spec.rules")[0])
        if not rule_items:
            # No ``rules``: the model holds the spec's default rule, which has no manifest
            # item and no backends to check.
            continue
        for (i, rule_item, _), rule in zip(rule_items, route.rules, strict=True):
            backend_items = maps(rule_item.get("backendRefs"))
            for (j, item, line), ref in zip(backend_items, rule.backend_refs, strict=True):
                path = f"spec.rules[{i}].backendRefs[{j}]"
                _backend_warning(ctx, ref, path, line, services)
                _mirror_warnings(ctx, ref.filters, item, path, services)
            _mirror_warnings(ctx, rule.filters, rule_item, f"spec.rules[{i}]", services)
    return labels


def _mirror_warnings(
    ctx: DocContext,
    filters: Iterable[HTTPRouteFilter],
    owner: Any,
    path: str,
    services: set[str],
) -> None:
    items = maps(owner.get("filters"))
    for (k, _, line), flt in zip(items, filters, strict=True):
        if isinstance(flt.config, RequestMirror):
            where_ = f"{path}.filters[{k}].requestMirror.backendRef"
            _backend_warning(
                ctx, flt.config.backend, where_, line, services, "nothing is mirrored to it"
            )


def _backend_warning(
    ctx: DocContext,
    ref: BackendRef,
    path: str,
    line: int,
    services: set[str],
    consequence: str = "its share of the requests is answered 500",
) -> None:
    if not ref.resolvable:
        ctx.warn(
            path,
            line,
            f"backend {shown(ref.group)}/{shown(ref.kind)} {shown(ref.name)} is not a Service "
            f"with a port the mesh can send to: {consequence}",
        )
        return
    key = f"{ref.name}.{ref.namespace}"
    if key not in services:
        ctx.warn(path, line, f"{_no_service(key)}: {consequence}")


def _conflicts(policies: list[tuple[TrafficPolicyDoc, DocContext]]) -> None:
    setters: dict[tuple[Any, ...], DocContext] = {}
    for policy, ctx in policies:
        t = policy.target
        scope = (t.namespace, t.service, t.route) if t.service else (t.namespace, None, None)
        for name in policy.fields:
            key = (*scope, name)
            prior = setters.get(key)
            if prior is None:
                setters[key] = ctx
                continue
            yaml_path = _YAML_PATH.get(name, name)
            ctx.error(
                f"spec.{yaml_path}",
                at(ctx.doc, f"spec.{yaml_path}")[1],
                f"{yaml_path} is also set for the same {t.scope} target by {where(prior)}; "
                "two policies may not set one field for one target",
            )


def _traffic_target(
    ctx: DocContext,
    target: TrafficTarget,
    groups: dict[str, RouteGroup],
    l4_routes: Mapping[str, set[str]],
    services: list[tuple[ServiceDef, DocContext]],
) -> None:
    base = "specs" if ctx.version == 1 else "spec.rules"
    # The builder kept the rules that have a kind and a name, in order: pair them with their
    # items the same way, so an error names the rule it is about.
    items = [
        (i, item)
        for i, item, _ in maps(at(ctx.doc, base)[0])
        if as_str(item.get("kind")) is not None and as_str(item.get("name")) is not None
    ]
    for (i, item), rule in zip(items, target.rules, strict=True):
        key = f"{rule.name}.{target.namespace}"
        where_ns = f"in namespace {shown(target.namespace)}"
        if rule.kind in l4_routes:
            if key not in l4_routes[rule.kind]:
                ctx.error(
                    f"{base}[{i}].name",
                    item.line_of("name"),
                    f"{rule.kind} {shown(rule.name)} does not exist {where_ns}",
                )
            elif rule.kind == "UDPRoute":
                ctx.warn(
                    f"{base}[{i}]",
                    item.line_of("kind"),
                    f"UDPRoute {shown(rule.name)} admits no request: meshlib enforces HTTP "
                    "traffic only (UDP is for other data planes reading the same manifest)",
                )
            continue
        if rule.kind != "HTTPRouteGroup":
            continue  # a kind this version does not allow: reported by the structural check
        group = groups.get(key)
        if group is None:
            ctx.error(
                f"{base}[{i}].name",
                item.line_of("name"),
                f"HTTPRouteGroup {shown(rule.name)} does not exist {where_ns}",
            )
            continue
        known = {m.name for m in group.matches}
        for j, match in enumerate(rule.matches):
            if match not in known:
                ctx.error(
                    f"{base}[{i}].matches[{j}]",
                    item.line_of("matches"),
                    f"HTTPRouteGroup {shown(rule.name)} has no match named {shown(match)}",
                )
    # Unknown identities cannot widen access (a rule only admits what it names), but they are
    # usually typos, so say so.
    identities = {(s.service_account or s.name, s.namespace) for s, _ in services}
    for who, path in [
        (target.destination, "destination"),
        *((s, "sources") for s in target.sources),
    ]:
        if who not in identities:
            ctx.warn(
                f"{'' if ctx.version == 1 else 'spec.'}{path}",
                ctx.line,
                f"service account {shown(who[0])} in namespace {shown(who[1])} is not used by any "
                "declared Service",
            )


def endpointless_services(snapshot: Snapshot) -> tuple[Problem, ...]:
    """A warning for each Service a call can be routed to that has no endpoints.

    Endpoints come only from the policy file (there is no registry yet), so a call that ends at
    such a service fails at run time with NoHealthyEndpointsError. Only ``meshctl validate``
    asks: a service declared for its identity alone (a pure caller) is legal, and a reload
    should not log about it. The root of a split without matches is skipped: every call to it
    goes to a backend.
    """
    split_away = {root for root, split in snapshot.splits.items() if not split.matches}
    found = []
    for key, service in snapshot.services.items():
        if service.endpoints or key in split_away:
            continue
        origin = service.origin
        found.append(
            Problem(
                origin.file if origin else snapshot.source,
                origin.line if origin else 0,
                origin.document if origin else 0,
                "spec.endpoints",
                f"Service {shown(service.name)} in namespace {shown(service.namespace)} has no "
                "endpoints: a call routed to it fails with NoHealthyEndpointsError (list its "
                "endpoints, or ignore this if the service only makes calls)",
            )
        )
    return tuple(found)
