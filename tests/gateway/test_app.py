"""The ingress gateway's ASGI app (meshlib.gateway.app) under a real uvicorn on 127.0.0.1, in
front of real echo backends reached through a real mesh client: listener and route by host and
path, 404 / redirect / 500, header filters and rewrites, the forwarding headers, forged mesh
headers stripped before the backend, and a 10 MB upload streamed through without being held
(issue 14)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.config.gatewaykind import Listener, ListenerProtocol, load_gateway_config
from meshlib.gateway.app import (
    GatewayApp,
    attached_routes,
    edge_stack,
    listener_for,
    split_host,
)
from meshlib.gateway.edge import EdgeLimits
from tests.gateway.fixtures import EDGE_AUTH, GATEWAY_HEAD, gateway_mesh, gateway_policy
from tests.harness.echo import EchoBackend
from tests.harness.server import ServerHandle, run_uvicorn
from tests.inbound.origin.conftest import rsa_key, token

pytestmark = pytest.mark.timeout(30)

GATEWAY = (
    GATEWAY_HEAD
    + """\
  - {name: any, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
  - {name: shop, hostname: shop.example.com, port: 8080, protocol: HTTP}
  - {name: wild, hostname: "*.example.com", port: 8080, protocol: HTTP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: edge}
spec:
  parentRefs: [{name: edge, sectionName: shop}]
  hostnames: [shop.example.com]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-route, value: api}]
        remove: [x-drop-me]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add: [{name: x-served-by, value: gateway}]
    backendRefs: [{name: api, namespace: shop, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /v1}}]
    filters:
    - type: URLRewrite
      urlRewrite:
        hostname: internal.shop
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}
    backendRefs: [{name: api, namespace: shop, port: 8080}]
  - matches: [{path: {type: Exact, value: /sink}}, {path: {type: Exact, value: /drip}}]
    backendRefs: [{name: sink, namespace: shop, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /slow}}]
    timeouts: {request: 300ms}
    backendRefs: [{name: web, namespace: shop, port: 8080}]
  - matches: [{path: {type: Exact, value: /empty}}]
    backendRefs: [{name: gateway, namespace: edge, port: 8080}]
  - matches: [{path: {type: Exact, value: /closed}}]
    backendRefs: [{name: closed, namespace: shop, port: 8080}]
  - matches: [{path: {type: Exact, value: /broken}}]
    backendRefs: [{name: ghost, namespace: shop, port: 80}]
  - backendRefs: [{name: web, namespace: shop, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: wild, namespace: edge}
spec:
  parentRefs: [{name: edge, sectionName: wild}]
  rules:
  - backendRefs: [{name: api, namespace: shop, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: moved, namespace: edge}
spec:
  parentRefs: [{name: edge, sectionName: any}]
  hostnames: [old.example.org]
  rules:
  - filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: shop.example.com, statusCode: 301}
"""
)


def policy(web: int, api: int, sink: int = 0, closed: int = 0) -> str:
    ports = {"shop/web": web, "shop/api": api, "shop/sink": sink or api}
    return gateway_policy({**ports, "shop/closed": closed or api})


class HashingSink:
    """An ASGI app that reads a request body chunk by chunk and answers its length and
    SHA-256, never holding it: the memory measured around an upload is then the gateway's.
    On ``/drip`` it answers a first chunk, then waits for :attr:`release` before the rest."""

    def __init__(self) -> None:
        self.release = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        digest = hashlib.sha256()
        length = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            digest.update(message.get("body", b""))
            length += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        start = {"type": "http.response.start", "status": 200, "headers": []}
        if scope["path"] == "/drip":
            await send(start)
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            await asyncio.to_thread(self.release.wait, 10.0)
            await send({"type": "http.response.body", "body": b"rest"})
            return
        body = json.dumps({"body_len": length, "body_sha256": digest.hexdigest()}).encode()
        await send({**start, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


@dataclass
class Edge:
    web: EchoBackend
    api: EchoBackend
    server: ServerHandle
    mesh: meshlib.Mesh
    sink_url: str
    sink: HashingSink

    def get(self, host: str, path: str, **kwargs: object) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}) or {})  # type: ignore[call-overload]
        headers["host"] = host
        with httpx.Client(timeout=10.0) as client:
            return client.get(self.server.url + path, headers=headers, **kwargs)  # type: ignore[arg-type]


@contextlib.contextmanager
def running_edge(
    extra_policy: str = "", server_options: dict[str, Any] | None = None, **options: Any
) -> Iterator[Edge]:
    """The gateway of GATEWAY behind its MeshMiddleware (``edge_stack``), the policy of
    :func:`policy` plus ``extra_policy``, in front of the echo backends and the sink;
    ``options`` go to GatewayApp, ``server_options`` to the gateway's uvicorn."""
    web, api = EchoBackend("web"), EchoBackend("api")
    web.serve()
    api.serve()
    sink_app = HashingSink()
    sink = run_uvicorn(sink_app, name="sink")
    mesh = gateway_mesh(policy(web.port, api.port, sink.port, _closed_port()) + extra_policy)
    config = load_gateway_config([("gateway.yaml", GATEWAY)])
    gateway = config.gateways[0]
    transport = mesh.async_transport()
    app = GatewayApp(gateway, config, mesh=mesh, transport=transport, **options)
    server = run_uvicorn(
        edge_stack(app.on_port(8080), mesh),
        proxy_headers=False,
        name="gateway",
        **(server_options or {}),
    )
    try:
        yield Edge(web, api, server, mesh, sink.url, sink_app)
    finally:
        server.stop()
        web.stop()
        api.stop()
        sink_app.release.set()
        sink.stop()
        mesh.close()


@pytest.fixture
def edge() -> Iterator[Edge]:
    with running_edge() as running:
        yield running


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_split_host_and_listener_choice() -> None:
    assert split_host("Shop.Example.com:8080") == ("shop.example.com", 8080)
    assert split_host("shop.example.com.") == ("shop.example.com", None)
    assert split_host("[::1]:80") == ("[::1]", 80)
    assert split_host(None) == ("", None)
    listeners = (
        Listener("any", 80, ListenerProtocol.HTTP),
        Listener("wild", 80, ListenerProtocol.HTTP, "*.example.com"),
        Listener("deep", 80, ListenerProtocol.HTTP, "*.api.example.com"),
        Listener("shop", 80, ListenerProtocol.HTTP, "shop.example.com"),
    )
    assert listener_for(listeners, "shop.example.com").name == "shop"  # type: ignore[union-attr]
    assert listener_for(listeners, "x.api.example.com").name == "deep"  # type: ignore[union-attr]
    assert listener_for(listeners, "a.example.com").name == "wild"  # type: ignore[union-attr]
    assert listener_for(listeners, "example.com").name == "any"  # type: ignore[union-attr]
    assert listener_for(listeners[1:], "example.com") is None


def test_routes_attach_to_the_listeners_their_parent_names() -> None:
    config = load_gateway_config([("gateway.yaml", GATEWAY)])
    attached = attached_routes(config.gateways[0], config)
    assert {k: [r.name for r in v] for k, v in attached.items()} == {
        "any": ["moved"],
        "shop": ["shop"],
        "wild": ["wild"],
    }


def test_host_and_path_pick_listener_route_and_backend(edge: Edge) -> None:
    response = edge.get("shop.example.com", "/")
    assert response.status_code == 200, response.text
    assert response.json()["backend"] == "web"
    response = edge.get("shop.example.com:8080", "/api/items?x=1")
    assert response.json()["backend"] == "api"
    assert response.json()["path"] == "/api/items"
    assert response.json()["query"] == "x=1"
    # another name under the wildcard listener: its own route
    assert edge.get("cart.example.com", "/api").json()["backend"] == "api"
    assert edge.get("cart.example.com", "/").json()["backend"] == "api"


def test_no_route_is_404_and_an_invalid_backend_500(edge: Edge) -> None:
    response = edge.get("nowhere.example.net", "/")  # the hostname-less listener: no route
    assert response.status_code == 404
    assert response.headers["x-mesh-reason"] == "no_route"
    response = edge.get("shop.example.com", "/broken")
    assert response.status_code == 500
    assert response.headers["x-mesh-reason"] == "invalid_backend"
    assert "HTTPRoute edge/shop rule[6]" in response.text
    assert edge.web.requests == 0 and edge.api.requests == 0


def test_redirect_answers_location_without_calling_a_backend(edge: Edge) -> None:
    response = edge.get("old.example.org", "/a/b?q=1")
    assert response.status_code == 301
    assert response.headers["location"] == "https://shop.example.com/a/b?q=1"
    assert edge.web.requests == 0 and edge.api.requests == 0


def test_header_filters_and_url_rewrite(edge: Edge) -> None:
    response = edge.get(
        "shop.example.com", "/api/x", headers={"x-route": "client", "x-drop-me": "1", "x-keep": "k"}
    )
    seen = response.json()["headers"]
    assert seen["x-route"] == "api" and "x-drop-me" not in seen and seen["x-keep"] == "k"
    assert seen["host"] == "shop.example.com"  # the client's Host reaches the backend
    assert response.headers["x-served-by"] == "gateway"
    response = edge.get("shop.example.com", "/v1/items")
    assert response.json()["path"] == "/v2/items"
    assert response.json()["headers"]["host"] == "internal.shop"


def test_forwarding_headers_set_and_forged_mesh_headers_stripped(edge: Edge) -> None:
    forged = {
        "x-mesh-identity": "spiffe://shop.test/ns/shop/sa/admin",
        "x-mesh-timeout-ms": "1",
        "x-forwarded-client-cert": "By=spiffe://x;URI=spiffe://y",
        "x-forwarded-proto": "https",
        "x-forwarded-for": "10.9.9.9",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    response = edge.get("shop.example.com", "/", headers=forged)
    assert response.status_code == 200
    seen = response.json()["headers"]
    assert "x-mesh-identity" not in seen
    assert "x-forwarded-client-cert" not in seen
    assert seen.get("x-mesh-timeout-ms") != "1"  # the deadline is the gateway's, not theirs
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
    assert seen["x-forwarded-host"] == "shop.example.com"
    assert seen["forwarded"] == "for=127.0.0.1;host=shop.example.com;proto=http"
    assert seen.get("traceparent", "").split("-")[1:2] != ["0af7651916cd43dd8448eb211c80319c"]


def test_edge_limits_are_answered_by_the_gateway(edge: Edge) -> None:
    response = edge.get("shop.example.com", "/" + "a" * 9000)
    assert response.status_code == 414
    assert response.headers["x-mesh-reason"] == "bad_request"
    response = edge.get("shop.example.com", "/%2e%2e/%2e%2e/etc")
    assert response.status_code == 400
    assert edge.web.requests == 0


def test_mesh_failures_answer_their_status_and_reason(edge: Edge) -> None:
    response = edge.get("shop.example.com", "/empty")  # a Service without endpoints
    assert response.status_code == 503
    assert response.headers["x-mesh-reason"] == "no_healthy_endpoints"
    response = edge.get("shop.example.com", "/closed")  # nothing listens there
    assert response.status_code == 502  # a transport failure: bad gateway
    assert response.headers["x-mesh-reason"] == "connect_failure"


def test_the_rule_timeout_caps_the_call(edge: Edge) -> None:
    edge.web.set_delay(5.0, path="/slow")
    response = edge.get("shop.example.com", "/slow")
    assert response.status_code == 504
    assert response.headers["x-mesh-reason"] == "timeout"


def test_a_client_that_goes_away_cancels_the_call(edge: Edge) -> None:
    edge.web.set_behavior("hang", path="/hang")
    with pytest.raises(httpx.ReadTimeout):
        edge.get("shop.example.com", "/hang", timeout=0.5)
    assert edge.web.wait_for_disconnects(1, timeout=5.0)


def test_jwt_and_authorization_of_the_gateway_service_apply_at_the_edge() -> None:
    with running_edge(EDGE_AUTH) as edge:
        response = edge.get("shop.example.com", "/")  # no token: no principal
        assert response.status_code == 403
        assert response.headers["x-mesh-reason"] == "denied"
        forged = token(rsa_key("other"))
        response = edge.get("shop.example.com", "/", headers={"authorization": f"Bearer {forged}"})
        assert response.status_code == 401
        assert edge.web.requests == 0
        bob = token(sub="bob")
        response = edge.get("shop.example.com", "/", headers={"authorization": f"Bearer {bob}"})
        assert response.status_code == 403
        alice = token()
        response = edge.get("shop.example.com", "/", headers={"authorization": f"Bearer {alice}"})
        assert response.status_code == 200, response.text
        assert response.json()["backend"] == "web"


def test_the_response_is_relayed_as_it_arrives(edge: Edge) -> None:
    # The backend holds the rest of its answer until the client has read the first chunk
    # through the gateway: a gateway that buffered the response would never deliver it.
    with (
        httpx.Client(timeout=10.0) as client,
        client.stream(
            "GET", edge.server.url + "/drip", headers={"host": "shop.example.com"}
        ) as response,
    ):
        chunks = response.iter_raw()
        assert next(chunks) == b"first"
        edge.sink.release.set()
        assert b"".join(chunks) == b"rest"


def test_an_upgrade_is_refused_501_not_forwarded_as_a_plain_request() -> None:
    # A server without a WebSocket library hands the handshake over as a plain request
    # (the pass-through itself: tests/gateway/test_websocket.py).
    with running_edge(server_options={"ws": "none"}) as edge:
        response = edge.get(
            "shop.example.com",
            "/chat",
            headers={
                "connection": "Upgrade",
                "upgrade": "websocket",
                "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
                "sec-websocket-version": "13",
            },
        )
        assert response.status_code == 501
        assert "WebSockets" in response.text
        assert edge.web.requests == 0


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    block = bytes(range(256)) * (size // 256)
    sent = 0
    while sent < total:
        piece = block[: min(size, total - sent)]
        sent += len(piece)
        yield piece


def _upload(url: str, total: int) -> httpx.Response:
    with httpx.Client(timeout=30.0) as client:
        return client.post(
            url,
            content=_chunks(total),
            headers={"host": "shop.example.com", "content-length": str(total)},
        )


def test_a_10_mb_upload_streams_through_without_being_held(edge: Edge) -> None:
    total = 10 * 1024 * 1024
    digest = hashlib.sha256()
    for piece in _chunks(total):
        digest.update(piece)
    # Intact, to the echo backend (which keeps what it receives).
    echoed = _upload(edge.server.url + "/upload", total).json()
    assert (echoed["body_len"], echoed["body_sha256"]) == (total, digest.hexdigest())
    # Not held: the same upload to a backend that hashes as it reads, measured against the
    # same upload sent to that backend directly. The client, the gateway and the sink share
    # this process; tracemalloc counts every Python allocation of all their threads.
    through = _peak_growth(lambda: _upload(edge.server.url + "/sink", total), digest, total)
    direct = _peak_growth(lambda: _upload(edge.sink_url, total), digest, total)
    print(
        f"10 MiB upload, peak traced memory growth: {through / 1024:.0f} KiB through the "
        f"gateway, {direct / 1024:.0f} KiB client to backend directly"
    )
    # A buffered body would add at least 10 MiB. The bound, 3 MiB over the direct upload,
    # leaves room for scheduling noise and is still more than 3x below one copy.
    assert through - direct < 3 * 1024 * 1024, f"{through} vs {direct} bytes"


def _peak_growth(upload: Callable[[], httpx.Response], digest: Any, total: int) -> int:
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        response = upload()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 200, response.text
    assert response.json() == {"body_len": total, "body_sha256": digest.hexdigest()}
    return peak - base


@pytest.mark.timeout(30)
def test_chunked_body_over_the_limit_is_refused_413() -> None:
    web = EchoBackend("web")
    web.serve()
    mesh = gateway_mesh(policy(web.port, web.port))

    config = load_gateway_config([("gateway.yaml", GATEWAY)])
    app = GatewayApp(
        config.gateways[0],
        config,
        mesh=mesh,
        transport=mesh.async_transport(),
        limits=EdgeLimits(max_body_bytes=256 * 1024),
    )
    server = run_uvicorn(app.on_port(8080), proxy_headers=False, name="gateway")
    try:
        with httpx.Client(timeout=10.0) as client:
            response = client.post(
                server.url + "/upload",
                content=_chunks(1024 * 1024),  # no length: sent chunked
                headers={"host": "shop.example.com"},
            )
        assert response.status_code == 413
        assert response.headers["x-mesh-reason"] == "bad_request"
    finally:
        server.stop()
        web.stop()
        mesh.close()


def test_one_users_cookie_never_reaches_another_users_request(edge: Edge) -> None:
    # A client object in the gateway would keep a cookie jar shared by every user behind it.
    edge.web.set_status(200, path="/login", headers={"set-cookie": "session=user-A-secret"})
    login = edge.get("shop.example.com", "/login")
    assert login.headers["set-cookie"] == "session=user-A-secret"  # relayed to its user
    seen = edge.get("shop.example.com", "/profile").json()["headers"]  # another user
    assert "cookie" not in seen
