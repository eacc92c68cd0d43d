"""Calls that are not sampled, made one after another in the same context (as while one inbound
request is handled): what the SDK's own sampler decides for one of them it decides for all, so
it is asked by the first two calls of a context only (the first decides alone, the second keeps
the answer), and a root its sampler never samples gets its ids without a span being started —
with exactly the headers the SDK's own start would have given it. A sampler whose answer may
change from call to call (a ratio, one of the application's own) is still asked once per call,
and every context gets its own answer. No sockets, except the check that
OpenTelemetry's httpx instrumentation stays quiet for such calls (a real server)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry import context, trace
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    StaticSampler,
    TraceIdRatioBased,
)

import meshlib

from .conftest import Counted, service_yaml, traceparent_ids

pytestmark = pytest.mark.timeout(30)

TRACE_A = 0x0AF7651916CD43DD8448EB211C80319C
TRACE_B = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_SPAN = 0xB7AD6B7169203331


def _off() -> Sampler:
    """The SDK's ALWAYS_OFF, a fresh instance: the tests wrap its method."""
    return StaticSampler(Decision.DROP)


def _parent(trace_id: int, flags: int, state: str = "") -> context.Context:
    span = trace.SpanContext(
        trace_id,
        PARENT_SPAN,
        True,
        trace.TraceFlags(flags),
        trace.TraceState.from_header([state]) if state else None,
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(span))


@pytest.fixture
def calls() -> Iterator[tuple[Any, list[httpx.Request]]]:
    """``make(sampler)`` → (counting provider, ``get(ctx)``): one GET through the mesh in
    ``ctx`` (``None``: no context attached); every request sent is kept."""
    sent: list[httpx.Request] = []
    meshes: list[meshlib.Mesh] = []
    clients: list[httpx.Client] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    def make(sampler: Sampler) -> tuple[Counted, Any]:
        asked = Counted(sampler, count_asks=True)
        mesh = meshlib.Mesh.from_text(
            service_yaml("reviews", 9080),
            service="web",
            metrics=False,
            seed=3,
            tracer_provider=asked.provider,
        )
        meshes.append(mesh)
        client = httpx.Client(
            transport=meshlib.MeshTransport(mesh, inner=httpx.MockTransport(answer))
        )
        clients.append(client)

        def get(ctx: context.Context | None) -> httpx.Request:
            token = context.attach(ctx) if ctx is not None else None
            try:
                assert client.get("http://reviews/r").status_code == 200
            finally:
                if token is not None:
                    context.detach(token)
            return sent[-1]

        return asked, get

    yield make, sent
    for client in clients:
        client.close()
    for mesh in meshes:
        mesh.close()


@pytest.mark.parametrize(
    "sampler", [lambda: ParentBased(ALWAYS_ON), _off], ids=["parent-based", "always-off"]
)
def test_under_a_parent_the_sdk_sampler_is_asked_by_the_first_two_calls_of_a_context(
    calls, sampler
) -> None:
    make, _ = calls
    asked, get = make(sampler())
    a = _parent(TRACE_A, 0, "k=v")
    b = _parent(TRACE_B, 0)
    sent = [get(a), get(a), get(a), get(a), get(b), get(b), get(a)]

    # The first call of a context decides alone, the second works out what the context's calls
    # share (a, a; b, b), later ones ask nothing: 5 questions for 7 calls; no span started.
    assert (asked.asked, asked.started) == (5, 0)
    ids = [traceparent_ids(r.headers["traceparent"]) for r in sent]
    assert [t for t, _, _ in ids] == [TRACE_A] * 4 + [TRACE_B] * 2 + [TRACE_A]
    assert [f for _, _, f in ids] == [0] * 7
    span_ids = [s for _, s, _ in ids]
    assert len(set(span_ids)) == 7 and PARENT_SPAN not in span_ids  # one new span id per call
    # The parent's trace state goes on with its trace, and only with it.
    assert [r.headers.get("tracestate") for r in sent] == ["k=v"] * 4 + [None] * 2 + ["k=v"]
    assert asked.exporter.get_finished_spans() == ()


def test_a_sampled_parent_after_an_unsampled_one_is_recorded(calls) -> None:
    make, _ = calls
    asked, get = make(ParentBased(ALWAYS_ON))
    unsampled, sampled = _parent(TRACE_A, 0), _parent(TRACE_B, 1)
    sent = [get(unsampled), get(sampled), get(unsampled)]

    (span,) = asked.exporter.get_finished_spans()
    assert span.context.trace_id == TRACE_B and span.parent.span_id == PARENT_SPAN
    assert traceparent_ids(sent[1].headers["traceparent"]) == (TRACE_B, span.context.span_id, 1)
    assert [traceparent_ids(r.headers["traceparent"])[0::2] for r in (sent[0], sent[2])] == [
        (TRACE_A, 0),
        (TRACE_A, 0),
    ]


