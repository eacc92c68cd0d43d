"""What ``meshctl explain`` shows for a service with Gateway API HTTPRoutes: which routes attach
to the call (and why the others do not), the candidates tried in precedence order and why each
failed, the winning rule, its backends and shares, what its filters do, and its timeouts.

Every verdict comes from :mod:`meshlib.policy.routes` (the same table, ``select``, ``pick``
arithmetic, ``request_edit`` and ``redirect_location`` a call uses); this module only puts
them into words. The per-criterion reasons are asked of the same ``Candidate.accepts`` with one
criterion at a time, so an explanation cannot disagree with the routing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from meshlib.config.model import HeaderModifier, RequestMirror
from meshlib.config.routemodel import HTTPRoute, RouteMatch
from meshlib.config.values import format_duration
from meshlib.policy.routes import (
    Backend,
    Candidate,
    RouteTable,
    Rule,
    edit_headers,
    query_params,
    redirect_location,
    request_edit,
    response_modifiers,
)
from meshlib.policy.routing import Router

#: The scheme explain assumes for the dialled URL (``--port`` says which port).
_SCHEME = "http"
_DEFAULT_PORT = 80


@dataclass(frozen=True)
class Request:
    """The request explained, as a call would see it: ``path`` without the query, ``query`` raw,
    header names lower-case; ``host`` and ``port`` as the caller dialled them."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    host: str
    port: int

    @property
    def authority(self) -> str:
        """The Host header httpx sends for the dialled URL."""
        return self.host if self.port == _DEFAULT_PORT else f"{self.host}:{self.port}"

    def params(self) -> Mapping[str, str]:
        return query_params(self.query)


@dataclass(frozen=True)
class Explanation:
    """The ``http`` section of the explain document, and what the rest of the document needs:
    the winning rule (None: no rule matched, or no route attaches) and whether any request is
    forwarded (False when the mesh answers every such request itself: 404, a redirect, 500)."""

    document: dict[str, Any]
    rule: Rule | None
    forwards: bool

    @property
    def attached(self) -> bool:
        return bool(self.document["attached"])


def explain(
    router: Router, service_key: str, caller_namespace: str, request: Request
) -> Explanation | None:
    """The HTTPRoute part of an explanation, or None when no HTTPRoute names the service."""
    index = router.http
    if index is None or service_key not in index:
        return None
    table = index.table(service_key, caller_namespace, request.port)
    routes = [r for r in router.snapshot.http_routes if service_key in r.services()]
    attached = table.routes if table is not None else ()
    consumers = {r.namespace for r in attached} - {service_key.split(".", 1)[1]}
    document: dict[str, Any] = {
        "caller_namespace": caller_namespace,
        "port": request.port,
        "attached": [_route_doc(r, service_key, None) for r in attached],
        "not_attached": [
            _route_doc(
                r, service_key, _why_not(r, service_key, caller_namespace, request, consumers)
            )
            for r in routes
            if all(r is not a for a in attached)
        ],
        "outcome": "not_attached",
        "status": None,
        "tried": [],
        "not_tried": 0,
        "rule": None,
        "redirect": None,
        "backends": [],
        "invalid_share": 0.0,
        "mirrors": [],
        "timeouts": None,
    }
    if table is None:
        return Explanation(document, None, forwards=True)
    winner = _tried(table, request, document)
    if winner is None:
        document.update(outcome="no_route", status=404)
        return Explanation(document, None, forwards=False)
    rule = winner.rule
    document["rule"] = {"where": rule.where, "match": winner.why(), "route": rule.label}
    timeouts = rule.rule.timeouts
    document["timeouts"] = {
        "request": _duration(timeouts.request),
        "backendRequest": _duration(timeouts.backend_request),
    }
    if rule.redirect is not None:
        location = redirect_location(
            rule.redirect,
            winner.match,
            _SCHEME,
            request.host,
            request.port,
            request.path,
            request.query,
        )
        document.update(
            outcome="redirect",
            status=rule.redirect.status_code,
            redirect={"status": rule.redirect.status_code, "location": location},
        )
        return Explanation(document, rule, forwards=False)
    document["mirrors"] = [_mirror(router, m) for m in rule.mirrors(None)]
    total = rule.total_weight
    invalid = 0
    for backend in rule.backends:
        share = 100.0 * backend.weight / total if total > 0 else 0.0
        if backend.service is None and backend.weight > 0:
            invalid += backend.weight
        document["backends"].append(_backend_doc(router, winner, backend, share, request))
    forwards = total > invalid
    document["invalid_share"] = round(100.0 * invalid / total, 3) if total > 0 else 100.0
    document["outcome"] = "forward" if forwards else "invalid_backend"
    document["status"] = None if forwards else 500
    return Explanation(document, rule, forwards)


