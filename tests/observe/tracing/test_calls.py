"""What one outbound call looks like as spans: one CLIENT span for a call with one attempt,
retries and hedges as resend spans under it (the first attempt an event on it), an injected
abort, failures with their reason, and the policy's sampling."""

from __future__ import annotations

import asyncio
import functools
import gc
import socket
from typing import Any

import httpx
import pytest
from opentelemetry import context
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, StatusCode

import meshlib
from meshlib import MeshMiddleware
from meshlib.observe.tracing import TRACER_NAME
from meshlib.outbound.call import Send

from .conftest import (
    MESH_ONLY,
    drain,
    headers_of,
    reply,
    sampling,
    service_yaml,
    traceparent_ids,
)

pytestmark = pytest.mark.timeout(30)


def policy(spec: str) -> str:
    return (
        "---\napiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: p}\n"
        f"spec:\n  target: {{service: reviews}}\n{spec}"
    )


RETRY = policy(
    "  retries: {attempts: 2, retryOn: [5xx], backoff: {baseInterval: 1ms, maxInterval: 2ms}}\n"
)


def call_and_resends(recorder):
    """The call's span (which is also its first attempt's) and the spans of the attempts sent
    after it (retries, hedges), each its child, in order."""
    spans = recorder.named("GET reviews", SpanKind.CLIENT)
    calls = [s for s in spans if "http.request.resend_count" not in s.attributes]
    assert len(calls) == 1, spans
    resends = sorted(
        (s for s in spans if "http.request.resend_count" in s.attributes),
        key=lambda s: s.attributes["mesh.attempt"],
    )
    for resend in resends:
        assert resend.parent is not None and resend.parent.span_id == calls[0].context.span_id
        assert (
            resend.attributes["http.request.resend_count"] == resend.attributes["mesh.attempt"] - 1
        )
    return calls[0], resends


def attempt_events(span):
    return [dict(e.attributes) for e in span.events if e.name == "mesh.attempt"]


