"""The ingress gateway's ASGI app: one request from outside, checked at the edge, routed by the
Gateway's HTTPRoutes and forwarded into the mesh through a mesh client, bodies streamed both
ways.

Per request, in order (each step's local answer beside it, with ``x-mesh-reason``):

1. the listener: of the Gateway's listeners on the port the request arrived on, the one whose
   ``hostname`` equals the Host (lower case, port stripped), else the most specific wildcard,
   else the one without hostname (upstream Listener.hostname); none: **404** ``no_route``;
2. the edge limits and framing (:func:`meshlib.gateway.edge.check_request`): 414, 431, 413,
   400 ``bad_request``, the connection closed after the answer;
3. the path, normalised as the inbound side normalises it for authorization (``%2F`` decoded,
   ``//`` merged, dot segments removed; :func:`meshlib.policy.authz.normalize_path`), so that
   the route matched and the path the backend reads are one string; an unnormalisable path
   (NUL, backslash, ``..`` above the root): **400**;
4. the route (:class:`meshlib.policy.routes.IngressIndex`, the same rule compiler and
   precedence as mesh mode): no rule matches, **404** ``no_route``; a RequestRedirect, its 3xx
   with ``Location`` (HTTP → HTTPS is a route on the HTTP listener with
   ``requestRedirect: {scheme: https}``); a backend by weight from the mesh's seeded RNG, none
   usable, **500** ``invalid_backend``;
5. the filters: request header edits, URLRewrite path and hostname (the Host the backend sees
   is the client's unless rewritten), response header edits;
6. the call: ``http://{service}.{namespace}:{port}{path}?{query}`` through the mesh client with
   the edge-cleaned headers (:func:`meshlib.gateway.edge.edge_headers`): mTLS with the
   gateway's SVID, retries, budgets, outlier detection are the mesh's. The request body is read
   from ASGI ``receive`` as the client sends it (over the body limit: **413**), the response
   relayed chunk by chunk as it arrives: neither is held whole. A rule's ``timeouts.request``
   caps the call's deadline (:data:`meshlib.context.inbound_deadline`). A mesh failure answers
   its own status and reason (503, 504, 429, ...); a transport failure **502**
   (``connect_failure``, else ``reset``). A client that goes away cancels the call.

A WebSocket handshake (an ASGI ``websocket`` scope; uvicorn runs wsproto for it) takes steps
1 to 5 as its GET would — the edge middleware has authenticated and authorized it before, so a
refused upgrade never reaches a backend — and the gateway's own answers are HTTP refusals
(``websocket.http.response``); then :mod:`meshlib.gateway.websocket` passes it through to one
endpoint of the backend (:meth:`GatewayHost.stream_endpoint`: over mTLS with the gateway's SVID
when the service uses it). An ``Upgrade`` that reaches the app as a plain ``http`` request (a
server without a WebSocket library) is refused with 501.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from meshlib.config.gatewaykind import (
    Gateway,
    GatewayConfig,
    Listener,
    ListenerProtocol,
    hostnames_intersect,
)
from meshlib.config.model import HeaderModifier, RateLimitPolicy, Snapshot
from meshlib.config.routemodel import HTTPRoute
from meshlib.context import inbound_deadline
from meshlib.errors import REASON_HEADER, MeshError, Reason
from meshlib.gateway.edge import (
    DEFAULT_LIMITS,
    HOP_BY_HOP,
    TRACE_CONTEXT_HEADERS,
    Downstream,
    EdgeLimits,
    Refusal,
    body_refusal,
    check_request,
    edge_headers,
    fault_header_names,
    relayed_headers,
)
from meshlib.gateway.ratelimit import MAX_KEYS, EdgeRateLimits
from meshlib.inbound.middleware import InboundHost, MeshMiddleware, handshake_send
from meshlib.observe.asgi import answer_lifespan
from meshlib.outbound.call import STREAM_EXTENSION
from meshlib.outbound.stream import StreamEndpoint
from meshlib.policy.authz import normalize_path
from meshlib.policy.routes import (
    IngressIndex,
    edit_headers,
    host_specificity,
    pick,
    redirect_location,
    request_edit,
    response_modifiers,
)

__all__ = [
    "GatewayApp",
    "GatewayHost",
    "attached_routes",
    "edge_stack",
    "listener_for",
    "split_host",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("meshlib.gateway")

#: Seconds each phase of an upstream exchange may take (connect, a read, a write, the pool
#: wait): a backend that stops sending mid-answer is cut after this long.
UPSTREAM_TIMEOUT = 10.0

#: Seconds to reach a WebSocket's backend and complete its handshake (a rule's
#: ``timeouts.request`` caps it; the open connection has no deadline).
HANDSHAKE_TIMEOUT = 10.0

#: Safe characters when a normalised path is sent on (as the inbound side re-quotes it).
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


class GatewayHost(Protocol):
    """What the app needs from the gateway's mesh (:class:`meshlib.Mesh`): the policy in force
    (its services resolve backends, its FaultInjection header names are stripped at the edge),
    the seeded RNG that picks backends by weight, the clock deadlines are read on, and an
    endpoint to pass a WebSocket through to."""

    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def rng(self) -> random.Random: ...

    def clock(self) -> float:
        """The clock of the mesh's deadlines (:data:`meshlib.context.inbound_deadline`)."""

    def stream_endpoint(self, service_key: str) -> StreamEndpoint | None:
        """An endpoint of the service for a WebSocket, and how to connect to it (plain or
        mTLS with the peer's SPIFFE ID checked); None when there is none."""