# --- the parts of the document -------------------------------------------------------------------


def _route_doc(route: HTTPRoute, service_key: str, why_not: str | None) -> dict[str, Any]:
    role = "producer" if route.namespace == service_key.split(".", 1)[1] else "consumer"
    doc: dict[str, Any] = {
        "name": f"{route.namespace}/{route.name}",
        "role": role,
        "source": f"{route.origin.file}:{route.origin.line}",
    }
    if why_not is not None:
        doc["reason"] = why_not
    return doc


def _why_not(
    route: HTTPRoute, service_key: str, caller: str, request: Request, consumers: set[str]
) -> str:
    """Why a route naming the service does not apply to this call (GAMMA's rules, in the order
    RouteIndex applies them)."""
    parents = [
        p
        for p in route.parent_refs
        if p.kind == "Service" and f"{p.name}.{p.namespace}" == service_key
    ]
    if all(p.port is not None and p.port != request.port for p in parents):
        ports = ", ".join(sorted({str(p.port) for p in parents}))
        return f"its parentRef names port {ports}; the call dials port {request.port}"
    if route.namespace != service_key.split(".", 1)[1] and route.namespace != caller:
        return (
            f"a consumer route: it applies only to callers in namespace {route.namespace}, "
            f"the caller is in {caller}"
        )
    if consumers:
        return (
            f"a producer route, replaced for callers in namespace {caller} by their own "
            "consumer route(s)"
        )
    return "not attached"  # unreachable while RouteIndex's rules are the ones above


def _tried(table: RouteTable, request: Request, document: dict[str, Any]) -> Candidate | None:
    """Fill ``tried`` (each candidate before the winner, with why it failed, then the winner)
    and ``not_tried``; return the winner ``select`` answers."""
    winner = table.select(request.method, request.path, request.query, request.headers)
    tried = document["tried"]
    for n, candidate in enumerate(table.candidates):
        won = candidate is winner
        failed = [] if won else _failures(candidate, request)
        tried.append({"match": candidate.why(), "route": candidate.rule.label, "failed": failed})
        if won:
            document["not_tried"] = len(table.candidates) - n - 1
            break
    return winner


def _failures(candidate: Candidate, request: Request) -> list[str]:
    """Each criterion of the match the request fails, asked one at a time of ``accepts``."""
    m = candidate.match
    params = request.params()
    out: list[str] = []

    def fails(match: RouteMatch) -> bool:
        one = Candidate(candidate.rule, match, candidate.match_index)
        return not one.accepts(request.method, request.path, lambda: params, request.headers)

    if fails(RouteMatch(path=m.path)):
        out.append(f"path {m.path.type.value} {m.path.value!r} (request {request.path!r})")
    if m.method is not None and fails(RouteMatch(method=m.method)):
        out.append(f"method {m.method} (request {request.method})")
    for h in m.headers:
        if fails(RouteMatch(headers=(h,))):
            got = request.headers.get(h.name)
            out.append(f"header {h.name} {h.type.value} {h.value!r} (request {_got(got)})")
    for q in m.query_params:
        if fails(RouteMatch(query_params=(q,))):
            out.append(
                f"query {q.name} {q.type.value} {q.value!r} (request {_got(params.get(q.name))})"
            )
    return out


def _got(value: str | None) -> str:
    return "has none" if value is None else repr(value)


def _backend_doc(
    router: Router, winner: Candidate, backend: Backend, share: float, request: Request
) -> dict[str, Any]:
    ref = backend.ref
    problem: str | None = None
    if backend.service is None:
        what = "a core Service with a port" if not ref.resolvable else "a declared mesh Service"
        problem = f"not {what}: its share is answered 500 invalid_backend"
    edit = request_edit(winner, backend, request.path)
    path = edit.path if edit.path is not None else request.path
    pairs = edit_headers(sorted(request.headers.items()), edit.headers)
    return {
        "backend": f"{ref.name}.{ref.namespace}",
        "port": ref.port,
        "service": backend.service,
        "weight": backend.weight,
        "share": round(share, 3),
        "problem": problem,
        "request": {
            "path": path + (f"?{request.query}" if request.query else ""),
            "host": edit.host if edit.host is not None else request.authority,
            "headers": [[n, v] for n, v in pairs],
        },
        "response_headers": [_modifier(m) for m in response_modifiers(winner, backend)],
        "mirrors": [
            _mirror(router, f.config)
            for f in backend.filters
            if isinstance(f.config, RequestMirror)
        ],
    }


