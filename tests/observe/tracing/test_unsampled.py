"""A call that is not sampled, with an SDK installed: nothing is recorded, no span is built for
it or its attempts, and every attempt carries the call's ids once written — the parent's trace
id, a new span id, flags ``00``. Sampled calls are unchanged. Whoever decides (the policy's
``spec.tracing.sampling: 0``, the SDK's ALWAYS_OFF or ratio sampler, a parent that was not
sampled), the outcome is the same."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from opentelemetry import context, propagate, trace
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import meshlib

from .conftest import Counted, sampling, service_yaml, traceparent_ids

pytestmark = pytest.mark.timeout(30)

PARENT_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_SPAN = 0xB7AD6B7169203331
RETRY = (
    "---\napiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: p}\n"
    "spec:\n  target: {service: reviews}\n"
    "  retries: {attempts: 2, retryOn: [5xx], backoff: {baseInterval: 1ms, maxInterval: 2ms}}\n"
)

# name → (the SDK's sampler, the parent's flags or None for a root, the policy's sampling)
CASES: dict[str, tuple[Sampler | None, int | None, str | None]] = {
    "parent-not-sampled": (None, 0, None),  # the SDK default, ParentBased(ALWAYS_ON)
    "sdk-always-off": (ALWAYS_OFF, 1, None),
    "sdk-ratio-root": (ParentBased(TraceIdRatioBased(0.0)), None, None),
    "policy-sampling-0": (None, None, "0"),
}


class _Marker(TraceContextTextMapPropagator):
    """Not only the W3C headers: the span's id goes out in a header of its own too."""

    def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:  # type: ignore[override]
        super().inject(carrier, context)
        span = trace.get_current_span(context).get_span_context()
        carrier["x-span"] = f"{span.span_id:016x}"


def _call(
    sampler: Sampler | None,
    parent_flags: int | None,
    rate: str | None,
    monkeypatch: pytest.MonkeyPatch,
    marker: bool = False,
) -> tuple[Counted, list[httpx.Request]]:
    """One GET through a retry policy (503, then 200) with a mock inner transport that keeps
    every attempt's request; ``marker``: :class:`_Marker` is the global propagator."""
    counted = Counted(sampler)
    if marker:
        propagator = _Marker()
        monkeypatch.setattr(propagate, "get_global_textmap", lambda: propagator)
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(503 if len(sent) == 1 else 200)

    text = service_yaml("reviews", 9080, RETRY + ("" if rate is None else "---\n" + sampling(rate)))
    mesh = meshlib.Mesh.from_text(
        text, service="web", metrics=False, seed=7, tracer_provider=counted.provider
    )
    token = None
    if parent_flags is not None:
        parent = trace.SpanContext(PARENT_TRACE, PARENT_SPAN, True, trace.TraceFlags(parent_flags))
        token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(parent)))
    try:
        transport = meshlib.MeshTransport(mesh, inner=httpx.MockTransport(answer))
        with httpx.Client(transport=transport) as client:
            assert client.get("http://reviews/r").status_code == 200
    finally:
        if token is not None:
            context.detach(token)
        mesh.close()
        counted.provider.shutdown()
    return counted, sent


