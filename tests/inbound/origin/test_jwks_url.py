"""SEC-12: a JWKS served over HTTP by a real uvicorn — rotation, a slow and a failing endpoint."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from harness import ServerHandle, run_uvicorn

import meshlib
from inbound.origin.conftest import (
    ISSUER,
    Recorder,
    acall,
    bearer,
    http_scope,
    jwks,
    request_authentication,
    rsa_key,
    token,
)
from meshlib.inbound.origin import UrlJwks

pytestmark = pytest.mark.timeout(30)


class JwksServer:
    """Serves ``body`` at any path after ``delay`` seconds with ``status``; counts requests."""

    def __init__(self, body: str) -> None:
        self.body = body
        self.status = 200
        self.delay = 0.0
        self.requests = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.requests += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        body = self.body.encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def jwks_server() -> Iterator[tuple[JwksServer, ServerHandle]]:
    app = JwksServer(jwks((rsa_key(), "rsa-1")))
    handle = run_uvicorn(app, name="jwks")
    yield app, handle
    handle.stop()


@pytest.fixture
def setup(
    jwks_server: tuple[JwksServer, ServerHandle], make_mesh: Callable[..., meshlib.Mesh]
) -> tuple[JwksServer, meshlib.MeshMiddleware, Clock]:
    server, handle = jwks_server
    clock = Clock()
    rule = f'{{issuer: "{ISSUER}", jwksUri: "{handle.url}/jwks"}}'
    mesh = make_mesh(request_authentication(rule), clock=clock)
    return server, meshlib.MeshMiddleware(Recorder(), mesh=mesh), clock


def source_of(app: meshlib.MeshMiddleware) -> UrlJwks:
    rule = app.mesh.snapshot.request_authentications[0].rules[0]
    source = app._jwt_verifier().store.source(rule)
    assert isinstance(source, UrlJwks)
    return source


async def status(app: Any, value: str | None) -> int:
    return (await acall(app, http_scope(bearer(value) if value else [])))[0]


def test_first_fetch_then_rotation_with_bounded_refetches(setup: Any) -> None:
    server, app, clock = setup

    async def scenario() -> None:
        assert await status(app, token()) == 200  # waited for the first fetch
        assert server.requests == 1
        rotated = rsa_key("rotated")
        server.body = jwks((rsa_key(), "rsa-1"), (rotated, "rsa-2"))
        # just fetched: an unknown kid cannot refetch yet, and a kid flood costs nothing
        for _ in range(20):
            assert await status(app, token(kid=secrets.token_hex(4))) == 401
        assert await status(app, token(rotated, kid="rsa-2")) == 401
        assert server.requests == 1
        clock.now += 11  # past min_refresh_interval: the unknown kid triggers one refetch
        assert await status(app, token(rotated, kid="rsa-2")) == 200
        assert server.requests == 2
        for _ in range(20):
            assert await status(app, token(kid=secrets.token_hex(4))) == 401
        assert server.requests == 2  # within the interval: no refetch at all
        clock.now += 11
        for _ in range(20):
            assert await status(app, token(kid=secrets.token_hex(4))) == 401
        assert server.requests == 3  # the next interval: one refetch, no more
        assert await status(app, token()) == 200

    asyncio.run(scenario())


def test_slow_endpoint_never_delays_requests_with_cached_keys(setup: Any) -> None:
    server, app, clock = setup

    async def scenario() -> None:
        assert await status(app, token()) == 200
        rotated = rsa_key("rotated")
        server.body = jwks((rsa_key(), "rsa-1"), (rotated, "rsa-2"))
        server.delay = 2.0
        clock.now += 301  # past the TTL: the next lookup starts a background refresh
        started = time.monotonic()
        for _ in range(5):
            assert await status(app, token()) == 200
        assert time.monotonic() - started < 0.5
        source = source_of(app)
        task = source._task
        assert task is not None and not task.done()
        started = time.monotonic()
        assert await status(app, token(rotated, kid="rsa-2")) == 401  # waits max_wait only
        assert time.monotonic() - started < source.max_wait + 0.5
        assert await task  # the refresh completes in the background
        assert await status(app, token(rotated, kid="rsa-2")) == 200

    asyncio.run(scenario())


def test_failing_endpoint_keeps_the_old_keys(setup: Any) -> None:
    server, app, clock = setup

    async def scenario() -> None:
        assert await status(app, token()) == 200
        server.status = 500
        clock.now += 301
        assert await status(app, token()) == 200
        source = source_of(app)
        assert source._task is not None
        assert await source._task is False
        assert source.last_error is not None and "500" in source.last_error
        assert await status(app, token()) == 200
        server.status = 200
        assert await source.refresh() is True

    asyncio.run(scenario())


def test_endpoint_down_at_startup_fails_closed(setup: Any) -> None:
    server, app, _ = setup
    server.status = 503

    async def scenario() -> None:
        assert await status(app, token()) == 401
        assert await status(app, None) == 200  # no token: no principal, no rule needs one
        assert server.requests == 1

    asyncio.run(scenario())
