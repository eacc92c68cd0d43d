"""Gateway API HTTPRoute semantics over one snapshot: which routes attach to a call, the order
their rules are tried in, matching one request, the backend chosen, and what the rule's filters
do to the request and the response. Pure: no I/O, no clock; the caller passes the RNG.

The spec's precedence (gateway.networking.k8s.io/v1 HTTPRouteRule) orders every match of every
attached rule once per table: an Exact path, then a RegularExpression path (longer pattern
first: the spec leaves regex precedence to the implementation, and Envoy Gateway puts them
between Exact and PathPrefix), then the longest PathPrefix; then a match with a method; then
the most header matches; then the most query-parameter matches. Ties go to the oldest route
(``metadata.creationTimestamp``, else load order), then ``namespace/name``, then rule order,
then match order. The first match that accepts the request wins; none: 404.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from meshlib.config.model import (
    EffectivePolicy,
    FilterType,
    HeaderModifier,
    PathMatchType,
    PathModifierType,
    RequestMirror,
    RequestRedirect,
    Snapshot,
    URLRewrite,
    ValueMatchType,
)

if TYPE_CHECKING:
    from meshlib.config.routemodel import (
        BackendRef,
        HTTPRoute,
        HTTPRouteFilter,
        HTTPRouteRule,
        PathModifier,
        RouteMatch,
    )

#: Bound on the (service, caller namespace, port) → table cache: ports come from URLs.
_MAX_TABLES = 4096
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PATH_RANK = {PathMatchType.EXACT: 0, PathMatchType.REGULAR_EXPRESSION: 1}
_PREFIX = PathMatchType.PATH_PREFIX
_EXACT = PathMatchType.EXACT
#: Characters after which a regular expression's text is no longer a plain literal.
_REGEX_SPECIAL = frozenset("\\.^$*+?()[]{}|")
_QUANTIFIERS = frozenset("*+?{")


@dataclass(frozen=True, eq=False, slots=True)
class Backend:
    """One backendRef of a rule, ready to send to: ``service`` is the mesh service key, or
    None when the mesh cannot send to it (its share of requests is answered 500)."""

    service: str | None
    weight: int
    filters: tuple[HTTPRouteFilter, ...]
    ref: BackendRef
    #: Whether the rule's or this backend's filters change the request (RequestHeaderModifier,
    #: URLRewrite): when not, a call skips :func:`request_edit`.
    edits_request: bool = True
    #: The ResponseHeaderModifiers of the rule, then of this backend (computed once).
    response_headers: tuple[HeaderModifier, ...] = ()


@dataclass(frozen=True, eq=False, slots=True)
class Rule:
    """One HTTPRoute rule compiled against the snapshot's services.

    Identity-compared: per-rule call plans are memoised per snapshot keyed by it.
    """

    route: HTTPRoute
    index: int  # the rule's position in the route
    rule: HTTPRouteRule
    label: str  # the route label (rule name, else route name)
    backends: tuple[Backend, ...]
    total_weight: int
    redirect: RequestRedirect | None

    @property
    def where(self) -> str:
        """``HTTPRoute ns/name rule[i] (name)`` for explanations and messages."""
        name = f" {self.rule.name!r}" if self.rule.name else ""
        return f"HTTPRoute {self.route.namespace}/{self.route.name} rule[{self.index}]{name}"

    def mirrors(self, backend: Backend | None) -> tuple[RequestMirror, ...]:
        """The RequestMirror filters that apply: the rule's, then the chosen backend's."""
        own = backend.filters if backend is not None else ()
        return tuple(
            f.config for f in (*self.rule.filters, *own) if isinstance(f.config, RequestMirror)
        )


@dataclass(frozen=True, eq=False, slots=True)
class Candidate:
    """One match of one rule, in a table's precedence order."""

    rule: Rule
    match: RouteMatch
    match_index: int
    #: A literal every path the match accepts starts with: checked before the regular
    #: expression, which costs far more than ``startswith`` (computed once).
    literal: str = field(init=False, default="")

    def __post_init__(self) -> None:
        path = self.match.path
        if path.type is PathMatchType.REGULAR_EXPRESSION:
            object.__setattr__(self, "literal", regex_literal_prefix(path.value))

    def accepts(
        self,
        method: str,
        path: str,
        query: Callable[[], Mapping[str, str]],
        headers: Mapping[str, str],
    ) -> bool:
        """Whether the request matches: path, method, every header, every query parameter."""
        m = self.match
        spec = m.path
        kind = spec.type
        if kind is _PREFIX:
            prefix = spec.value.rstrip("/")
            # Element-wise: "/v2" matches "/v2", "/v2/" and "/v2/x", never "/v2example".
            if prefix and path != prefix and not path.startswith(prefix + "/"):
                return False
        elif kind is _EXACT:
            if path != spec.value:
                return False
        elif (
            not path.startswith(self.literal)
            or spec.regex is None
            or spec.regex.match(path) is None
        ):
            return False
        if m.method is not None and m.method != method:
            return False
        for h in m.headers:
            value = headers.get(h.name)
            if value is None or not _value_matches(h.type, h.value, h.regex, value):
                return False
        if m.query_params:
            params = query()
            for q in m.query_params:
                value = params.get(q.name)
                if value is None or not _value_matches(q.type, q.value, q.regex, value):
                    return False
        return True

    def why(self) -> str:
        """What this match required, in words, for ``meshctl explain``."""
        m = self.match
        parts = [f"path {m.path.type.value} {m.path.value!r}"]
        if m.method is not None:
            parts.append(f"method {m.method}")
        parts += [f"header {h.name} {h.type.value} {h.value!r}" for h in m.headers]
        parts += [f"query {q.name} {q.type.value} {q.value!r}" for q in m.query_params]
        return f"{self.rule.where} matches[{self.match_index}]: " + ", ".join(parts)


