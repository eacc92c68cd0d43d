"""A plugged-in mesh keeps the client's own settings: timeouts, pool limits, TLS, headers.

httpx ignores ``verify``/``limits``/``http2`` on a client given a custom transport; the mesh
carries them to its inner transport, so they must still take effect.
"""

from __future__ import annotations

import ssl

import httpx
import pytest

import meshlib
from e2e.conftest import service_yaml

pytestmark = pytest.mark.timeout(30)


def test_client_timeout_still_applies(caller, make_mesh, echo_factory) -> None:
    slow = echo_factory("slow")
    slow.set_delay(2.0)
    mesh = make_mesh(service_yaml("reviews", [slow.port]))
    c = caller.bind(mesh, timeout=httpx.Timeout(0.2))
    error = c.outcome("GET", "http://reviews/")
    assert isinstance(error, httpx.TimeoutException)
    assert isinstance(error, meshlib.MeshTimeout)
    assert error.decision is not None and len(error.decision.attempts) == 1


def test_client_pool_limits_still_apply(caller, make_mesh, echo_factory) -> None:
    backend = echo_factory("b")
    backend.set_delay(0.1)
    mesh = make_mesh(service_yaml("reviews", [backend.port]))
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    c = caller.bind(mesh, limits=limits)
    results = c.many(4, "GET", "http://reviews/", concurrency=4)
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results)
    assert backend.max_in_flight == 1  # one connection: requests were serialised


def test_client_headers_and_base_url_reach_the_backend(caller, make_mesh, echo_factory) -> None:
    backend = echo_factory("b")
    mesh = make_mesh(service_yaml("reviews", [backend.port]))
    c = caller.bind(mesh, base_url="http://reviews", headers={"x-team": "shop"})
    r = c.get("/items")
    assert r.status_code == 200
    assert r.json()["path"] == "/items"
    assert r.json()["headers"]["x-team"] == "shop"


def test_verify_setting_reaches_inner_transport(make_mesh, echo_factory) -> None:
    backend = echo_factory("b")
    mesh = make_mesh(service_yaml("reviews", [backend.port]))
    with mesh.client(verify=False) as client:
        transport = client._transport
        assert isinstance(transport, meshlib.MeshTransport)
        context = transport._inner._pool._ssl_context  # type: ignore[attr-defined]
        assert context.verify_mode == ssl.CERT_NONE
        # The endpoint's own pool (built on the first call) shares that one context.
        assert client.get("http://reviews/").status_code == 200
        [(_, endpoint_pool)] = transport._pools.items()
        assert endpoint_pool._pool._ssl_context is context  # type: ignore[attr-defined]
    with mesh.client() as client:
        context = client._transport._inner._pool._ssl_context  # type: ignore[attr-defined]
        assert context.verify_mode == ssl.CERT_REQUIRED
