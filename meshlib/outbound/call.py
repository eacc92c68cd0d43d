"""The outbound call sequence, written once as a generator of effects (sans-IO).

:func:`run_call` decides everything about one call — route, split, faults, limits, endpoint,
retries, backoff, hedges, deadline — and *yields* the I/O it needs as effect values (``Send``,
``Sleep``, ``Race``, ``Close``, ``Buffer``, ``Mirror``). The sync transport and the async
transport (:mod:`meshlib.outbound.transport`) are thin drivers that perform those effects and
send the results back in, so no policy logic is written twice (the pattern of ``httpx/_auth.py``).

The order of the stack, each step with its reason:

1. route + split — everything below depends on which backend this call goes to;
2. deadline start — the overall timeout covers faults, backoff, every attempt and (unless the
   caller streams the response) the response body, which :class:`Body` holds to it;
3. faults — above retries, so an injected abort is returned, never retried;
4. rate limit, connection-pool limit, circuit breaker — before any budget is spent on a call
   we refuse; the breaker admits *calls*, so a retry is never refused half-way through one;
5. budget deposit — every admitted call earns retry budget, once;
6. body buffering — replayability is decided before the first attempt, never after;
7. mirror — fire-and-forget, after admission, so refused calls are not mirrored;
8. attempts: endpoint pick (avoiding endpoints already tried) → send (maybe hedged) → one
   classification feeding balancer, outlier detection and the retry decision;
9. the call's final outcome, after retries and endpoint switching, is the breaker's one verdict
   for the call (what its caller saw; a single bad endpoint is outlier detection's business).
"""

from __future__ import annotations

import operator
import random
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Collection,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from meshlib.config.model import (
    EffectivePolicy,
    FaultRule,
    HeaderModifier,
    MirrorRule,
    ServiceDef,
)
from meshlib.context import DEADLINE_HEADER, inbound_deadline
from meshlib.decision import DECISION_EXTENSION, AttemptRecord, Decision
from meshlib.errors import (
    REASON_HEADER,
    CircuitOpenError,
    ConnectionPoolOverflowError,
    MeshError,
    MeshTimeout,
    NoHealthyEndpointsError,
    RateLimitedError,
    Reason,
    RetryBudgetExhaustedError,
    annotate,
    describe,
)
from meshlib.policy.balancer import EndpointState
from meshlib.policy.breaker import Admission, BreakerState
from meshlib.policy.fault import NO_FAULT, FaultDecision, decide_faults
from meshlib.policy.retry import (
    MAX_RETRY_AFTER,
    Failure,
    backoff_delay,
    is_failure_status,
    is_idempotent,
    max_retries,
    parse_retry_after,
    should_retry,
)
from meshlib.policy.routes import (
    Backend,
    RequestEdit,
    RouteTable,
    Rule,
    backend_service,
    default_port,
    edit_headers,
    pick,
    redirect_location,
    request_edit,
    response_modifiers,
    rule_policy,
)
from meshlib.policy.routing import Router
from meshlib.policy.split import pick_backend

if TYPE_CHECKING:
    from meshlib.outbound.destination import Destination

#: Bodies up to this size are buffered so they can be replayed; larger ones stream through and
#: are never retried (Linkerd and gRFC A6 use 64 KiB).
MAX_REPLAY_BUFFER = 64 * 1024

_REFUSED = Admission.REFUSED
_PROBE = Admission.PROBE
_HALF_OPEN = BreakerState.HALF_OPEN.value  # the circuit-state metric's words
_CLOSED = BreakerState.CLOSED.value
_OPEN_STATE = BreakerState.OPEN

#: Request extension marking a call whose response the caller streams (``client.stream``):
#: its deadline ends at the response headers and ``streamIdleTimeout`` bounds each read of the
#: body. ``mesh.client()`` sets it; with ``httpx.Client(transport=mesh.transport())`` pass
#: ``extensions={STREAM_EXTENSION: True}`` to ``client.stream``. Without it the deadline covers
#: the whole body (docs/features/timeouts.md).
STREAM_EXTENSION = "mesh_stream"

# --- effects: what the core asks its driver to do ------------------------------------------------


@dataclass(slots=True)
class Send:
    """Send one attempt; the driver answers with an :class:`Outcome`."""

    request: httpx.Request
    state: EndpointState
    number: int
    hedge: bool = False
    tls: bool = False  # over mutual TLS (the mesh's mTLS transport), decided per call


@dataclass(slots=True)
class Sleep:
    """Wait; the driver answers None."""

    seconds: float


@dataclass(slots=True)
class Close:
    """Close a response that will not reach the caller; the driver answers None."""

    response: httpx.Response


@dataclass(slots=True)
class Buffer:
    """Read the request body into memory (``request.read()``); the driver answers None."""

    request: httpx.Request


#: Told how a mirrored copy ended: ``(response, None)`` answered (the response already read
#: and closed), ``(None, error)`` failed, ``(None, None)`` dropped without being sent.
MirrorObserver = Callable[[httpx.Response | None, BaseException | None], None]


@dataclass(slots=True)
class Mirror:
    """Send a copy somewhere, do not wait, discard the answer; the driver answers None. The
    driver calls ``observe`` (if set, e.g. by tracing) exactly once, when the copy has ended."""

    request: httpx.Request
    tls: bool = False
    service: str = ""  # the mirror service's key
    observe: MirrorObserver | None = None


@dataclass(slots=True)
class Race:
    """Send ``first``; if it has not completed after ``delay`` seconds, ask ``backup()`` for a
    second attempt (None: no hedge) and take the first outcome for which ``accept`` is true
    (or the last one to complete). The driver cancels and closes the loser and answers a
    :class:`RaceResult`."""

    first: Send
    delay: float
    backup: Callable[[], Send | None]
    accept: Callable[[Outcome], bool]


