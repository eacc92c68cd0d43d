"""Mesh.from_registry end to end: real registry (uvicorn, strict mTLS, SQLite), real echo
backends, real meshes discovering each other, registering, draining and applying versions."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshlib
from meshlib import NoHealthyEndpointsError
from meshlib.control.client import PolicyRejected
from tests.control.conftest import TD, RunningRegistry
from tests.control.fakes import mesh_policy
from tests.control.waiting import endpoints_of, until

pytestmark = pytest.mark.timeout(60)

POLICY = mesh_policy(TD, "reviews", "productpage", mtls="disable")


@pytest.fixture
def meshes(registry: RunningRegistry, tmp_path: Path) -> Iterator[Callable[..., meshlib.Mesh]]:
    made: list[meshlib.Mesh] = []

    def make(service: str, **kwargs: Any) -> meshlib.Mesh:
        kwargs.setdefault("cache_dir", tmp_path / f"cache-{service}")
        kwargs.setdefault("metrics", False)
        mesh = meshlib.Mesh.from_registry(
            registry.url,
            service=service,
            svid_dir=registry.issue("default", service),
            watch_wait=5.0,
            **kwargs,
        )
        made.append(mesh)
        return mesh

    yield make
    for mesh in made:
        mesh.close()


def test_a_registered_instance_is_called_and_its_drain_moves_traffic(
    registry: RunningRegistry, meshes: Callable[..., meshlib.Mesh], echo_factory: Any
) -> None:
    registry.client().apply(POLICY)
    a, b = echo_factory("a"), echo_factory("b")
    reviews = meshes("reviews")
    productpage = meshes("productpage")
    assert "reviews.default" in productpage.snapshot.services

    handle_a = reviews.register("127.0.0.1", a.port)
    handle_b = reviews.register("127.0.0.1", b.port)
    both = {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
    assert until(lambda: endpoints_of(productpage, "reviews.default") == both)
    with productpage.client() as client:
        seen = {client.get("http://reviews/x").headers["x-backend"] for _ in range(40)}
        assert seen == {"a", "b"}
        assert handle_a.close()
        assert until(
            lambda: endpoints_of(productpage, "reviews.default") == both - {f"127.0.0.1:{a.port}"}
        )
        assert {client.get("http://reviews/x").headers["x-backend"] for _ in range(20)} == {"b"}
        assert handle_b.close()
        assert until(lambda: not endpoints_of(productpage, "reviews.default"))
        with pytest.raises(NoHealthyEndpointsError):
            client.get("http://reviews/x")


def test_a_new_policy_version_is_applied_and_acked(
    registry: RunningRegistry, meshes: Callable[..., meshlib.Mesh], echo_factory: Any
) -> None:
    admin = registry.client()
    first = admin.apply(POLICY)
    reviews = meshes("reviews")
    reviews.register("127.0.0.1", echo_factory("a").port)
    assert reviews.registry_status() is not None
    second = admin.apply(
        POLICY + "---\napiVersion: meshlib/v1\nkind: Service\nmetadata: {name: ratings}\n"
    )
    assert second.version == first.version + 1
    assert until(lambda: "ratings.default" in reviews.snapshot.services)

    def acked() -> bool:
        rows = admin.instances()
        return bool(rows) and rows[0].applied_version == second.version

    assert until(acked)


def test_a_version_the_workload_refuses_is_nacked_and_the_last_good_stays(
    registry: RunningRegistry,
    meshes: Callable[..., meshlib.Mesh],
    echo_factory: Any,
    tmp_path: Path,
) -> None:
    admin = registry.client()
    admin.apply(POLICY)
    local = tmp_path / "local.yaml"
    # Valid alone and valid at the registry; together with the next version it sets one
    # field twice for one target, which only this workload sees.
    local.write_text(
        "apiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: local}\n"
        "spec: {target: {service: reviews}, timeout: 2s}\n"
    )
    reviews = meshes("reviews", policy_file=local)
    reviews.register("127.0.0.1", echo_factory("a").port)
    good = reviews.snapshot
    bad = admin.apply(
        POLICY + "---\napiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: central}\n"
        "spec: {target: {service: reviews}, timeout: 3s}\n"
    )

    def nacked() -> bool:
        rows = admin.instances()
        return bool(rows) and rows[0].rejected_version == bad.version

    assert until(nacked)
    row = admin.instances()[0]
    assert "local.yaml" in (row.error or "")
    assert reviews.snapshot is good


def test_a_restart_without_the_registry_routes_from_the_cache_file(
    registry_factory: Any, tmp_path: Path, echo_factory: Any
) -> None:
    registry = registry_factory()
    registry.client().apply(POLICY)
    backend = echo_factory("a")
    cache = tmp_path / "cache"
    svid = registry.issue("default", "productpage")
    reviews = meshlib.Mesh.from_registry(
        registry.url,
        service="reviews",
        svid_dir=registry.issue("default", "reviews"),
        cache_dir=tmp_path / "rc",
        metrics=False,
        watch_wait=5.0,
    )
    reviews.register("127.0.0.1", backend.port)
    first = meshlib.Mesh.from_registry(
        registry.url,
        service="productpage",
        svid_dir=svid,
        cache_dir=cache,
        metrics=False,
        watch_wait=5.0,
    )
    assert until(lambda: bool(endpoints_of(first, "reviews.default")))
    first.close()
    url = registry.url
    registry.stop()  # the registry is gone
    cache_file = next(cache.iterdir())
    assert cache_file.stat().st_mode & 0o777 == 0o600
    second = meshlib.Mesh.from_registry(
        url,
        service="productpage",
        svid_dir=svid,
        cache_dir=cache,
        metrics=False,
        startup_timeout=1.0,
    )
    try:
        assert "reviews.default" in second.snapshot.services
        with second.client() as client:
            assert client.get("http://reviews/x").headers["x-backend"] == "a"
    finally:
        second.close()
        reviews.close()


def test_from_env(
    registry: RunningRegistry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    registry.client().apply(POLICY)
    monkeypatch.setenv("MESHLIB_REGISTRY", registry.url)
    monkeypatch.setenv("MESHLIB_SERVICE", "reviews")
    monkeypatch.setenv("MESHLIB_SVID_DIR", str(registry.issue("default", "reviews")))
    monkeypatch.setenv("MESHLIB_CACHE_DIR", str(tmp_path))
    with meshlib.Mesh.from_env(metrics=False) as mesh:
        assert "reviews.default" in mesh.snapshot.services
    monkeypatch.delenv("MESHLIB_SVID_DIR")
    with pytest.raises(ValueError, match="MESHLIB_SVID_DIR"):
        meshlib.Mesh.from_env()
    monkeypatch.delenv("MESHLIB_SERVICE")
    with pytest.raises(ValueError, match="MESHLIB_SERVICE"):
        meshlib.Mesh.from_env()


def test_serve_registers_itself_and_drains_on_stop(
    registry: RunningRegistry, meshes: Callable[..., meshlib.Mesh]
) -> None:
    registry.client().apply(POLICY)
    reviews = meshes("reviews")
    productpage = meshes("productpage")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"x-backend", b"served")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    server = meshlib.serve(app, mesh=reviews, mode="disable")
    try:
        assert until(
            lambda: endpoints_of(productpage, "reviews.default") == {f"127.0.0.1:{server.port}"}
        )
        with productpage.client() as client:
            assert client.get("http://reviews/").headers["x-backend"] == "served"
    finally:
        server.stop()
    assert until(lambda: not endpoints_of(productpage, "reviews.default"))
    assert httpx  # the module's clients are httpx's


def test_status_and_metrics_show_the_registry_link(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    from prometheus_client import CollectorRegistry

    from meshlib.cli.observe import format_status
    from meshlib.observe.admin import status

    applied = registry.client().apply(POLICY)
    prom = CollectorRegistry()
    with meshlib.Mesh.from_registry(
        registry.url,
        service="reviews",
        svid_dir=registry.issue("default", "reviews"),
        cache_dir=tmp_path,
        registry=prom,
        watch_wait=5.0,
    ) as mesh:
        assert until(
            lambda: prom.get_sample_value("mesh_registry_up", {"registry": registry.url}) == 1.0
        )
        assert prom.get_sample_value("mesh_policy_version", {"state": "applied"}) == applied.version
        assert (
            prom.get_sample_value("mesh_registry_staleness_seconds", {"registry": registry.url})
            == 0.0
        )
        link = status(mesh)["registry"]
        assert link["url"] == registry.url and link["up"] is True
        assert link["policy_version"] == applied.version
        assert "reviews.default" in link["services"]
        text = format_status(status(mesh), {"destinations": []})
        assert f"registry:     {registry.url} up" in text
    plain = meshlib.Mesh.from_text(POLICY, service="reviews", metrics=False)
    assert status(plain)["registry"] is None


def test_a_discovered_endpoint_is_called_over_mtls(
    registry: RunningRegistry, meshes: Callable[..., meshlib.Mesh]
) -> None:
    # The server's expected SPIFFE ID comes from the service that lists the endpoint: a
    # discovered endpoint is listed by the registry, not by the snapshot (it was refused).
    registry.client().apply(POLICY.replace("mtls: disable", "mtls: strict"))
    reviews = meshes("reviews")
    productpage = meshes("productpage")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"over mTLS"})

    assert reviews.svid is not None
    server = meshlib.serve(app, mesh=reviews, svid_dir=str(registry.issue("default", "reviews")))
    try:
        assert server.url.startswith("https://")
        assert until(
            lambda: endpoints_of(productpage, "reviews.default") == {f"127.0.0.1:{server.port}"}
        )
        with productpage.client() as client:
            answer = client.get("http://reviews/")
        assert answer.text == "over mTLS"
        assert answer.extensions["mesh_decision"].attempts[0].endpoint == f"127.0.0.1:{server.port}"
    finally:
        server.stop()


def test_a_discovered_endpoint_with_another_identity_is_refused(
    registry: RunningRegistry, meshes: Callable[..., meshlib.Mesh]
) -> None:
    registry.client().apply(POLICY.replace("mtls: disable", "mtls: strict"))
    reviews = meshes("reviews")
    productpage = meshes("productpage")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"impostor"})

    # Registered as reviews (by reviews' registrar) but serving another account's SVID.
    impostor = registry.issue("default", "impostor")
    server = meshlib.serve(app, mesh=reviews, svid_dir=str(impostor))
    try:
        assert until(
            lambda: endpoints_of(productpage, "reviews.default") == {f"127.0.0.1:{server.port}"}
        )
        with productpage.client() as client, pytest.raises(httpx.ConnectError, match="impostor"):
            client.get("http://reviews/")
    finally:
        server.stop()


def test_serve_registers_with_the_meshs_labels_and_metrics_port(
    registry: RunningRegistry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    registry.client().apply(POLICY)
    monkeypatch.setenv("MESHLIB_REGISTRY", registry.url)
    monkeypatch.setenv("MESHLIB_SERVICE", "reviews")
    monkeypatch.setenv("MESHLIB_SVID_DIR", str(registry.issue("default", "reviews")))
    monkeypatch.setenv("MESHLIB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MESHLIB_LABELS", "version=v2, zone=a")
    monkeypatch.setenv("MESHLIB_METRICS_PORT", "9464")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    with meshlib.Mesh.from_env(metrics=False, watch_wait=5.0) as mesh:
        server = meshlib.serve(app, mesh=mesh, mode="disable")
        try:
            admin = registry.client()
            assert until(lambda: len(admin.instances()) == 1)
            row = admin.instances()[0]
            assert dict(row.labels) == {"version": "v2", "zone": "a"}
            assert row.metrics_port == 9464 and row.port == server.port
            groups = admin.prometheus_sd()
            assert groups[0]["targets"] == ["127.0.0.1:9464"]
            assert groups[0]["labels"]["__meta_meshlib_label_version"] == "v2"
        finally:
            server.stop()
    monkeypatch.setenv("MESHLIB_LABELS", "version")
    with pytest.raises(ValueError, match="MESHLIB_LABELS item 'version' is not key=value"):
        meshlib.Mesh.from_env()
    monkeypatch.setenv("MESHLIB_LABELS", "")
    monkeypatch.setenv("MESHLIB_METRICS_PORT", "http")
    with pytest.raises(ValueError, match="MESHLIB_METRICS_PORT"):
        meshlib.Mesh.from_env()


def test_a_first_call_right_after_start_finds_the_registered_endpoints(
    registry: RunningRegistry, meshes: Callable[..., meshlib.Mesh], echo_factory: Any
) -> None:
    """Start-up fetches the declared services' endpoints with the policy: no call made right
    after ``from_registry`` returns fails for want of a first watch answer."""
    admin = registry.client()
    admin.apply(POLICY)
    backend = echo_factory("a")
    reviews = meshes("reviews")
    reviews.register("127.0.0.1", backend.port)
    assert until(lambda: len(admin.instances()) == 1)
    productpage = meshes("productpage")
    with productpage.client() as client:
        assert client.get("http://reviews/x").headers["x-backend"] == "a"


HTTP_ROUTE = """---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-v2}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules:
  - name: v2
    matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: ratings, port: 80}]
  - backendRefs: [{name: reviews, port: 80}]