def test_under_a_sampled_parent_each_call_is_the_sdks_start_asked_ahead_once(calls) -> None:
    """The same answer for every call in the context: the sampler is asked ahead by the first
    two calls (the first decides alone, the second keeps the answer), then only by each call's
    ``start_span`` (once per call, as with no mesh)."""
    make, _ = calls
    asked, get = make(ParentBased(ALWAYS_ON))
    sampled = _parent(TRACE_B, 1)
    sent = [get(sampled) for _ in range(3)]

    assert (asked.started, asked.asked) == (3, 2 + 3)
    spans = asked.exporter.get_finished_spans()
    assert len(spans) == 3 and {s.context.trace_id for s in spans} == {TRACE_B}
    assert [traceparent_ids(r.headers["traceparent"]) for r in sent] == [
        (TRACE_B, s.context.span_id, 1) for s in spans
    ]


@pytest.mark.parametrize("sampler", [_off, lambda: ParentBased(ALWAYS_OFF)], ids=["off", "pb-off"])
def test_a_root_the_sdk_never_samples_starts_one_span_per_context(calls, sampler) -> None:
    """The first root call is the SDK's start (which it does not sample); later roots in the
    same context get their ids as the SDK makes them — its id generator, the same flags —
    without a span. A new trace each time."""
    make, _ = calls
    asked, get = make(sampler())
    sent = [get(None) for _ in range(4)]

    assert asked.started == 1
    assert asked.exporter.get_finished_spans() == ()
    ids = [traceparent_ids(r.headers["traceparent"]) for r in sent]
    assert len({t for t, _, _ in ids}) == 4 and 0 not in {t for t, _, _ in ids}
    assert len({s for _, s, _ in ids}) == 4
    assert {f for _, _, f in ids} == {ids[0][2]} and ids[0][2] & 1 == 0
    assert all("tracestate" not in r.headers for r in sent)


@pytest.mark.parametrize(
    "sampler",
    [lambda: TraceIdRatioBased(0.5), lambda: ParentBased(TraceIdRatioBased(0.5))],
    ids=["ratio", "pb-ratio"],
)
def test_a_ratio_root_is_decided_by_the_sdk_once_per_call(calls, sampler) -> None:
    """A ratio sampler reads the trace id the SDK's start draws: asked ahead as well, it would
    sample at p² — so every root call is the SDK's start, asked once."""
    make, _ = calls
    asked, get = make(sampler())
    sent = [get(None) for _ in range(40)]

    assert asked.started == 40 and asked.asked == 40
    recorded = {s.context.trace_id for s in asked.exporter.get_finished_spans()}
    ids = [traceparent_ids(r.headers["traceparent"]) for r in sent]
    assert {t for t, _, f in ids if f & 1} == recorded and 0 < len(recorded) < 40


@pytest.fixture
def instrumented() -> Iterator[InMemorySpanExporter]:
    """OpenTelemetry's httpx instrumentation on ``httpx.HTTPTransport`` (the mesh's inner
    transport), recording through a provider that samples everything."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = HTTPXClientInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        yield exporter
    finally:
        instrumentor.uninstrument()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_httpx_instrumentation_stays_quiet_for_unsampled_calls(
    mode, instrumented, make_mesh, echo_factory
) -> None:
    """An unsampled call's attempts go out with HTTP instrumentation suppressed: the httpx
    instrumentation (which would sample its own span here) records nothing and does not
    replace the call's traceparent — the same on every call made in the context."""
    backend = echo_factory("reviews")
    provider = TracerProvider(sampler=_off())
    mesh = make_mesh(service_yaml("reviews", backend.port), tracer_provider=provider)
    token = context.attach(_parent(TRACE_A, 0))

    async def go_async() -> list[str]:
        async with mesh.async_client() as client:
            return [
                (await client.get("http://reviews/x")).json()["headers"]["traceparent"]
                for _ in range(3)
            ]

    try:
        if mode == "sync":
            with mesh.client() as client:
                got = [
                    client.get("http://reviews/x").json()["headers"]["traceparent"]
                    for _ in range(3)
                ]
        else:
            got = asyncio.run(go_async())
    finally:
        context.detach(token)

    assert instrumented.get_finished_spans() == ()
    ids = [traceparent_ids(h) for h in got]
    assert [(t, f) for t, _, f in ids] == [(TRACE_A, 0)] * 3
    assert len({s for _, s, _ in ids}) == 3
