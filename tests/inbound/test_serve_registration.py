"""``meshlib.serve`` tells a mesh that registers itself where it listens, and drains first on
stop: the hook (:class:`meshlib.inbound.serving.ServingHook`) is called once the socket
accepts, with the real port, and what it returned is closed while the socket still accepts.

The mesh here is a real :class:`meshlib.Mesh` wrapped by a tiny object that adds the hook and
records its calls; the registry side is tests/control/test_registrar.py.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.inbound.serving import Closeable, Server, ServingHook, serve

from .conftest import SERVICE_ONLY

pytestmark = pytest.mark.timeout(30)

PLAIN = SERVICE_ONLY.replace("trustDomain: shop.test", "trustDomain: shop.test, mtls: disable")


async def hello(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


def accepts(port: int) -> bool:
    """Whether 127.0.0.1:``port`` accepts a TCP connection now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0):
            return True
    except OSError:
        return False


class Registration:
    """What the hook returns: records whether the server still accepted when it was closed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.closes = 0
        self.accepting_at_close: bool | None = None

    def close(self) -> bool:
        self.closes += 1
        self.accepting_at_close = accepts(self.port)
        return True


class RegisteringMesh:
    """A real mesh plus the optional ``on_serving`` hook, recording its calls."""

    def __init__(self, mesh: meshlib.Mesh, result: str = "handle") -> None:
        self.mesh = mesh
        self.result = result
        self.calls: list[tuple[str, int, str, bool]] = []
        self.registration: Registration | None = None

    @property
    def snapshot(self) -> Any:
        return self.mesh.snapshot

    @property
    def metrics(self) -> Any:
        return self.mesh.metrics

    def mtls_mode(self, service_key: str | None = None) -> Any:
        return self.mesh.mtls_mode(service_key)

    def on_serving(self, host: str, port: int, scheme: str) -> Closeable | None:
        self.calls.append((host, port, scheme, accepts(port)))
        if self.result == "raise":
            raise ValueError("register: host '0.0.0.0' is no address: pass advertise=")
        if self.result == "none":
            return None
        self.registration = Registration(port)
        return self.registration


def test_the_hook_gets_the_real_port_once_listening_and_drains_before_the_socket_closes(
    make_mesh: Callable[..., meshlib.Mesh],
) -> None:
    mesh = RegisteringMesh(make_mesh(PLAIN))
    assert isinstance(mesh, ServingHook)
    server = serve(hello, mesh=mesh, port=0)
    try:
        assert mesh.calls == [("127.0.0.1", server.port, "http", True)]
        assert httpx.get(f"{server.url}/", timeout=5.0).text == "hello"
        registration = mesh.registration
        assert registration is not None and registration.closes == 0
    finally:
        server.stop()
    assert registration.closes == 1
    assert registration.accepting_at_close is True  # drained while the port still accepted
    assert not accepts(server.port)
    server.stop()  # a second stop closes nothing twice
    assert registration.closes == 1


def test_advertise_is_the_address_registered(make_mesh: Callable[..., meshlib.Mesh]) -> None:
    mesh = RegisteringMesh(make_mesh(PLAIN))
    with serve(hello, mesh=mesh, host="127.0.0.1", port=0, advertise="10.1.2.3") as server:
        assert mesh.calls == [("10.1.2.3", server.port, "http", True)]


def test_a_hook_that_returns_none_and_a_mesh_without_a_hook_serve_as_before(
    make_mesh: Callable[..., meshlib.Mesh],
) -> None:
    quiet = RegisteringMesh(make_mesh(PLAIN), result="none")
    with serve(hello, mesh=quiet, port=0) as server:
        assert len(quiet.calls) == 1
        port = server.port
    assert not accepts(port)
    plain = make_mesh(PLAIN)
    with serve(hello, mesh=plain, port=0) as server:
        assert httpx.get(f"{server.url}/", timeout=5.0).text == "hello"


def test_a_hook_that_raises_stops_the_server_and_the_error_propagates(
    make_mesh: Callable[..., meshlib.Mesh],
) -> None:
    mesh = RegisteringMesh(make_mesh(PLAIN), result="raise")
    with pytest.raises(ValueError, match="advertise="):
        serve(hello, mesh=mesh, port=0)
    (_, port, _, was_accepting), *_ = mesh.calls
    assert was_accepting and not accepts(port)


def test_a_drain_that_fails_does_not_keep_the_server_up(
    make_mesh: Callable[..., meshlib.Mesh], caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def close(self) -> None:
            raise ConnectionError("registry down")

    class BrokenMesh(RegisteringMesh):
        def on_serving(self, host: str, port: int, scheme: str) -> Closeable | None:
            return Broken()

    server: Server = serve(hello, mesh=BrokenMesh(make_mesh(PLAIN)), port=0)
    server.stop()
    assert not accepts(server.port)
    assert "the registry drain failed" in caplog.text
