"""Zero-code propagation across three services over real sockets: A's handler calls B; B calls
C from a spawned task and from threads started by the usual context-copying helpers. One
trace, correct parent links, the remaining deadline carried — and no application code."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import anyio.to_thread
import httpx
import pytest
from opentelemetry.trace import NoOpTracerProvider, SpanKind

from meshlib import MeshMiddleware
from meshlib.outbound.call import DEADLINE_HEADER

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

#: How B reaches C: each one an outbound call made while B handles A's request.
HOPS = ("task", "to_thread", "anyio", "copy_context")


def three_services(recorder, make_mesh, serve, *, b_provider: Any = None):
    """Start C, B, A (each knows the next one's port); return (A's server, what C saw)."""
    seen: dict[str, dict[str, str]] = {}
    mesh_c = make_mesh(MESH_ONLY, service="c", tracer_provider=recorder.provider)

    async def c_app(scope: Any, receive: Any, send: Any) -> None:
        await drain(receive)
        await reply(send, 200, b"c")

    inner_c = MeshMiddleware(c_app, mesh=mesh_c)

    async def c_outer(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen[scope["path"].strip("/")] = headers_of(scope)  # raw, as it came off the wire
        await inner_c(scope, receive, send)

    c = serve(c_outer, "c")

    mesh_b = make_mesh(
        service_yaml("c", c.port),
        service="b",
        tracer_provider=b_provider or recorder.provider,
    )

    def sync_call(label: str) -> int:
        with mesh_b.client() as client:
            return client.get(f"http://c/{label}").status_code

    async def b_app(scope: Any, receive: Any, send: Any) -> None:
        await drain(receive)

        async def from_task() -> int:
            async with mesh_b.async_client() as client:
                return (await client.get("http://c/task")).status_code

        loop = asyncio.get_running_loop()
        statuses = [
            await asyncio.create_task(from_task()),
            await asyncio.to_thread(sync_call, "to_thread"),
            await anyio.to_thread.run_sync(sync_call, "anyio"),
            await loop.run_in_executor(
                None, contextvars.copy_context().run, sync_call, "copy_context"
            ),
        ]
        await reply(send, 200, ",".join(map(str, statuses)).encode())

    b = serve(MeshMiddleware(b_app, mesh=mesh_b, default_timeout=3.0), "b")

    mesh_a = make_mesh(service_yaml("b", b.port), service="a", tracer_provider=recorder.provider)

    async def a_app(scope: Any, receive: Any, send: Any) -> None:
        await drain(receive)
        async with mesh_a.async_client() as client:
            response = await client.get("http://b/work")
        await reply(send, response.status_code, response.content)

    a = serve(MeshMiddleware(a_app, mesh=mesh_a, default_timeout=5.0), "a")
    return a, seen


def test_one_trace_across_three_services_tasks_and_threads(recorder, make_mesh, serve) -> None:
    a, seen = three_services(recorder, make_mesh, serve)

    response = httpx.get(a.url + "/start", timeout=10)

    assert response.status_code == 200 and response.text == "200,200,200,200"
    recorder.wait_for_server("/start")
    # B's SERVER span may end after A's response is complete: waited for, not assumed.
    for path in ("/work", *(f"/{hop}" for hop in HOPS)):
        recorder.wait_for_server(path)
    spans = recorder.spans()
    assert len({s.context.trace_id for s in spans}) == 1, "one trace"
    by_id = recorder.by_id()

    def parent(span: Any) -> Any:
        assert span.parent is not None, span.name
        return by_id[span.parent.span_id]

    (a_server,) = [
        s for s in spans if s.kind is SpanKind.SERVER and s.attributes["url.path"] == "/start"
    ]
    assert a_server.parent is None  # the trace starts at A
    # A call with one attempt is one CLIENT span (docs/design.md, "What a trace shows").
    (a_call,) = recorder.named("GET b")
    assert a_call.kind is SpanKind.CLIENT and parent(a_call) is a_server
    assert a_call.attributes["mesh.attempts"] == 1 and "network.peer.port" in a_call.attributes
    (b_server,) = [s for s in spans if s.attributes.get("url.path") == "/work"]
    assert b_server.kind is SpanKind.SERVER and parent(b_server) is a_call

    b_calls = recorder.named("GET c")
    assert len(b_calls) == len(HOPS)
    for call in b_calls:
        assert parent(call) is b_server, "every hop continues B's request"
        # The remaining deadline of B's request (default_timeout 3 s) capped each call.
        assert 0 < call.attributes["mesh.deadline_ms"] <= 3000
    for hop in HOPS:
        (c_server,) = [s for s in spans if s.attributes.get("url.path") == f"/{hop}"]
        call = parent(c_server)
        assert call.attributes["mesh.attempts"] == 1 and call in b_calls
        # The wire traceparent names the call span; the deadline header went out too.
        trace_id, parent_id, flags = traceparent_ids(seen[hop]["traceparent"])
        assert (trace_id, parent_id) == (a_server.context.trace_id, call.context.span_id)
        assert flags & 1  # sampled
        assert 0 < int(seen[hop][DEADLINE_HEADER]) <= 3000


def test_span_attributes_follow_the_conventions(recorder, make_mesh, serve) -> None:
    a, _ = three_services(recorder, make_mesh, serve)
    httpx.get(a.url + "/start?x=1", timeout=10)
    recorder.wait_for_server("/start")

    (a_call,) = recorder.named("GET b")
    attrs = a_call.attributes
    assert attrs["http.request.method"] == "GET" and attrs["url.full"] == "http://b/work"
    assert attrs["server.address"] == "b"  # the service the caller named
    assert attrs["http.response.status_code"] == 200 and "mesh.reason" not in attrs  # ok
    assert attrs["server.port"] == 80  # required by the conventions: the origin's
    # No split: the backend is mesh.service itself. No retry: mesh.retries is 0.
    assert attrs["mesh.service"] == "b.default" and "mesh.backend" not in attrs
    assert "mesh.retries" not in attrs
    # Its only attempt: the endpoint it reached is the connection's peer.
    assert attrs["mesh.attempts"] == 1 and "mesh.attempt" not in attrs
    assert attrs["network.peer.address"] == "127.0.0.1"
    assert isinstance(attrs["network.peer.port"], int)
    assert "mesh.outcome" not in attrs  # ok: the default
    (server,) = [s for s in recorder.spans() if s.attributes.get("url.path") == "/start"]
    assert server.attributes["url.query"] == "x=1"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["mesh.authz"] == "allow"
    assert server.attributes["mesh.deadline_ms"] <= 5000


def test_a_middle_service_without_sdk_does_not_break_the_trace(recorder, make_mesh, serve) -> None:
    """B records nothing (no-op provider) yet carries A's context to C: C's SERVER spans are
    children of A's call span, in A's trace."""
    a, seen = three_services(recorder, make_mesh, serve, b_provider=NoOpTracerProvider())

    assert httpx.get(a.url + "/start", timeout=10).status_code == 200
    recorder.wait_for_server("/start")
    for hop in HOPS:
        recorder.wait_for_server(f"/{hop}")
    spans = recorder.spans()
    assert len({s.context.trace_id for s in spans}) == 1
    assert not [s for s in spans if s.attributes.get("url.path") == "/work"]  # B records nothing
    (a_call,) = recorder.named("GET b")
    for hop in HOPS:
        (c_server,) = [s for s in spans if s.attributes.get("url.path") == f"/{hop}"]
        assert c_server.parent is not None
        assert c_server.parent.span_id == a_call.context.span_id
        assert traceparent_ids(seen[hop]["traceparent"])[1] == a_call.context.span_id


def test_sampling_zero_records_nothing_downstream(recorder, make_mesh, serve) -> None:
    """A samples none of the traces it starts; B and C (parent-based SDK default) follow the
    unsampled flag, so nothing is recorded anywhere, yet ids still propagate."""
    seen: dict[str, str] = {}
    mesh_b = make_mesh(MESH_ONLY, service="b", tracer_provider=recorder.provider)

    async def b_app(scope: Any, receive: Any, send: Any) -> None:
        seen.update(headers_of(scope))
        await drain(receive)
        await reply(send, 200, b"b")

    b = serve(MeshMiddleware(b_app, mesh=mesh_b), "b")
    sampling_zero = "---\n" + sampling("0")
    mesh_a = make_mesh(
        service_yaml("b", b.port, sampling_zero), service="a", tracer_provider=recorder.provider
    )
    assert mesh_a.snapshot.mesh.tracing_sampling == 0.0

    with mesh_a.client() as client:
        assert client.get("http://b/x").status_code == 200
    b.stop()  # B's request is over (and would have ended its span) once its server is down

    assert recorder.spans() == []
    trace_id, span_id, flags = traceparent_ids(seen["traceparent"])
    assert trace_id != 0 and span_id != 0 and flags & 1 == 0  # not sampled
