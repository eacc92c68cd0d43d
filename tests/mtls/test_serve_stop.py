"""Restarting a ``meshlib.serve`` workload under live meshed callers, in every mTLS mode: stop
closes idle keep-alive connections at once (over TLS too, where the caller never answers the
server's close_notify on an idle pooled connection), lets an in-flight request finish, and the
callers' next calls reach the new instance without failing."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.inbound.serving import Server, serve

from .conftest import PKI, mesh_text

pytestmark = pytest.mark.timeout(40)

#: Longer than any wait below: a connection closed before it ends was closed by the stop
#: itself, not by the grace running out.
GRACE = 15.0


class SlowApp:
    """``/slow`` waits for :meth:`release` (called from the test) before answering, ``/stream``
    sends its headers and then waits; anything else answers at once. The body names the
    instance, so a caller can tell which one answered."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = threading.Event()  # a /slow or /stream request is waiting
        self._released: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def release(self) -> None:
        """Let the waiting request finish (from the test's thread)."""
        assert self._loop is not None and self._released is not None
        self._loop.call_soon_threadsafe(self._released.set)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = self.name.encode()
        headers = [(b"content-length", str(len(body)).encode())]
        start = {"type": "http.response.start", "status": 200, "headers": headers}
        if scope["path"] == "/stream":
            await send(start)
        if scope["path"] in ("/slow", "/stream"):
            self._loop, self._released = asyncio.get_running_loop(), asyncio.Event()
            self.started.set()
            await self._released.wait()
        if scope["path"] != "/stream":
            await send(start)
        await send({"type": "http.response.body", "body": body})


def poll(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Re-check a server-side count that has no event to wait on (bounded, 5 ms steps)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def workload(pki: PKI) -> Iterator[Callable[..., Server]]:
    """``workload(mode, app, port=0)`` → productpage served by ``meshlib.serve``."""
    servers: list[Server] = []
    meshes: list[meshlib.Mesh] = []

    def start(mode: str, app: SlowApp, port: int = 0) -> Server:
        mesh = meshlib.Mesh.from_text(
            mesh_text(mode), service="productpage", seed=7, registry=CollectorRegistry()
        )
        meshes.append(mesh)
        server = serve(
            meshlib.MeshMiddleware(app, mesh=mesh),
            mesh=mesh,
            port=port,
            svid_dir=None if mode == "disable" else str(pki.server_dir),
            svid_poll_interval=None,
            lifespan="off",
            timeout_keep_alive=30,  # the caller's pooled connection stays idle, not timed out
            timeout_graceful_shutdown=GRACE,
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()  # again for a stopped one: returns at once
    for mesh in meshes:
        mesh.close()


def _caller(pki: PKI, mode: str, port: int) -> meshlib.Mesh:
    """The meshed caller "web" (with its SVID unless mode is disable) of productpage."""
    text = (
        mesh_text(mode) + "---\napiVersion: meshlib/v1\nkind: Service\n"
        "metadata: {name: productpage, namespace: default}\n"
        f'spec: {{endpoints: [{{address: "127.0.0.1:{port}"}}]}}\n'
    )
    svid = None if mode == "disable" else str(pki.client_dir)
    return meshlib.Mesh.from_text(
        text, service="web", seed=7, registry=CollectorRegistry(), svid_dir=svid
    )


@pytest.mark.parametrize("path", ["/slow", "/stream"])
@pytest.mark.parametrize("mode", ["strict", "permissive", "disable"])
def test_stop_under_live_callers_closes_idle_drains_in_flight_and_callers_move_on(
    pki: PKI, workload: Callable[..., Server], mode: str, path: str
) -> None:
    """``/slow``: the response starts during the drain, and says ``Connection: close``;
    ``/stream``: its headers went out before the stop, and the connection closes after it
    all the same (over TLS, without waiting for a close_notify the caller never sends)."""
    old = SlowApp("old")
    server = workload(mode, old)
    mesh = _caller(pki, mode, server.port)
    with mesh, mesh.client(timeout=GRACE) as client, ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(client.get, "http://productpage" + path)
        assert old.started.wait(5.0)
        # A second connection (the first is busy), then idle in the caller's pool.
        assert client.get("http://productpage/fast").text == "old"
        connections = server.server.server_state.connections
        assert len(connections) == 2
        stopping = pool.submit(server.stop)

        # The idle connection is closed by the stop itself, while the in-flight request
        # still holds the server open (the grace is far longer than this wait).
        assert poll(lambda: len(connections) == 1), f"{len(connections)} connections left"
        assert not stopping.done()

        old.release()
        finished = in_flight.result(timeout=10.0)
        assert (finished.status_code, finished.text) == (200, "old")
        if path == "/slow":
            assert finished.headers["connection"] == "close"  # drained, not kept alive
        # stop() returned without error, long before the grace would have cut the connection
        stopping.result(timeout=10.0)

        # The workload restarts on the same port; the caller's next calls reach it.
        new = SlowApp("new")
        workload(mode, new, port=server.port)
        answers = [client.get("http://productpage/fast") for _ in range(3)]
    assert [(r.status_code, r.text) for r in answers] == [(200, "new")] * 3


@pytest.mark.parametrize("mode", ["strict", "disable"])
def test_stop_with_only_idle_callers_returns_and_the_port_is_free(
    pki: PKI, workload: Callable[..., Server], mode: str
) -> None:
    server = workload(mode, SlowApp("old"))
    mesh = _caller(pki, mode, server.port)
    with mesh, mesh.client(timeout=5.0) as client:
        assert client.get("http://productpage/").text == "old"  # now idle in the pool
        server.stop()  # raises TimeoutError if an idle connection holds it
        assert server.server.server_state.connections == set()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{server.port}/", timeout=2.0)


def test_a_request_outliving_the_grace_is_cut_and_stop_still_returns(
    pki: PKI, make_mesh: Callable[..., meshlib.Mesh]
) -> None:
    """serve's default grace (SHUTDOWN_GRACE; uvicorn's own default waits forever)."""
    app = SlowApp("old")  # /slow is never released
    mesh = make_mesh("strict")
    server = serve(
        meshlib.MeshMiddleware(app, mesh=mesh),
        mesh=mesh,
        svid_dir=str(pki.server_dir),
        svid_poll_interval=None,
        lifespan="off",
    )
    caller = _caller(pki, "strict", server.port)
    try:
        with caller, caller.client(timeout=GRACE) as client, ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.get, "http://productpage/slow")
            assert app.started.wait(5.0)
            server.stop()  # the grace runs out: cancelled and aborted, no TimeoutError
            assert server.server.server_state.connections == set()
            # cut: uvicorn's 500 for the cancelled app, or the aborted connection
            with contextlib.suppress(httpx.TransportError):
                assert in_flight.result(timeout=10.0).status_code == 500
    finally:
        server.stop()


def test_a_connection_that_never_spoke_is_closed_by_the_stop(
    pki: PKI, workload: Callable[..., Server]
) -> None:
    """Until its first byte says TLS or plain HTTP, a connection is idle: a stop closes it."""
    server = workload("permissive", SlowApp("old"))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5.0) as silent:
        connections = server.server.server_state.connections
        assert poll(lambda: len(connections) == 1)  # accepted, waiting for a first byte
        server.stop()
        assert silent.recv(1) == b""  # closed by the server (a timeout fails the test)