@dataclass(slots=True)
class Outcome:
    response: httpx.Response | None
    error: httpx.TransportError | None
    elapsed: float


@dataclass(slots=True)
class RaceResult:
    winner: Send
    outcome: Outcome
    loser: Send | None = None  # None when no backup was sent
    loser_outcome: Outcome | None = None  # None when the loser was cancelled


Effect = Send | Sleep | Close | Buffer | Mirror | Race


class Labels(Protocol):
    """A metric family with labels: ``labels(*values)`` is the child to ``inc()``."""

    def labels(self, *values: str) -> Any: ...


class CallMetrics(Protocol):
    """The metrics the call sequence updates (:class:`meshlib.observe.metrics.MeshMetrics`)."""

    @property
    def retries(self) -> Labels: ...

    @property
    def budget_exhausted(self) -> Labels: ...

    @property
    def ejections(self) -> Labels: ...

    @property
    def faults(self) -> Labels: ...

    def observe_call(
        self,
        source: str,
        destination: str,
        route: str,
        code: str,
        reason: str,
        seconds: float,
        attempts: Sequence[AttemptRecord] = (),
    ) -> None: ...

    def set_circuit_state(self, source: str, destination: str, state: str) -> None: ...


class CallHost(Protocol):
    """What the call sequence needs from the mesh that runs it."""

    source: str

    @property
    def metrics(self) -> CallMetrics | None: ...

    def clock(self) -> float: ...

    @property
    def rng(self) -> random.Random: ...

    def destination(self, key: str, router: Router) -> Destination: ...

    def extra_faults(self, service_key: str, route: str | None) -> tuple[FaultRule, ...]: ...

    def uses_mtls(self, router: Router, service_key: str) -> bool: ...

    #: Retry without waiting (:func:`meshlib.testing.instant_retries`): the backoff is still
    #: drawn, so the seeded sequence is the same, but the wait is zero.
    instant_backoff: bool


# --- classification -------------------------------------------------------------------------------