"""


def test_an_httproute_applied_at_the_registry_routes_the_workloads_calls(
    registry: RunningRegistry, meshes: Callable[..., meshlib.Mesh], echo_factory: Any
) -> None:
    admin = registry.client()
    with pytest.raises(PolicyRejected) as refused:  # the registry checks it with the loader
        admin.apply(POLICY + HTTP_ROUTE.replace("name: reviews}]", "name: nowhere}]"))
    assert "spec.parentRefs[0].name: service 'nowhere' is not declared" in str(refused.value)
    admin.apply(mesh_policy(TD, "reviews", "productpage", "ratings", mtls="disable") + HTTP_ROUTE)
    meshes("reviews").register("127.0.0.1", echo_factory("reviews").port)
    meshes("ratings").register("127.0.0.1", echo_factory("ratings").port)
    productpage = meshes("productpage")
    assert until(lambda: bool(endpoints_of(productpage, "ratings.default")))
    assert until(lambda: bool(endpoints_of(productpage, "reviews.default")))
    assert [r.name for r in productpage.snapshot.http_routes] == ["reviews-v2"]
    with productpage.client() as client:
        v2 = client.get("http://reviews/v2/x")
        assert v2.headers["x-backend"] == "ratings"
        assert v2.extensions["mesh_decision"].route == "v2"
        assert client.get("http://reviews/v2example").headers["x-backend"] == "reviews"
