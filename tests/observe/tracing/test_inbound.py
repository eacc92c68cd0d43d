"""The SERVER span of one inbound request, driven in-process (no sockets): local replies,
the verified peer (never a claimed one), the route template, errors, and WebSockets."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from inbound.conftest import tls_extension
from opentelemetry.trace import SpanKind, StatusCode

import meshlib

from .conftest import MESH_ONLY

PEER = "spiffe://cluster.local/ns/default/sa/reviews"


def scope(path: str = "/items/7", **extra: Any) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"productpage")],
        "scheme": "http",
        "server": ("127.0.0.1", 9080),
        "client": ("127.0.0.1", 50000),
        "http_version": "1.1",
        **extra,
    }


def drive(app: Any, request_scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(request_scope, receive, send))
    return sent


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    scope["route"] = SimpleNamespace(path="/items/{id}")  # as a router exposing templates does
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_route_template_names_the_span(recorder, make_mesh) -> None:
    mesh = make_mesh(MESH_ONLY, service="productpage", tracer_provider=recorder.provider)
    drive(meshlib.MeshMiddleware(ok_app, mesh=mesh), scope())
    (span,) = recorder.spans()
    assert span.kind is SpanKind.SERVER and span.name == "GET /items/{id}"
    assert span.attributes["http.route"] == "/items/{id}"
    assert span.attributes["url.path"] == "/items/7"
    assert span.status.status_code is StatusCode.UNSET


def test_verified_peer_is_recorded(recorder, make_mesh) -> None:
    mesh = make_mesh(MESH_ONLY, service="productpage", tracer_provider=recorder.provider)
    drive(meshlib.MeshMiddleware(ok_app, mesh=mesh), scope(extensions=tls_extension(PEER)))
    assert recorder.spans()[0].attributes["mesh.peer"] == PEER


def test_a_claimed_identity_is_never_recorded(recorder, make_mesh) -> None:
    """A peer without a certificate sends x-mesh-identity: neither the answered request nor
    the one the mesh refuses (rate limit) records it."""
    mesh = make_mesh(MESH_ONLY, service="productpage", tracer_provider=recorder.provider)
    middleware = meshlib.MeshMiddleware(ok_app, mesh=mesh, rate_limit=(0.001, 1))
    forged = scope()
    forged["headers"] = [*forged["headers"], (b"x-mesh-identity", PEER.encode())]
    drive(middleware, dict(forged))
    refused = drive(middleware, dict(forged))
    assert refused[0]["status"] == 429
    answered, limited = recorder.spans()
    assert "mesh.peer" not in answered.attributes and "mesh.peer" not in limited.attributes
    assert limited.attributes["mesh.reason"] == "rate_limited"
    assert limited.attributes["http.response.status_code"] == 429
    assert limited.attributes["mesh.authz"] == "allow"


def test_a_denied_request_has_a_span(recorder, make_mesh) -> None:
    enforce = MESH_ONLY.replace("spec: {}", "spec: {accessControl: enforce}")
    mesh = make_mesh(enforce, service="productpage", tracer_provider=recorder.provider)
    sent = drive(meshlib.MeshMiddleware(ok_app, mesh=mesh), scope())
    assert sent[0]["status"] == 403
    (span,) = recorder.spans()
    assert span.attributes["mesh.authz"] == "deny" and span.attributes["mesh.reason"] == "denied"
    assert span.status.status_code is StatusCode.UNSET  # a 4xx is not a server error


def test_an_exception_in_the_app_is_an_error(recorder, make_mesh) -> None:
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    mesh = make_mesh(MESH_ONLY, service="productpage", tracer_provider=recorder.provider)
    with pytest.raises(RuntimeError):
        drive(meshlib.MeshMiddleware(failing, mesh=mesh), scope())
    (span,) = recorder.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "RuntimeError"
    assert [e.name for e in span.events] == ["exception"]


def test_websocket_is_not_traced_and_still_served(recorder, make_mesh) -> None:
    accepted: list[str] = []

    async def ws_app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        accepted.append(scope["path"])
        await send({"type": "websocket.accept"})

    mesh = make_mesh(MESH_ONLY, service="productpage", tracer_provider=recorder.provider)
    ws_scope = {**scope("/ws"), "type": "websocket"}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(meshlib.MeshMiddleware(ws_app, mesh=mesh)(ws_scope, receive, send))
    assert accepted == ["/ws"] and sent == [{"type": "websocket.accept"}]
    assert recorder.spans() == []


def test_a_global_provider_set_later_is_picked_up(recorder, monkeypatch) -> None:
    """No provider given: the global one is looked up again at most every GLOBAL_RECHECK s."""
    import meshlib.observe.tracing as tracing_module
    from meshlib.config.model import MeshSettings

    now = [100.0]
    monkeypatch.setattr(tracing_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    tracing = tracing_module.Tracing(None, MeshSettings, lambda: now[0])
    assert tracing.tracer() is None  # the global provider is OpenTelemetry's no-op proxy
    monkeypatch.setattr(tracing_module.trace, "get_tracer_provider", lambda: recorder.provider)
    assert tracing.tracer() is None  # not looked at again yet
    now[0] += tracing_module.GLOBAL_RECHECK
    tracer = tracing.tracer()
    assert tracer is not None and tracing.tracer() is tracer