class RouteTable:
    """The candidates of the routes attached to one (service, caller namespace, port), in
    precedence order; ``select`` answers the first that accepts a request."""

    __slots__ = ("candidates", "routes")

    def __init__(self, routes: Sequence[HTTPRoute], candidates: Sequence[Candidate]) -> None:
        self.routes = tuple(routes)
        self.candidates = tuple(candidates)

    def select(
        self, method: str, path: str, query: str, headers: Mapping[str, str]
    ) -> Candidate | None:
        """The winning match for a request (``path`` decoded, without the query; ``query`` the
        raw query string; header names looked up lower-case), or None: the spec's 404."""
        parsed: list[dict[str, str]] = []

        def params() -> Mapping[str, str]:
            if not parsed:
                parsed.append(query_params(query))
            return parsed[0]

        for candidate in self.candidates:
            if candidate.accepts(method, path, params, headers):
                return candidate
        return None


def query_params(query: str) -> dict[str, str]:
    """A raw query string's parameters as a match reads them: the spec says that with a
    parameter given several times, only the first counts."""
    first: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        first.setdefault(name, value)
    return first


class _Rules:
    """Compiles rules against the services calls can be sent to, each rule once; and orders
    the matches of a set of attached routes into a table."""

    def __init__(self, services: Mapping[str, object]) -> None:
        self._services = services
        self._rules: dict[tuple[int, int], Rule] = {}

    def table(
        self, chosen: Sequence[tuple[int, HTTPRoute]], host: str | None = None
    ) -> RouteTable | None:
        """The table of ``chosen`` (load order, route) pairs; with ``host`` (ingress), only
        routes whose hostnames accept it, more specific hostnames first (the spec: the most
        characters in a matching exact hostname, then in a matching wildcard)."""
        candidates: list[tuple[tuple[object, ...], Candidate]] = []
        kept: list[HTTPRoute] = []
        for order, route in chosen:
            specificity = (0, 0)
            if host is not None:
                found = host_specificity(route.hostnames, host)
                if found is None:
                    continue
                specificity = found
            kept.append(route)
            # The oldest route first; routes of one timestamp go on to ns/name (the spec), so
            # load order stands in only for a route without one ("~" sorts after any time).
            age = (route.created, 0) if route.created else ("~", order)
            for i, rule in enumerate(route.rules):
                compiled = self.rule(order, route, i, rule)
                for j, match in enumerate(rule.matches):
                    rank = _precedence(match)
                    tie = (*age, f"{route.namespace}/{route.name}", i, j)
                    key = (*specificity, *rank, *tie)
                    candidates.append((key, Candidate(compiled, match, j)))
        if not kept:
            return None
        candidates.sort(key=lambda item: item[0])
        return RouteTable(kept, [c for _, c in candidates])

    def rule(self, order: int, route: HTTPRoute, index: int, rule: HTTPRouteRule) -> Rule:
        key = (order, index)
        compiled = self._rules.get(key)
        if compiled is None:
            backends = tuple(
                Backend(
                    backend_service(ref, self._services),
                    ref.weight,
                    ref.filters,
                    ref,
                    _edits_request((*rule.filters, *ref.filters)),
                    _response_headers((*rule.filters, *ref.filters)),
                )
                for ref in rule.backend_refs
            )
            redirect = next(
                (f.config for f in rule.filters if isinstance(f.config, RequestRedirect)), None
            )
            compiled = self._rules[key] = Rule(
                route,
                index,
                rule,
                route.label(rule),
                backends,
                sum(b.weight for b in backends),
                redirect,
            )
        return compiled


