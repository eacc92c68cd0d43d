"""MeshMiddleware under a real uvicorn: what crosses the wire (SEC-9, deadlines, limits)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from harness import EchoBackend, run_uvicorn

import meshlib
from inbound.conftest import SERVICE_ONLY
from meshlib.context import inbound_deadline
from meshlib.outbound.call import DEADLINE_HEADER

pytestmark = pytest.mark.timeout(30)


async def headers_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers with the request headers it was given, one ``name: value`` per line."""
    body = "".join(f"{k.decode()}: {v.decode()}\n" for k, v in scope["headers"]).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_forged_identity_and_control_headers_never_reach_the_app(
    make_mesh: Callable[..., meshlib.Mesh],
) -> None:
    mesh = make_mesh()
    forged = {
        "x-forwarded-client-cert": "By=spiffe://shop.test/ns/default/sa/admin",
        "x-mesh-identity": "spiffe://shop.test/ns/default/sa/admin",
        "x-spiffe-id": "spiffe://shop.test/ns/default/sa/admin",
        "x-mesh-timeout-ms": "99999",
        "x-meshlib-principal": "admin",
        "x-envoy-fault-abort-request": "503",
        "X_Forwarded_Client_Cert": "By=spiffe://x",
        "x-custom": "kept",
    }
    with run_uvicorn(meshlib.MeshMiddleware(headers_app, mesh=mesh)) as server:
        seen = httpx.get(server.url + "/", headers=forged).text.lower()
    assert "x-custom: kept" in seen
    for name in forged.keys() - {"x-custom"}:
        assert name.lower() not in seen, name
    assert "admin" not in seen and "99999" not in seen


def _deadline_mesh(make_mesh: Callable[..., meshlib.Mesh], backend: EchoBackend) -> meshlib.Mesh:
    return make_mesh(
        SERVICE_ONLY + "---\napiVersion: meshlib/v1\nkind: Service\nmetadata: {name: reviews}\n"
        f"spec: {{endpoints: [{{address: '127.0.0.1:{backend.port}'}}]}}\n"
        "---\napiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: p}\n"
        "spec: {target: {service: reviews}, timeout: 10s}\n"
    )


def test_outbound_calls_get_only_the_time_left(
    make_mesh: Callable[..., meshlib.Mesh], echo_factory: Callable[..., EchoBackend]
) -> None:
    backend = echo_factory("reviews")
    mesh = _deadline_mesh(make_mesh, backend)

    def sync_call() -> str:
        with mesh.client() as client:  # runs in a worker thread: the context came along
            return str(client.get("http://reviews/sync").json()["headers"][DEADLINE_HEADER])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async with mesh.async_client() as client:
            response = await client.get("http://reviews/async")
        in_thread = await asyncio.to_thread(sync_call)
        body = f"{response.json()['headers'][DEADLINE_HEADER]} {in_thread}".encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    middleware = meshlib.MeshMiddleware(app, mesh=mesh, default_timeout=0.8)
    with run_uvicorn(middleware) as server:
        # a forged deadline from a plain-HTTP caller is not adopted (nor can it lengthen one)
        reply = httpx.get(server.url + "/", headers={DEADLINE_HEADER: "60000"})
    assert reply.status_code == 200
    from_task, from_thread = (int(v) for v in reply.text.split())
    assert 0 < from_thread <= from_task <= 800  # the policy's 10 s never applied
    assert inbound_deadline.get() is None


def test_rate_limits_answer_429_before_the_app(make_mesh: Callable[..., meshlib.Mesh]) -> None:
    mesh = make_mesh()
    calls: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await headers_app(scope, receive, send)

    middleware = meshlib.MeshMiddleware(
        app, mesh=mesh, rate_limit=(0.01, 3), per_identity_rate_limit=(0.01, 2)
    )
    with run_uvicorn(middleware) as server, httpx.Client(base_url=server.url) as client:
        responses = [client.get(f"/{i}") for i in range(4)]
    assert [r.status_code for r in responses] == [200, 200, 429, 429]
    assert calls == ["/0", "/1"]  # plain-HTTP callers share the "unauthenticated" bucket
    refused = responses[2]
    assert refused.headers[meshlib.REASON_HEADER] == "rate_limited"
    assert refused.headers["retry-after"] == "100"
    assert refused.text == "rate_limited\n"


def test_streaming_responses_stream_through(make_mesh: Callable[..., meshlib.Mesh]) -> None:
    mesh = make_mesh()
    first_chunk_read = threading.Event()
    read_in_time: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
        # the rest is sent only once the client has read the first chunk: a buffering
        # middleware would deadlock here (and the test time out)
        read_in_time.append(await asyncio.to_thread(first_chunk_read.wait, 10))
        for i in range(3):
            await send({"type": "http.response.body", "body": b"%d\n" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    middleware = meshlib.MeshMiddleware(app, mesh=mesh, default_timeout=5)
    with run_uvicorn(middleware) as server, httpx.stream("GET", server.url + "/") as response:
        lines = response.iter_lines()
        assert next(lines) == "first"
        first_chunk_read.set()
        rest = list(lines)
    assert rest == ["0", "1", "2"]
    assert read_in_time == [True]


def test_lifespan_reaches_the_app(make_mesh: Callable[..., meshlib.Mesh]) -> None:
    mesh = make_mesh()
    events: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                events.append(message["type"])
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await headers_app(scope, receive, send)

    server = run_uvicorn(meshlib.MeshMiddleware(app, mesh=mesh), lifespan="on")
    with server:
        assert httpx.get(server.url + "/").status_code == 200
    assert events[0] == "lifespan.startup"


def _policy(rule: str) -> str:
    return (
        SERVICE_ONLY + "---\napiVersion: meshlib/v1\nkind: Service\nmetadata: {name: productpage}\n"
        "spec: {}\n---\napiVersion: meshlib/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: p}}\nspec: {{target: {{service: productpage}}, {rule}}}\n"
    )


ALLOW_GET = _policy("rules: [{to: [{methods: [GET]}]}]")
DENY_DELETE = _policy("action: DENY, rules: [{to: [{methods: [DELETE]}]}]")


def _raw_request(port: int, method: str) -> tuple[int, str]:
    """(status, x-mesh-reason) for ``method /`` sent as is (httpx would upper-case it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        sock.sendall(f"{method} / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head = received.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), fields.get(meshlib.REASON_HEADER, "")


@pytest.mark.parametrize(
    ("policy", "method", "status", "reason"),
    [
        (ALLOW_GET, "GET", 200, ""),
        (ALLOW_GET, "get", 400, "bad_request"),  # was admitted by the GET rule, as "get"
        (ALLOW_GET, "Get", 400, "bad_request"),
        (ALLOW_GET, "POST", 403, "denied"),
        (DENY_DELETE, "DELETE", 403, "denied"),
        (DENY_DELETE, "Delete", 400, "bad_request"),
        (DENY_DELETE, "GET", 200, ""),
        (DENY_DELETE, "PURGE", 200, ""),  # extension methods pass as sent
        (DENY_DELETE, "purge", 200, ""),
    ],
)
def test_a_method_case_variant_is_refused_before_authorization(
    make_mesh: Callable[..., meshlib.Mesh], policy: str, method: str, status: int, reason: str
) -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["method"])
        await headers_app(scope, receive, send)

    with run_uvicorn(meshlib.MeshMiddleware(app, mesh=make_mesh(policy))) as server:
        assert _raw_request(server.port, method) == (status, reason)
    assert seen == ([method] if status == 200 else [])
