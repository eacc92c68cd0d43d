"""Metrics as a user sees them: route labels bounded whatever the paths, served by the ASGI
``/metrics`` app and by the standalone exporter, with metrics switched off when asked."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from harness import run_uvicorn
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.inbound.middleware import route_template
from meshlib.observe.metrics import MeshMetrics

pytestmark = pytest.mark.timeout(60)

POLICY = """\
apiVersion: meshlib/v1
kind: Service
metadata: {name: backend}
spec:
  endpoints: [{address: "127.0.0.1:9"}]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: backend-routes}
spec:
  matches:
    - {name: items, pathRegex: "/items/.*"}
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: items-timeout}
spec: {target: {service: backend, route: items}, timeout: 10s}
"""

DISTINCT_PATHS = 10_000


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def mesh(registry: CollectorRegistry) -> Iterator[meshlib.Mesh]:
    m = meshlib.Mesh.from_text(POLICY, service="web", registry=registry, watch=False)
    yield m
    m.close()


def series(registry: CollectorRegistry, sample: str) -> list[dict[str, str]]:
    """Label sets of every series of ``sample`` in the registry."""
    return [s.labels for family in registry.collect() for s in family.samples if s.name == sample]


class _Route:
    """What FastAPI stores in ``scope["route"]``: the matched route, template in ``.path``."""

    def __init__(self, path: str) -> None:
        self.path = path


def tiny_router(scope: dict[str, Any]) -> _Route | None:
    return _Route("/items/{id}") if scope["path"].startswith("/items/") else None


async def routed_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A hand-written router following FastAPI's contract: the matched route is stored in
    the scope it was given before the endpoint runs; no match answers 404."""
    if scope["type"] != "http":
        return
    route = tiny_router(scope)
    status = 404
    if route is not None:
        scope["route"] = route
        status = 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_outbound_route_labels_stay_bounded_under_10000_distinct_paths(
    mesh: meshlib.Mesh, registry: CollectorRegistry
) -> None:
    inner = httpx.MockTransport(lambda request: httpx.Response(200))
    with httpx.Client(transport=meshlib.MeshTransport(mesh, inner=inner)) as client:
        for i in range(DISTINCT_PATHS // 2):
            assert client.get(f"http://backend/items/{i}").status_code == 200
            assert client.get(f"http://backend/other/{i}?q={i}").status_code == 200
    calls = series(registry, "mesh_requests_total")
    assert sorted(labels["route"] for labels in calls) == ["", "items"]
    assert all(labels["direction"] == "outbound" for labels in calls)
    half = DISTINCT_PATHS // 2
    for route in ("", "items"):
        labels = {
            "direction": "outbound",
            "source": "web.default",
            "destination": "backend.default",
            "route": route,
            "code": "200",
            "reason": "ok",
        }
        assert registry.get_sample_value("mesh_requests_total", labels) == half
        assert registry.get_sample_value("mesh_request_duration_seconds_count", labels) == half
    assert len(series(registry, "mesh_attempts_total")) == 1
    attempt = series(registry, "mesh_attempts_total")[0]
    assert attempt["code"] == "200" and attempt["endpoint"] == "127.0.0.1:9"


def test_inbound_route_labels_stay_bounded_under_10000_distinct_paths(
    mesh: meshlib.Mesh, registry: CollectorRegistry
) -> None:
    middleware = meshlib.MeshMiddleware(routed_app, mesh=mesh)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    async def drive() -> None:
        for i in range(DISTINCT_PATHS // 2):
            for path in (f"/items/{i}", f"/nowhere/{i}"):
                scope = {"type": "http", "method": "GET", "path": path, "headers": []}
                await middleware(scope, receive, send)

    asyncio.run(drive())
    calls = series(registry, "mesh_requests_total")
    assert sorted((c["route"], c["code"]) for c in calls) == [("", "404"), ("/items/{id}", "200")]
    labels = {
        "direction": "inbound",
        "source": "unauthenticated",
        "destination": "web.default",
        "route": "/items/{id}",
        "code": "200",
        "reason": "ok",
    }
    assert registry.get_sample_value("mesh_requests_total", labels) == DISTINCT_PATHS // 2


def test_route_template_reads_only_a_route_object_with_a_string_path() -> None:
    assert route_template({"route": _Route("/a/{b}")}) == "/a/{b}"
    assert route_template({}) == ""
    assert route_template({"route": "/raw/path"}) == ""  # not a route object
    assert route_template({"route": _Route(None)}) == ""  # type: ignore[arg-type]


def test_metrics_app_serves_prometheus_text_and_openmetrics(
    mesh: meshlib.Mesh, registry: CollectorRegistry
) -> None:
    app = meshlib.MeshMiddleware(routed_app, mesh=mesh)
    with run_uvicorn(app) as served, run_uvicorn(meshlib.metrics_app(registry)) as metrics:
        assert httpx.get(f"{served.url}/items/42").status_code == 200
        text = httpx.get(f"{metrics.url}/metrics")
        assert text.status_code == 200
        assert text.headers["content-type"].startswith("text/plain")
        assert 'route="/items/{id}"' in text.text
        assert "# TYPE mesh_request_duration_seconds histogram" in text.text
        om = httpx.get(
            f"{metrics.url}/metrics",
            headers={"accept": "application/openmetrics-text; version=1.0.0"},
        )
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.text.rstrip().endswith("# EOF")
        assert "mesh_requests_total{" in om.text


def test_standalone_exporter_serves_and_stops(registry: CollectorRegistry) -> None:
    MeshMetrics.for_registry(registry).observe_call(
        "worker.default", "backend.default", "items", "200", "ok", 0.002
    )
    server = meshlib.start_metrics_server(0, registry=registry)
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        response = httpx.get(server.url)
        assert response.status_code == 200
        assert 'source="worker.default"' in response.text
    finally:
        server.stop()
    server.stop()  # idempotent
    assert not server._thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url, timeout=2)


def test_metrics_off_registers_nothing(registry: CollectorRegistry) -> None:
    mesh = meshlib.Mesh.from_text(
        POLICY, service="web", registry=registry, metrics=False, watch=False
    )
    try:
        assert mesh.metrics is None
        inner = httpx.MockTransport(lambda request: httpx.Response(200))
        with httpx.Client(transport=meshlib.MeshTransport(mesh, inner=inner)) as client:
            client.get("http://backend/items/1")
        assert series(registry, "mesh_requests_total") == []
    finally:
        mesh.close()


def test_cost_benchmark_runs() -> None:
    """benchmarks/metrics_cost.py stays runnable (the numbers of a tiny run mean nothing)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "metrics_cost.py"
    done = subprocess.run(
        [sys.executable, str(script), "--calls", "200", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=50,
        check=True,
    )
    assert "| outbound |" in done.stdout and "| inbound |" in done.stdout
    assert "metrics calls alone (best round): outbound" in done.stdout