def classify(outcome: Outcome) -> tuple[Failure, int | None]:
    """One classification of an attempt, shared by retries, breaker, outlier detection."""
    response = outcome.response
    if response is not None:
        status = response.status_code
        return (Failure.STATUS if is_failure_status(status) else Failure.NONE), status
    error = outcome.error
    if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        return Failure.CONNECT, None
    if isinstance(error, httpx.TimeoutException):
        return Failure.TIMEOUT, None
    if isinstance(error, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return Failure.RESET, None
    return Failure.ERROR, None


# --- requests -------------------------------------------------------------------------------------


_DEFAULT_PORTS = {"http": 80, "https": 443}
_DEADLINE_KEY = DEADLINE_HEADER.encode("ascii")  # lower case, as httpx keys its header list
_header_key = operator.itemgetter(1)
_new_url = httpx.URL.__new__
_new_request = httpx.Request.__new__
_new_headers = httpx.Headers.__new__
_new_tuple = tuple.__new__


def _private_shapes_ok() -> bool:
    """Whether httpx's ``URL``, ``Request`` and ``Headers`` have the private shape the fast
    paths below write (checked once, at import): a parsed URL tuple with the expected fields,
    a ``Request`` built from a stream that holds exactly five attributes, and a header list of
    ``(raw key, lower-case key, value)``. Any other httpx takes the public constructors."""
    probe = httpx.Request(
        "GET", "http://probe/", headers={"X-A": "b"}, stream=httpx.ByteStream(b"")
    )
    ref = getattr(probe.url, "_uri_reference", None)
    return (
        getattr(ref, "_fields", None)
        == ("scheme", "userinfo", "host", "port", "path", "query", "fragment")
        and set(vars(probe)) == {"method", "url", "headers", "extensions", "stream"}
        and getattr(probe.headers, "_list", None) == [(b"X-A", b"x-a", b"b")]
        and set(vars(probe.headers)) == {"_list", "_encoding"}
    )


_FAST = _private_shapes_ok()


def _endpoint_url(url: httpx.URL, host: str, port: int, tls: bool = False) -> httpx.URL:
    """``url`` aimed at one endpoint: host and port swapped, ``https`` when the attempt goes
    over mutual TLS; path and query unchanged.

    ``URL.copy_with`` re-parses the whole URL (about 15 µs, the largest cost of a call); the
    parsed form is a named tuple whose fields can be swapped directly. The fast path is checked
    against ``copy_with`` in tests/policy/test_call_url.py and falls back to it whenever the
    private shape is not the expected one.
    """
    if _FAST and port > 0:
        ref = url._uri_reference
        scheme = "https" if tls else ref[0]
        # httpx keeps a scheme's default port as None (as copy_with would normalise it).
        parsed_port = None if _DEFAULT_PORTS.get(scheme) == port else port
        new = _new_url(httpx.URL)
        new._uri_reference = _new_tuple(
            type(ref), (scheme, ref[1], host.lower(), parsed_port, ref[4], ref[5], ref[6])
        )
        return new
    return url.copy_with(scheme="https" if tls else url.scheme, host=host, port=port)


def _capped(current: Mapping[str, float | None] | None, timeout: float) -> dict[str, Any]:
    """The timeout extension with every phase capped at ``timeout`` (a shorter setting wins)."""
    if not current:
        return {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
    get = current.get
    c = get("connect")
    if c is not None and c == get("read") == get("write") == get("pool"):  # httpx.Timeout(x)
        c = timeout if c > timeout else c
        return {"connect": c, "read": c, "write": c, "pool": c}
    r, w, p = get("read"), get("write"), get("pool")
    return {
        "connect": timeout if c is None or c > timeout else c,
        "read": timeout if r is None or r > timeout else r,
        "write": timeout if w is None or w > timeout else w,
        "pool": timeout if p is None or p > timeout else p,
    }


def _attempt_request(
    request: httpx.Request,
    state: EndpointState,
    timeout: float | None,
    remaining: float | None,
    tls: bool = False,
) -> httpx.Request:
    """The request as sent to one endpoint: same method, path, headers (Host kept) and body;
    the per-try ``timeout`` caps each phase, the ``remaining`` deadline goes in a header.

    Headers and extensions are copies: the caller's request is never edited. With the
    expected httpx shapes (:func:`_private_shapes_ok`) the request is assembled directly —
    ``Request()`` would wrap the URL again and the header setter scans every header — which
    tests/policy/test_call_url.py checks against the public constructor.
    """
    endpoint = state.endpoint
    url = _endpoint_url(request.url, endpoint.host, endpoint.port, tls)
    extensions = dict(request.extensions)
    if timeout is not None:
        extensions["timeout"] = _capped(extensions.get("timeout"), timeout)
    deadline = None if remaining is None else str(max(1, int(remaining * 1000)))
    if not _FAST:
        attempt = httpx.Request(request.method, url, headers=request.headers, stream=request.stream)
        attempt.extensions = extensions
        if deadline is not None:
            attempt.headers[DEADLINE_HEADER] = deadline
        return attempt
    attempt = _new_request(httpx.Request)
    attempt.method = request.method
    attempt.url = url
    # httpx.Headers(request.headers), without its type tests: the list copied, the encoding
    # left to be detected again (the constructor does not carry it over either).
    headers = attempt.headers = _new_headers(httpx.Headers)
    headers._list = list(request.headers._list)
    headers._encoding = None
    if deadline is not None:
        items = headers._list
        if _DEADLINE_KEY in map(_header_key, items):
            headers[DEADLINE_HEADER] = deadline  # the caller set one: replaced, as the setter does
        else:
            items.append((_DEADLINE_KEY, _DEADLINE_KEY, deadline.encode("ascii")))
    attempt.extensions = extensions
    attempt.stream = request.stream
    return attempt


def _body_size(request: httpx.Request) -> int | None:
    """The request body's size when known (in memory, or declared by Content-Length)."""
    if isinstance(request.stream, httpx.ByteStream):
        try:
            return len(request.content)
        except httpx.RequestNotRead:
            pass
    length = request.headers.get("content-length")
    return int(length) if length is not None and length.isdigit() else None


def local_response(
    request: httpx.Request, status: int, reason: Reason, decision: Decision
) -> httpx.Response:
    """A reply made by the mesh itself (injected abort, or a sidecar-style local error)."""
    decision.status = status
    return httpx.Response(
        status,
        headers={REASON_HEADER: reason.value, "content-type": "text/plain"},
        content=reason.value.encode(),
        request=request,
        extensions={DECISION_EXTENSION: decision},
    )


def _fail(error: MeshError, decision: Decision) -> MeshError:
    decision.reason = error.reason.value
    decision.status = error.status
    error.decision = decision
    return error


# --- the end of a call: reporting, and the response body ----------------------------------------


def _report(
    host: CallHost,
    backend: str,
    request: httpx.Request,
    decision: Decision,
    code: str,
    start: float,
) -> None:
    """Count the call (metrics, call-completion events) once, when it has ended."""
    elapsed = host.clock() - start  # one reading for both: they agree on the call's duration
    metrics = host.metrics
    if metrics is not None:
        metrics.observe_call(
            host.source,
            backend,
            decision.route or "",
            code,
            decision.reason,
            elapsed,
            decision.attempts,
        )
    events = getattr(host, "events", None)  # call-completion events (meshlib.observe)
    if events is not None:
        events.outbound(host.source, backend, request, decision, code, elapsed)


class Body(httpx.SyncByteStream, httpx.AsyncByteStream):
    """The body of a call's response as its caller reads it, held to the call's time limits.
    The call ends — metrics, events and its span are recorded — when the body does: read to
    the end, failed, or closed by the caller.

    - A buffered call (``client.get``, ``client.post``...: the default) is bounded by its
      deadline up to the last byte, as Envoy's route timeout bounds the whole response. Every
      chunk is checked against the deadline, and the connection's read timeout is set to the
      time left when the headers arrive, so neither a trickle nor a stalled read can hold the
      call for ever; past the deadline the read raises :class:`MeshTimeout`.
    - A streamed call (the request carries :data:`STREAM_EXTENSION`: ``client.stream`` on a
      ``mesh.client()``) was bounded by its deadline up to the response headers; each read of
      the body then waits at most ``streamIdleTimeout`` (Envoy's ``stream_idle_timeout``), and
      the deadline is not checked.

    The client's own read timeout still applies to each read when it is shorter. httpx calls
    :meth:`__iter__` or :meth:`__aiter__` by the client's kind; both are the same loop.
    """

    __slots__ = (
        "_backend",
        "_code",
        "_deadline",
        "_decision",
        "_host",
        "_inner",
        "_listeners",
        "_read",
        "_request",
        "_start",
    )

    def __init__(
        self,
        inner: httpx.SyncByteStream | httpx.AsyncByteStream,
        host: CallHost,
        backend: str,
        request: httpx.Request,
        decision: Decision,
        code: str,
        start: float,
        deadline: float | None,
        idle: float | None,
        extensions: dict[str, Any],
    ) -> None:
        self._inner = inner
        # what reporting the call needs when the body ends
        self._host = host
        self._backend = backend
        self._request = request  # the caller's: its "timeout" extension holds the client's
        self._decision = decision
        self._code = code  # the response's status, as the metrics label it: made once
        self._start = start
        self._deadline = deadline  # None: streamed, or no deadline
        # () while open, a list once a listener is registered, None once the body has ended:
        # one slot for both, and what the listeners reach is let go with them.
        self._listeners: tuple[()] | list[Callable[[BaseException | None], None]] | None = ()
        # Bound each read of the body. httpcore (HTTP/1.1) takes the read timeout from the
        # attempt's extensions once per response body, when the body starts; set here, at the
        # headers, it is what is left of the deadline (buffered) or the idle timeout (streamed)
        # — whichever is shorter, with the client's own.
        own = request.extensions.get("timeout")
        client_read = None if own is None else own.get("read")
        bound = (
            idle
            if client_read is None or (idle is not None and idle < client_read)
            else client_read
        )
        if deadline is not None:
            left = deadline - host.clock()
            if left < 0.001:  # never 0: a zero read timeout is a non-blocking read, an error
                left = 0.001
            if bound is None or left < bound:
                bound = left
        self._read = bound
        timeouts = extensions.get("timeout")
        if timeouts is not None and timeouts is not own:  # the attempt's own copy (per-try
            timeouts["read"] = bound  # and deadline caps)
        elif timeouts is None or bound != client_read:  # the caller's own dict is never edited
            extensions["timeout"] = {**(timeouts or {}), "read": bound}
        # else: the caller's read timeout is the bound already, nothing to copy

    def then(self, listener: Callable[[BaseException | None], None]) -> bool:
        """Call ``listener(error)`` when the body ends (``error`` None: read to the end or
        closed). False, and nothing registered, when it has already ended."""
        listeners = self._listeners
        if listeners is None:
            return False
        if type(listeners) is tuple:
            self._listeners = [listener]
        else:
            listeners.append(listener)  # type: ignore[union-attr]  # a list, the tuple is ()
        return True

    def __iter__(self) -> Iterator[bytes]:
        inner: Iterable[bytes] = self._inner  # type: ignore[assignment]  # a sync client's
        try:
            deadline = self._deadline
            clock = self._host.clock
            for chunk in inner:
                if deadline is not None and clock() >= deadline:
                    raise self._expired(None)
                yield chunk
        except MeshError:
            raise  # this body's own MeshTimeout, already counted
        except httpx.TimeoutException as error:
            raise self._expired(error) from error
        except httpx.TransportError as error:
            self._broken(error)
            raise
        self._end(None, None)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        inner: AsyncIterable[bytes] = self._inner  # type: ignore[assignment]  # an async client's
        try:
            deadline = self._deadline
            clock = self._host.clock
            async for chunk in inner:
                if deadline is not None and clock() >= deadline:
                    raise self._expired(None)
                yield chunk
        except MeshError:
            raise  # this body's own MeshTimeout, already counted
        except httpx.TimeoutException as error:
            raise self._expired(error) from error
        except httpx.TransportError as error:
            self._broken(error)
            raise
        self._end(None, None)

    def close(self) -> None:
        try:
            self._inner.close()  # type: ignore[union-attr]  # a sync client's: sync
        finally:
            if self._listeners is not None:
                self._end(None, None)

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()  # type: ignore[union-attr]  # an async client's: async
        finally:
            if self._listeners is not None:
                self._end(None, None)

    def _expired(self, cause: httpx.TimeoutException | None) -> MeshError:
        """The body's time limit passed: the call fails with MeshTimeout (504, timeout)."""
        if self._deadline is not None:
            why = "the deadline passed"
        else:
            why = f"no data within the read timeout ({self._read or 0:g}s)"
        decision = self._decision
        error = _fail(
            MeshTimeout(f"call to {self._backend} timed out reading the response body: {why}"),
            decision,
        )
        error.__cause__ = cause
        # The error leaves the mesh here, from the caller's read, not from the transport.
        annotate(error, describe(decision) + "; in the response body")
        self._end(error, str(error.status))
        return error

    def _broken(self, error: httpx.TransportError) -> None:
        """The connection failed mid-body (reset, truncated): the call ends in error."""
        decision = self._decision
        decision.reason = Reason.RESET.value
        error.decision = decision  # type: ignore[attr-defined]
        # The error leaves the mesh here, from the caller's read, not from the transport.
        annotate(error, describe(decision) + "; in the response body")
        self._end(error, "error")

    def _end(self, error: BaseException | None, code: str | None) -> None:
        """Report the call, once. ``code``: the metrics label (None: the response's status).

        httpx leaves every response to the cyclic collector (it and its stream refer to each
        other), so what the body still holds when it ends waits for the collector: the
        listeners (a tracing listener reaches the call's spans) and the request (an HTTPRoute
        rule's edited copy is the body's alone) are let go. The decision stays: it is the
        response's too, and a read after the end still names it in its error."""
        listeners = self._listeners
        if listeners is None:
            return
        self._listeners = None
        decision = self._decision
        request = self._request
        self._request = None  # type: ignore[assignment]  # never read once ended
        if code is None:
            code = self._code
        _report(self._host, self._backend, request, decision, code, self._start)
        if listeners:
            for listener in listeners:
                listener(error)


# --- the sequence ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one (service, route) call needs from the snapshot, derived once per snapshot."""

    policy: EffectivePolicy
    faults: tuple[FaultRule, ...]
    mirrors: tuple[MirrorRule, ...]
    max_retries: int
    #: Whether attempts must record latency (only hedging on the observed p95 reads it).
    track_latency: bool
    #: Whether attempts go over mutual TLS (the mesh has an SVID and the destination's
    #: effective ``mtls`` mode is not disable).
    tls: bool


def _plan(host: CallHost, router: Router, service_key: str, route: str | None) -> _Plan:
    key = (service_key, route)
    plan: _Plan | None = router.derived.get(key)
    if plan is None:
        policy = router.policy(service_key, route)
        plan = _Plan(
            policy,
            router.faults(service_key, route),
            router.mirrors(service_key),
            max_retries(policy.retries),
            policy.hedging.enabled and policy.hedging.delay is None,
            host.uses_mtls(router, service_key),
        )
        router.derived[key] = plan
    return plan


def _http_route(
    host: CallHost,
    router: Router,
    service: ServiceDef,
    request: httpx.Request,
    table: RouteTable,
) -> tuple[_Plan, Decision, str, httpx.Request, tuple[HeaderModifier, ...]] | httpx.Response:
    """Step 1 under a Gateway API HTTPRoute: the winning rule, a backend by weight, and the
    request as the rule's filters edit it; or the mesh's own answer (404 no rule matched, a
    RequestRedirect, 500 for an invalid backend's share)."""
    url = request.url
    path = url.path
    query = url.query.decode("ascii", "replace")
    winner = table.select(request.method, path, query, request.headers)
    decision = Decision(service.key, router.snapshot.version)
    decision.backend = service.key
    if winner is None:
        decision.reason = Reason.NO_ROUTE.value
        return local_response(request, 404, Reason.NO_ROUTE, decision)
    rule = winner.rule
    decision.route = rule.label
    if rule.redirect is not None:
        location = redirect_location(
            rule.redirect, winner.match, url.scheme, url.host, url.port, path, query
        )
        decision.status = rule.redirect.status_code
        return httpx.Response(
            rule.redirect.status_code,
            headers={"location": location},
            request=request,
            extensions={DECISION_EXTENSION: decision},
        )
    backend = pick(rule, host.rng.random)
    if backend is None or backend.service is None:
        decision.reason = Reason.INVALID_BACKEND.value
        return local_response(request, 500, Reason.INVALID_BACKEND, decision)
    edit = request_edit(winner, backend, path)
    if edit:
        request = _edited(request, edit)
    key = (service.key, rule, backend)
    plan: _Plan | None = router.derived.get(key)
    if plan is None:
        plan = router.derived[key] = _rule_plan(host, router, service.key, rule, backend)
    return plan, decision, backend.service, request, response_modifiers(winner, backend)


def _rule_plan(
    host: CallHost, router: Router, service_key: str, rule: Rule, backend: Backend
) -> _Plan:
    """The (service, route) plan with the rule's own timeouts and mirrors on top: an
    HTTPRoute's ``timeouts`` are set on the route itself, so they win over every scope."""
    plan = _plan(host, router, service_key, rule.label)
    policy = rule_policy(plan.policy, rule)
    mirrors = plan.mirrors + tuple(
        MirrorRule(rule.route.name, rule.route.namespace, service_key, key, m.percent)
        for m in rule.mirrors(backend)
        if (key := backend_service(m.backend, router.services)) is not None
    )
    return replace(plan, policy=policy, mirrors=mirrors)


def _edit_response_headers(headers: httpx.Headers, modifiers: Sequence[HeaderModifier]) -> None:
    """ResponseHeaderModifier, in place (the response is the mesh's to hand over): ``set``
    replaces every value, ``add`` appends one, ``remove`` drops every value. Building a new
    ``Headers`` instead costs more than the rest of the rule's routing."""
    for modifier in modifiers:
        for name, value in modifier.set:
            headers[name] = value
        if modifier.add:
            if _FAST:
                encoding = headers.encoding
                headers._list.extend(
                    (n.encode(encoding), n.lower().encode(encoding), v.encode(encoding))
                    for n, v in modifier.add
                )
            else:
                pairs = edit_headers(headers.multi_items(), (HeaderModifier(add=modifier.add),))
                headers.clear()
                headers.update(httpx.Headers(pairs))
        for name in modifier.remove:
            if name in headers:
                del headers[name]


def _edited(request: httpx.Request, edit: RequestEdit) -> httpx.Request:
    """A copy of the request with the rule's edits (the caller's request is never changed)."""
    url = request.url if edit.path is None else request.url.copy_with(path=edit.path)
    pairs = request.headers.multi_items()
    if edit.headers:
        pairs = edit_headers(pairs, edit.headers)
    if edit.host is not None:
        pairs = [(n, v) for n, v in pairs if n.lower() != "host"] + [("host", edit.host)]
    copy = httpx.Request(request.method, url, headers=pairs, stream=request.stream)
    copy.extensions = dict(request.extensions)
    return copy


def run_call(
    host: CallHost, router: Router, service: ServiceDef, request: httpx.Request
) -> Generator[Effect, Any, httpx.Response]:
    """Drive one call. Returns the response for the caller; raises a MeshError (or the last
    attempt's httpx error, with ``.decision`` set) when it cannot."""
    clock = host.clock
    start = clock()

    # 1. route and split: Gateway API HTTPRoutes when the service has them, else SMI
    table = None
    http = router.http
    if http is not None and service.key in http:
        url = request.url
        table = http.table(
            service.key, host.source.split(".", 1)[1], url.port or default_port(url.scheme)
        )
    response_edits: tuple[HeaderModifier, ...] = ()
    if table is not None:
        routed = _http_route(host, router, service, request, table)
        if isinstance(routed, httpx.Response):
            decision = routed.extensions[DECISION_EXTENSION]
            _report(host, service.key, request, decision, str(routed.status_code), start)
            return routed
        plan, decision, backend, request, response_edits = routed
    else:
        match = router.route_for(service, request.method, request, request.headers)
        plan = _plan(host, router, service.key, match.name)
        decision = Decision(service.key, router.snapshot.version, route=match.name)
        backend = service.key
        if match.split is not None:
            backend = pick_backend(match.split, host.rng)
            decision.split = match.split.name
    decision.backend = backend
    if backend != service.key and host.uses_mtls(router, backend) is not plan.tls:
        plan = replace(plan, tls=not plan.tls)  # a split backend with its own mode
    decision.mtls = plan.tls
    dest = host.destination(backend, router)

    # 2. the deadline covers everything below; an inbound request's deadline caps it
    timeout = plan.policy.timeout
    deadline = None if timeout is None else start + timeout
    inherited = inbound_deadline.get()
    if inherited is not None and (deadline is None or inherited < deadline):
        deadline = inherited
        timeout = max(0.0, inherited - start)
    decision.deadline = timeout

    code = "error"
    body: Body | None = None
    try:
        response, attempt = yield from _admitted_call(
            host, router, service, request, plan, dest, decision, deadline, start
        )
        code = str(response.status_code)
        decision.status = response.status_code
        response.extensions[DECISION_EXTENSION] = decision
        if response_edits:
            _edit_response_headers(response.headers, response_edits)
        if attempt is not None and not response.is_closed:
            # The body is still on the wire: the call ends, and is reported, when it does.
            streamed = request.extensions.get(STREAM_EXTENSION)
            response.stream = body = Body(
                response.stream,
                host,
                backend,
                request,
                decision,
                code,
                start,
                None if streamed else deadline,
                plan.policy.stream_idle_timeout,
                attempt.extensions,
            )
        return response
    except MeshError as error:
        code = str(error.status)
        raise
    except httpx.TransportError as error:
        # The last attempt's own error, re-raised: a connect failure (refused, or a connect or
        # pool timeout: Envoy's UF) or a reset; a timeout is a MeshTimeout by now.
        failure = classify(Outcome(None, error, 0.0))[0]
        decision.reason = (
            Reason.CONNECT_FAILURE.value if failure is Failure.CONNECT else Reason.RESET.value
        )
        error.decision = decision  # type: ignore[attr-defined]
        raise
    finally:
        if body is None:
            _report(host, backend, request, decision, code, start)


def _admitted_call(
    host: CallHost,
    router: Router,
    service: ServiceDef,
    request: httpx.Request,
    plan: _Plan,
    dest: Destination,
    decision: Decision,
    deadline: float | None,
    now: float,
) -> Generator[Effect, Any, tuple[httpx.Response, httpx.Request | None]]:
    """Faults, admission, replayability, mirroring, then the attempts loop. ``now`` is the
    clock reading the call started with: admission and the first pick reuse it while no
    effect has been yielded (nothing in between waits)."""

    # 3. faults: decided before the call leaves; an abort is an answer, not a failure to retry
    rules = plan.faults
    extra = host.extra_faults(service.key, decision.route)
    if extra:
        rules = rules + extra
    refuse = False
    if rules:
        fault = decide_faults(rules, request.headers, host.rng)
        if fault is not NO_FAULT:
            refuse = fault.refuse
            yield from _inject(host, service, request, fault, decision, deadline)
            now = host.clock()
            if fault.abort is not None:
                decision.faults.append(f"abort:{fault.abort}")
                decision.reason = Reason.FAULT_ABORT.value
                return local_response(request, fault.abort, Reason.FAULT_ABORT, decision), None

    # 6 (decided here, performed after admission). Replayability is decided once, before the
    # first attempt: only a body of known length within the replay buffer is replayed, even
    # when it is already in memory.
    size = _body_size(request)
    fits = size is None or size <= MAX_REPLAY_BUFFER
    replayable = fits and isinstance(request.stream, httpx.ByteStream)
    buffer = not replayable and size is not None and fits
    # With nothing to buffer or mirror, nothing happens between admission and the first pick:
    # the pick is made under the admission's lock (one lock section fewer per call).
    first: tuple[EndpointState | None] | None = None

    # 4–5. admission: rate limit, concurrency limit, circuit breaker, budget deposit
    policy = plan.policy
    max_in_flight = policy.connection_pool.max_connections
    # acquire/release, not ``with``: a with-block builds and calls a bound ``__exit__`` per
    # section, ≈ 600 instructions a lock section on the call path (docs/performance.md).
    dest.lock.acquire()
    try:
        if dest.rate_limit is not None and not dest.rate_limit.take(now):
            raise _fail(RateLimitedError(f"rate limit for {dest.key} exceeded"), decision)
        if max_in_flight is not None and dest.in_flight >= max_in_flight:
            raise _fail(
                ConnectionPoolOverflowError(f"{dest.key}: {max_in_flight} calls in flight"),
                decision,
            )
        admission = dest.breaker.admit(now)
        if admission is _REFUSED:
            raise _fail(CircuitOpenError(f"circuit open for {dest.key}"), decision)
        dest.in_flight += 1
        dest.budget.deposit(now)
        if not buffer and not plan.mirrors:
            first = (_place(host, dest, (), now),)
    finally:
        dest.lock.release()
    if admission is _PROBE and host.metrics is not None:  # open → half-open happened here
        host.metrics.set_circuit_state(host.source, dest.key, _HALF_OPEN)
    lease = _Lease(admission)
    try:
        # 6. buffering
        if buffer:
            yield Buffer(request)
            replayable = True
            now = host.clock()

        # 7. mirror
        if plan.mirrors and replayable:
            rng = host.rng
            for rule in plan.mirrors:
                if rng.random() * 100.0 < rule.percent:
                    tls = host.uses_mtls(router, rule.mirror)
                    copy = _mirror_request(host, router, request, rule.mirror, tls)
                    if copy is not None:
                        decision.mirrored_to = rule.mirror
                        yield Mirror(copy, tls, rule.mirror)
                        now = host.clock()

        # 8. attempts: endpoint pick (avoiding endpoints already tried), send (maybe hedged),
        # one classification, then retry or hand back. In this generator, not one of its own:
        # every effect is resumed through each generator level, once per call.
        clock = host.clock
        retry_policy = plan.policy.retries
        per_try = retry_policy.per_try_timeout
        retries_left = plan.max_retries
        idempotent = is_idempotent(request.method, request.headers)
        hedging = plan.policy.hedging
        can_hedge = hedging.enabled and idempotent and replayable
        track_latency = plan.track_latency
        tried: list[str] = []
        number = 0
        picked_at: float | None = now  # current for the first attempt only

        while True:
            number += 1
            send = _begin(
                host,
                dest,
                request,
                tried,
                number,
                per_try,
                deadline,
                False,
                plan.tls,
                picked_at,
                first,
            )
            picked_at = first = None
            if send is None:
                raise _fail(NoHealthyEndpointsError(f"no endpoint for {dest.key}"), decision)

            hedge_delay = None
            if can_hedge and retries_left > 0 and not refuse:
                hedge_delay = hedging.delay if hedging.delay is not None else dest.p95()
            if refuse:
                outcome = Outcome(None, httpx.ConnectError("connection refused (injected)"), 0.0)
            elif hedge_delay is None:
                try:
                    outcome = yield send
                except GeneratorExit:
                    _abandon(dest, [send])
                    raise
            else:
                started: list[Send] = [send]
                try:
                    race: RaceResult = yield _race(
                        host,
                        request,
                        send,
                        hedge_delay,
                        plan,
                        dest,
                        decision,
                        deadline,
                        tried,
                        started,
                    )
                except GeneratorExit:
                    _abandon(dest, started)
                    raise
                if race.loser is not None:
                    _finish(host, dest, decision, race.loser, race.loser_outcome, track_latency)
                    retries_left -= 1
                    number += 1
                send, outcome = race.winner, race.outcome
            failure, status = _finish(host, dest, decision, send, outcome, track_latency, lease)
            response = outcome.response
            if failure is Failure.NONE:
                assert response is not None
                return response, send.request

            # Decide whether to try again; otherwise hand back what we have.
            now = clock()
            retry = retries_left > 0 and should_retry(
                retry_policy, failure, status, idempotent=idempotent, replayable=replayable
            )
            if retry and dest.breaker.state is _OPEN_STATE:
                # Other calls' verdicts opened the breaker while this one was out: the backend as a
                # whole is failing, so this call ends with what it has instead of adding retries.
                retry = False
            retry_after = None
            if retry and response is not None:
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                if retry_after is not None and retry_after > MAX_RETRY_AFTER:
                    retry = False
            delay = 0.0
            if retry:
                delay = backoff_delay(
                    retry_policy.backoff, decision.retries + 1, host.rng, retry_after
                )
                if host.instant_backoff:
                    delay = 0.0
                if deadline is not None and now + delay >= deadline:
                    retry = False
            if retry:
                with dest.lock:
                    if not dest.budget.try_withdraw(now):
                        decision.budget = "exhausted"
                        retry = False
                        if host.metrics is not None:
                            host.metrics.budget_exhausted.labels(host.source, dest.key).inc()
                if not retry and response is None:  # a response is handed back below
                    error = RetryBudgetExhaustedError(f"retry budget for {dest.key} exhausted")
                    error.__cause__ = outcome.error
                    raise _fail(error, decision)
            if not retry:
                if response is not None:
                    decision.reason = Reason.UPSTREAM_ERROR.value
                    lease.healthy = response.status_code < 500  # a 5xx is a failed call
                    return response, send.request
                if failure is Failure.TIMEOUT:
                    timeout_error = MeshTimeout(
                        f"call to {dest.key} timed out after {len(decision.attempts)} attempt(s)"
                    )
                    timeout_error.__cause__ = outcome.error
                    raise _fail(timeout_error, decision)
                assert outcome.error is not None
                raise outcome.error
            retries_left -= 1
            decision.retries += 1
            if host.metrics is not None:
                host.metrics.retries.labels(host.source, dest.key).inc()
            if response is not None:
                yield Close(response)
            if delay > 0:
                decision.attempts[-1].backoff = delay
                yield Sleep(delay)
    except (MeshError, httpx.TransportError):
        # The caller gets an error: the backend's failure if anything was sent to it; a call
        # refused before its first attempt (no endpoint, say) leaves no verdict.
        if lease.held and decision.attempts:
            lease.healthy = False
        raise
    finally:
        if lease.held:
            _settle(host, dest, lease)


class _Lease:
    """What an admitted call holds until it ends: its in-flight slot and its breaker admission,
    and the verdict the breaker gets (None: no verdict, e.g. abandoned). A successful attempt
    settles it under the lock it already takes for its outcome (one lock section fewer per
    call); every other ending settles it in :func:`_settle`."""

    __slots__ = ("admission", "healthy", "held")

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.held = True
        self.healthy: bool | None = None


def _settle(host: CallHost, dest: Destination, lease: _Lease) -> None:
    """Give back the call's in-flight slot and hand the breaker the call's verdict."""
    lease.held = False
    healthy = lease.healthy
    now = host.clock() if healthy is False else 0.0
    breaker = dest.breaker
    with dest.lock:
        dest.in_flight -= 1
        before = breaker.state
        if healthy is None:
            breaker.on_abandon(lease.admission)
        elif healthy:
            breaker.on_success(lease.admission)
        else:
            breaker.on_failure(lease.admission, now)
        after = breaker.state
    if after is not before and host.metrics is not None:
        host.metrics.set_circuit_state(host.source, dest.key, after.value)


def _inject(
    host: CallHost,
    service: ServiceDef,
    request: httpx.Request,
    fault: FaultDecision,
    decision: Decision,
    deadline: float | None,
) -> Generator[Effect, Any, None]:
    """Count the fault that fired and perform its delay (an abort is answered by the caller)."""
    metrics = host.metrics
    if metrics is not None:
        for kind, on in (
            ("delay", fault.delay is not None),
            ("abort", fault.abort is not None),
            ("refuse", fault.refuse),
        ):
            if on:
                metrics.faults.labels(host.source, service.key, kind).inc()
    if fault.delay is not None:
        clock = host.clock
        decision.faults.append(f"delay:{fault.delay:g}s")
        # Envoy's DI: the call's reason unless something worse happens later (an abort, a
        # failure after the delay, the deadline), which then names the call's end instead.
        decision.reason = Reason.FAULT_DELAY.value
        wait = fault.delay
        if deadline is not None:
            wait = min(wait, max(0.0, deadline - clock()))
        yield Sleep(wait)
        if deadline is not None and clock() >= deadline:
            raise _fail(MeshTimeout("deadline expired during injected delay"), decision)


def _mirror_request(
    host: CallHost, router: Router, request: httpx.Request, mirror_key: str, tls: bool
) -> httpx.Request | None:
    dest = host.destination(mirror_key, router)
    with dest.lock:
        state = dest.endpoints.pick(host.clock(), host.rng)
    if state is None:
        return None
    copy = _attempt_request(request, state, None, None, tls)
    copy.headers["host"] = f"{request.url.host}-shadow"  # Istio marks mirrored traffic so
    return copy


def _place(
    host: CallHost, dest: Destination, tried: Collection[str], now: float
) -> EndpointState | None:
    """The endpoint pick for one attempt, under ``dest.lock`` (held by the caller); None if
    there is no endpoint to send to."""
    state = dest.endpoints.pick(now, host.rng, tried)
    if state is not None:
        dest.endpoints.on_start(state)
    return state


def _begin(
    host: CallHost,
    dest: Destination,
    request: httpx.Request,
    tried: list[str],
    number: int,
    per_try: float | None,
    deadline: float | None,
    hedge: bool,
    tls: bool,
    now: float | None = None,
    placed: tuple[EndpointState | None] | None = None,
) -> Send | None:
    """Place one attempt (the endpoint pick); None if there is no endpoint. ``now``: a
    clock reading that is still current, if the caller has one; ``placed``: the outcome of
    :func:`_place`, if the caller has already placed the attempt at that time."""
    if now is None:
        now = host.clock()
    if placed is None:
        with dest.lock:
            state = _place(host, dest, tried, now)
    else:
        state = placed[0]
    if state is None:
        return None
    tried.append(state.endpoint.address)
    remaining = None if deadline is None else deadline - now
    timeout = per_try
    if remaining is not None and (timeout is None or remaining < timeout):
        timeout = remaining
    attempt = _attempt_request(request, state, timeout, remaining, tls)
    return Send(attempt, state, number, hedge, tls)


def _finish(
    host: CallHost,
    dest: Destination,
    decision: Decision,
    send: Send,
    outcome: Outcome | None,
    track_latency: bool,
    lease: _Lease | None = None,
) -> tuple[Failure, int | None]:
    """Feed one attempt's outcome to endpoint health and the decision record: one
    classification for both. A success ends the call: with its ``lease``, the call's in-flight
    slot is given back and the breaker told of the call's success under the same lock."""
    state = send.state
    if outcome is None:  # a hedge loser cancelled before it answered
        with dest.lock:
            dest.endpoints.on_abandon(state)
        decision.attempts.append(
            AttemptRecord(send.number, state.address, "cancelled", hedge=send.hedge)
        )
        return Failure.NONE, None
    response = outcome.response
    if response is not None:  # the common case, classified inline
        status: int | None = response.status_code
        unhealthy = status >= 500  # type: ignore[operator]
        failed = unhealthy or status == 429  # is_failure_status, inline
        failure = Failure.STATUS if failed else Failure.NONE
    else:
        failure, status = classify(outcome)
        failed = unhealthy = True
    now = host.clock()
    closed = False  # whether this call's success closed a half-open breaker
    dest.lock.acquire()  # not ``with``: cheaper on the call path (see the admission's lock)
    try:
        ejected = dest.endpoints.on_end(state, now, outcome.elapsed, failed, unhealthy)
        if not failed:
            if track_latency:
                dest.record_latency(outcome.elapsed)
            if lease is not None:
                dest.in_flight -= 1
                lease.held = False
                admission = lease.admission
                dest.breaker.on_success(admission)
                closed = admission is _PROBE  # the half-open probe succeeded
    finally:
        dest.lock.release()
    if (ejected or closed) and host.metrics is not None:
        if ejected:
            host.metrics.ejections.labels(host.source, dest.key, state.address).inc()
        if closed:
            host.metrics.set_circuit_state(host.source, dest.key, _CLOSED)
    error = outcome.error
    decision.attempts.append(
        AttemptRecord(
            send.number,
            state.endpoint.address,
            failure._value_,  # .value is a descriptor call; _value_ is the same str
            status,
            None if error is None else type(error).__name__,
            outcome.elapsed,
            send.hedge,
        )
    )
    return failure, status


def _abandon(dest: Destination, sends: list[Send]) -> None:
    """The call was abandoned (the caller's task cancelled, a KeyboardInterrupt) while these
    attempts were out: give back the endpoints' in-flight counts (the call's own slot and a
    half-open breaker's probe are given back when the call ends, by :func:`_settle`)."""
    with dest.lock:
        for send in sends:
            dest.endpoints.on_abandon(send.state)


def _race(
    host: CallHost,
    request: httpx.Request,
    first: Send,
    delay: float,
    plan: _Plan,
    dest: Destination,
    decision: Decision,
    deadline: float | None,
    tried: list[str],
    started: list[Send],
) -> Race:
    """A hedged attempt: the backup is decided when the driver asks for it, drawing on the
    retry budget and going to an endpoint not yet tried."""
    hedging = plan.policy.hedging
    per_try = plan.policy.retries.per_try_timeout

    def backup() -> Send | None:
        if first.number >= hedging.max_attempts:
            return None
        now = host.clock()
        if deadline is not None and now >= deadline:
            return None
        with dest.lock:
            if not dest.budget.try_withdraw(now):
                decision.budget = "exhausted"
                return None
        send = _begin(
            host, dest, request, tried, first.number + 1, per_try, deadline, True, plan.tls
        )
        if send is not None:
            started.append(send)
            decision.hedges += 1
        return send

    def accept(outcome: Outcome) -> bool:
        return classify(outcome)[0] is Failure.NONE

    return Race(first, delay, backup, accept)
