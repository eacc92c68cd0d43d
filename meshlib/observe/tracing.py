"""Tracing: OpenTelemetry spans for outbound calls and inbound requests, and W3C propagation.

Only the OpenTelemetry *API* is used: the application chooses the SDK, exporter and sampler.
Loaded by the mesh's hook (:mod:`meshlib.observe.tracehook`) only once OpenTelemetry is in the
process or a request brings a trace context: never by ``import meshlib`` nor by a mesh with
nothing to trace.

Outbound, the call sequence (:func:`meshlib.outbound.call.run_call`) stays free of tracing: this
module wraps its generator of effects. The *call* span (kind CLIENT) is also its first attempt's:
the first ``Send`` gets the call span's ``traceparent``, and when it is the only attempt its
attributes end on the call span — one span per call, the SDK's per-span work done once. Every
later ``Send`` (a retry, a hedge ``Race``'s backup) starts a span of its own (CLIENT, child of the
call span, ``http.request.resend_count``) and gets that span's ``traceparent``; the first
attempt's outcome then becomes a ``mesh.attempt`` event on the call span. So the upstream's
SERVER span is always the child of the span whose context it got (docs/design.md, "What a
trace shows"). A ``Mirror`` gets its own
CLIENT span, child of the call span and marked ``mesh.mirror``, ended by the driver's report of
how the copy ended (it outlives the call). While an attempt is out
with the driver, a context holding the call span and OpenTelemetry's "suppress HTTP
instrumentation" key is attached, so opentelemetry-instrumentation-httpx (which wraps
``httpx.HTTPTransport``, meshlib's *inner* transport) neither opens a second CLIENT span nor
overwrites the header. The attach is handed to the driver across ``yield`` on purpose: the
sync driver resumes the generator on the same thread, the async one in the same task, and the
sync driver runs hedges and mirrors in a copy of the context.

Inbound, :class:`InboundTrace` opens a SERVER span per HTTP request (or enriches one already
open, e.g. by OpenTelemetry's ASGI middleware outside meshlib's) and *attaches* its context
around the request, where the deadline is set too: an outbound call made anywhere while the
request is handled — the handler, a task it spawns, a thread started with a context-copying
helper — continues the trace with no application code.

A call the mesh refuses before it becomes a call (a host outside the mesh under ``egress:
registry-only``) gets a CLIENT span of its own too, with error status and the reason
(:meth:`Tracing.refused`).

Cost: with no SDK (the default no-op provider) nothing is created. An incoming trace context is
still carried through (extracted, attached, injected into outbound attempts), so a service
without an SDK in the middle of a chain does not break the trace.

Sampling (``Mesh.spec.tracing.sampling``) applies to traces meshlib *starts* (no parent): an
unsampled root gets a non-recording span context with a random trace id and flags ``00``, so
downstream parent-based samplers (the SDK default) agree and record nothing. A trace started
elsewhere keeps its sampled flag; meshlib never samples again inside it.

A call that is not sampled — ``spec.tracing.sampling`` says no to a root, or the SDK's sampler
says no (asked directly under a parent, through ``start_span`` for a root, whose trace id the
SDK draws) — builds no span for itself or its attempts: its ids (the parent's trace id, a new
span id, the sampled flag cleared) are written into headers once per call and copied onto every
attempt, hedge and mirror, and only the "suppress HTTP instrumentation" key is attached around
its attempts (no span of its own: nothing reads it there). What the calls made in one context share
is worked out on its second call (:class:`_Known`; the empty context of root calls at once): under a
parent, the SDK's sampler answers from the parent alone (``ParentBased`` with its default delegates,
``ALWAYS_ON``/``OFF``), so later calls in the context do not ask it; a root whose sampler is
``ALWAYS_OFF`` (or ``ParentBased`` with that root) gets its ids from the SDK's id generator with the
flags its first ``start_span`` gave, without a span. A ratio sampler, or any of the application's
own, answers per call.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Awaitable, Callable, Generator, MutableMapping
from functools import partial
from typing import Any, NamedTuple

import httpx
from opentelemetry import context as otel_context, propagate, trace
from opentelemetry.context import (
    _SUPPRESS_HTTP_INSTRUMENTATION_KEY,
    _SUPPRESS_INSTRUMENTATION_KEY,
    Context,
)
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    Tracer,
    TracerProvider,
    TraceState,
)

from meshlib.config.model import MeshSettings, ServiceDef
from meshlib.context import inbound_deadline
from meshlib.decision import DECISION_EXTENSION, Decision
from meshlib.errors import REASON_HEADER, MeshError
from meshlib.inbound.peer import IDENTITY_HEADER, verified_identity
from meshlib.outbound.call import Body, Effect, Mirror, Outcome, Race, Send, classify

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
ASGISend = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, ASGISend], Awaitable[None]]
Handler = Callable[[Scope, Receive, ASGISend, ASGIApp], Awaitable[None]]
Call = Generator[Effect, Any, httpx.Response]
#: A span's ids as plain values — trace id, span id, flags, trace state — for the headers of a
#: call: building and reading a ``SpanContext`` costs a Python call per field.
Ids = tuple[int, int, int, TraceState | None]

#: Instrumentation scope name of every span meshlib records.
TRACER_NAME = "meshlib"
#: Seconds between two looks at OpenTelemetry's global provider while none is set.
GLOBAL_RECHECK = 1.0

_REASON = REASON_HEADER.encode("latin-1")
_IDENTITY = IDENTITY_HEADER.encode("latin-1")
_current_context = otel_context.get_current
#: The module of the OpenTelemetry SDK's samplers, whose answers depend only on the parent and
#: the trace id: the only ones asked ahead of ``start_span`` (``Tracing._unsampled_child``).
_SDK_SAMPLERS = "opentelemetry.sdk.trace.sampling"


class Tracing:
    """One mesh's tracing: the tracer (resolved lazily), root sampling and propagation.

    ``provider`` is the mesh's ``tracer_provider``; ``None`` means the global provider, looked
    up on every call until a real one is set (``trace.set_tracer_provider`` may come after the
    mesh is built), then kept. ``settings`` returns the mesh settings in force (hot reload).
    """

    def __init__(
        self,
        provider: TracerProvider | None,
        settings: Callable[[], MeshSettings],
        clock: Callable[[], float],
        seed: int | None = None,
    ) -> None:
        self._provider = provider
        self._settings = settings
        self.clock = clock
        self._rng = random.Random(seed)  # sampling draws only: never the policy RNG's sequence
        self._tracer: Tracer | None = None
        self._recheck = 0.0  # monotonic time of the next look at the global provider
        self._textmap: TextMapPropagator | None = None
        self._fields: frozenset[bytes] = frozenset()
        self._carried: tuple[Context, TextMapPropagator, dict[str, str]] | None = None
        self._w3c: tuple[TextMapPropagator, bool] | None = None
        self._suppressed_last: tuple[Context, Context] | None = None
        #: What the calls of the last context seen share when not sampled (:class:`_Known`).
        self._known: _Known | None = None
        #: The last context a call was made in that has no entry yet (see :meth:`trace_call`).
        self._seen: Context | None = None
        #: What the SDK's sampler is, worked out once per sampler (:meth:`_traits`).
        self._sampler_traits: _SamplerTraits | None = None

    def tracer(self) -> Tracer | None:
        """The tracer spans are recorded with; ``None`` while the provider is a no-op.

        Looking the global provider up costs about a microsecond (it reads ``os.environ``),
        so while none is set it is looked up again at most every :data:`GLOBAL_RECHECK`
        seconds: a provider set after the mesh is built is used from then on.
        """
        tracer = self._tracer
        if tracer is not None:
            return tracer
        now = time.monotonic()
        if now < self._recheck:
            return None
        self._recheck = now + GLOBAL_RECHECK
        provider = self._provider if self._provider is not None else trace.get_tracer_provider()
        if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            if self._provider is not None:
                self._recheck = math.inf  # a no-op provider given explicitly: never anything
            return None
        tracer = self._tracer = provider.get_tracer(TRACER_NAME, _meshlib_version())
        return tracer

    def sample_root(self) -> bool:
        """Whether a trace meshlib starts is sampled (``spec.tracing.sampling``)."""
        rate = self._settings().tracing_sampling
        return rate >= 1.0 or (rate > 0.0 and self._rng.random() < rate)

    # -- outbound --------------------------------------------------------------------------------

    def trace_call(self, call: Call, request: httpx.Request, service: ServiceDef) -> Call:
        """``call`` itself when there is nothing to record or propagate (the hot path), else
        ``call`` wrapped to record spans or to carry the current context to every attempt."""
        ctx = _current_context()
        known = self._known
        if (
            known is not None
            and known.ctx is ctx
            and known.textmap is propagate.get_global_textmap()
        ):
            return self._known_call(known, call, request, service)
        if not ctx and self._tracer is None and time.monotonic() < self._recheck:
            return call  # no SDK (looked at within the last second) and no context to carry
        if ctx and (
            ctx.get(_SUPPRESS_HTTP_INSTRUMENTATION_KEY) or ctx.get(_SUPPRESS_INSTRUMENTATION_KEY)
        ):
            return call
        tracer = self.tracer()
        if tracer is None:
            carried = self.carrier(ctx) if ctx else None
            return _propagating(call, carried) if carried else call
        parent: SpanContext | None = None
        name = f"{request.method} {service.name}"
        if ctx:  # an empty context (a call made outside any trace) holds no span
            current = trace.get_current_span(ctx)
            # A CLIENT span already current (opentelemetry-instrumentation-httpx's
            # instrument_client on the mesh's client) is this call's span: enriched, never
            # doubled, ended by its owner.
            if current.is_recording() and _kind(current) is SpanKind.CLIENT:
                carrier = self._carrier_for(ctx, _ids(current.get_span_context()))
                send_context = trace.set_span_in_context(current, self._suppressed(ctx))
                return _traced(
                    call, _CallSpans(tracer, send_context, current, False, name, request, carrier)
                )
            parent = current.get_span_context()
        under = parent is not None and parent.is_valid
        # What the calls of a context share is worked out on its second call: the first is
        # often the only one (an inbound request making one call), and learning costs that
        # call more than deciding it alone. The empty context is every root call's: at once.
        if not ctx or self._seen is ctx:
            known = self._learn(tracer, ctx, parent if under else None, name)
            if known is not None:
                self._known = known  # one assignment: other threads see the old entry or new
                return self._known_call(known, call, request, service)
        else:
            self._seen = ctx
        ids: Ids | None = None
        if parent is not None and under:
            ids = self._unsampled_child(tracer, ctx, parent, name, request, service)
        elif not self.sample_root():
            ids = (_random_trace_id(), _random_span_id(), 0, None)
        if ids is None:
            return self._start(call, request, service, ctx, tracer, None)
        # Not sampled: nothing is recorded for the call or its attempts, so no span is built.
        # The call's ids (the parent's trace id, a new span id, not sampled) are written once
        # and copied onto every attempt, hedge and mirror.
        return _propagating(call, self._carrier_for(ctx, ids), self._suppressed(ctx))

    def _start(
        self,
        call: Call,
        request: httpx.Request,
        service: ServiceDef,
        ctx: Context,
        tracer: Tracer,
        known: _Known | None,
    ) -> Call:
        """``call`` under a call span the SDK's ``start_span`` decides on: recorded, or (a root
        its sampler does not sample) only its ids carried. ``known``: the context's entry, which
        learns from such a root the flags of the roots its sampler never samples."""
        name = f"{request.method} {service.name}"
        attributes = _call_attributes(request, service)
        span = tracer.start_span(name, ctx, SpanKind.CLIENT, attributes)
        span_context = span.get_span_context()
        if span.is_recording():
            carrier = self._carrier_for(ctx, _ids(span_context))
            # One context per call: the call span over the parent's suppressed context
            # (made once per parent context), attached around attempts, parent of resends.
            send_context = trace.set_span_in_context(span, self._suppressed(ctx))
            return _traced(
                call, _CallSpans(tracer, send_context, span, True, name, request, carrier)
            )
        ids = _ids(span_context)  # the SDK's sampler said no to a root
        if known is not None and known.drops is not None and span_context.is_valid:
            # What the SDK made for a root its sampler never samples: new ids from its id
            # generator and these flags (``00``, or ``02`` where the SDK marks its trace ids
            # random), no trace state. Later roots in this context are made the same way.
            known.roots = (known.drops, int(span_context.trace_flags))
        return _propagating(call, self._carrier_for(ctx, ids), self._suppressed(ctx))

    def _known_call(
        self, known: _Known, call: Call, request: httpx.Request, service: ServiceDef
    ) -> Call:
        """``call`` in the context ``known`` was made for: not sampled under its parent, or
        a root (sampled as ``spec.tracing.sampling`` then the SDK's sampler say)."""
        if known.head is not None:  # under a parent its sampler does not sample
            carrier = dict(known.base)
            carrier["traceparent"] = f"{known.head}{_random_span_id():016x}{known.tail}"
        elif known.sampled:  # under a parent its sampler samples: not asked ahead again
            return self._start(call, request, service, known.ctx, known.tracer, None)
        elif not self.sample_root():
            carrier = known.root(_random_trace_id(), _random_span_id(), 0)
        elif known.roots is not None:  # the SDK's sampler never samples a root
            ids, flags = known.roots
            carrier = known.root(ids.generate_trace_id(), ids.generate_span_id(), flags)
        else:
            return self._start(call, request, service, known.ctx, known.tracer, known)
        return _propagating(call, carrier, known.suppressed)

    def _learn(
        self, tracer: Tracer, ctx: Context, parent: SpanContext | None, name: str
    ) -> _Known | None:
        """The entry for the calls made in ``ctx`` (``parent`` its valid span context, or
        ``None`` for a root), or ``None`` when each call must be decided on its own: the
        global propagator writes more than W3C trace context, or under a parent the SDK's
        sampler may answer otherwise for another call (see :func:`_from_parent`)."""
        textmap = propagate.get_global_textmap()
        if not self._w3c_only(textmap):
            return None
        if parent is None:
            base = dict(self.carrier(ctx)) if ctx else {}
            base.pop("tracestate", None)
            drops = (
                getattr(tracer, "id_generator", None)
                if self._traits(getattr(tracer, "sampler", None)).drops_roots
                else None
            )
            return _Known(ctx, textmap, tracer, base, None, "", self._suppressed(ctx), drops)
        sampler = getattr(tracer, "sampler", None)
        if not self._traits(sampler).from_parent:
            return None
        # Asked as the SDK's start_span asks it, less the attributes it does not read.
        result = sampler.should_sample(ctx, parent.trace_id, name, SpanKind.CLIENT, None, ())  # type: ignore[union-attr]
        if result.decision.is_recording():  # each call's start_span decides (the same way)
            known = _Known(ctx, textmap, tracer, {}, None, "", ctx, None)
            known.sampled = True
            return known
        base = dict(self.carrier(ctx))
        base["traceparent"] = ""  # written per call: here, so the headers keep their order
        state = result.trace_state
        if state:
            base["tracestate"] = state.to_header()
        else:
            base.pop("tracestate", None)
        # As the SDK builds a span it does not sample: the parent's flags less "sampled".
        flags = parent.trace_flags & ~TraceFlags.SAMPLED
        head, tail = f"00-{parent.trace_id:032x}-", f"-{flags:02x}"
        return _Known(ctx, textmap, tracer, base, head, tail, self._suppressed(ctx), None)

    def _traits(self, sampler: object) -> _SamplerTraits:
        """What ``sampler`` is, worked out once per sampler: the first call in every new
        context (each inbound request's) asks."""
        traits = self._sampler_traits
        if traits is None or traits.sampler is not sampler:
            traits = self._sampler_traits = _SamplerTraits.of(sampler)
        return traits

    def _unsampled_child(
        self,
        tracer: Tracer,
        ctx: Context,
        parent: SpanContext,
        name: str,
        request: httpx.Request,
        service: ServiceDef,
    ) -> Ids | None:
        """The ids of a call under ``parent`` that the SDK's sampler does not sample, or
        ``None`` when it does (or the tracer is not the SDK's: its ``start_span`` decides).

        The sampler is asked as the SDK's ``start_span`` asks it, with the same inputs
        (the parent's trace id, the call span's ``name``, kind and attributes); a sampled call
        then starts its span, which asks again. Only the SDK's own samplers (parent-based,
        ratio, always on/off) are asked ahead: they answer from the parent and the trace id, so
        both answers agree. Any other sampler may draw at random, and asking it twice would
        sample at p² instead of p: its ``start_span`` alone decides. The attributes are built
        only for a sampler that may read them: under a parent, the parent-based sampler with
        its default delegates answers from the parent's flags alone.
        """
        sampler = getattr(tracer, "sampler", None)
        if type(sampler).__module__ != _SDK_SAMPLERS:
            return None
        should_sample = getattr(sampler, "should_sample", None)
        if should_sample is None:
            return None
        reads = self._traits(sampler).reads_attributes
        attributes = _call_attributes(request, service) if reads else None
        result = should_sample(ctx, parent.trace_id, name, SpanKind.CLIENT, attributes, ())
        if result.decision.is_recording():
            return None
        # As the SDK builds a span it does not sample: the parent's flags less "sampled".
        flags = parent.trace_flags & ~TraceFlags.SAMPLED
        return (parent.trace_id, _random_span_id(), flags, result.trace_state)

    def _carrier_for(self, ctx: Context, ids: Ids) -> dict[str, str]:
        """The headers the global propagator writes for a span with ``ids`` under ``ctx``
        (an unsampled call's ids, or a recorded call span's). When that propagator writes the
        W3C trace context and nothing else that depends on the span (the default,
        ``tracecontext,baggage``), they are the context's own headers (cached per context:
        baggage) with ``traceparent`` and ``tracestate`` formatted directly, as OpenTelemetry's
        W3C propagator formats them; any other propagator injects."""
        textmap = propagate.get_global_textmap()
        if not self._w3c_only(textmap):
            carrier: dict[str, str] = {}
            trace_id, span_id, flags, state = ids
            span = NonRecordingSpan(SpanContext(trace_id, span_id, False, TraceFlags(flags), state))
            textmap.inject(carrier, context=trace.set_span_in_context(span, ctx))
            return carrier
        carrier = dict(self.carrier(ctx)) if ctx else {}
        trace_id, span_id, flags, state = ids
        carrier["traceparent"] = f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"
        if state:
            carrier["tracestate"] = state.to_header()
        else:
            carrier.pop("tracestate", None)
        return carrier

    def _w3c_only(self, textmap: TextMapPropagator) -> bool:
        """Whether ``textmap`` writes a span's W3C trace context and nothing else that depends
        on the span (checked once per propagator)."""
        w3c = self._w3c
        if w3c is None or w3c[0] is not textmap:
            w3c = self._w3c = (textmap, _writes_w3c_only(textmap))
        return w3c[1]

    def _suppressed(self, ctx: Context) -> Context:
        """``ctx`` with OpenTelemetry's HTTP instrumentation off, made once per context (the
        calls of one inbound request share it; a root call's is the empty context's)."""
        last = self._suppressed_last
        if last is not None and last[0] is ctx:
            return last[1]
        suppressed = otel_context.set_value(_SUPPRESS_HTTP_INSTRUMENTATION_KEY, True, ctx)
        self._suppressed_last = (ctx, suppressed)  # one assignment: other threads see either
        return suppressed

    def refused(self, request: httpx.Request, error: MeshError) -> None:
        """Record a CLIENT span for a call refused before any call sequence ran (egress:
        registry-only): error status, the reason, the exception. Only on that path: nothing
        is looked up for calls that go ahead."""
        tracer = self.tracer()
        if tracer is None:
            return
        parent = _current_context()
        root = not trace.get_current_span(parent).get_span_context().is_valid
        if root and not self.sample_root():
            return
        url = request.url
        span = tracer.start_span(
            f"{request.method} {url.host}",
            parent,
            SpanKind.CLIENT,
            {
                "http.request.method": request.method,
                "url.full": str(url),
                "server.address": url.host,
                "server.port": _port(url),
                "mesh.reason": error.reason.value,
            },
        )
        span.record_exception(error)
        _set_error(span, error.reason.value, f"{error.reason.value}: {error}")
        span.end()

    def carrier(self, ctx: Context) -> dict[str, str]:
        """The headers the global propagator writes for ``ctx``.

        Computed once per context and propagator: the calls made while one inbound request is
        handled share its context, and a context never changes (setting a value makes a new
        one), so the injection is not redone for each of them. Empty when the context holds
        nothing to propagate (no valid span, no baggage).
        """
        textmap = propagate.get_global_textmap()
        last = self._carried
        if last is not None and last[0] is ctx and last[1] is textmap:
            return last[2]
        carrier: dict[str, str] = {}
        textmap.inject(carrier, context=ctx)
        self._carried = (ctx, textmap, carrier)  # one assignment: other threads see old or new
        return carrier

    # -- inbound ---------------------------------------------------------------------------------

    def inbound(self, scope: Scope) -> InboundTrace | None:
        """How to trace one HTTP request; ``None`` when there is nothing to record or carry."""
        tracer = self.tracer()
        if tracer is None:
            if not self._carries_context(scope):
                return None
            if trace.get_current_span().get_span_context().is_valid:
                return None  # already attached by someone outside (e.g. OTel's ASGI middleware)
        return InboundTrace(self, tracer, scope)

    def _carries_context(self, scope: Scope) -> bool:
        """Whether the request has a header the global propagator reads (traceparent, ...)."""
        fields = self.fields()
        for name, _ in scope.get("headers") or ():
            if name in fields:
                return True
        return False

    def fields(self) -> frozenset[bytes]:
        """The header names the global propagator reads, as ASGI spells them."""
        textmap = propagate.get_global_textmap()
        if textmap is not self._textmap:
            self._fields = frozenset(f.lower().encode("latin-1") for f in textmap.fields)
            self._textmap = textmap
        return self._fields

    def settings(self) -> MeshSettings:
        """The mesh settings in force (trust domain, sampling)."""
        return self._settings()


# --- spans ---------------------------------------------------------------------------------------


def _ids(context: SpanContext) -> Ids:
    return (context.trace_id, context.span_id, context.trace_flags, context.trace_state)


def _random_trace_id() -> int:
    return random.getrandbits(128) or 1


def _random_span_id() -> int:
    return random.getrandbits(64) or 1


def _unsampled_root() -> SpanContext:
    """The ids of a new trace that records nothing but carries its ids and the flag ``00``
    downstream (``spec.tracing.sampling`` said no)."""
    flags = TraceFlags(TraceFlags.DEFAULT)
    return SpanContext(_random_trace_id(), _random_span_id(), False, flags)


def _port(url: httpx.URL) -> int:
    """The port ``url`` reaches, its scheme's default included (httpx drops a default port)."""
    return url.port or (443 if url.scheme == "https" else 80)


def _call_attributes(request: httpx.Request, service: ServiceDef) -> dict[str, Any]:
    """The call span's attributes, given to ``start_span`` (cleaned once, and seen by its
    sampler): the HTTP client conventions' required four (``server.*`` the origin the caller
    named) and the service's key."""
    url = request.url
    return {
        "http.request.method": request.method,
        "url.full": str(url),
        "server.address": url.host,
        "server.port": _port(url),
        "mesh.service": service.key,
    }


def _send_attributes(method: str, url: httpx.URL) -> dict[str, Any]:
    """What an attempt's or a mirrored copy's span says of the request it sends."""
    return {
        "http.request.method": method,
        "url.full": str(url),
        "server.address": url.host,
        "server.port": _port(url),
    }


def _parent_only(sampler: object) -> bool:
    """Whether ``sampler``, under a parent, answers from the parent's flags alone: the SDK's
    ``ParentBased`` whose four parent delegates are its defaults (``ALWAYS_ON`` for a sampled
    parent, ``ALWAYS_OFF`` for one that is not), which read no attribute. Read from the SDK
    object's fields; anything unexpected answers no (the attributes are then built)."""
    from opentelemetry.sdk.trace import sampling  # an SDK is installed: its sampler is here

    if type(sampler) not in (sampling.ParentBased, sampling.ParentBasedTraceIdRatio):
        return False  # a subclass of the application's own may read anything
    on, off = sampling.ALWAYS_ON, sampling.ALWAYS_OFF
    delegates = (
        (getattr(sampler, "_remote_parent_sampled", None), on),
        (getattr(sampler, "_local_parent_sampled", None), on),
        (getattr(sampler, "_remote_parent_not_sampled", None), off),
        (getattr(sampler, "_local_parent_not_sampled", None), off),
    )
    return all(delegate is default for delegate, default in delegates)


def _from_parent(sampler: object) -> bool:
    """Whether ``sampler``, under a parent, answers from the parent's span context alone, so
    its answer for one call in a context is its answer for all of them: the SDK's
    ``ALWAYS_ON`` and ``ALWAYS_OFF``, and a ``ParentBased`` with its default parent delegates
    (:func:`_parent_only`). A ratio sampler reads the trace id, which is the parent's too, but
    is left to answer per call like any other."""
    if type(sampler).__module__ != _SDK_SAMPLERS:
        return False
    from opentelemetry.sdk.trace import sampling

    return type(sampler) is sampling.StaticSampler or _parent_only(sampler)


def _drops_roots(sampler: object) -> bool:
    """Whether ``sampler`` never samples a root, whatever its trace id: the SDK's
    ``ALWAYS_OFF``, or a ``ParentBased`` whose root sampler is ``ALWAYS_OFF``. Only then are a
    root's ids made without asking it (a ratio sampler's answer depends on the trace id its
    ``start_span`` draws: asked ahead as well, it would sample at p² instead of p)."""
    if type(sampler).__module__ != _SDK_SAMPLERS:
        return False
    from opentelemetry.sdk.trace import sampling

    if type(sampler) in (sampling.ParentBased, sampling.ParentBasedTraceIdRatio):
        sampler = getattr(sampler, "_root", None)
    return (
        type(sampler) is sampling.StaticSampler
        and getattr(sampler, "_decision", None) is sampling.Decision.DROP
    )


class _SamplerTraits(NamedTuple):
    """What tracing needs to know of the SDK's sampler (:meth:`Tracing._traits`)."""

    sampler: object
    #: Under a parent, it answers from the parent alone (:func:`_from_parent`).
    from_parent: bool
    #: It never samples a root (:func:`_drops_roots`).
    drops_roots: bool
    #: Under a parent, it may read the call span's attributes (not :func:`_parent_only`).
    reads_attributes: bool

    @classmethod
    def of(cls, sampler: object) -> _SamplerTraits:
        sdk = type(sampler).__module__ == _SDK_SAMPLERS
        return cls(
            sampler,
            _from_parent(sampler),
            _drops_roots(sampler),
            not (sdk and _parent_only(sampler)),
        )


class _Known:
    """What the calls made in one context share when they are not sampled, worked out on the second
    of them (:meth:`Tracing.trace_call` says why; the calls made while one inbound request is
    handled share its context, and a context never changes): the headers other than the call's
    ``traceparent`` (baggage, the ``tracestate``), the context attached around attempts, and under a
    parent that its sampler does not sample, the ``traceparent``'s trace id and flags (``head``,
    ``tail``) — only the span id is new per call; under one it samples, ``sampled`` (each call's
    ``start_span`` then decides, and the sampler is not asked ahead again). For a root, ``drops`` is
    the SDK's id generator when its sampler never samples a root; ``roots`` pairs it with the flags
    the SDK gives such a root, learned from the first one it starts (:meth:`Tracing._start`).
    """

    __slots__ = (
        "base",
        "ctx",
        "drops",
        "head",
        "roots",
        "sampled",
        "suppressed",
        "tail",
        "textmap",
        "tracer",
    )

    def __init__(
        self,
        ctx: Context,
        textmap: TextMapPropagator,
        tracer: Tracer,
        base: dict[str, str],
        head: str | None,
        tail: str,
        suppressed: Context,
        drops: Any,
    ) -> None:
        self.ctx = ctx
        self.textmap = textmap
        self.tracer = tracer
        self.base = base
        self.head = head
        self.tail = tail
        self.suppressed = suppressed
        self.drops = drops
        self.roots: tuple[Any, int] | None = None
        self.sampled = False  # under a parent its sampler samples

    def root(self, trace_id: int, span_id: int, flags: int) -> dict[str, str]:
        """The headers of a root call with these ids."""
        carrier = dict(self.base)
        carrier["traceparent"] = f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"
        return carrier


#: A context whose span the probe in :func:`_writes_w3c_only` injects.
_PROBE = SpanContext(1, 1, False, TraceFlags(TraceFlags.SAMPLED))


def _writes_w3c_only(textmap: TextMapPropagator) -> bool:
    """Whether ``textmap`` writes a span as OpenTelemetry's W3C trace context propagator does
    and nothing else for it (baggage, which does not depend on the span, may be added)."""
    probe: dict[str, str] = {}
    textmap.inject(probe, context=trace.set_span_in_context(NonRecordingSpan(_PROBE), Context()))
    return probe == {"traceparent": f"00-{1:032x}-{1:016x}-01"}


def _kind(span: Span) -> SpanKind | None:
    """The kind of a recording SDK span (the API's Span does not expose it)."""
    kind = getattr(span, "kind", None)
    return kind if isinstance(kind, SpanKind) else None


def _set_error(span: Span, error_type: str, description: str) -> None:
    span.set_attribute("error.type", error_type)
    span.set_status(StatusCode.ERROR, description)


class _CallSpans:
    """The spans of one recorded outbound call (a call that is not sampled has none:
    :meth:`Tracing.trace_call`).

    The call span is also its first attempt's span: that attempt carries the call span's
    ``traceparent`` (so the upstream's SERVER span is the call span's child) and, when it is the
    only attempt, its attributes end on the call span, so the SDK's per-span work is done once
    per call. Every later attempt (a retry, a hedge) is a CLIENT span of its own, child of the
    call span, with ``http.request.resend_count``, whose context its request carries; the first
    attempt's outcome is then an event ``mesh.attempt`` on the call span, since its attributes
    describe the call as the caller saw it. A mirrored copy has its own span. docs/design.md
    ("What a trace shows") says why.
    """

    # One per sampled call: no instance dict to allocate (and for the collector to walk).
    __slots__ = (
        "attempts",
        "carrier",
        "first",
        "first_ended",
        "first_open",
        "method",
        "name",
        "owned",
        "resent",
        "send_context",
        "span",
        "tracer",
    )

    def __init__(
        self,
        tracer: Tracer,
        send_context: Context,
        span: Span,
        owned: bool,
        name: str,
        request: httpx.Request,
        carrier: dict[str, str],
    ) -> None:
        self.tracer = tracer
        self.method = request.method
        self.name = name
        self.span = span
        self.owned = owned  # False: someone else's CLIENT span, enriched and ended by its owner
        self.carrier = carrier  # the call span's headers, which the first attempt carries
        #: The call span, HTTP instrumentation off: attached while an attempt is with the
        #: driver, and the parent of resends and mirrors (the SDK reads only the span from it).
        self.send_context = send_context
        self.first: Send | None = None  # the first attempt, recorded on the call span
        self.first_open = False  # the first attempt is with the driver
        #: The first attempt's attributes and end time (ns), once it has ended, until it is
        #: known whether another attempt followed (then they become an event).
        self.first_ended: tuple[dict[str, Any], int] | None = None
        self.resent = False  # a second attempt has begun
        self.attempts: dict[int, Span] = {}  # id(Send) → its span, while in flight

    def begin(self, send: Send) -> None:
        """Put the call span's context on the first attempt; open a span for a later one."""
        request = send.request
        if self.first is None:
            self.first = send
            self.first_open = True
            _carry(request.headers, self.carrier)
            return
        if not self.resent:
            self.resent = True
            ended = self.first_ended
            if ended is not None:  # the first attempt is over: its outcome becomes an event
                self.first_ended = None
                self.span.add_event("mesh.attempt", _event(self.first, ended[0]), ended[1])
        attributes = _send_attributes(self.method, request.url)
        attributes["mesh.attempt"] = send.number
        attributes["mesh.hedge"] = send.hedge
        attributes["http.request.resend_count"] = send.number - 1
        span = self.tracer.start_span(self.name, self.send_context, SpanKind.CLIENT, attributes)
        self.attempts[id(send)] = span
        propagate.inject(
            request.headers, context=trace.set_span_in_context(span, self.send_context)
        )

    def mirror(self, mirror: Mirror) -> None:
        """Open the mirrored copy's span (a child of the call span, marked as a mirror), put its
        context on the copy, and have the driver end it when the copy ends."""
        request = mirror.request
        attributes = _send_attributes(self.method, request.url)
        attributes["mesh.mirror"] = True
        attributes["mesh.service"] = mirror.service
        name = f"{self.method} {mirror.service.partition('.')[0]}"
        span = self.tracer.start_span(name, self.send_context, SpanKind.CLIENT, attributes)
        propagate.inject(
            request.headers, context=trace.set_span_in_context(span, self.send_context)
        )
        mirror.observe = _mirror_observer(span)

    def end(self, send: Send, outcome: Outcome | None) -> None:
        if send is self.first:
            if self.first_open:
                self.first_open = False
                self._first_ended(_first_attempt(send, outcome))
            return
        span = self.attempts.pop(id(send), None)
        if span is None:
            return
        if span.is_recording():
            if outcome is None:
                span.set_attribute("mesh.outcome", "cancelled")
            else:
                failure, status = classify(outcome)
                if status is None:
                    span.set_attribute("mesh.outcome", failure.value)
                    if outcome.error is not None:
                        _set_error(span, type(outcome.error).__name__, str(outcome.error))
                else:  # one call: each takes the span's lock and checks its values
                    span.set_attributes(
                        {"mesh.outcome": failure.value, "http.response.status_code": status}
                    )
                    if status >= 400:
                        _set_error(span, str(status), failure.value)
        span.end()

    def _first_ended(self, attributes: dict[str, Any]) -> None:
        if self.resent:
            assert self.first is not None
            self.span.add_event("mesh.attempt", _event(self.first, attributes))
        else:  # it may stay the only attempt: kept until the call ends or another begins
            self.first_ended = (attributes, time.time_ns())

    def finish(
        self, status: int | None, decision: Decision | None, error: BaseException | None
    ) -> None:
        """Close the call span with what the decision record says: ``status`` the response's,
        or None when the call failed with ``error``."""
        for span in self.attempts.values():  # abandoned in flight
            if span.is_recording():
                span.set_attribute("mesh.outcome", "cancelled")
            span.end()
        self.attempts.clear()
        if self.first_open:  # abandoned in flight
            self.first_open = False
            assert self.first is not None
            self._first_ended(_first_attempt(self.first, None))
        span = self.span
        # Set in one call: each call takes the span's lock and checks its values. The only
        # attempt's attributes are the call span's own (its error, if any, is the call's), its
        # outcome left out at its default: an absent mesh.outcome reads as ok.
        ended = self.first_ended
        if ended is not None:
            attributes = ended[0]
            attributes.pop("error.type", None)
            if attributes["mesh.outcome"] == "ok":
                del attributes["mesh.outcome"]
        else:
            attributes = {}
        if decision is not None:
            if not self.owned:  # someone else's span, started without our mesh.service
                attributes["mesh.service"] = decision.service
            _decision_attributes(decision, attributes)
        if self.owned and status is not None:
            attributes["http.response.status_code"] = status
        if attributes:
            span.set_attributes(attributes)
        if self.owned:
            if status is not None:
                if status >= 400:
                    reason = decision.reason if decision is not None else str(status)
                    _set_error(span, str(status), reason)
            elif isinstance(error, MeshError):
                span.record_exception(error)
                _set_error(span, error.reason.value, f"{error.reason.value}: {error}")
            elif isinstance(error, GeneratorExit):
                _set_error(span, "cancelled", "call abandoned by its caller")
            elif error is not None:
                span.record_exception(error)
                _set_error(span, type(error).__name__, str(error))
            span.end()


def _first_attempt(send: Send, outcome: Outcome | None) -> dict[str, Any]:
    """The first attempt's attributes: on the call span if it was the only attempt, else on
    the call span's ``mesh.attempt`` event (:func:`_event`). The endpoint is the connection's
    peer (``network.peer.*``): the call span's ``server.address`` is the service the caller
    named. No ``mesh.attempt``/``mesh.hedge`` on the call span: a call with one attempt says
    ``mesh.attempts`` = 1, and a first attempt is never a hedge (each attribute costs the SDK's
    cleaning; docs/performance.md)."""
    url = send.request.url
    attributes: dict[str, Any] = {
        "network.peer.address": url.host,
        "network.peer.port": _port(url),
    }
    if outcome is None:
        attributes["mesh.outcome"] = "cancelled"
        return attributes
    failure, status = classify(outcome)
    attributes["mesh.outcome"] = failure.value
    if status is not None:
        attributes["http.response.status_code"] = status
        if status >= 400:
            attributes["error.type"] = str(status)
    elif outcome.error is not None:
        attributes["error.type"] = type(outcome.error).__name__
    return attributes


def _event(first: Send, attributes: dict[str, Any]) -> dict[str, Any]:
    """The first attempt's ``mesh.attempt`` event on a call span that has resends: the
    attempt's number and whether it was a hedge, then :func:`_first_attempt`'s attributes."""
    return {"mesh.attempt": first.number, "mesh.hedge": first.hedge, **attributes}


def _decision_attributes(decision: Decision, attributes: dict[str, Any]) -> None:
    """The call span's attributes from the decision record, added to ``attributes``. What is
    at its default or repeats another attribute is left out (no retry, no hedge, no route, no
    split, the reason ``ok``, the backend when it is ``mesh.service`` itself): each attribute
    costs the SDK's cleaning, an absent ``mesh.retries`` reads as 0, an absent ``mesh.reason``
    as ``ok`` and an absent ``mesh.backend`` as ``mesh.service``."""
    if decision.reason != "ok":
        attributes["mesh.reason"] = decision.reason
    attributes["mesh.attempts"] = len(decision.attempts)
    if decision.retries:
        attributes["mesh.retries"] = decision.retries
    if decision.hedges:
        attributes["mesh.hedges"] = decision.hedges
    if decision.route is not None:
        attributes["mesh.route"] = decision.route
    if decision.backend is not None and decision.backend != decision.service:
        attributes["mesh.backend"] = decision.backend
    if decision.split is not None:
        attributes["mesh.split"] = decision.split
    if decision.faults:
        attributes["mesh.fault"] = ",".join(decision.faults)
    if decision.deadline is not None:
        attributes["mesh.deadline_ms"] = int(decision.deadline * 1000)
    if decision.budget != "ok":
        attributes["mesh.budget"] = decision.budget


def _traced(call: Call, spans: _CallSpans) -> Call:
    """``call``, with a span per attempt under the call's span."""
    result: Any = None
    response: httpx.Response | None = None
    error: BaseException | None = None
    try:
        while True:
            effect = call.send(result)
            kind = type(effect)
            if kind is Send:
                spans.begin(effect)  # type: ignore[arg-type]
            elif kind is Race:
                race: Race = effect  # type: ignore[assignment]
                spans.begin(race.first)
                race.backup = _traced_backup(race.backup, spans)
            elif kind is Mirror:
                spans.mirror(effect)  # type: ignore[arg-type]
            token = None
            if kind is Send or kind is Race or kind is Mirror:
                token = otel_context.attach(spans.send_context)
            try:
                result = yield effect
            finally:
                if token is not None:
                    otel_context.detach(token)
            if kind is Send:
                spans.end(effect, result)  # type: ignore[arg-type]
            elif kind is Race:
                spans.end(result.winner, result.outcome)
                if result.loser is not None:
                    spans.end(result.loser, result.loser_outcome)
    except StopIteration as stop:
        response = stop.value
        return response
    except BaseException as exc:
        error = exc
        raise
    finally:
        # A body still on the wire ends the call when it ends: our call span stays open until
        # then. A span someone else owns (instrument_client's) is ended by its owner when the
        # transport returns, so its attributes are set now.
        body: object = None
        if response is not None:
            body, status = response.stream, response.status_code
            decision: Decision | None = response.extensions.get(DECISION_EXTENSION)
        else:
            status, decision = None, getattr(error, "decision", None)
        # The body's listener holds what it needs, never the response: the response holds the
        # body and the body its listeners, a cycle only the cyclic collector would free — with
        # the call's spans, contexts and attempt requests in it, each sampled call's garbage.
        if not (
            type(body) is Body
            and spans.owned
            and body.then(partial(_finish_body, spans, status, decision))
        ):
            spans.finish(status, decision, error)
        call.close()


def _mirror_observer(
    span: Span,
) -> Callable[[httpx.Response | None, BaseException | None], None]:
    """Ends a mirror's span with how the copy ended (called by the driver, on any thread)."""

    def ended(response: httpx.Response | None, error: BaseException | None) -> None:
        if span.is_recording():
            if response is not None:
                status = response.status_code
                span.set_attribute("http.response.status_code", status)
                span.set_attribute("mesh.outcome", "ok" if status < 500 else "status")
                if status >= 400:
                    _set_error(span, str(status), "mirror answered with an error status")
            elif error is not None:
                span.set_attribute("mesh.outcome", "error")
                span.record_exception(error)
                _set_error(span, type(error).__name__, str(error))
            else:
                span.set_attribute("mesh.outcome", "dropped")  # too many copies in flight
        span.end()

    return ended


def _finish_body(
    spans: _CallSpans, status: int | None, decision: Decision | None, error: BaseException | None
) -> None:
    """The call's body ended: read to the end or closed (``error`` None), or failed."""
    if error is None:
        spans.finish(status, decision, None)
    else:
        spans.finish(None, getattr(error, "decision", decision), error)


def _traced_backup(
    backup: Callable[[], Send | None], spans: _CallSpans
) -> Callable[[], Send | None]:
    def traced() -> Send | None:
        send = backup()
        if send is not None:
            spans.begin(send)
        return send

    return traced


def _propagating(call: Call, carrier: dict[str, str], attach: Context | None = None) -> Call:
    """``call``, with ``carrier``'s headers on every attempt and nothing recorded: no SDK, or
    a call that is not sampled. ``attach`` (the unsampled call's span, HTTP instrumentation
    off) is the current context while an attempt is with the driver, as in :func:`_traced`."""
    result: Any = None
    try:
        while True:
            effect = call.send(result)
            kind = type(effect)
            if kind is Send:
                _carry(effect.request.headers, carrier)  # type: ignore[union-attr]
            elif kind is Race:
                race: Race = effect  # type: ignore[assignment]
                _carry(race.first.request.headers, carrier)
                race.backup = _propagating_backup(race.backup, carrier)
            elif kind is Mirror:
                _carry(effect.request.headers, carrier)  # type: ignore[union-attr]
            else:
                result = yield effect
                continue
            if attach is None:
                result = yield effect
                continue
            token = otel_context.attach(attach)
            try:
                result = yield effect
            finally:
                otel_context.detach(token)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        call.close()


def _carry(headers: httpx.Headers, carrier: dict[str, str]) -> None:
    for name, value in carrier.items():
        headers[name] = value


def _propagating_backup(
    backup: Callable[[], Send | None], carrier: dict[str, str]
) -> Callable[[], Send | None]:
    def propagating() -> Send | None:
        send = backup()
        if send is not None:
            _carry(send.request.headers, carrier)
        return send

    return propagating


# --- inbound -------------------------------------------------------------------------------------


class InboundTrace:
    """The tracing of one inbound HTTP request: :meth:`run` wraps the middleware's handling."""

    def __init__(self, tracing: Tracing, tracer: Tracer | None, scope: Scope) -> None:
        self._tracing = tracing
        self._tracer = tracer
        self._scope = scope
        self.status: int | None = None
        self.reason: str | None = None
        self.app_called = False
        self.route: str | None = None
        self.deadline_ms: int | None = None
        self.annotated = False

    async def run(
        self, handle: Handler, scope: Scope, receive: Receive, send: ASGISend, app: ASGIApp
    ) -> None:
        parent = otel_context.get_current()
        current = trace.get_current_span(parent)
        span: Span | None = None
        owned = False
        attach: Context | None = None
        if current.is_recording() and _kind(current) is SpanKind.SERVER:
            span = current  # a SERVER span already open for this request: enrich it
        else:
            if not current.get_span_context().is_valid:
                parent = propagate.extract(_carrier(scope, self._tracing), context=parent)
            if self._tracer is not None:
                span, owned = self._start(parent), True
                attach = trace.set_span_in_context(span, parent)
            else:
                attach = parent  # no SDK: carry the caller's context through, record nothing
        token = otel_context.attach(attach) if attach is not None else None
        error: BaseException | None = None
        try:
            if span is None:  # carrying a context, recording nothing: no wrappers needed
                await handle(scope, receive, send, app)
            else:
                await handle(
                    scope, receive, self._observe(send, span), self._observe_app(app, span)
                )
        except BaseException as exc:
            error = exc
            raise
        finally:
            if token is not None:
                otel_context.detach(token)
            if span is not None and span.is_recording():
                if not self.annotated:  # no response started (an error, a disconnect)
                    self._annotate(span)
                if owned:
                    self._finish(span, error)
            if owned and span is not None:
                span.end()

    def _start(self, parent: Context) -> Span:
        assert self._tracer is not None
        root = not trace.get_current_span(parent).get_span_context().is_valid
        if root and not self._tracing.sample_root():
            return NonRecordingSpan(_unsampled_root())
        scope = self._scope
        method = scope.get("method", "")
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.path": scope.get("path", ""),
            "url.scheme": scope.get("scheme", "http"),
        }
        query = scope.get("query_string")
        if query:
            attributes["url.query"] = query.decode("latin-1")
        client = scope.get("client")
        if client:
            attributes["client.address"] = client[0]
        server = scope.get("server")
        if server:
            attributes["server.address"] = server[0]
            if server[1] is not None:
                attributes["server.port"] = server[1]
        return self._tracer.start_span(method, parent, SpanKind.SERVER, attributes)

    def _observe(self, send: ASGISend, span: Span) -> ASGISend:
        async def observing(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = int(message["status"])
                for name, value in message.get("headers") or ():
                    if name.lower() == _REASON:
                        self.reason = value.decode("latin-1")
                # Now, not at the end: a span opened outside (OTel's ASGI middleware) is ended
                # by its owner as soon as the response is complete.
                if span.is_recording():
                    self._annotate(span)
            await send(message)

        return observing

    def _observe_app(self, app: ASGIApp, span: Span) -> ASGIApp:
        recording = span.is_recording()

        async def observed(scope: Scope, receive: Receive, send: ASGISend) -> None:
            self.app_called = True
            self._scope = scope  # as the app sees it: sanitized, identity header set
            if recording:
                deadline = inbound_deadline.get()
                if deadline is not None:
                    left = deadline - self._tracing.clock()
                    self.deadline_ms = max(0, int(left * 1000))
            await app(scope, receive, send)

        return observed

    def _annotate(self, span: Span) -> None:
        """The mesh's view of the request, on our span or on one opened outside."""
        self.annotated = True
        scope = self._scope
        route = getattr(scope.get("route"), "path", None)  # Starlette / FastAPI template
        if isinstance(route, str):
            self.route = route
        peer = _peer(scope, self._tracing, sanitized=self.app_called)
        if peer is not None:
            span.set_attribute("mesh.peer", peer)
        if self.app_called or self.reason == "rate_limited":
            span.set_attribute("mesh.authz", "allow")
        elif self.reason == "denied":
            span.set_attribute("mesh.authz", "deny")
        if self.reason is not None:
            span.set_attribute("mesh.reason", self.reason)
        if self.deadline_ms is not None:
            span.set_attribute("mesh.deadline_ms", self.deadline_ms)
        if self.route is not None:
            span.set_attribute("http.route", self.route)

    def _finish(self, span: Span, error: BaseException | None) -> None:
        """Name, status code and outcome of our own SERVER span."""
        status = self.status
        if self.route is not None:
            span.update_name(f"{self._scope.get('method', '')} {self.route}")
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if error is not None:
            span.record_exception(error)
            _set_error(span, type(error).__name__, str(error))
        elif status is None or status >= 500:
            _set_error(span, str(status or 500), self.reason or "server error")


def _peer(scope: Scope, tracing: Tracing, *, sanitized: bool) -> str | None:
    """The caller's verified SPIFFE ID: the header the middleware set in the app's
    (``sanitized``) scope, or, for a request refused before the app, from the TLS extension —
    never from the raw headers, where a peer could claim any identity."""
    if sanitized:
        for name, value in scope.get("headers") or ():
            if name == _IDENTITY:
                return bytes(value).decode("latin-1")
        return None
    return verified_identity(scope, tracing.settings().trust_domain)


def _carrier(scope: Scope, tracing: Tracing) -> dict[str, str]:
    """The request's propagation headers as the default getter reads them (repeats joined)."""
    fields = tracing.fields()
    carrier: dict[str, str] = {}
    for name, value in scope.get("headers") or ():
        key = bytes(name).lower()
        if key in fields:
            text = bytes(value).decode("latin-1")
            label = key.decode("latin-1")
            carrier[label] = f"{carrier[label]},{text}" if label in carrier else text
    return carrier


@functools.cache
def _meshlib_version() -> str | None:
    """The installed meshlib's version, for the tracer's instrumentation scope. Read from the
    distribution rather than ``meshlib.__version__``: the package root imports the mesh, which
    builds this module, so importing it from here would point an arrow up (docs/design.md)."""
    # Imported here, once per tracer: importlib.metadata (and the zipfile, email and csv modules
    # under it) is ~0.8 MB of RSS that a mesh with no SDK never needs (docs/performance.md).
    import importlib.metadata

    try:
        return importlib.metadata.version("meshlib")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return None
