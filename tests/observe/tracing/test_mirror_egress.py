"""Spans for traffic that is not an attempt: a mirrored copy gets its own CLIENT span under the
call span, marked as a mirror, and the shadow continues that trace; a call refused by
``egress: registry-only`` gets a CLIENT span with error status and the reason."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

import meshlib

from .conftest import MESH_ONLY, service_yaml, traceparent_ids

pytestmark = pytest.mark.timeout(30)

MIRROR = (
    "---\napiVersion: meshlib/v1\nkind: TrafficMirror\nmetadata: {name: m}\n"
    "spec: {service: reviews, mirror: reviews-shadow, percent: 100}\n"
)


def mirror_mesh(make_mesh, recorder, primary, shadow) -> meshlib.Mesh:
    return make_mesh(
        service_yaml("reviews", primary.port)
        + "---\n"
        + service_yaml("reviews-shadow", shadow.port, MIRROR),
        tracer_provider=recorder.provider,
    )


def has_mirror_span(spans) -> bool:
    return any(s.attributes.get("mesh.mirror") for s in spans)


def call(mode: str, mesh: meshlib.Mesh, recorder, url: str) -> httpx.Response:
    """One GET through the sync or the async client; returns once the copy's span has ended."""
    if mode == "sync":
        with mesh.client() as client:
            response = client.get(url)
        recorder.wait_for(has_mirror_span)
        return response

    async def go() -> httpx.Response:
        async with mesh.async_client() as client:
            response = await client.get(url)
            # Wait before closing the client: closing it cancels a copy still in flight.
            await asyncio.to_thread(recorder.wait_for, has_mirror_span)
            return response

    return asyncio.run(go())


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("shadow_status", [200, 500])
def test_a_mirrored_copy_is_its_own_client_span_under_the_call(
    mode, shadow_status, recorder, make_mesh, echo_factory
) -> None:
    primary, shadow = echo_factory("primary"), echo_factory("shadow")
    shadow.set_status(shadow_status)
    mesh = mirror_mesh(make_mesh, recorder, primary, shadow)

    response = call(mode, mesh, recorder, "http://reviews/m")
    assert response.status_code == 200
    assert shadow.wait_for_requests(1)

    spans = recorder.named("GET reviews", SpanKind.CLIENT)
    (call_span,) = spans  # the call, which carries its one attempt
    assert call_span.attributes["mesh.attempts"] == 1
    (copy,) = [s for s in recorder.spans() if s.attributes.get("mesh.mirror")]
    assert copy.kind is SpanKind.CLIENT and copy.name == "GET reviews-shadow"
    assert copy.parent is not None and copy.parent.span_id == call_span.context.span_id
    assert copy.context.trace_id == call_span.context.trace_id
    assert copy.attributes["mesh.service"] == "reviews-shadow.default"
    assert copy.attributes["server.port"] == shadow.port
    assert copy.attributes["http.response.status_code"] == shadow_status
    if shadow_status == 200:
        assert copy.status.status_code is StatusCode.UNSET
    else:  # the copy failed: its own span says so; the call it shadowed did not
        assert copy.status.status_code is StatusCode.ERROR
        assert copy.attributes["error.type"] == "500"
    assert call_span.status.status_code is StatusCode.UNSET
    assert "mesh.mirror" not in call_span.attributes
    # The shadow continues the trace from the copy's span, the primary from the call's.
    copied = traceparent_ids(shadow.records[0].headers["traceparent"])
    assert copied[:2] == (call_span.context.trace_id, copy.context.span_id)
    sent = traceparent_ids(response.json()["headers"]["traceparent"])
    assert sent[:2] == (call_span.context.trace_id, call_span.context.span_id)


def test_a_failed_copy_records_its_error(recorder, make_mesh, echo_factory) -> None:
    primary = echo_factory("primary")
    text = (
        service_yaml("reviews", primary.port)
        + "---\n"
        + service_yaml("reviews-shadow", 9, MIRROR)  # port 9: nothing listens
    )
    mesh = make_mesh(text, tracer_provider=recorder.provider)
    assert call("sync", mesh, recorder, "http://reviews/m").status_code == 200
    (copy,) = [s for s in recorder.spans() if s.attributes.get("mesh.mirror")]
    assert copy.status.status_code is StatusCode.ERROR
    assert copy.attributes["error.type"] == "ConnectError"
    assert copy.attributes["mesh.outcome"] == "error"
    assert [e.name for e in copy.events] == ["exception"]


REGISTRY_ONLY = MESH_ONLY.replace("spec: {}", "spec: {egress: registry-only}")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_egress_refused_call_gets_an_error_span_with_its_reason(
    mode, recorder, make_mesh, echo_factory
) -> None:
    outside = echo_factory("outside")
    mesh = make_mesh(REGISTRY_ONLY, tracer_provider=recorder.provider)
    url = f"http://127.0.0.1:{outside.port}/out"
    tracer = recorder.provider.get_tracer("test")

    with tracer.start_as_current_span("handler") as parent:
        if mode == "sync":
            with mesh.client() as client, pytest.raises(meshlib.AccessDeniedError) as info:
                client.get(url)
        else:

            async def go() -> None:
                async with mesh.async_client() as client:
                    await client.get(url)

            with pytest.raises(meshlib.AccessDeniedError) as info:
                asyncio.run(go())
    assert info.value.decision.reason == "denied"
    assert outside.requests == 0

    (span,) = [s for s in recorder.spans() if s.kind is SpanKind.CLIENT]
    assert span.name == "GET 127.0.0.1"
    assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description.startswith("denied: egress to '127.0.0.1' refused")
    assert span.attributes["error.type"] == "denied"
    assert span.attributes["mesh.reason"] == "denied"
    assert span.attributes["url.full"] == url
    assert [e.name for e in span.events] == ["exception"]


def test_egress_refusal_records_nothing_without_a_provider(make_mesh) -> None:
    mesh = make_mesh(REGISTRY_ONLY, tracer_provider=trace.NoOpTracerProvider())
    with mesh.client() as client, pytest.raises(meshlib.AccessDeniedError):
        client.get("http://127.0.0.1:9/out")