@pytest.mark.parametrize("marker", [False, True], ids=["w3c", "other-propagator"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_an_unsampled_call_builds_no_span_and_sends_its_ids_once_written(
    case: str, marker: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    sampler, parent_flags, rate = CASES[case]
    counted, sent = _call(sampler, parent_flags, rate, monkeypatch, marker)

    assert counted.exporter.get_finished_spans() == ()
    # Under a parent the sampler is asked without starting a span; a root the SDK samples
    # (or not) is its call span's start. Never a span for an attempt.
    assert counted.started == (1 if parent_flags is None and rate is None else 0)
    assert len(sent) == 2
    headers = [r.headers["traceparent"] for r in sent]
    assert headers[0] == headers[1]  # both attempts: the same (unrecorded) call
    trace_id, span_id, flags = traceparent_ids(headers[0])
    assert flags & 1 == 0  # not sampled: downstream parent-based samplers record nothing
    assert span_id not in (0, PARENT_SPAN)
    if parent_flags is None:
        assert trace_id not in (0, PARENT_TRACE)  # a new trace
    else:
        assert trace_id == PARENT_TRACE
    if marker:  # any other propagator writes what it writes for the call's (unrecorded) span
        assert [r.headers["x-span"] for r in sent] == [f"{span_id:016x}"] * 2


def test_a_sampled_call_records_its_span_and_one_per_resend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counted, sent = _call(None, 1, None, monkeypatch)

    spans = counted.exporter.get_finished_spans()
    (call,) = [s for s in spans if "http.request.resend_count" not in s.attributes]
    (resend,) = [s for s in spans if "http.request.resend_count" in s.attributes]
    assert counted.started == 2
    assert call.parent is not None and call.parent.span_id == PARENT_SPAN
    assert call.context.trace_id == PARENT_TRACE
    assert resend.parent is not None and resend.parent.span_id == call.context.span_id
    # The first attempt went out with the call span's context, the retry with its own span's.
    assert [traceparent_ids(r.headers["traceparent"]) for r in sent] == [
        (PARENT_TRACE, call.context.span_id, 1),
        (PARENT_TRACE, resend.context.span_id, 1),
    ]


def test_an_unsampled_parent_reaches_the_server_with_flags_00(
    recorder: Any, make_mesh: Any, echo_factory: Any
) -> None:
    """End to end: a real server sees the parent's trace id and flags ``00``; nothing is
    recorded on the client side."""
    backend = echo_factory("reviews")
    mesh = make_mesh(service_yaml("reviews", backend.port), tracer_provider=recorder.provider)
    parent = trace.SpanContext(PARENT_TRACE, PARENT_SPAN, True, trace.TraceFlags(0))
    token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(parent)))
    try:
        with mesh.client() as client:
            sent = client.get("http://reviews/u").json()["headers"]["traceparent"]
    finally:
        context.detach(token)
    trace_id, span_id, flags = traceparent_ids(sent)
    assert (trace_id, flags & 1) == (PARENT_TRACE, 0)
    assert span_id not in (0, PARENT_SPAN)
    assert recorder.spans() == []


class _CountingSampler(Sampler):
    """A sampler of the application's own (it could draw at random): it counts its calls."""

    def __init__(self, record: bool) -> None:
        self.inner = ALWAYS_ON if record else ALWAYS_OFF
        self.calls = 0

    def should_sample(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner.should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return "counting"


@pytest.mark.parametrize("record", [True, False], ids=["sampled", "not-sampled"])
def test_a_sampler_of_the_applications_own_is_asked_once_per_call(
    record: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Asked twice (once ahead, once by start_span), a sampler drawing at random would sample
    # at p² instead of p: only the SDK's own, deterministic samplers are asked ahead.
    sampler = _CountingSampler(record)
    counted, sent = _call(sampler, 1, None, monkeypatch)
    spans = counted.exporter.get_finished_spans()
    call_spans = [s for s in spans if "http.request.resend_count" not in s.attributes]
    # One decision for the call; a sampled call's resend span (the retry: its first attempt is
    # the call span) is a child it starts itself.
    assert sampler.calls == (2 if record else 1)
    assert len(call_spans) == (1 if record else 0)
    assert len(sent) == 2


class _Delegate(Sampler):
    """A parent-based sampler's delegate of the application's own: it keeps what it was given."""

    def __init__(self) -> None:
        self.given: list[Any] = []

    def should_sample(self, *args: Any, **kwargs: Any) -> Any:
        self.given.append(args[4] if len(args) > 4 else kwargs.get("attributes"))
        return ALWAYS_OFF.should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return "delegate"


@pytest.mark.parametrize("custom", [False, True], ids=["default-delegates", "custom-delegate"])
def test_the_call_attributes_are_built_only_for_a_sampler_that_may_read_them(
    custom: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a parent that was not sampled, the SDK's default ``ParentBased`` answers from the
    parent's flags: the call span's attributes (``url.full`` is a ``str(url)``) are not built.
    A delegate of the application's own still gets them, as ``start_span`` would give them."""
    from meshlib.observe import tracing as tracing_module

    built: list[int] = []
    real = tracing_module._call_attributes

    def counting(*args: Any) -> Any:
        built.append(1)
        return real(*args)

    monkeypatch.setattr(tracing_module, "_call_attributes", counting)
    delegate = _Delegate()
    sampler = (
        ParentBased(ALWAYS_ON, remote_parent_not_sampled=delegate)
        if custom
        else ParentBased(ALWAYS_ON)
    )
    counted, sent = _call(sampler, 0, None, monkeypatch)

    assert counted.exporter.get_finished_spans() == () and counted.started == 0
    assert len(sent) == 2 and traceparent_ids(sent[0].headers["traceparent"])[2] & 1 == 0
    if custom:
        assert len(built) == 1 and [a["mesh.service"] for a in delegate.given] == [
            "reviews.default"
        ]
    else:
        assert built == [] and delegate.given == []
