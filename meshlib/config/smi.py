"""Builders for the SMI kinds (TrafficSplit, HTTPRouteGroup, TCPRoute, UDPRoute, TrafficTarget),
every published version, into the validated model.
"""

from __future__ import annotations

import logging

from meshlib.config.documents import DocContext, as_int, as_str, at, maps
from meshlib.config.fragments import MAX_WEIGHT
from meshlib.config.model import Pattern
from meshlib.config.smimodel import (
    HTTPMatch,
    RouteGroup,
    Split,
    SplitBackend,
    SplitMatchRef,
    TCPRoute,
    TrafficTarget,
    TrafficTargetRule,
    UDPRoute,
)
from meshlib.config.values import compile_regex, parse_quantity_milli, shown
from meshlib.config.yamlsafe import YMap, YSeq

log = logging.getLogger("meshlib.config")


def build_split(ctx: DocContext) -> Split | None:
    spec, _ = at(ctx.doc, "spec")
    if not isinstance(spec, YMap):
        return None
    root_ref, root_line = at(spec, "service")
    root = ctx.service(root_ref, "spec.service", root_line)
    raw_backends, backends_line = at(spec, "backends")
    backends: list[SplitBackend] = []
    seen: dict[str, int] = {}
    for i, item, line in maps(raw_backends):
        path = f"spec.backends[{i}]"
        key = ctx.service(item.get("service"), f"{path}.service", item.line_of("service"))
        weight = _weight(ctx, item.get("weight"), f"{path}.weight", item.line_of("weight"))
        if key is None or weight is None:
            continue
        if key == root:
            ctx.error(
                f"{path}.service",
                item.line_of("service"),
                f"backend {key} is the split's own root service; a split may not reference "
                "itself (send traffic to a versioned service instead)",
            )
            continue
        if key in seen:
            ctx.error(
                f"{path}.service",
                line,
                f"backend {key} is listed twice (also spec.backends[{seen[key]}])",
            )
            continue
        seen[key] = i
        backends.append(SplitBackend(key, weight))
    if backends and all(b.weight == 0 for b in backends):
        ctx.error(
            "spec.backends",
            backends_line,
            "all weights are zero: the split would send traffic nowhere",
        )
        return None
    total = sum(b.weight for b in backends)
    if backends and total not in (100, 1000):
        # Weights are relative (SMI); a sum like 60 is legal and means 50/50 for 30/30.
        log.info(
            "%s: TrafficSplit %s weights sum to %d; they are relative", ctx.file, ctx.name, total
        )
    matches: list[SplitMatchRef] = []
    raw_matches, matches_line = at(spec, "matches")
    if raw_matches is not None and ctx.version < 3:
        ctx.error(
            "spec.matches",
            matches_line,
            f"matches needs split.smi-spec.io/v1alpha3 or later (this is {ctx.api})",
        )
    for _, item, _ in maps(raw_matches):
        name = as_str(item.get("name"))
        if name is not None:
            matches.append(SplitMatchRef(group=f"{name}.{ctx.namespace}"))
    if root is None or not backends:
        return None
    return Split(ctx.name, ctx.namespace, root, tuple(backends), tuple(matches), ctx.origin)


def _weight(ctx: DocContext, value: object, path: str, line: int) -> int | None:
    if ctx.version == 1:
        if isinstance(value, bool) or (
            isinstance(value, (int, float)) and not 0 <= value <= MAX_WEIGHT  # NaN too
        ):
            return None  # reported by the structural check
        try:
            milli = parse_quantity_milli(value)
        except ValueError as exc:
            if isinstance(value, (int, float, str)):
                ctx.error(path, line, str(exc))
            return None
        if milli > MAX_WEIGHT:
            ctx.error(
                path, line, f"weight {shown(value)} is too large (at most {MAX_WEIGHT} milli-units)"
            )
            return None
        return milli
    weight = as_int(value)
    if weight is None or not 0 <= weight <= MAX_WEIGHT:
        return None  # reported by the structural check (negative, fractional, overflow)
    return weight


def build_route_group(ctx: DocContext) -> RouteGroup | None:
    raw, _ = at(ctx.doc, "matches" if ctx.version <= 2 else "spec.matches")
    base = "matches" if ctx.version <= 2 else "spec.matches"
    matches: list[HTTPMatch] = []
    names: dict[str, int] = {}
    for i, item, _ in maps(raw):
        path = f"{base}[{i}]"
        name = as_str(item.get("name"))
        if name is None:
            continue
        if name in names:
            ctx.error(
                f"{path}.name",
                item.line_of("name"),
                f"duplicate route name {shown(name)} (also {base}[{names[name]}]); route names are "
                "policy targets and must be unique",
            )
            continue
        names[name] = i
        match = _http_match(ctx, item, name, path)
        if match is not None:
            matches.append(match)
    return RouteGroup(ctx.name, ctx.namespace, tuple(matches), ctx.origin)