def _mirror(router: Router, mirror: RequestMirror) -> dict[str, Any]:
    """A RequestMirror; ``service`` None when the mesh cannot send to it (no copy is sent)."""
    ref = mirror.backend
    port = f":{ref.port}" if ref.port is not None else ""
    key = f"{ref.name}.{ref.namespace}"
    return {
        "backend": f"{ref.name}.{ref.namespace}{port}",
        "service": key if ref.resolvable and key in router.services else None,
        "percent": mirror.percent,
    }


def _modifier(m: HeaderModifier) -> dict[str, Any]:
    return {
        "set": [list(p) for p in m.set],
        "add": [list(p) for p in m.add],
        "remove": list(m.remove),
    }


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return "0s (disabled)" if seconds == 0 else format_duration(seconds)


# --- the text ------------------------------------------------------------------------------------


def write(out: TextIO, http: Mapping[str, Any], endpoints: Sequence[Sequence[Any]]) -> None:
    """The HTTPRoute lines of ``explain``'s text, written from the document's ``http``;
    ``endpoints``: each backend's static endpoints (the document's ``backends``)."""
    w = out.write
    w(f"httproutes: (caller namespace {http['caller_namespace']}, port {http['port']})\n")
    for r in http["attached"]:
        w(f"  attached:     HTTPRoute {r['name']} ({r['role']})  {r['source']}\n")
    for r in http["not_attached"]:
        w(f"  not attached: HTTPRoute {r['name']} ({r['role']}): {r['reason']}\n")
    if http["outcome"] == "not_attached":
        w("  none attaches: the call is routed as without HTTPRoutes\n")
        return
    w("tried:    (precedence order)\n")
    for n, c in enumerate(http["tried"], 1):
        w(f"  {n}. {c['match']}\n")
        if c["failed"]:
            w(f"       no: {'; '.join(c['failed'])}\n")
        else:
            w("       matched\n")
    if http["not_tried"]:
        w(f"  ({http['not_tried']} lower-precedence candidate(s) not tried)\n")
    if http["outcome"] == "no_route":
        w("result:   404 no_route (no candidate matches; the mesh answers itself)\n")
        return
    rule = http["rule"]
    w(f"rule:     {rule['where']}\n")
    timeouts = http["timeouts"]
    w(
        f"timeouts: request {timeouts['request'] or '(not set)'}, "
        f"backendRequest {timeouts['backendRequest'] or '(not set)'}\n"
    )
    if http["outcome"] == "redirect":
        redirect = http["redirect"]
        w(f"result:   {redirect['status']} redirect, Location: {redirect['location']}\n")
        return
    if http["outcome"] == "invalid_backend":
        w("result:   500 invalid_backend (no backend the mesh can send to)\n")
    elif http["invalid_share"]:
        w(f"result:   forwarded; {http['invalid_share']:g}% of requests get 500 invalid_backend\n")
    else:
        w("result:   forwarded\n")
    for m in http["mirrors"]:
        w(f"mirror:   {m['percent']:g}% copied to {_mirror_text(m)}\n")
    for b, addresses in zip(http["backends"], endpoints, strict=True):
        port = f":{b['port']}" if b["port"] is not None else ""
        w(f"backend:  {b['backend']}{port}  weight {b['weight']}  {b['share']:.1f}%\n")
        if b["problem"] is not None:
            w(f"            {b['problem']}\n")
            continue
        if not addresses:
            w("            (no static endpoints)\n")
        for e in addresses:
            labels = "".join(f" {k}={v}" for k, v in e["labels"].items())
            w(f"            {e['address']}  weight {e['weight']}{labels}\n")
        sent = b["request"]
        w(f"            sees: {sent['path']}  host {sent['host']}\n")
        for name, value in sent["headers"]:
            w(f"            header {name}: {value}\n")
        for m in b["response_headers"]:
            w(f"            response headers: {_modifier_text(m)}\n")
        for m in b["mirrors"]:
            w(f"            mirror: {m['percent']:g}% copied to {_mirror_text(m)}\n")


def _modifier_text(m: Mapping[str, Sequence[Any]]) -> str:
    parts = [f"set {n}: {v}" for n, v in m["set"]]
    parts += [f"add {n}: {v}" for n, v in m["add"]]
    parts += [f"remove {n}" for n in m["remove"]]
    return ", ".join(parts)


def _mirror_text(m: Mapping[str, Any]) -> str:
    return (
        m["backend"]
        if m["service"] is not None
        else f"{m['backend']} (not a mesh Service: none sent)"
    )
