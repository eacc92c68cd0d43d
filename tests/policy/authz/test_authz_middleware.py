"""Authorization wired into MeshMiddleware (fake ASGI app, synthetic TLS scopes: no sockets),
and ``meshctl explain --caller``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from inbound.conftest import http_scope, tls_extension
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.cli import main
from policy.authz.authzdocs import ROUTES, SERVICES, TARGET_V1, mesh

RATINGS = "spiffe://shop.test/ns/default/sa/ratings"
DETAILS = "spiffe://shop.test/ns/default/sa/details"


class Recorder:
    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def call(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, _receive, send))
    return sent


def scope_for(identity: str | None, path: str, method: str = "GET") -> dict[str, Any]:
    scope = http_scope(path=path, extensions=tls_extension(identity) if identity else None)
    scope["method"] = method
    return scope


Setup = tuple[meshlib.MeshMiddleware, Recorder, CollectorRegistry]


@pytest.fixture
def setup() -> Iterator[Callable[..., Setup]]:
    meshes: list[meshlib.Mesh] = []

    def make(*docs: str, service: str = "reviews") -> Setup:
        registry = CollectorRegistry()
        m = meshlib.Mesh.from_text("\n---\n".join(docs), service=service, seed=7, registry=registry)
        meshes.append(m)
        app = Recorder()
        return meshlib.MeshMiddleware(app, mesh=m), app, registry

    yield make
    for m in meshes:
        m.close()


def decisions(registry: CollectorRegistry, verdict: str, mode: str, source: str) -> float:
    value = registry.get_sample_value(
        "mesh_authz_decisions_total",
        {"source": source, "destination": "reviews.default", "verdict": verdict, "mode": mode},
    )
    return value or 0.0


def test_denied_caller_gets_403_and_the_app_is_not_called(setup: Callable[..., Setup]) -> None:
    middleware, app, registry = setup(mesh(), SERVICES, ROUTES, TARGET_V1)
    sent = call(middleware, scope_for(DETAILS, "/reviews/1"))
    assert sent[0]["status"] == 403
    assert (b"x-mesh-reason", b"denied") in sent[0]["headers"]
    assert app.paths == []
    assert decisions(registry, "deny", "open", DETAILS) == 1
    unauthenticated = call(middleware, scope_for(None, "/reviews/1"))
    assert unauthenticated[0]["status"] == 403 and app.paths == []
    assert decisions(registry, "deny", "open", "unauthenticated") == 1


def test_allowed_caller_reaches_the_app_with_the_normalised_path(
    setup: Callable[..., Setup],
) -> None:
    middleware, app, registry = setup(mesh(), SERVICES, ROUTES, TARGET_V1)
    sent = call(middleware, scope_for(RATINGS, "/admin/..//reviews/./1"))
    assert sent[0]["status"] == 200
    assert app.paths == ["/reviews/1"]  # NET-6: the app routes on what was authorized
    assert decisions(registry, "allow", "open", RATINGS) == 1
    refused = call(middleware, scope_for(RATINGS, "/reviews\\..\\admin"))
    assert refused[0]["status"] == 403 and app.paths == ["/reviews/1"]


def test_without_authorization_paths_are_left_alone(setup: Callable[..., Setup]) -> None:
    middleware, app, _registry = setup(mesh(), SERVICES, ROUTES, TARGET_V1, service="details")
    assert call(middleware, scope_for(None, "//x/../y"))[0]["status"] == 200
    assert call(middleware, scope_for(None, "/a\\b"))[0]["status"] == 200
    assert app.paths == ["//x/../y", "/a\\b"]


def test_audit_mode_allows_logs_and_counts_would_deny(
    setup: Callable[..., Setup], caplog: pytest.LogCaptureFixture
) -> None:
    """SEC-13: audit mode allows, logs and labels the metric with the would-be verdict."""
    middleware, app, registry = setup(mesh("audit"), SERVICES, ROUTES, TARGET_V1)
    with caplog.at_level(logging.WARNING, logger="meshlib.inbound"):
        sent = call(middleware, scope_for(DETAILS, "/reviews/1"))
    assert sent[0]["status"] == 200 and app.paths == ["/reviews/1"]
    assert decisions(registry, "deny", "audit", DETAILS) == 1
    assert any("would deny" in r.getMessage() and DETAILS in r.getMessage() for r in caplog.records)
    call(middleware, scope_for(RATINGS, "/reviews/1"))
    assert decisions(registry, "allow", "audit", RATINGS) == 1


def test_enforce_mode_denies_an_unnamed_destination(setup: Callable[..., Setup]) -> None:
    middleware, app, _registry = setup(mesh("enforce"), SERVICES, service="details")
    assert call(middleware, scope_for(RATINGS, "/"))[0]["status"] == 403
    assert app.paths == []


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text("\n---\n".join([mesh(), SERVICES, ROUTES, TARGET_V1]))
    return path


def test_explain_shows_the_deciding_rule(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["explain", str(policy_file), "--service", "reviews", "--path", "/x/../reviews/1"]
    assert main([*base, "--caller", RATINGS]) == 0
    out = capsys.readouterr().out
    assert "authz:    allow  [accessControl: open]" in out
    assert "by:     TrafficTarget default/ratings-reads rule 0" in out
    assert "path:   /reviews/1" in out
    assert main([*base, "--caller", "none", "--method", "POST"]) == 0
    out = capsys.readouterr().out
    assert "authz:    deny" in out and "no rule allows it" in out
    assert main([*base, "--caller", "http://nope"]) == 2
    assert "--caller" in capsys.readouterr().err
    assert main(base) == 0
    assert "authz:" not in capsys.readouterr().out


def test_websocket_upgrade_is_authorized_like_a_get(setup: Callable[..., Setup]) -> None:
    """A DENY must not be bypassed by upgrading to a WebSocket: the upgrade is closed before
    accept (servers answer it with 403) and the app never sees it."""
    middleware, app, registry = setup(mesh(), SERVICES, ROUTES, TARGET_V1)

    def ws_call(identity: str | None, denial_responses: bool = False) -> list[dict[str, Any]]:
        scope = scope_for(identity, "/reviews/1")
        scope["type"] = "websocket"
        if denial_responses:  # the server can answer the handshake with HTTP (ASGI extension)
            scope["extensions"] = {**(scope.get("extensions") or {}), "websocket.http.response": {}}
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "websocket.connect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        asyncio.run(middleware(scope, receive, send))
        return sent

    assert ws_call(DETAILS) == [{"type": "websocket.close", "code": 1008}]
    start, body = ws_call(DETAILS, denial_responses=True)
    assert start["type"] == "websocket.http.response.start" and start["status"] == 403
    assert (b"x-mesh-reason", b"denied") in start["headers"]
    assert body == {"type": "websocket.http.response.body", "body": b"denied\n", "more_body": False}
    assert app.paths == []
    assert decisions(registry, "deny", "open", DETAILS) == 2