class RouteIndex:
    """Every mesh-mode route of one snapshot, compiled once; tables are built on first use."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._attached: dict[str, list[tuple[int, HTTPRoute]]] = {}
        for order, route in enumerate(snapshot.http_routes):
            for key in route.services():
                self._attached.setdefault(key, []).append((order, route))
        self._rules = _Rules(snapshot.services)
        self._tables: dict[tuple[str, str, int | None], RouteTable | None] = {}

    def __contains__(self, service_key: str) -> bool:
        return service_key in self._attached

    def table(self, service_key: str, caller_namespace: str, port: int | None) -> RouteTable | None:
        """The routes that apply to a call from ``caller_namespace`` to ``service_key`` dialled
        on ``port`` (None: the scheme's default was used and is not known), or None when no
        route attaches: the call is routed as without HTTPRoutes.

        GAMMA: a producer route (in the service's namespace) applies to every caller; a
        consumer route (in another namespace) only to callers in its own namespace, and for
        them it replaces the producer routes. A parentRef with a ``port`` applies only to
        calls dialled on that port.
        """
        key = (service_key, caller_namespace, port)
        try:
            return self._tables[key]
        except KeyError:
            pass
        table = self._build(service_key, caller_namespace, port)
        if len(self._tables) < _MAX_TABLES:
            self._tables[key] = table
        return table

    def _build(self, service_key: str, caller: str, port: int | None) -> RouteTable | None:
        service_ns = service_key.split(".", 1)[1]
        producer: list[tuple[int, HTTPRoute]] = []
        consumer: list[tuple[int, HTTPRoute]] = []
        for order, route in self._attached.get(service_key, ()):
            if not _attached_on(route, service_key, port):
                continue
            if route.namespace == service_ns:
                producer.append((order, route))
            elif route.namespace == caller:
                consumer.append((order, route))
        return self._rules.table(consumer or producer)


class IngressIndex:
    """The routes of one Gateway's listeners (ingress mode), compiled once; a table per
    (listener, request host) is built on first use.

    ``routes`` are the gateway's routes in load order (their age for ties); ``attached``
    maps a listener name to those attached to it: which routes a listener admits (parentRef
    name, sectionName, port, allowedRoutes) is the gateway's decision. Backends resolve
    against ``services``, the mesh services the gateway's outbound leg can call; any other
    backend's share is answered 500.
    """

    def __init__(
        self,
        routes: Sequence[HTTPRoute],
        attached: Mapping[str, Sequence[HTTPRoute]],
        services: Mapping[str, object],
    ) -> None:
        order = {id(route): i for i, route in enumerate(routes)}
        self._attached = {
            listener: sorted((order[id(r)], r) for r in listed)
            for listener, listed in attached.items()
        }
        self._rules = _Rules(services)
        self._tables: dict[tuple[str, str], RouteTable | None] = {}

    def table(self, listener: str, host: str) -> RouteTable | None:
        """The routes of ``listener`` whose hostnames accept ``host`` (lower case, no port);
        None: no route serves this host on this listener (the gateway's 404)."""
        key = (listener, host)
        try:
            return self._tables[key]
        except KeyError:
            pass
        table = self._rules.table(self._attached.get(listener, ()), host)
        if len(self._tables) < _MAX_TABLES:  # host names come from clients: bounded
            self._tables[key] = table
        return table


def host_specificity(hostnames: Sequence[str], host: str) -> tuple[int, int] | None:
    """How specifically ``hostnames`` accept ``host`` as a sort key (smaller is more specific),
    or None when they do not. No hostnames accept every host, least specifically. A wildcard
    ``*.example.com`` is a suffix match of one or more labels, never ``example.com`` itself."""
    if not hostnames:
        return (0, 0)
    best: tuple[int, int] | None = None
    for name in hostnames:
        if name == host:
            found = (-len(name), 0)
        elif name.startswith("*.") and host.endswith(name[1:]) and len(host) > len(name) - 1:
            found = (0, -len(name))
        else:
            continue
        if best is None or found < best:
            best = found
    return best


def backend_service(ref: BackendRef, services: Mapping[str, object]) -> str | None:
    """The mesh service key a backendRef sends to, or None when the mesh cannot send to it
    (not a core Service with a port, or not among ``services``)."""
    if not ref.resolvable:
        return None
    key = f"{ref.name}.{ref.namespace}"
    return key if key in services else None


def default_port(scheme: str) -> int | None:
    return _DEFAULT_PORTS.get(scheme)


def _attached_on(route: HTTPRoute, service_key: str, port: int | None) -> bool:
    for parent in route.parent_refs:
        if parent.kind != "Service" or f"{parent.name}.{parent.namespace}" != service_key:
            continue
        if parent.port is None or parent.port == port:
            return True
    return False


def _precedence(match: RouteMatch) -> tuple[int, int, int, int, int]:
    """Sort key: smaller is tried first."""
    path = match.path
    rank = _PATH_RANK.get(path.type, 2)
    length = len(path.value.rstrip("/") or "/") if path.type is PathMatchType.PATH_PREFIX else 0
    if path.type is PathMatchType.REGULAR_EXPRESSION:
        length = len(path.value)
    return (
        rank,
        -length,
        0 if match.method is not None else 1,
        -len(match.headers),
        -len(match.query_params),
    )


def regex_literal_prefix(pattern: str) -> str:
    """The longest plain literal every match of ``pattern`` (anchored at the start) begins
    with; "" when unsure. Conservative: any alternation gives "", and a literal character
    followed by a quantifier (``/ab?``) is not part of the prefix."""
    if "|" in pattern:
        return ""
    out: list[str] = []
    for char in pattern:
        if char in _REGEX_SPECIAL:
            if char in _QUANTIFIERS and out:
                out.pop()  # the character before a quantifier may be absent or repeated
            break
        out.append(char)
    return "".join(out)


def _value_matches(kind: ValueMatchType, expected: str, regex: object, value: str) -> bool:
    if kind is ValueMatchType.EXACT:
        return value == expected
    return regex is not None and regex.match(value) is not None  # type: ignore[attr-defined]


# --- what a rule does to the request and the response ------------------------------------------


def pick(rule: Rule, random: Callable[[], float]) -> Backend | None:
    """A backend by weight (``random()`` in [0, 1)); None when every weight is 0 or there are no
    backendRefs: the spec's 500."""
    total = rule.total_weight
    if total <= 0:
        return None
    x = random() * total
    for backend in rule.backends:
        if backend.weight <= 0:
            continue
        x -= backend.weight
        if x < 0:
            return backend
    return next(b for b in reversed(rule.backends) if b.weight > 0)


@dataclass(frozen=True, slots=True)
class RequestEdit:
    """What a rule's (and its backend's) filters change in the request; empty: nothing."""

    path: str | None = None  # the new path (query kept), or None
    host: str | None = None  # the new Host header, or None
    headers: tuple[HeaderModifier, ...] = ()  # applied in order

    def __bool__(self) -> bool:
        return self.path is not None or self.host is not None or bool(self.headers)


NO_EDIT = RequestEdit()


def request_edit(candidate: Candidate, backend: Backend | None, path: str) -> RequestEdit:
    """The edits of the rule's filters, then the backend's, for a request to ``path``."""
    if backend is not None and not backend.edits_request:
        return NO_EDIT
    filters = (*candidate.rule.rule.filters, *(backend.filters if backend is not None else ()))
    if not filters:
        return NO_EDIT
    new_path: str | None = None
    host: str | None = None
    headers: list[HeaderModifier] = []
    for f in filters:
        config = f.config
        if isinstance(config, HeaderModifier):
            if f.type is FilterType.REQUEST_HEADER_MODIFIER:
                headers.append(config)
        elif isinstance(config, URLRewrite):
            if config.hostname is not None:
                host = config.hostname
            if config.path is not None:
                new_path = rewrite_path(config.path, candidate.match, path)
    return RequestEdit(new_path, host, tuple(headers))


def response_modifiers(candidate: Candidate, backend: Backend | None) -> tuple[HeaderModifier, ...]:
    """The ResponseHeaderModifier filters of the rule, then of the backend."""
    if backend is not None:
        return backend.response_headers
    return _response_headers(candidate.rule.rule.filters)


def _response_headers(filters: Sequence[HTTPRouteFilter]) -> tuple[HeaderModifier, ...]:
    return tuple(
        f.config
        for f in filters
        if f.type is FilterType.RESPONSE_HEADER_MODIFIER and isinstance(f.config, HeaderModifier)
    )


def _edits_request(filters: Sequence[HTTPRouteFilter]) -> bool:
    return any(
        f.type in (FilterType.REQUEST_HEADER_MODIFIER, FilterType.URL_REWRITE) for f in filters
    )


def rewrite_path(modifier: PathModifier, match: RouteMatch, path: str) -> str:
    """ReplaceFullPath: the value. ReplacePrefixMatch: the matched prefix replaced, element-wise
    (``/strip-prefix/three`` with ``/strip-prefix`` → ``/`` gives ``/three``)."""
    if modifier.type is PathModifierType.REPLACE_FULL_PATH:
        return modifier.value
    prefix = match.path.value.rstrip("/")
    rest = path[len(prefix) :] if path.startswith(prefix) else path
    value = modifier.value
    if value.endswith("/") and rest.startswith("/"):
        value = value[:-1]
    return (value + rest) or "/"


def redirect_location(
    redirect: RequestRedirect,
    match: RouteMatch,
    scheme: str,
    host: str,
    port: int | None,
    path: str,
    query: str,
) -> str:
    """The ``Location`` of a RequestRedirect (spec: scheme, hostname, port and path default to
    the request's; a scheme given without a port drops the port, as does a well-known port)."""
    new_scheme = redirect.scheme or scheme
    new_host = redirect.hostname or host
    if redirect.port is not None:
        new_port: int | None = redirect.port
    elif redirect.scheme is not None:
        # The spec: a scheme given without a port means that scheme's well-known port, even
        # when it is the request's own scheme (upstream's echo server does the same).
        new_port = None
    else:
        new_port = port
    if new_port == _DEFAULT_PORTS.get(new_scheme):
        new_port = None
    new_path = path if redirect.path is None else rewrite_path(redirect.path, match, path)
    authority = new_host if new_port is None else f"{new_host}:{new_port}"
    return f"{new_scheme}://{authority}{new_path}" + (f"?{query}" if query else "")


def edit_headers(
    pairs: Sequence[tuple[str, str]], modifiers: Sequence[HeaderModifier]
) -> list[tuple[str, str]]:
    """Header pairs after the modifiers, in order. The spec: ``set`` replaces every value of the
    name (case-insensitive), ``add`` appends one more, ``remove`` drops every value."""
    out = list(pairs)
    for modifier in modifiers:
        for name, value in modifier.set:
            low = name.lower()
            out = [(n, v) for n, v in out if n.lower() != low]
            out.append((name, value))
        for name, value in modifier.add:
            out.append((name, value))
        if modifier.remove:
            gone = {name.lower() for name in modifier.remove}
            out = [(n, v) for n, v in out if n.lower() not in gone]
    return out


def rule_policy(policy: EffectivePolicy, rule: Rule) -> EffectivePolicy:
    """The (service, route label) policy with the rule's own ``timeouts`` on top: a timeout
    set on the route itself wins over every scope. ``request`` is the call's deadline,
    ``backendRequest`` the per-try timeout; ``0s`` disables either."""
    timeouts = rule.rule.timeouts
    if timeouts.request is None and timeouts.backend_request is None:
        return policy
    sources = dict(policy.sources)
    origin = f"route:HTTPRoute {rule.route.namespace}/{rule.route.name}"
    if timeouts.request is not None:
        policy = dataclasses.replace(policy, timeout=timeouts.request or None)
        sources["timeout"] = origin
    if timeouts.backend_request is not None:
        retries = dataclasses.replace(
            policy.retries, per_try_timeout=timeouts.backend_request or None
        )
        policy = dataclasses.replace(policy, retries=retries)
        sources["retries.per_try_timeout"] = origin
    return dataclasses.replace(policy, sources=sources)
