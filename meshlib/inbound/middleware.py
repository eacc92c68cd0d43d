"""``MeshMiddleware``: the mesh's decisions for requests arriving at this service, as pure ASGI.

The inbound stack, in order (each step's reason beside it):

1. non-HTTP scopes: ``lifespan`` (and anything unknown) passes through untouched; a
   ``websocket`` handshake gets steps 2 to 4 (identity and sanitation, origin
   authentication, authorization — the method checked is GET), refused before accept — a
   forged identity or a missing token is as dangerous on a WebSocket handshake, but a
   deadline or a rate per message means nothing for a long-lived connection;
2. peer identity, then header sanitation — first, so no later step (nor the app) ever reads
   a header the peer was not entitled to send;
   then the method: a case-variant of a standard method (``get``, ``Delete``) is answered 400
   — methods are case-sensitive (RFC 9110 §9.1), so it is not the method a rule names, yet
   an app or router may treat it as one; refused before authorization, no allow or deny rule
   can be side-stepped by case, whichever way the policy compares methods;
3. origin authentication (a RequestAuthentication applies): a token that does not verify is
   refused with 401; a verified token's claims go to authorization and to the app
   (``scope["extensions"]["meshlib"]``); no token means no request principal;
4. authorization — before the rate limits, so a denied caller spends no tokens;
5. rate limits: per caller identity, then total — in that order, so a request the total limit
   refuses costs only its own caller a token, never its neighbours;
6. the deadline — set last, around the app alone, so outbound calls made while handling the
   request get only the time that is left.

Per-request state lives in locals of ``_handle``; the instance holds configuration and the
token buckets (shared state by nature, behind a lock).

The stack is a budget (issue 3: at most 10 µs of server CPU per request; measure with
``benchmarks/inbound_loop.py`` and ``benchmarks/inbound.py``). What a request needs from the
policy (trust domain, authorization index, JWT rules) is a plan derived once per snapshot, and
steps that cannot apply cost a test each: with no header to strip, no path to normalise and no
token, the app gets the server's scope itself instead of a copy; with no authorization in force,
the decision is "allow" (still counted) without evaluating anything.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol
from urllib.parse import quote

from meshlib.config.authnmodel import JwtRule
from meshlib.config.model import AccessControl, RateLimitPolicy, ServiceDef
from meshlib.context import inbound_deadline
from meshlib.errors import REASON_HEADER, Reason
from meshlib.inbound.peer import (
    passes_unchanged,
    propagated_timeout,
    sanitize_headers,
    verified_identity,
)
from meshlib.policy.authz import AuthzIndex, authorize, index_for, normalize_path
from meshlib.policy.ratelimit import KeyedLimiter, TokenBucket, rate_limit_policy, retry_after

if TYPE_CHECKING:
    from meshlib.identity.spiffe import SpiffeID
    from meshlib.inbound.origin import JwtVerifier
    from meshlib.policy.routing import Router

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Handler = Callable[[Scope, Receive, Send, ASGIApp], Awaitable[None]]

log = logging.getLogger("meshlib.inbound")

#: Key of the bucket shared by every caller that is not a verified mesh member.
UNAUTHENTICATED = "unauthenticated"
#: Bound on per-identity buckets; the least recently seen identity is forgotten first.
MAX_IDENTITIES = 10_000


class TracedRequest(Protocol):
    """The tracing of one request: ``run`` calls ``handle`` inside its span."""

    async def run(
        self, handle: Handler, scope: Scope, receive: Receive, send: Send, app: ASGIApp
    ) -> None: ...


class InboundTracing(Protocol):
    """Tracing of inbound requests (:class:`meshlib.observe.tracing.Tracing`)."""

    def inbound(self, scope: Scope) -> TracedRequest | None:
        """None when there is nothing to record or propagate (the hot path)."""


class InboundMetrics(Protocol):
    """The metrics the middleware updates (:class:`meshlib.observe.metrics.MeshMetrics`)."""

    def observe_authz(self, source: str, destination: str, verdict: str, mode: str) -> None: ...

    def observe_inbound(
        self, source: str, destination: str, route: str, code: str, reason: str, seconds: float
    ) -> None: ...


class InboundEvents(Protocol):
    """Where a handled request is reported (:class:`meshlib.observe.events.EventHub`)."""

    def inbound(
        self,
        source: str,
        destination: str,
        scope: Mapping[str, Any],
        status: int,
        reason: Reason,
        seconds: float,
        peer: str | None = None,
        route: str | None = None,
    ) -> None: ...


class InboundHost(Protocol):
    """What the middleware needs from the mesh whose decisions it applies (:class:`meshlib.Mesh`):
    the service it guards, the current policy, a clock and where to report."""

    @property
    def service(self) -> str: ...

    @property
    def namespace(self) -> str: ...

    @property
    def router(self) -> Router: ...

    def clock(self) -> float: ...

    @property
    def tracing(self) -> InboundTracing: ...

    @property
    def metrics(self) -> InboundMetrics | None: ...

    @property
    def events(self) -> InboundEvents | None: ...


class Verdict(enum.Enum):
    """What authorization concluded for one inbound request."""

    ALLOW = "allow"
    DENY = "deny"


#: The ``mode`` label of a decision where no authorization applies (``accessControl: open``).
_OPEN_MODE = AccessControl.OPEN.value

#: RFC 9110 §9 methods and PATCH (RFC 5789), exactly as they are spelled: a request whose
#: method is one of these in another case is refused (see step 2 of the stack).
STANDARD_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


class _Plan(NamedTuple):
    """Everything a request needs from one policy snapshot, derived once per snapshot (one
    identity check per request instead of several memo lookups)."""

    trust_domain: str
    authz: AuthzIndex
    in_force: bool  # whether any authorization applies (else: allowed, path untouched)
    jwt_rules: tuple[JwtRule, ...]  # RequestAuthentications of this service and namespace


class MeshMiddleware:
    """ASGI middleware for the inbound side of a meshed service.

    ``rate_limit`` and ``per_identity_rate_limit`` are ``(requests_per_second, burst)`` or a
    :class:`~meshlib.config.model.RateLimitPolicy`; ``default_timeout`` (seconds) is a deadline
    for every request. A verified mesh member's propagated deadline is adopted too; the shorter
    wins.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        mesh: InboundHost,
        rate_limit: tuple[float, int] | RateLimitPolicy | None = None,
        per_identity_rate_limit: tuple[float, int] | RateLimitPolicy | None = None,
        default_timeout: float | None = None,
        max_identities: int = MAX_IDENTITIES,
    ) -> None:
        if default_timeout is not None and not (0 < default_timeout < math.inf):
            raise ValueError(f"default_timeout must be a positive number, not {default_timeout}")
        if max_identities < 1:
            raise ValueError("max_identities must be at least 1")
        self.app = app
        self.mesh = mesh
        self.default_timeout = default_timeout
        self.rate_limit = rate_limit_policy(rate_limit, "rate_limit")
        self.per_identity_rate_limit = rate_limit_policy(
            per_identity_rate_limit, "per_identity_rate_limit"
        )
        self.max_identities = max_identities
        self._clock = mesh.clock
        self._lock = threading.Lock()  # the app may be served from several threads' loops
        now = self._clock()
        self._total = TokenBucket(self.rate_limit, now) if self.rate_limit else None
        per_identity = self.per_identity_rate_limit
        self._buckets = None if per_identity is None else KeyedLimiter(per_identity, max_identities)
        self._destination = f"{mesh.service}.{mesh.namespace}"
        self._verifier: JwtVerifier | None = None  # built on first use (imports PyJWT)
        self._planned: tuple[Router, _Plan] | None = None  # the plan of the current snapshot
        #: A subclass that overrides the authorization hook is asked on every request.
        self._authz_hooked = type(self)._authorize is not MeshMiddleware._authorize

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Tracing (meshlib.observe.tracing) wraps the whole handling: its SERVER span sees local
        # replies too, and its context is attached while the app runs.
        traced = self.mesh.tracing.inbound(scope) if scope["type"] == "http" else None
        if traced is None:
            await self._handle(scope, receive, send, self.app)
        else:
            await traced.run(self._handle, scope, receive, send, self.app)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, app: ASGIApp) -> None:
        if scope["type"] != "http":
            await self._handle_other(scope, receive, send, app)
            return
        start = self._clock()
        plan = self._plan()
        # The app gets ``scope`` itself when nothing in it changes (the common case: no
        # identity, no header to strip, no path to normalise, no token); else one copy, so
        # the server's scope stays as it was.
        app_scope = scope
        identity = verified_identity(scope, plan.trust_domain) if scope.get("extensions") else None
        received = scope.get("headers")
        if identity is None and received is not None and passes_unchanged(received):
            headers = received
        else:
            headers = sanitize_headers(received or (), identity)
            app_scope = {**scope, "headers": headers}
        source = identity or UNAUTHENTICATED
        method, path = scope.get("method", ""), scope.get("path", "")
        if method not in STANDARD_METHODS and method.upper() in STANDARD_METHODS:
            log.info(
                "refused %r %s from %s: not %s (methods are case-sensitive)",
                method,
                path,
                source,
                method.upper(),
            )
            await send_local_reply(send, 400, Reason.BAD_REQUEST)
            self._record(source, 400, Reason.BAD_REQUEST, start, app_scope)
            return
        claims: Mapping[str, Any] | None = None
        if plan.in_force:
            app_scope = _normalized(app_scope, path)
            path = app_scope.get("path", "")
        if plan.jwt_rules:
            authenticated = await self._authenticate(plan.jwt_rules, headers, app_scope)
            if authenticated is None:
                await send_local_reply(send, 401, Reason.UNAUTHENTICATED)
                self._record(source, 401, Reason.UNAUTHENTICATED, start, app_scope)
                return
            app_scope, claims = authenticated
        if plan.in_force or self._authz_hooked:
            verdict = self._authorize(identity, method, path, headers, jwt_claims=claims)
            if verdict is Verdict.DENY:
                await send_local_reply(send, 403, Reason.DENIED)
                self._record(source, 403, Reason.DENIED, start, app_scope)
                return
        else:  # nothing to decide: allowed as "open", counted without building a verdict
            metrics = self.mesh.metrics
            if metrics is not None:
                metrics.observe_authz(source, self._destination, "allow", _OPEN_MODE)
        if self._total is not None or self._buckets is not None:
            refused_by = self._admit(source, start)
            if refused_by is not None:
                wait = retry_after(refused_by)
                await send_local_reply(send, 429, Reason.RATE_LIMITED, retry_after=wait)
                self._record(source, 429, Reason.RATE_LIMITED, start, app_scope)
                return

        if identity is None and self.default_timeout is None:
            deadline = inbound_deadline.get()  # nothing to add to the deadline in force
        else:
            deadline = self._deadline(headers if identity is not None else (), start)
        status = 500  # what the server answers if the app fails before starting a response

        def observing_send(message: Message) -> Awaitable[None]:
            # A plain function handing back the server's awaitable: no coroutine of its own
            # per message.
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            return send(message)

        token = inbound_deadline.set(deadline)
        try:
            await app(app_scope, receive, observing_send)
        finally:
            inbound_deadline.reset(token)
            reason = Reason.UPSTREAM_ERROR if status >= 500 else Reason.OK
            if UNCOUNTED not in app_scope:  # a scrape of the metrics or admin app is no traffic
                route = route_template(app_scope) if "route" in app_scope else ""
                self._record(source, status, reason, start, app_scope, route)

    async def _authenticate(
        self,
        rules: tuple[JwtRule, ...],
        headers: Iterable[tuple[bytes, bytes]],
        scope: Scope,
    ) -> tuple[Scope, Mapping[str, Any] | None] | None:
        """Origin authentication: ``None`` for a bad token (the caller answers 401), else the
        scope for the app (with the verified principal and claims, if a token came) and the
        claims for authorization (``None``: no token)."""
        from meshlib.inbound.origin import Unauthenticated

        try:
            principal = await self._jwt_verifier().authenticate(rules, headers)
        except Unauthenticated as exc:
            log.info("origin authentication failed for %s: %s", self._destination, exc)
            return None
        if principal is None:
            return scope, None
        extensions = dict(scope.get("extensions") or {})
        extensions["meshlib"] = {
            "request_principal": principal.request_principal,
            "claims": dict(principal.claims),
        }
        return {**scope, "extensions": extensions}, principal.claims

    async def _handle_other(self, scope: Scope, receive: Receive, send: Send, app: ASGIApp) -> None:
        """Scopes other than ``http``: a WebSocket handshake gets identity, header sanitation,
        origin authentication and authorization, refused before accept
        (:func:`refuse_websocket`); anything else (``lifespan``, unknown) passes through
        untouched."""
        if scope["type"] != "websocket":
            await app(scope, receive, send)
            return
        plan = self._plan()
        identity = verified_identity(scope, plan.trust_domain)
        headers = sanitize_headers(scope.get("headers") or (), identity)
        scope = {**scope, "headers": headers}  # a new dict: the server's scope stays as it was
        # A WebSocket upgrade is authorized like a GET of its path (a DENY rule must not be
        # bypassed by upgrading); refused before accept, which servers answer with 403.
        path = scope.get("path", "")
        if plan.in_force:
            scope = _normalized(scope, path)
            path = scope.get("path", "")
        claims: Mapping[str, Any] | None = None
        if plan.jwt_rules:  # a token on the handshake (an ingress gateway's end user)
            authenticated = await self._authenticate(plan.jwt_rules, headers, scope)
            if authenticated is None:
                await refuse_websocket(scope, receive, send, 401, Reason.UNAUTHENTICATED)
                return
            scope, claims = authenticated
        if self._authorize(identity, "GET", path, headers, jwt_claims=claims) is Verdict.DENY:
            await refuse_websocket(scope, receive, send, 403, Reason.DENIED)
            return
        await app(scope, receive, send)

    def _plan(self) -> _Plan:
        """What this middleware needs from the current policy snapshot, derived once per
        snapshot: a reload swaps the router, and the next request derives a new plan."""
        router = self.mesh.router
        planned = self._planned
        if planned is not None and planned[0] is router:
            return planned[1]
        service = router.services.get(self._destination) or ServiceDef(
            self.mesh.service, self.mesh.namespace, ()
        )
        index = index_for(router, service)  # an undeclared service: its name as its account
        rules = tuple(
            rule
            for ra in router.snapshot.request_authentications
            if ra.namespace == self.mesh.namespace and ra.service in (None, self._destination)
            for rule in ra.rules
        )
        plan = _Plan(router.snapshot.mesh.trust_domain, index, index.in_force, rules)
        self._planned = (router, plan)  # one reference assignment: threads see old or new
        return plan

    def _jwt_verifier(self) -> JwtVerifier:
        """One verifier (and JWKS cache) per middleware, kept across policy reloads."""
        if self._verifier is None:
            from meshlib.inbound.origin import JwksStore, JwtVerifier

            with self._lock:
                if self._verifier is None:
                    self._verifier = JwtVerifier(JwksStore(clock=self._clock))
        return self._verifier

    def _authorize(
        self,
        identity: str | None,
        method: str,
        path: str,
        headers: Iterable[tuple[bytes, bytes]] = (),
        *,
        jwt_claims: Mapping[str, Any] | None = None,
    ) -> Verdict:
        """Authorization hook: SMI TrafficTargets and AuthorizationPolicies (meshlib.policy.authz).

        ``identity`` is the verified SPIFFE ID (``None``: not a mesh member); ``path`` is
        ``scope["path"]``, the exact string the app's router will see (NET-6: the decision
        and the routing must use the same bytes); ``jwt_claims`` are the verified token's
        claims (``None``: no token). In ``audit`` mode a would-be denial is
        logged at WARNING and counted, and the request proceeds.
        """
        index = self._plan().authz
        caller = None if identity is None else _caller(identity)
        header_map: dict[str, str] = {}
        for name, value in headers if index.reads_headers else ():  # only rules read them
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            header_map[key] = f"{header_map[key]},{text}" if key in header_map else text
        verdict = authorize(index, index.service, caller, method, path, header_map, jwt_claims)
        source = identity or UNAUTHENTICATED
        if verdict.denied_by_policy:
            level = logging.WARNING if verdict.allowed else logging.INFO
            log.log(
                level,
                "authz %s: %s %s %s from %s (%s)",
                "would deny (audit)" if verdict.allowed else "denied",
                self._destination,
                method,
                path,
                source,
                verdict.rule,
            )
        metrics = self.mesh.metrics
        if metrics is not None:
            metrics.observe_authz(source, self._destination, verdict.verdict, verdict.mode)
        return Verdict.ALLOW if verdict.allowed else Verdict.DENY

    def _admit(self, source: str, now: float) -> RateLimitPolicy | None:
        """Take a token from the caller's bucket, then from the total one; the policy of the
        bucket that refused, or ``None`` if the request may proceed."""
        buckets = self._buckets
        with self._lock:
            if buckets is not None and not buckets.take(source, now):
                return buckets.policy
            if self._total is not None and not self._total.take(now):
                return self._total.policy
        return None

    def _deadline(self, trusted_headers: Iterable[tuple[bytes, bytes]], now: float) -> float | None:
        """The handler's absolute deadline: the shortest of the propagated one (verified
        members only), ``default_timeout`` and any deadline already in force."""
        candidates = [d for d in (inbound_deadline.get(),) if d is not None]
        propagated = propagated_timeout(trusted_headers)
        if propagated is not None:
            candidates.append(now + propagated)
        if self.default_timeout is not None:
            candidates.append(now + self.default_timeout)
        return min(candidates) if candidates else None

    def _record(
        self, source: str, status: int, reason: Reason, start: float, scope: Scope, route: str = ""
    ) -> None:
        seconds = self._clock() - start
        metrics = self.mesh.metrics
        if metrics is not None:
            # ``_value_``: the enum's plain attribute (``.value`` is a descriptor call)
            code = str(status)
            metrics.observe_inbound(source, self._destination, route, code, reason._value_, seconds)
        events = self.mesh.events  # call-completion events (meshlib.observe)
        if events is not None:
            peer = None if source == UNAUTHENTICATED else source
            events.inbound(source, self._destination, scope, status, reason, seconds, peer, route)


