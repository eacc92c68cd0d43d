"""Without an SDK, the propagation headers are computed once per context and reused: each call
still carries the context current when it starts, a changed context or propagator is picked up,
and a context with nothing to propagate leaves the call unwrapped. No sockets: the inner
transport records what it is sent."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from opentelemetry import context, propagate, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import meshlib
from meshlib.outbound.call import run_call

POLICY = """\
apiVersion: meshlib/v1
kind: Service
metadata: {name: reviews}
spec:
  endpoints:
  - address: 127.0.0.1:9080
"""


def _parent(trace_id: int) -> context.Context:
    span = trace.SpanContext(trace_id, 0xB7AD6B7169203331, True, trace.TraceFlags(1))
    return trace.set_span_in_context(trace.NonRecordingSpan(span))


@pytest.fixture
def sent() -> Iterator[tuple[httpx.Client, list[httpx.Request], meshlib.Mesh]]:
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200)

    mesh = meshlib.Mesh.from_text(
        POLICY, service="web", metrics=False, tracer_provider=trace.NoOpTracerProvider()
    )
    transport = meshlib.MeshTransport(mesh, inner=httpx.MockTransport(answer))
    with httpx.Client(transport=transport) as client:
        yield client, requests, mesh
    mesh.close()


def test_each_call_carries_the_context_current_when_it_starts(sent) -> None:
    client, requests, _ = sent
    for trace_id in (0x1, 0x1, 0x2):
        token = context.attach(_parent(trace_id))
        try:
            client.get("http://reviews/r")
        finally:
            context.detach(token)
    client.get("http://reviews/r")
    parents = [r.headers.get("traceparent") for r in requests]
    assert parents == [
        "00-00000000000000000000000000000001-b7ad6b7169203331-01",
        "00-00000000000000000000000000000001-b7ad6b7169203331-01",
        "00-00000000000000000000000000000002-b7ad6b7169203331-01",
        None,
    ]


def test_a_new_global_propagator_is_used(sent, monkeypatch: pytest.MonkeyPatch) -> None:
    client, requests, _ = sent
    token = context.attach(_parent(0x3))
    try:
        client.get("http://reviews/r")
        monkeypatch.setattr(propagate, "get_global_textmap", lambda: _Marker())
        client.get("http://reviews/r")
    finally:
        context.detach(token)
    assert "x-marker" not in requests[0].headers
    assert requests[1].headers["x-marker"] == "1"


def test_a_context_with_nothing_to_propagate_leaves_the_call_bare(sent) -> None:
    _, _, mesh = sent
    router = mesh.router
    service = router.services["reviews.default"]
    request = httpx.Request("GET", "http://reviews/r")
    token = context.attach(context.set_value("unrelated", 1))
    try:
        call = run_call(mesh, router, service, request)
        assert mesh.tracing.trace_call(call, request, service) is call
    finally:
        context.detach(token)
        call.close()


class _Marker(TraceContextTextMapPropagator):
    def inject(self, carrier, context=None, setter=None) -> None:  # type: ignore[no-untyped-def,override]
        super().inject(carrier, context)
        carrier["x-marker"] = "1"