def split_host(value: str | None) -> tuple[str, int | None]:
    """A Host header as (lower-case name without a trailing dot, port or None); IPv6
    literals keep their brackets. ``""`` when there is none."""
    if not value:
        return "", None
    text = value.strip().lower()
    port: int | None = None
    if text.startswith("["):
        end = text.find("]")
        if end != -1:
            rest = text[end + 1 :]
            if rest.startswith(":") and rest[1:].isdigit():
                port = int(rest[1:])
            return text[: end + 1], port
    name, sep, tail = text.rpartition(":")
    if sep and tail.isdigit() and name:
        text, port = name, int(tail)
    return text.rstrip("."), port


def listener_for(listeners: Sequence[Listener], host: str) -> Listener | None:
    """The listener serving ``host`` among those of one port: the exact hostname, else the
    most specific (longest) wildcard, else the one without hostname; the first of equals (the
    precedence routes' hostnames have, :func:`meshlib.policy.routes.host_specificity`)."""
    best: Listener | None = None
    best_rank: tuple[int, int] | None = None
    for listener in listeners:
        name = listener.hostname
        rank = host_specificity(() if name is None else (name,), host)
        if rank is not None and (best_rank is None or rank < best_rank):
            best, best_rank = listener, rank
    return best


def attached_routes(gateway: Gateway, config: GatewayConfig) -> dict[str, tuple[HTTPRoute, ...]]:
    """Listener name → the routes of ``config`` attached to it: every parentRef naming the
    Gateway, narrowed by ``sectionName`` and ``port``, to listeners whose allowedRoutes admit
    the route and whose hostname (if any) intersects the route's hostnames (if any)."""
    out: dict[str, list[HTTPRoute]] = {item.name: [] for item in gateway.listeners}
    for route in config.routes_of(gateway):
        for parent in route.parent_refs:
            if parent.name != gateway.name or parent.namespace != gateway.namespace:
                continue
            for listener in gateway.listeners:
                if parent.section_name is not None and listener.name != parent.section_name:
                    continue
                if parent.port is not None and listener.port != parent.port:
                    continue
                if not listener.allows(route.namespace, gateway.namespace):
                    continue
                if (
                    listener.hostname is not None
                    and route.hostnames
                    and not any(hostnames_intersect(listener.hostname, h) for h in route.hostnames)
                ):
                    continue
                if route not in out[listener.name]:
                    out[listener.name].append(route)
    return {name: tuple(routes) for name, routes in out.items()}


@dataclass(frozen=True)
class _Index:
    snapshot: Snapshot
    routes: IngressIndex
    strip: frozenset[str]


@dataclass(frozen=True)
class _Answer:
    """A local answer of the gateway's."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True)
class _Target:
    """Where a routed request goes: the backend service key and port, the path (as sent) and
    query, the edge-cleaned and edited headers (``host`` among them), whether a body
    follows, the response header edits and the rule's ``timeouts.request``."""

    method: str
    service: str
    port: int | None
    path: str
    query: str
    headers: list[tuple[str, str]]
    has_body: bool
    response_edits: Sequence[HeaderModifier]
    timeout: float | None

    @property
    def request_target(self) -> str:
        """The path and query, as the request line carries them."""
        return f"{self.path}?{self.query}" if self.query else self.path