@lru_cache(maxsize=1024)
def _caller(identity: str) -> SpiffeID | None:
    """The parsed SPIFFE ID of a verified caller (``None``: it does not parse, and grants
    nothing). Memoised: a member's requests repeat its identity, and parsing costs µs."""
    # Imported here: meshlib.identity loads cryptography, which plain-HTTP users never need
    # (a verified identity means it is loaded already).
    from meshlib.identity.spiffe import SpiffeID, SpiffeIDError

    try:
        return SpiffeID.parse(identity)
    except SpiffeIDError:
        return None


def _normalized(scope: Scope, path: str) -> Scope:
    """Once any authorization applies to this service, the app sees the normalised path
    the decision is made on (NET-6: decision and routing use the same string)."""
    normal = normalize_path(path)
    if normal is None or normal == path:
        return scope  # unnormalisable paths are denied by the authorization step
    raw = quote(normal, safe="/:@!$&'()*+,;=-._~").encode("ascii")
    return {**scope, "path": normal, "raw_path": raw}


#: The scope key an app sets in the scope it was given to say "this request is not traffic":
#: meshlib's metrics and admin apps do, so a scrape that reaches them through this middleware
#: (FastAPI's ``add_middleware`` wraps the mounts too) is left out of the request metrics and the
#: call events (tap, top, access log, graph); its authorization decision is still counted.
#: Read like ``scope["route"]``, once the app returns.
UNCOUNTED = "meshlib.uncounted"