def _http_match(ctx: DocContext, item: YMap, name: str, path: str) -> HTTPMatch | None:
    ok = True
    path_regex: Pattern | None = None
    raw_regex = item.get("pathRegex")
    if isinstance(raw_regex, str):
        try:
            path_regex = compile_regex(raw_regex, anchored=True)
        except ValueError as exc:
            ctx.error(f"{path}.pathRegex", item.line_of("pathRegex"), str(exc))
            ok = False
    methods: frozenset[str] | None = None
    raw_methods = item.get("methods")
    if isinstance(raw_methods, YSeq):
        upper = {m.strip().upper() for m in raw_methods if isinstance(m, str)}
        methods = None if "*" in upper else frozenset(upper)
        for j, m in enumerate(raw_methods):
            if isinstance(m, str) and m != "*" and not m.strip().isalpha():
                ctx.error(
                    f"{path}.methods[{j}]",
                    raw_methods.line_of(j),
                    f"{shown(m)} is not an HTTP method",
                )
                ok = False
    headers: list[tuple[str, Pattern]] = []
    raw_headers = item.get("headers")
    entries: list[tuple[str, object, int, str]] = []
    if isinstance(raw_headers, YMap):
        for k, v in raw_headers.items():
            entries.append((k, v, raw_headers.line_of(k), f"{path}.headers.{k}"))
    elif isinstance(raw_headers, YSeq):
        for j, entry in enumerate(raw_headers):
            if isinstance(entry, YMap):
                for k, v in entry.items():
                    entries.append((k, v, entry.line_of(k), f"{path}.headers[{j}].{k}"))
    seen_headers: set[str] = set()
    for header, value, line, hpath in entries:
        if not isinstance(value, str):
            continue
        lower = header.lower()
        if lower in seen_headers:
            ctx.error(hpath, line, f"header {shown(header)} is matched twice")
            ok = False
            continue
        seen_headers.add(lower)
        try:
            headers.append((lower, compile_regex(value)))
        except ValueError as exc:
            ctx.error(hpath, line, str(exc))
            ok = False
    if not ok:
        return None
    return HTTPMatch(name, path_regex, methods, tuple(headers))


def build_tcp_route(ctx: DocContext) -> TCPRoute:
    return TCPRoute(ctx.name, ctx.namespace, _ports(ctx), ctx.origin)


def build_udp_route(ctx: DocContext) -> UDPRoute:
    return UDPRoute(ctx.name, ctx.namespace, _ports(ctx), ctx.origin)


def _ports(ctx: DocContext) -> tuple[int, ...]:
    """``spec.matches.ports`` (v1alpha4); empty means every port of the service."""
    ports, _ = at(ctx.doc, "spec.matches.ports")
    return tuple(p for p in ports if as_int(p) is not None) if isinstance(ports, YSeq) else ()


def build_traffic_target(ctx: DocContext) -> TrafficTarget | None:
    body = ctx.doc if ctx.version == 1 else ctx.doc.get("spec")
    if not isinstance(body, YMap):
        return None
    dest = body.get("destination")
    if not isinstance(dest, YMap) or as_str(dest.get("name")) is None:
        return None
    destination = (str(dest["name"]), as_str(dest.get("namespace")) or ctx.namespace)
    sources = tuple(
        (str(s["name"]), as_str(s.get("namespace")) or ctx.namespace)
        for _, s, _ in maps(body.get("sources"))
        if as_str(s.get("name")) is not None
    )
    rules_key = "specs" if ctx.version == 1 else "rules"
    rules: list[TrafficTargetRule] = []
    for _, rule, _ in maps(body.get(rules_key)):
        kind, name = as_str(rule.get("kind")), as_str(rule.get("name"))
        if kind is None or name is None:
            continue
        raw = rule.get("matches")
        names = tuple(m for m in raw if isinstance(m, str)) if isinstance(raw, YSeq) else ()
        rules.append(TrafficTargetRule(kind, name, names))
    return TrafficTarget(ctx.name, ctx.namespace, destination, sources, tuple(rules), ctx.origin)