class _BodyRefused(Exception):
    """The request body passed the edge's limit while it was being streamed."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.detail)
        self.refusal = refusal


class _ClientGone(Exception):
    """The client disconnected before its request body ended."""


class GatewayApp:
    """The ASGI app of one Gateway (see the module docstring).

    ``transport`` is the mesh transport requests go out through (``mesh.async_transport()``):
    the transport, not an ``httpx.AsyncClient``, because a client keeps a cookie jar, and a
    jar shared by every user of the gateway would hand one user's ``Set-Cookie`` to the next
    (it also skips the client's per-request work). ``timeout`` bounds each phase of the
    upstream exchange (connect, each read and write, the pool wait); the mesh's deadline
    bounds the whole call. ``mesh`` gives the policy and the RNG (:class:`GatewayHost`).
    ``ports`` maps the port a server listens on to the Gateway listener port it serves, when
    they differ (``meshctl gateway serve --port``); :meth:`on_port` gives an app fixed to one
    listener port instead.
    ``trusted_hops`` and ``trust_trace_context`` are :func:`~meshlib.gateway.edge.edge_headers`'.
    ``rate_limit_per_ip``, ``rate_limit_per_subject`` (``"100/s:200"``, ``(rps, burst)`` or a
    RateLimitPolicy) and ``max_rate_keys``: :class:`~meshlib.gateway.ratelimit.EdgeRateLimits`.
    """

    def __init__(
        self,
        gateway: Gateway,
        config: GatewayConfig,
        *,
        mesh: GatewayHost,
        transport: httpx.AsyncBaseTransport,
        timeout: float | None = UPSTREAM_TIMEOUT,
        limits: EdgeLimits = DEFAULT_LIMITS,
        trusted_hops: int = 0,
        trust_trace_context: bool = False,
        ports: Mapping[int, int] | None = None,
        rate_limit_per_ip: RateLimitPolicy | tuple[float, int] | str | None = None,
        rate_limit_per_subject: RateLimitPolicy | tuple[float, int] | str | None = None,
        max_rate_keys: int = MAX_KEYS,
    ) -> None:
        self.gateway = gateway
        self.mesh = mesh
        self.transport = transport
        self._timeout = dict.fromkeys(("connect", "read", "write", "pool"), timeout)
        self.limits = limits
        self.trusted_hops = trusted_hops
        self.trust_trace_context = trust_trace_context
        self.ports = dict(ports or {})
        self.rate_limits = EdgeRateLimits(
            clock=mesh.clock,
            per_ip=rate_limit_per_ip,
            per_subject=rate_limit_per_subject,
            max_keys=max_rate_keys,
        )
        self._routes = config.routes_of(gateway)
        self._attached = attached_routes(gateway, config)
        self._by_port: dict[int, tuple[Listener, ...]] = {}
        for listener in gateway.listeners:
            self._by_port[listener.port] = (*self._by_port.get(listener.port, ()), listener)
        self._index: _Index | None = None

    def on_port(self, port: int) -> ASGIApp:
        """An ASGI app serving the Gateway's listeners on ``port``, wherever it is bound."""
        if port not in self._by_port:
            raise ValueError(f"Gateway {self.gateway.name} has no listener on port {port}")

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await self.handle(scope, receive, send, port)

        return app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        bound = int(server[1]) if server and server[1] is not None else 0
        await self.handle(scope, receive, send, self.ports.get(bound, bound))

    async def handle(self, scope: Scope, receive: Receive, send: Send, port: int) -> None:
        """Serve one ASGI connection scope that arrived on the Gateway's listener ``port``."""
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send, port)
        elif kind == "websocket":
            await self._websocket(scope, receive, send, port)
        elif kind == "lifespan":
            await answer_lifespan(receive, send)

    def _current(self) -> _Index:
        """The route index of the policy in force, rebuilt when the mesh reloads it (backends
        resolve against its services)."""
        snapshot = self.mesh.snapshot
        index = self._index
        if index is None or index.snapshot is not snapshot:
            routes = IngressIndex(self._routes, self._attached, snapshot.services)
            index = self._index = _Index(snapshot, routes, fault_header_names(snapshot.faults))
        return index

    def _select(self, scope: Scope, port: int) -> _Answer | _Target:
        """Steps 1 to 5 of the module docstring for an ``http`` or ``websocket`` scope: the
        gateway's own answer, or where to send the request and with what."""
        websocket = scope["type"] == "websocket"
        received: list[tuple[bytes, bytes]] = list(scope.get("headers") or ())
        host_value = next((v.decode("latin-1") for n, v in received if n.lower() == b"host"), None)
        host, host_port = split_host(host_value)
        listener = listener_for(self._by_port.get(port, ()), host)
        if listener is None:
            return _answer(404, Reason.NO_ROUTE, f"no listener on port {port} serves {host!r}")
        raw_path: bytes = scope.get("raw_path") or scope.get("path", "/").encode("utf-8")
        query_bytes: bytes = scope.get("query_string") or b""
        refusal = check_request(
            raw_path,
            query_bytes,
            received,
            http_version=scope.get("http_version", "1.1"),
            limits=self.limits,
        )
        if refusal is not None:
            return _answer(refusal.status, refusal.reason, refusal.detail, close=True)
        if not websocket and any(n.lower() == b"upgrade" for n, _ in received):
            # A server without a WebSocket library hands the handshake to the app as a plain
            # request: forwarded without its Upgrade it would reach the backend as a GET.
            return _Answer(501, _NOT_UPGRADED_HEADERS, _NOT_UPGRADED)
        path = normalize_path(scope.get("path", "/"))
        if path is None:
            return _answer(400, Reason.BAD_REQUEST, "the path cannot be normalised")
        if path == scope.get("path"):
            sent_path = raw_path.decode("latin-1").partition("?")[0]
        else:
            sent_path = quote(path, safe=_PATH_SAFE)
        query = query_bytes.decode("latin-1")
        index = self._current()
        table = index.routes.table(listener.name, host)
        method = "GET" if websocket else scope.get("method", "GET")  # the upgrade is a GET
        candidate = None
        if table is not None:
            lookup: dict[str, str] = {}
            for name, value in received:
                key = name.decode("latin-1").lower()
                text = value.decode("latin-1")
                lookup[key] = f"{lookup[key]}, {text}" if key in lookup else text
            candidate = table.select(method, path, query, lookup)
        if candidate is None:
            return _answer(404, Reason.NO_ROUTE, f"no route of listener {listener.name!r}")
        rule = candidate.rule
        scheme = "https" if listener.protocol is ListenerProtocol.HTTPS else "http"
        if rule.redirect is not None:
            location = redirect_location(
                rule.redirect,
                candidate.match,
                scheme,
                host,
                host_port if host_port is not None else listener.port,
                path,
                query,
            )
            return _Answer(
                rule.redirect.status_code,
                [(b"location", location.encode("latin-1")), (b"content-length", b"0")],
                b"",
            )
        backend = pick(rule, self.mesh.rng.random)
        if backend is None or backend.service is None:
            return _answer(500, Reason.INVALID_BACKEND, f"{rule.where} has no usable backend")
        edit = request_edit(candidate, backend, path)
        headers = edge_headers(
            received,
            Downstream(_peer(scope), scheme, host_value),
            also_strip=index.strip,
            trusted_hops=self.trusted_hops,
            trust_trace_context=self.trust_trace_context,
        )
        pairs = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]
        if edit.headers:
            pairs = edit_headers(pairs, edit.headers)
        if edit.host is not None:
            pairs = [(n, v) for n, v in pairs if n.lower() != "host"] + [("host", edit.host)]
        if edit.path is not None:
            sent_path = quote(edit.path, safe=_PATH_SAFE)
        return _Target(
            method,
            backend.service,
            backend.ref.port,
            sent_path,
            query,
            pairs,
            _has_body(received),
            response_modifiers(candidate, backend),
            rule.rule.timeouts.request or None,
        )

    async def _http(self, scope: Scope, receive: Receive, send: Send, port: int) -> None:
        if self.rate_limits.active and await self.rate_limits.refuse(
            scope, send, self.trusted_hops
        ):
            return
        target = self._select(scope, port)
        if isinstance(target, _Answer):
            await _respond(send, target.status, target.headers, target.body)
            return
        await self._forward(receive, send, target)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, port: int) -> None:
        """A WebSocket handshake (already authorized by the edge middleware): routed as its
        GET would be, then passed through to one endpoint of the backend
        (:mod:`meshlib.gateway.websocket`); the gateway's own answers as HTTP refusals."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        extensions = scope.get("extensions") or {}
        if self.rate_limits.active and await self.rate_limits.refuse(
            scope, handshake_send(send, extensions), self.trusted_hops
        ):
            return
        target = self._select(scope, port)
        if isinstance(target, _Answer):
            await _refuse(extensions, send, target)
            return
        try:
            from meshlib.gateway.websocket import pass_through
        except ImportError:  # pragma: no cover - the `gateway` extra is not installed
            await _refuse(extensions, send, _Answer(501, _NOT_UPGRADED_HEADERS, _NOT_UPGRADED))
            return
        upstream = self.mesh.stream_endpoint(target.service)
        if upstream is None:
            detail = f"{target.service} has no endpoint"
            await _refuse(extensions, send, _answer(503, Reason.NO_HEALTHY_ENDPOINTS, detail))
            return

        async def refuse(status: int, reason: Reason, detail: str) -> None:
            await _refuse(extensions, send, _answer(status, reason, detail))

        host = next((v for n, v in target.headers if n.lower() == "host"), target.service)
        timeout = HANDSHAKE_TIMEOUT
        if target.timeout is not None:
            timeout = min(timeout, target.timeout)  # the rule's timeouts.request caps it
        await pass_through(
            scope.get("subprotocols") or (),
            extensions,
            receive,
            send,
            refuse,
            upstream,
            host=host,
            target=target.request_target,
            headers=target.headers,
            response_edits=target.response_edits,
            max_message=self.limits.max_websocket_message_bytes,
            timeout=timeout,
        )

    async def _forward(self, receive: Receive, send: Send, target: _Target) -> None:
        """Send the request into the mesh and relay the answer, both bodies streamed; a client
        that disconnects cancels the call."""
        url = f"http://{target.service}:{target.port}{target.request_target}"
        has_body = target.has_body
        body_done = asyncio.Event()
        finished = False
        limits = self.limits

        async def body() -> AsyncIterator[bytes]:
            seen = 0
            try:
                while True:
                    message = await _receive_in_time(receive, self.mesh.clock)
                    if message["type"] == "http.disconnect":
                        raise _ClientGone()
                    chunk: bytes = message.get("body", b"")
                    if chunk:
                        seen += len(chunk)
                        refusal = body_refusal(seen, limits)
                        if refusal is not None:
                            raise _BodyRefused(refusal)
                        yield chunk
                    if not message.get("more_body", False):
                        return
            finally:
                body_done.set()

        if not has_body:
            body_done.set()

        async def relay() -> None:
            nonlocal finished
            if target.timeout is not None:
                cap = self.mesh.clock() + target.timeout
                current = inbound_deadline.get()
                if current is None or cap < current:
                    inbound_deadline.set(cap)  # this task's own context: the caller's is unchanged
            request = httpx.Request(
                target.method,
                url,
                headers=target.headers,
                content=body() if has_body else None,
                # The answer is streamed: the deadline ends at its headers (STREAM_EXTENSION).
                extensions={"timeout": self._timeout, STREAM_EXTENSION: True},
            )
            try:
                response = await self.transport.handle_async_request(request)
            except (_BodyRefused, _ClientGone, MeshError, httpx.TransportError) as exc:
                # The body's own exceptions may come back as the cause of a transport error.
                cause = exc if isinstance(exc, _BodyRefused | _ClientGone) else exc.__cause__
                if isinstance(cause, _ClientGone):
                    raise cause from None
                if isinstance(cause, _BodyRefused):
                    refusal = cause.refusal
                    await _local(send, refusal.status, refusal.reason, refusal.detail, close=True)
                elif isinstance(exc, MeshError):
                    await _local(send, exc.status, exc.reason, str(exc))
                else:
                    await self._transport_failed(send, url, exc)
                return
            try:
                out = relayed_headers(response.headers.raw, HOP_BY_HOP, target.response_edits)
                await send(
                    {"type": "http.response.start", "status": response.status_code, "headers": out}
                )
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                finished = True  # before the last send: a disconnect now cancels nothing
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except (MeshError, httpx.TransportError) as exc:
                # The status line is out: a cut connection is the only honest signal left,
                # and raising is how an ASGI app asks the server for it.
                log.info("gateway response from %s broke: %r", url, exc)
                raise
            finally:
                await response.aclose()

        task = asyncio.ensure_future(relay())

        async def watch() -> None:
            await body_done.wait()
            while not task.done():
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not finished:
                        task.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
            log.info("client went away: the call to %s was cancelled", url)
        except _ClientGone:
            log.info("client went away while sending its body to %s", url)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    @staticmethod
    async def _transport_failed(send: Send, url: str, exc: BaseException) -> None:
        """A transport failure the mesh left as it was: 502, as a proxy answers."""
        log.info("gateway call to %s failed: %r", url, exc)
        connect = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
        reason = Reason.CONNECT_FAILURE if connect else Reason.RESET
        await _local(send, 502, reason, f"the upstream failed: {type(exc).__name__}")


#: The client's body did not arrive within the call's deadline (Envoy's request_timeout: 408).
_SLOW_BODY = Refusal(
    408, "the request body did not arrive within the request's deadline", Reason.TIMEOUT
)


async def _receive_in_time(receive: Receive, clock: Callable[[], float]) -> Message:
    """The client's next body message within the call's deadline, if one is in force
    (:data:`inbound_deadline`, on ``clock``): the deadline covers the upload too, since the
    mesh times its reads and writes, not the wait for a client that stopped sending. Past it,
    :data:`_SLOW_BODY`."""
    deadline = inbound_deadline.get()
    if deadline is None:
        return await receive()
    try:
        return await asyncio.wait_for(receive(), max(0.0, deadline - clock()))
    except TimeoutError:
        raise _BodyRefused(_SLOW_BODY) from None


_TRACE_FIELDS = frozenset(name.encode("latin-1") for name in TRACE_CONTEXT_HEADERS)


def edge_stack(app: ASGIApp, mesh: InboundHost, *, trust_trace_context: bool = False) -> ASGIApp:
    """``app`` (a :meth:`GatewayApp.on_port`) behind the gateway mesh's inbound
    :class:`~meshlib.inbound.MeshMiddleware` — golden metrics, the SERVER span, access log,
    RequestAuthentication and AuthorizationPolicy of the gateway's own Service apply at the
    edge — with the trace context from outside dropped *before* the middleware reads it
    (unless ``trust_trace_context``): else its span would continue the stranger's trace and
    the mesh client would carry it in."""
    inner = MeshMiddleware(app, mesh=mesh)
    if trust_trace_context:
        return inner

    async def front(scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope.get("headers")
        if (
            scope["type"] in ("http", "websocket")
            and headers is not None
            and any(name.lower() in _TRACE_FIELDS for name, _ in headers)
        ):
            kept = [(n, v) for n, v in headers if n.lower() not in _TRACE_FIELDS]
            scope = {**scope, "headers": kept}
        await inner(scope, receive, send)

    return front


def _peer(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


def _has_body(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            return True
        if lowered == b"content-length" and value.strip() != b"0":
            return True
    return False


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _answer(status: int, reason: Reason, detail: str, *, close: bool = False) -> _Answer:
    """The gateway's own answer: ``reason: detail`` as text, the reason in ``x-mesh-reason``."""
    body = f"{reason.value}: {detail}\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode("ascii")),
        (REASON_HEADER.encode("ascii"), reason.value.encode("ascii")),
    ]
    if close:
        headers.append((b"connection", b"close"))
    return _Answer(status, headers, body)


async def _local(
    send: Send, status: int, reason: Reason, detail: str, *, close: bool = False
) -> None:
    answer = _answer(status, reason, detail, close=close)
    await _respond(send, answer.status, answer.headers, answer.body)


_NOT_UPGRADED = (
    b"not implemented: this server passes no WebSockets through (serve the gateway with "
    b"uvicorn ws='wsproto', from meshlib[gateway])\n"
)
_NOT_UPGRADED_HEADERS = [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", str(len(_NOT_UPGRADED)).encode("ascii")),
    (b"connection", b"close"),
]


async def _refuse(extensions: Mapping[str, Any], send: Send, answer: _Answer) -> None:
    """The gateway's answer to a WebSocket handshake it does not pass through."""
    await _respond(handshake_send(send, extensions), answer.status, answer.headers, answer.body)