def route_template(scope: Scope) -> str:
    """The ``route`` metric label of an inbound request: the template of the route the app's
    router matched, never the raw path (which would make one series per URL).

    The contract is FastAPI's: after matching, the router stores the matched route object in
    the scope it was given (``scope["route"]``, with the template as ``.path``); the scope is
    the dict this middleware passed on, so it is readable once the app returns. No route
    (no router, nothing matched, refused before the app) is the one bucket ``""``.
    """
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else ""


async def send_local_reply(
    send: Send, status: int, reason: Reason, *, retry_after: int | None = None
) -> None:
    """Answer on the mesh's behalf: plain text naming the reason, with the reason header."""
    body = f"{reason.value}\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (REASON_HEADER.encode(), reason.value.encode()),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def refuse_websocket(
    scope: Scope, receive: Receive, send: Send, status: int, reason: Reason
) -> None:
    """Refuse a WebSocket handshake before accepting it: an HTTP answer with ``status`` and the
    reason (as :func:`send_local_reply`) where the server offers the ASGI
    ``websocket.http.response`` extension, else a close before accept, which servers answer
    with 403. The handshake's ``websocket.connect`` is received first, as ASGI orders it."""
    message = await receive()
    if message.get("type") != "websocket.connect":
        return  # the client left before its handshake was answered
    await send_local_reply(handshake_send(send, scope.get("extensions") or {}), status, reason)


def handshake_send(send: Send, extensions: Mapping[str, Any]) -> Send:
    """``send`` for an HTTP answer to a WebSocket handshake: ``http.response.*`` messages go out
    as the ``websocket.http.response`` extension's where the server supports denial responses,
    else the answer is a close before accepting (which the server answers 403)."""
    denial = "websocket.http.response" in extensions

    async def answer(message: Message) -> None:
        kind = message["type"]
        if denial:
            await send({**message, "type": f"websocket.{kind}"})
        elif kind == "http.response.start":
            await send({"type": "websocket.close", "code": 1008})

    return answer
