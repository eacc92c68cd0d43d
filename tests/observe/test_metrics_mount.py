"""The metrics app where people put it (issue 10 item 13), served by real uvicorn: in front of
an application (``/metrics`` and ``/metrics/`` both answered), mounted with Starlette's
``Mount`` behind ``MeshMiddleware`` as FastAPI's ``add_middleware`` + ``app.mount`` do (the
router redirects ``/metrics`` to ``/metrics/``, which ``meshctl graph`` follows), and in every
case scrapes of the metrics and admin apps never counted as traffic in metrics, top or graph."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from harness import ServerHandle, run_uvicorn
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import meshlib
from meshlib import cli
from meshlib.observe import graph

pytestmark = pytest.mark.timeout(30)

POLICY = "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: nobody}\nspec: {}\n"


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


@pytest.fixture
def serve() -> Iterator[Callable[[Any], ServerHandle]]:
    started: list[ServerHandle] = []

    def start(app: Any) -> ServerHandle:
        server = run_uvicorn(app, name="metrics-mount")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _inbound(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """Inbound ``mesh_requests_total`` per (route, code)."""
    return {
        (s.labels["route"], s.labels["code"]): s.value
        for family in registry.collect()
        if family.name == "mesh_requests"
        for s in family.samples
        if s.labels.get("direction") == "inbound" and s.name == "mesh_requests_total"
    }


def _graph_edges(url: str, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    import json

    assert cli.main(["graph", url, "-o", "json"]) == 0, capsys.readouterr().err
    edges: list[dict[str, Any]] = json.loads(capsys.readouterr().out)["edges"]
    return edges


def test_in_front_of_the_app_it_answers_both_paths_and_scrapes_never_reach_the_mesh(
    make_mesh, serve, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = CollectorRegistry()
    mesh = make_mesh(POLICY, service="web", registry=registry)
    admin = mesh.admin_app()
    try:
        api = Starlette(
            routes=[Route("/hello", hello)],
            middleware=[Middleware(meshlib.MeshMiddleware, mesh=mesh)],
        )
        server = serve(meshlib.metrics_app(registry, app=api))
        for _ in range(3):
            assert httpx.get(server.url + "/hello", timeout=5).text == "hello"
        for path in ("/metrics", "/metrics/"):
            response = httpx.get(server.url + path, timeout=5)
            assert response.status_code == 200, path  # no redirect either way
            assert "mesh_requests_total" in response.text
        assert httpx.get(server.url + "/nope", timeout=5).status_code == 404  # the app's own

        # host:port without a scheme, the base URL: /metrics implied
        edges = _graph_edges(f"127.0.0.1:{server.port}", capsys)
        assert [(e["source"], e["destination"], e["requests"]) for e in edges] == [
            ("unauthenticated", "web.default", 4.0)
        ]
        assert _inbound(registry) == {("/hello", "200"): 3.0, ("", "404"): 1.0}
        top = admin.top.stats()
        assert sum(s.requests for s in top) == 4
    finally:
        admin.close()


def test_mounted_behind_the_middleware_scrapes_of_metrics_and_admin_are_not_traffic(
    make_mesh, serve, capsys: pytest.CaptureFixture[str]
) -> None:
    """FastAPI's ``add_middleware`` wraps its mounts: the apps mark the scope they answer."""
    registry = CollectorRegistry()
    mesh = make_mesh(POLICY, service="web", registry=registry)
    admin = mesh.admin_app()
    try:
        app = Starlette(
            routes=[
                Route("/hello", hello),
                Mount("/metrics", meshlib.metrics_app(registry)),
                Mount("/admin", admin),
            ],
            middleware=[Middleware(meshlib.MeshMiddleware, mesh=mesh)],
        )
        server = serve(app)
        for _ in range(2):
            assert httpx.get(server.url + "/hello", timeout=5).status_code == 200
            assert httpx.get(server.url + "/metrics/", timeout=5).status_code == 200
            assert httpx.get(server.url + "/admin/top", timeout=5).status_code == 200
        assert cli.main(["top", f"{server.url}/admin", "-o", "json"]) == 0
        capsys.readouterr()
        edges = _graph_edges(f"{server.url}/metrics/", capsys)
        assert [(e["source"], e["destination"], e["requests"]) for e in edges] == [
            ("unauthenticated", "web.default", 2.0)
        ]
        assert _inbound(registry) == {("/hello", "200"): 2.0}
        assert [(s.direction, s.requests) for s in admin.top.stats()] == [("inbound", 2)]
    finally:
        admin.close()


def test_meshctl_graph_follows_the_routers_redirect_to_the_mount(
    serve, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bare ``Mount("/metrics", ...)``: Starlette's router answers ``/metrics`` with a 307
    to ``/metrics/`` (redirect_slashes); meshctl follows it, from a base or metrics URL."""
    registry = CollectorRegistry()
    meshlib.Mesh.from_text(POLICY, service="web", registry=registry, watch=False).close()
    server = serve(Starlette(routes=[Mount("/metrics", meshlib.metrics_app(registry))]))
    redirect = httpx.get(server.url + "/metrics", timeout=5)
    assert redirect.status_code == 307 and redirect.headers["location"].endswith("/metrics/")
    for url in (server.url, server.url + "/metrics", f"127.0.0.1:{server.port}/metrics"):
        assert cli.main(["graph", url]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out.startswith("service graph: 0 services")
    (scrape,) = graph.scrape([server.url])
    assert scrape == {}


def test_a_starlette_route_serves_it_at_the_exact_path(serve) -> None:
    """``Route("/metrics", metrics_app())``: an ASGI app (a class instance), not an endpoint
    function called with a request."""
    registry = CollectorRegistry()
    meshlib.Mesh.from_text(POLICY, service="web", registry=registry, watch=False).close()
    server = serve(Starlette(routes=[Route("/metrics", meshlib.metrics_app(registry))]))
    response = httpx.get(server.url + "/metrics", timeout=5)
    assert response.status_code == 200 and "mesh_requests" in response.text
