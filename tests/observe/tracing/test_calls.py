"""What one outbound call looks like as spans: retries and hedges as attempt spans under one
call span, an injected abort, failures with their reason, and the policy's sampling."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from opentelemetry.trace import SpanKind, StatusCode

import meshlib
from meshlib.observe.tracing import TRACER_NAME

from .conftest import sampling, service_yaml, traceparent_ids

pytestmark = pytest.mark.timeout(30)


def policy(spec: str) -> str:
    return (
        "---\napiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: p}\n"
        f"spec:\n  target: {{service: reviews}}\n{spec}"
    )


RETRY = policy(
    "  retries: {attempts: 2, retryOn: [5xx], backoff: {baseInterval: 1ms, maxInterval: 2ms}}\n"
)


def call_and_attempts(recorder):
    spans = recorder.named("GET reviews", SpanKind.CLIENT)
    calls = [s for s in spans if "mesh.attempt" not in s.attributes]
    assert len(calls) == 1, spans
    attempts = sorted(
        (s for s in spans if "mesh.attempt" in s.attributes),
        key=lambda s: s.attributes["mesh.attempt"],
    )
    for attempt in attempts:
        assert attempt.parent is not None and attempt.parent.span_id == calls[0].context.span_id
    return calls[0], attempts


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_retry_is_a_second_attempt_span_under_one_call(
    mode, recorder, make_mesh, echo_factory
) -> None:
    backend = echo_factory("reviews")
    backend.set_status(503, times=1)
    mesh = make_mesh(
        service_yaml("reviews", backend.port, RETRY), tracer_provider=recorder.provider
    )

    if mode == "sync":
        with mesh.client() as client:
            response = client.get("http://reviews/r")
    else:

        async def go() -> httpx.Response:
            async with mesh.async_client() as client:
                return await client.get("http://reviews/r")

        response = asyncio.run(go())

    assert response.status_code == 200
    call, attempts = call_and_attempts(recorder)
    assert [a.attributes["http.response.status_code"] for a in attempts] == [503, 200]
    first, second = attempts
    assert first.status.status_code is StatusCode.ERROR and first.attributes["error.type"] == "503"
    assert second.attributes["http.request.resend_count"] == 1
    assert "http.request.resend_count" not in first.attributes
    assert call.attributes["mesh.retries"] == 1 and call.attributes["mesh.attempts"] == 2
    assert call.status.status_code is StatusCode.UNSET
    assert call.instrumentation_scope.name == TRACER_NAME
    assert call.instrumentation_scope.version == meshlib.__version__
    # What the backend got last names the second attempt.
    sent = response.json()["headers"]["traceparent"]
    assert traceparent_ids(sent)[:2] == (call.context.trace_id, second.context.span_id)


def test_hedged_attempts_are_both_visible(recorder, make_mesh, echo_factory) -> None:
    slow, fast = echo_factory("slow"), echo_factory("fast")
    slow.set_delay(0.4)
    hedge = policy(
        "  loadBalancer: {type: round-robin}\n"
        "  hedging: {enabled: true, delay: 50ms, maxAttempts: 2}\n"
        "  retries: {attempts: 2, retryOn: [5xx]}\n"
    )
    text = (
        "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: reviews}\nspec:\n  endpoints:\n"
        f"  - address: 127.0.0.1:{fast.port}\n  - address: 127.0.0.1:{slow.port}\n" + hedge
    )
    mesh = make_mesh(text, tracer_provider=recorder.provider)
    with mesh.client() as client:
        response = client.get("http://reviews/h")
    assert response.json()["backend"] == "fast"

    call, attempts = call_and_attempts(recorder)
    assert [(a.attributes["mesh.hedge"], a.attributes["server.port"]) for a in attempts] == [
        (False, slow.port),
        (True, fast.port),
    ]
    assert attempts[0].attributes["mesh.outcome"] == "cancelled"
    assert call.attributes["mesh.hedges"] == 1


def test_an_injected_abort_is_visible_and_sends_nothing(recorder, make_mesh) -> None:
    mesh = make_mesh(service_yaml("reviews", 9), tracer_provider=recorder.provider)
    with mesh.inject_fault("reviews", abort=503), mesh.client(local_responses=True) as client:
        assert client.get("http://reviews/f").status_code == 503

    call, attempts = call_and_attempts(recorder)
    assert attempts == []
    assert call.attributes["mesh.fault"] == "abort:503"
    assert call.attributes["mesh.reason"] == "fault_abort"
    assert call.status.status_code is StatusCode.ERROR
    assert call.status.description == "fault_abort"


def test_a_mesh_error_marks_the_call_span(recorder, make_mesh) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mesh = make_mesh(service_yaml("reviews", port), tracer_provider=recorder.provider)
    with mesh.inject_fault("reviews", delay=5.0), mesh.client() as client:
        mesh_deadline = policy("  timeout: 20ms\n")
        mesh.apply(make_mesh(service_yaml("reviews", port, mesh_deadline)).snapshot)
        with pytest.raises(meshlib.MeshTimeout):
            client.get("http://reviews/e")

    call, _ = call_and_attempts(recorder)
    assert call.status.status_code is StatusCode.ERROR
    assert call.attributes["error.type"] == "timeout"
    assert call.attributes["mesh.reason"] == "timeout"
    assert [e.name for e in call.events] == ["exception"]


def test_a_connect_failure_marks_call_and_attempt(recorder, make_mesh) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mesh = make_mesh(service_yaml("reviews", port), tracer_provider=recorder.provider)
    with mesh.client() as client, pytest.raises(httpx.ConnectError):
        client.get("http://reviews/c")

    call, attempts = call_and_attempts(recorder)
    assert attempts and len(attempts) == call.attributes["mesh.attempts"]
    for attempt in attempts:  # the default policy retries connect failures
        assert attempt.attributes["error.type"] == "ConnectError"
        assert attempt.attributes["mesh.outcome"] == "connect_failure"
    assert call.attributes["error.type"] == "ConnectError"
    assert call.attributes["mesh.reason"] == "connect_failure"


def test_sampling_applies_to_roots_only(recorder, make_mesh) -> None:
    """With sampling 0.5 about half of the roots are recorded (seeded, so exact here); a call
    inside an existing sampled trace is always recorded."""
    half = "---\n" + sampling("0.5")
    mesh = make_mesh(service_yaml("reviews", 9, half), tracer_provider=recorder.provider)
    with mesh.inject_fault("reviews", abort=503), mesh.client(local_responses=True) as client:
        for _ in range(40):
            client.get("http://reviews/s")
        roots = len(recorder.spans())
        assert 10 <= roots <= 30, roots
        tracer = recorder.provider.get_tracer("test")
        with tracer.start_as_current_span("parent"):
            for _ in range(10):
                client.get("http://reviews/s")
    assert len(recorder.spans()) == roots + 10 + 1


def test_no_span_without_a_provider_and_no_header_without_a_context(
    make_mesh, echo_factory
) -> None:
    backend = echo_factory("reviews")
    mesh = make_mesh(service_yaml("reviews", backend.port))  # the global no-op provider
    with mesh.client() as client:
        headers = client.get("http://reviews/n").json()["headers"]
    assert "traceparent" not in headers


def test_invalid_sampling_is_rejected_with_its_place() -> None:
    text = sampling("1.5")
    with pytest.raises(meshlib.ConfigError) as caught:
        meshlib.Mesh.from_text(text, service="x")
    assert "spec.tracing.sampling" in str(caught.value)
    assert (
        meshlib.Mesh.from_text(
            text.replace("1.5", "0.25"), service="x"
        ).snapshot.mesh.tracing_sampling
        == 0.25
    )