def test_a_call_with_one_attempt_is_one_span_carrying_the_attempt(
    recorder, make_mesh, echo_factory
) -> None:
    backend = echo_factory("reviews")
    mesh = make_mesh(service_yaml("reviews", backend.port), tracer_provider=recorder.provider)
    with mesh.client() as client:
        response = client.get("http://reviews/one")

    assert response.status_code == 200
    (call,) = recorder.spans()
    assert call.name == "GET reviews" and call.kind is SpanKind.CLIENT
    # Exactly these, and nothing at its default: the HTTP client conventions' required
    # attributes (server.* the origin the caller named), the endpoint as network.peer.*, and the
    # decision. No mesh.attempt / mesh.hedge (mesh.attempts says 1; a first attempt is never a
    # hedge), no mesh.retries / mesh.hedges at 0, no mesh.reason or mesh.outcome at ok, no
    # mesh.backend that repeats mesh.service: each attribute costs the SDK's cleaning.
    assert dict(call.attributes) == {
        "http.request.method": "GET",
        "url.full": "http://reviews/one",
        "server.address": "reviews",
        "server.port": 80,
        "mesh.service": "reviews.default",
        "network.peer.address": "127.0.0.1",
        "network.peer.port": backend.port,
        "http.response.status_code": 200,
        "mesh.attempts": 1,
    }
    assert "http.request.resend_count" not in call.attributes and call.events == ()
    # The upstream got the call span's own context: its SERVER span will be the call's child.
    sent = response.json()["headers"]["traceparent"]
    assert traceparent_ids(sent) == (
        call.context.trace_id,
        call.context.span_id,
        call.context.trace_flags,
    )
    assert call.context.trace_flags.sampled


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_retry_is_a_resend_span_under_the_call_span(
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
    call, resends = call_and_resends(recorder)
    (second,) = resends
    # The first attempt (its context was the call span's) is an event on the call span.
    assert attempt_events(call) == [
        {
            "mesh.attempt": 1,
            "mesh.hedge": False,
            "network.peer.address": "127.0.0.1",
            "network.peer.port": backend.port,
            "mesh.outcome": "status",
            "http.response.status_code": 503,
            "error.type": "503",
        }
    ]
    assert second.attributes["http.response.status_code"] == 200
    assert second.attributes["http.request.resend_count"] == 1
    assert second.status.status_code is StatusCode.UNSET
    # The call span says what the caller got, not what its first attempt got.
    assert call.attributes["http.response.status_code"] == 200
    assert "mesh.outcome" not in call.attributes and "mesh.attempt" not in call.attributes
    assert call.attributes["mesh.retries"] == 1 and call.attributes["mesh.attempts"] == 2
    assert call.status.status_code is StatusCode.UNSET
    assert call.instrumentation_scope.name == TRACER_NAME
    assert call.instrumentation_scope.version == meshlib.__version__
    # What the backend got last names the resend.
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

    call, resends = call_and_resends(recorder)
    ((first,), (backup,)) = attempt_events(call), resends
    assert (first["mesh.hedge"], first["network.peer.port"], first["mesh.outcome"]) == (
        False,
        slow.port,
        "cancelled",
    )
    assert (backup.attributes["mesh.hedge"], backup.attributes["server.port"]) == (True, fast.port)
    assert backup.attributes["mesh.outcome"] == "ok"
    assert call.attributes["mesh.hedges"] == 1
    sent = response.json()["headers"]["traceparent"]
    assert traceparent_ids(sent)[1] == backup.context.span_id


def test_an_injected_abort_is_visible_and_sends_nothing(recorder, make_mesh) -> None:
    mesh = make_mesh(service_yaml("reviews", 9), tracer_provider=recorder.provider)
    with mesh.inject_fault("reviews", abort=503), mesh.client(local_responses=True) as client:
        assert client.get("http://reviews/f").status_code == 503

    call, resends = call_and_resends(recorder)
    assert resends == [] and "mesh.attempt" not in call.attributes
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

    call, _ = call_and_resends(recorder)
    assert call.status.status_code is StatusCode.ERROR
    assert call.attributes["error.type"] == "timeout"
    assert call.attributes["mesh.reason"] == "timeout"
    assert [e.name for e in call.events] == ["exception"]


def test_a_connect_failure_marks_call_and_attempts(recorder, make_mesh) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mesh = make_mesh(service_yaml("reviews", port), tracer_provider=recorder.provider)
    with mesh.client() as client, pytest.raises(httpx.ConnectError):
        client.get("http://reviews/c")

    call, resends = call_and_resends(recorder)
    events = attempt_events(call)  # the default policy retries connect failures
    assert resends and len(events) == 1 and 1 + len(resends) == call.attributes["mesh.attempts"]
    for attempt in [events[0], *(r.attributes for r in resends)]:
        assert attempt["error.type"] == "ConnectError"
        assert attempt["mesh.outcome"] == "connect_failure"
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


def upstream(make_mesh, serve, recorder, name: str, statuses: list[int], delay: float = 0.0):
    """A meshed upstream under uvicorn recording its SERVER spans with ``recorder``: answers
    each request with the next of ``statuses`` (then 200) after ``delay`` seconds, and keeps
    the ``traceparent`` of every request it got."""
    seen: list[str] = []
    mesh = make_mesh(MESH_ONLY, service=name, tracer_provider=recorder.provider)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(headers_of(scope)["traceparent"])
        await drain(receive)
        if delay:
            await asyncio.sleep(delay)
        await reply(send, statuses.pop(0) if statuses else 200, name.encode())

    return serve(MeshMiddleware(app, mesh=mesh), name), seen


def server_spans(recorder, path: str) -> list[Any]:
    spans = [s for s in recorder.spans() if s.kind is SpanKind.SERVER]
    return sorted(
        (s for s in spans if s.attributes.get("url.path") == path), key=lambda s: s.start_time
    )


@pytest.mark.timeout(20)
def test_each_upstream_server_span_is_the_child_of_the_span_whose_context_it_got(
    recorder, make_mesh, serve
) -> None:
    """A retry against a real upstream: its first request got the call span's context, its
    second the resend span's; the upstream's two SERVER spans hang under those two spans."""
    server, seen = upstream(make_mesh, serve, recorder, "reviews", [503])
    mesh = make_mesh(service_yaml("reviews", server.port, RETRY), tracer_provider=recorder.provider)
    with mesh.client() as client:
        assert client.get("http://reviews/retried").status_code == 200
    recorder.wait_for_server("/retried", count=2)

    call, (resend,) = call_and_resends(recorder)
    assert call.parent is None  # a root: the caller had no trace
    first, second = server_spans(recorder, "/retried")
    assert [traceparent_ids(t)[1] for t in seen] == [call.context.span_id, resend.context.span_id]
    assert first.parent is not None and first.parent.span_id == call.context.span_id
    assert second.parent is not None and second.parent.span_id == resend.context.span_id
    assert [s.attributes["http.response.status_code"] for s in (first, second)] == [503, 200]
    assert {s.context.trace_id for s in (call, resend, first, second)} == {call.context.trace_id}
    ((event,),) = [[e for e in call.events if e.name == "mesh.attempt"]]
    assert event.attributes["http.response.status_code"] == 503
    assert first.start_time < event.timestamp < resend.start_time  # attempt 1 ended, then 2


@pytest.mark.timeout(20)
def test_a_hedge_reaches_its_upstream_with_its_own_span(recorder, make_mesh, serve) -> None:
    """The first attempt (slow) carries the call span's context, the hedge its own span's;
    each upstream's SERVER span is the child of the one it got."""
    slow, slow_seen = upstream(make_mesh, serve, recorder, "slow", [], delay=0.4)
    fast, fast_seen = upstream(make_mesh, serve, recorder, "fast", [])
    text = (
        "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: reviews}\nspec:\n  endpoints:\n"
        f"  - address: 127.0.0.1:{fast.port}\n  - address: 127.0.0.1:{slow.port}\n"
        + policy(
            "  loadBalancer: {type: round-robin}\n"
            "  hedging: {enabled: true, delay: 50ms, maxAttempts: 2}\n"
            "  retries: {attempts: 2, retryOn: [5xx]}\n"
        )
    )
    mesh = make_mesh(text, tracer_provider=recorder.provider)
    with mesh.client() as client:
        assert client.get("http://reviews/hedged").text == "fast"
    recorder.wait_for_server("/hedged", count=2)

    call, (backup,) = call_and_resends(recorder)
    assert backup.attributes["mesh.hedge"] is True
    assert [traceparent_ids(t)[1] for t in slow_seen + fast_seen] == [
        call.context.span_id,
        backup.context.span_id,
    ]
    by_port = {s.attributes["server.port"]: s for s in server_spans(recorder, "/hedged")}
    assert by_port[slow.port].parent.span_id == call.context.span_id
    assert by_port[fast.port].parent.span_id == backup.context.span_id
    ((event,),) = [[e for e in call.events if e.name == "mesh.attempt"]]
    assert event.attributes["mesh.outcome"] == "cancelled"


def test_a_split_to_another_service_names_the_backend_it_chose(
    recorder, make_mesh, echo_factory
) -> None:
    """``mesh.backend`` is left out only when it repeats ``mesh.service``: a split that sends
    the call to another service names that service."""
    backend = echo_factory("ratings")
    text = (
        service_yaml("ratings", backend.port)
        + "---\napiVersion: meshlib/v1\nkind: Service\nmetadata: {name: reviews}\n"
        + "---\napiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\n"
        + "metadata: {name: reviews-split}\nspec:\n  service: reviews\n"
        + "  backends: [{service: ratings, weight: 1}]\n"
    )
    mesh = make_mesh(text, tracer_provider=recorder.provider)
    with mesh.client() as client:
        assert client.get("http://reviews/s").status_code == 200

    (call,) = recorder.named("GET reviews", SpanKind.CLIENT)
    assert call.attributes["mesh.service"] == "reviews.default"
    assert call.attributes["mesh.backend"] == "ratings.default"
    assert call.attributes["mesh.split"] == "reviews-split"
    assert "mesh.reason" not in call.attributes  # ok


@pytest.mark.timeout(20)
def test_a_call_its_caller_cancels_ends_its_span_as_cancelled(recorder, make_mesh, serve) -> None:
    """A task cancelled while its attempt is out: the call span ends with error
    ``cancelled``, its attempt's outcome says so, and the caller's context is the current one
    again (the call span's, attached around the attempt, is detached)."""
    server, seen = upstream(make_mesh, serve, recorder, "reviews", [], delay=2.0)
    mesh = make_mesh(service_yaml("reviews", server.port), tracer_provider=recorder.provider)

    async def go() -> object:
        async with mesh.async_client() as client:
            before = context.get_current()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.get("http://reviews/slow"), 0.3)
            return before is context.get_current()

    assert asyncio.run(go()) is True
    (call,) = recorder.named("GET reviews", SpanKind.CLIENT)
    assert call.status.status_code is StatusCode.ERROR
    assert call.status.description == "call abandoned by its caller"
    assert call.attributes["error.type"] == "cancelled"
    assert call.attributes["mesh.outcome"] == "cancelled" and len(seen) == 1


def test_a_sampled_call_leaves_nothing_of_its_attempts_to_the_cyclic_collector(
    recorder, make_mesh, echo_factory
) -> None:
    """httpx leaves a response to the cyclic collector (it and its stream refer to each
    other); what the body's listener reaches goes with it unless the call lets go when it
    ends: its attempt (``Send`` and its request) and the call span's context must not, nor
    the body's listener (the tracing closure that ends the call span) once it has run."""
    backend = echo_factory("reviews")
    mesh = make_mesh(service_yaml("reviews", backend.port), tracer_provider=recorder.provider)
    with mesh.client() as client:
        client.get("http://reviews/warm")
        gc.collect()
        gc.disable()
        try:
            assert client.get("http://reviews/gc").status_code == 200
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            garbage = [o for o in gc.garbage if isinstance(o, (Send, Context, functools.partial))]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert len(recorder.named("GET reviews", SpanKind.CLIENT)) == 2
    assert garbage == []
