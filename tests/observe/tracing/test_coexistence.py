"""meshlib next to OpenTelemetry's own httpx and ASGI instrumentations: one CLIENT span per
call plus one per resend, one SERVER span per request, and a traceparent that names a span that
exists — whichever of them is installed, and in whichever order."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.trace import SpanKind

from meshlib import MeshMiddleware
from meshlib.observe.tracing import TRACER_NAME

from .conftest import MESH_ONLY, drain, headers_of, reply, service_yaml, traceparent_ids

pytestmark = pytest.mark.timeout(30)

HTTPX_SCOPE = "opentelemetry.instrumentation.httpx"


@pytest.fixture
def instrumented(recorder) -> Iterator[None]:
    """``HTTPXClientInstrumentor().instrument()``: wraps ``httpx.HTTPTransport`` globally —
    the mesh's inner transport. Undone at teardown."""
    instrumentor = HTTPXClientInstrumentor()
    instrumentor.instrument(tracer_provider=recorder.provider)
    try:
        yield
    finally:
        instrumentor.uninstrument()


def clients(spans: list[Any]) -> list[Any]:
    return [s for s in spans if s.kind is SpanKind.CLIENT]


def check_wire(recorder, sent_traceparent: str) -> Any:
    """The traceparent the backend got names a recorded meshlib span that sent an attempt (a
    call's span, which carries its only attempt's endpoint, or a resend's)."""
    trace_id, span_id, _ = traceparent_ids(sent_traceparent)
    attempt = recorder.by_id()[span_id]
    assert attempt.context.trace_id == trace_id
    assert attempt.instrumentation_scope.name == TRACER_NAME and (
        "network.peer.port" in attempt.attributes or "mesh.attempt" in attempt.attributes
    )
    return attempt


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_global_httpx_instrumentation_adds_no_span_and_keeps_our_header(
    mode, instrumented, recorder, make_mesh, echo_factory
) -> None:
    backend = echo_factory("reviews")
    mesh = make_mesh(service_yaml("reviews", backend.port), tracer_provider=recorder.provider)

    async def go_async() -> tuple[httpx.Response, httpx.Response]:
        async with mesh.async_client() as client:
            return await client.get("http://reviews/x"), await client.get(backend.url + "/plain")

    if mode == "sync":
        with mesh.client() as client:
            meshed, plain = client.get("http://reviews/x"), client.get(backend.url + "/plain")
    else:
        meshed, plain = asyncio.run(go_async())

    spans = recorder.spans()
    theirs = [s for s in spans if s.instrumentation_scope.name == HTTPX_SCOPE]
    # Only the call that did not go through the mesh (an outside host) is theirs to trace.
    assert len(theirs) == 1
    ours = [s for s in clients(spans) if s.instrumentation_scope.name == TRACER_NAME]
    assert len(ours) == 1  # the call, which carries its one attempt
    check_wire(recorder, meshed.json()["headers"]["traceparent"])
    sent = plain.json()["headers"]["traceparent"]
    assert traceparent_ids(sent)[1] == theirs[0].context.span_id


def test_hedge_threads_are_not_traced_twice(
    instrumented, recorder, make_mesh, echo_factory
) -> None:
    """Sync hedges run on a thread pool: the suppression travels with a copy of the context."""
    fast, slow = echo_factory("fast"), echo_factory("slow")
    slow.set_delay(0.4)
    text = (
        "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: reviews}\nspec:\n  endpoints:\n"
        f"  - address: 127.0.0.1:{fast.port}\n  - address: 127.0.0.1:{slow.port}\n---\n"
        "apiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n"
        "  target: {service: reviews}\n  loadBalancer: {type: round-robin}\n"
        "  hedging: {enabled: true, delay: 50ms, maxAttempts: 2}\n  retries: {attempts: 2}\n"
    )
    mesh = make_mesh(text, tracer_provider=recorder.provider)
    with mesh.client() as client:
        response = client.get("http://reviews/h")
    assert response.json()["backend"] == "fast"
    check_wire(recorder, response.json()["headers"]["traceparent"])
    assert not [s for s in recorder.spans() if s.instrumentation_scope.name == HTTPX_SCOPE]


@pytest.mark.parametrize("also_global", [False, True])
def test_instrument_client_span_is_the_call_span(
    also_global, recorder, make_mesh, echo_factory
) -> None:
    """``instrument_client`` on the mesh's client wraps the mesh transport: its CLIENT span
    is the call and carries the first attempt; meshlib adds the resend under it and no call
    span of its own."""
    backend = echo_factory("reviews")
    backend.set_status(503, times=1)
    retry = (
        "---\napiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n"
        "  target: {service: reviews}\n  retries: {attempts: 1, retryOn: [5xx]}\n"
    )
    mesh = make_mesh(
        service_yaml("reviews", backend.port, retry), tracer_provider=recorder.provider
    )
    instrumentor = HTTPXClientInstrumentor()
    if also_global:
        instrumentor.instrument(tracer_provider=recorder.provider)
    try:
        with mesh.client() as client:
            HTTPXClientInstrumentor.instrument_client(client, tracer_provider=recorder.provider)
            response = client.get("http://reviews/x")
    finally:
        if also_global:
            instrumentor.uninstrument()

    assert response.status_code == 200
    spans = clients(recorder.spans())
    (call,) = [s for s in spans if s.instrumentation_scope.name == HTTPX_SCOPE]
    (resend,) = [s for s in spans if s.instrumentation_scope.name == TRACER_NAME]
    assert resend.attributes["http.request.resend_count"] == 1
    assert resend.parent is not None and resend.parent.span_id == call.context.span_id
    (first,) = [e.attributes for e in call.events if e.name == "mesh.attempt"]
    assert (first["mesh.attempt"], first["http.response.status_code"]) == (1, 503)
    assert (
        call.attributes["mesh.retries"] == 1
        and call.attributes["mesh.service"] == "reviews.default"
    )
    assert (
        check_wire(recorder, response.json()["headers"]["traceparent"]).attributes["mesh.attempt"]
        == 2
    )


def server_app(seen: dict[str, str]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.update(headers_of(scope))
        await drain(receive)
        await reply(send, 200, b"ok")

    return app


@pytest.mark.parametrize("order", ["otel-outside", "otel-inside"])
def test_one_server_span_with_the_asgi_middleware(order, recorder, make_mesh, serve) -> None:
    seen: dict[str, str] = {}
    mesh = make_mesh(MESH_ONLY, service="b", tracer_provider=recorder.provider)
    if order == "otel-outside":
        app = OpenTelemetryMiddleware(
            MeshMiddleware(server_app(seen), mesh=mesh), tracer_provider=recorder.provider
        )
    else:
        app = MeshMiddleware(
            OpenTelemetryMiddleware(server_app(seen), tracer_provider=recorder.provider), mesh=mesh
        )
    server = serve(app, "b")
    caller = make_mesh(
        service_yaml("b", server.port), service="a", tracer_provider=recorder.provider
    )
    with caller.client() as client:
        assert client.get("http://b/hello").status_code == 200
    server.stop()  # every span of the request has ended

    servers = [s for s in recorder.spans() if s.kind is SpanKind.SERVER]
    assert len(servers) == 1, servers
    (span,) = servers
    attempt = check_wire(recorder, seen["traceparent"])
    assert span.parent is not None and span.parent.span_id == attempt.context.span_id
    assert span.attributes["mesh.authz"] == "allow"
    expected = "opentelemetry.instrumentation.asgi" if order == "otel-outside" else TRACER_NAME
    assert span.instrumentation_scope.name == expected
