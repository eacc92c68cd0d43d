"""MeshMiddleware driven with fake ASGI apps and a fake clock: no sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from policy.fakes import FakeClock

import meshlib
from inbound.conftest import http_scope, tls_extension
from meshlib.context import inbound_deadline
from meshlib.inbound import IDENTITY_HEADER, Verdict

REVIEWS = "spiffe://shop.test/ns/default/sa/reviews"
RATINGS = "spiffe://shop.test/ns/default/sa/ratings"


class Recorder:
    """An ASGI app that records what it was given and answers 200."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []
        self.deadlines: list[float | None] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        self.deadlines.append(inbound_deadline.get())
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})


async def _noop_receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def call(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, _noop_receive, send))
    return sent


def headers_of(message: dict[str, Any]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in message["headers"]}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def mesh(make_mesh: Callable[..., meshlib.Mesh], clock: FakeClock) -> meshlib.Mesh:
    return make_mesh(clock=clock)


def test_scope_is_copied_never_mutated(mesh: meshlib.Mesh) -> None:
    app = Recorder()
    forged = [(b"x-mesh-identity", b"spiffe://shop.test/ns/default/sa/admin"), (b"a", b"b")]
    scope = http_scope(list(forged))
    call(meshlib.MeshMiddleware(app, mesh=mesh), scope)
    assert scope["headers"] == forged  # the server's scope is as it was
    assert app.scopes[0]["headers"] == [(b"a", b"b")]
    assert app.scopes[0] is not scope and app.scopes[0]["path"] == "/"


def test_a_member_gets_its_identity_set_by_the_mesh(mesh: meshlib.Mesh) -> None:
    app = Recorder()
    scope = http_scope([(b"x-mesh-identity", b"forged")], extensions=tls_extension(REVIEWS))
    call(meshlib.MeshMiddleware(app, mesh=mesh), scope)
    assert app.scopes[0]["headers"] == [(IDENTITY_HEADER.encode(), REVIEWS.encode())]


def test_lifespan_passes_through_untouched(mesh: meshlib.Mesh) -> None:
    app = Recorder()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "headers": [(b"x-mesh-peer", b"x")]}
    middleware = meshlib.MeshMiddleware(app, mesh=mesh, rate_limit=(1, 1), default_timeout=1.0)
    for _ in range(3):  # never rate limited, never given a deadline
        call(middleware, scope)
    assert all(s is scope for s in app.scopes) and app.deadlines == [None] * 3


def test_websocket_headers_are_sanitized_but_not_limited(mesh: meshlib.Mesh) -> None:
    app = Recorder()
    middleware = meshlib.MeshMiddleware(app, mesh=mesh, rate_limit=(1, 1), default_timeout=1.0)
    scope = http_scope([(b"x-forwarded-client-cert", b"x"), (b"x-mesh-timeout-ms", b"5")])
    scope["type"] = "websocket"
    for _ in range(3):
        call(middleware, scope)
    assert [s["headers"] for s in app.scopes] == [[]] * 3
    assert app.deadlines == [None] * 3


def test_default_timeout_and_member_deadline_shorter_wins(
    mesh: meshlib.Mesh, clock: FakeClock
) -> None:
    app = Recorder()
    middleware = meshlib.MeshMiddleware(app, mesh=mesh, default_timeout=2.0)
    member = tls_extension(REVIEWS)
    call(middleware, http_scope([(b"x-mesh-timeout-ms", b"500")], extensions=member))
    call(middleware, http_scope([(b"x-mesh-timeout-ms", b"5000")], extensions=member))
    call(middleware, http_scope([(b"x-mesh-timeout-ms", b"500")]))  # untrusted: ignored
    assert app.deadlines == [clock.now + 0.5, clock.now + 2.0, clock.now + 2.0]
    assert inbound_deadline.get() is None  # reset after the app returned


def test_deadline_is_reset_when_the_app_raises(mesh: meshlib.Mesh) -> None:
    async def boom(scope: Any, receive: Any, send: Any) -> None:
        assert inbound_deadline.get() is not None
        raise RuntimeError("handler failed")

    middleware = meshlib.MeshMiddleware(boom, mesh=mesh, default_timeout=1.0)

    async def run() -> float | None:
        with pytest.raises(RuntimeError):
            await middleware(http_scope(), _noop_receive, _ignore)
        return inbound_deadline.get()

    assert asyncio.run(run()) is None


async def _ignore(message: Any) -> None:
    return None


def test_concurrent_requests_each_see_their_own_deadline(
    mesh: meshlib.Mesh, clock: FakeClock
) -> None:
    seen: dict[str, float | None] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        everyone_in.release()
        async with gate:  # every request is in flight before any reads its deadline
            pass
        seen[scope["path"]] = inbound_deadline.get()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = meshlib.MeshMiddleware(app, mesh=mesh)
    member = tls_extension(REVIEWS)

    async def run() -> None:
        nonlocal gate, everyone_in
        gate, everyone_in = asyncio.Lock(), asyncio.Semaphore(0)
        await gate.acquire()
        tasks = [
            asyncio.create_task(
                middleware(
                    http_scope(
                        [(b"x-mesh-timeout-ms", str(100 * (i + 1)).encode())],
                        extensions=member,
                        path=f"/{i}",
                    ),
                    _noop_receive,
                    _ignore,
                )
            )
            for i in range(20)
        ]
        for _ in range(20):
            await everyone_in.acquire()
        gate.release()
        await asyncio.gather(*tasks)

    gate: asyncio.Lock
    everyone_in: asyncio.Semaphore
    asyncio.run(run())
    assert seen == {f"/{i}": clock.now + 0.1 * (i + 1) for i in range(20)}
    assert not hasattr(middleware, "deadline") and not hasattr(middleware, "identity")


def test_total_rate_limit_answers_429_without_calling_the_app(
    mesh: meshlib.Mesh, clock: FakeClock
) -> None:
    app = Recorder()
    middleware = meshlib.MeshMiddleware(app, mesh=mesh, rate_limit=(0.5, 2))
    statuses = [call(middleware, http_scope())[0]["status"] for _ in range(3)]
    assert statuses == [200, 200, 429] and len(app.scopes) == 2
    refused = call(middleware, http_scope())
    assert headers_of(refused[0])["x-mesh-reason"] == "rate_limited"
    assert headers_of(refused[0])["retry-after"] == "2"  # one token takes 1 / 0.5 s
    assert refused[1]["body"] == b"rate_limited\n"
    clock.advance(2.0)
    assert call(middleware, http_scope())[0]["status"] == 200


def test_per_identity_rate_limit_keeps_callers_apart(mesh: meshlib.Mesh) -> None:
    app = Recorder()
    middleware = meshlib.MeshMiddleware(app, mesh=mesh, per_identity_rate_limit=(1, 2))

    def status(*uris: str) -> int:
        ext = tls_extension(*uris) if uris else None
        return int(call(middleware, http_scope(extensions=ext))[0]["status"])

    assert [status(REVIEWS) for _ in range(3)] == [200, 200, 429]
    assert [status(RATINGS) for _ in range(2)] == [200, 200]  # its own bucket
    # untrusted callers share one bucket, whatever identity they claim
    assert [status() for _ in range(3)] == [200, 200, 429]
    other_domain = "spiffe://evil.test/ns/default/sa/reviews"
    assert status(other_domain) == 429  # not a member: the unauthenticated bucket


def test_per_identity_refusal_does_not_spend_the_total(mesh: meshlib.Mesh) -> None:
    app = Recorder()
    middleware = meshlib.MeshMiddleware(
        app, mesh=mesh, rate_limit=(1, 3), per_identity_rate_limit=(1, 1)
    )
    ext = tls_extension(REVIEWS)
    statuses = [call(middleware, http_scope(extensions=ext))[0]["status"] for _ in range(4)]
    assert statuses == [200, 429, 429, 429]
    others = [RATINGS, "spiffe://shop.test/ns/default/sa/details"]
    assert [
        call(middleware, http_scope(extensions=tls_extension(u)))[0]["status"] for u in others
    ] == [200, 200]


def test_per_identity_buckets_are_bounded(mesh: meshlib.Mesh) -> None:
    middleware = meshlib.MeshMiddleware(
        Recorder(), mesh=mesh, per_identity_rate_limit=(1, 1), max_identities=2
    )
    for sa in ("a", "b", "c"):
        call(middleware, http_scope(extensions=tls_extension(f"spiffe://shop.test/sa/{sa}")))
    assert list(middleware._buckets) == ["spiffe://shop.test/sa/b", "spiffe://shop.test/sa/c"]
    # the forgotten caller starts over with a full bucket
    again = call(middleware, http_scope(extensions=tls_extension("spiffe://shop.test/sa/a")))
    assert again[0]["status"] == 200


def test_authorization_hook_can_deny_with_403(mesh: meshlib.Mesh) -> None:
    class Guarded(meshlib.MeshMiddleware):
        def _authorize(
            self, identity: str | None, method: str, path: str, headers: object = (), **_: object
        ) -> Verdict:
            return Verdict.DENY if path.startswith("/admin") else Verdict.ALLOW

    app = Recorder()
    middleware = Guarded(app, mesh=mesh, rate_limit=(1, 1))
    denied = call(middleware, http_scope(path="/admin"))
    assert denied[0]["status"] == 403 and headers_of(denied[0])["x-mesh-reason"] == "denied"
    assert call(middleware, http_scope(path="/app"))[0]["status"] == 200  # no token spent
    assert [s["path"] for s in app.scopes] == ["/app"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"default_timeout": 0},
        {"default_timeout": -1.0},
        {"default_timeout": float("inf")},
        {"rate_limit": (0, 1)},
        {"rate_limit": (1, 0)},
        {"per_identity_rate_limit": (-1, 5)},
        {"max_identities": 0},
    ],
)
def test_options_are_checked_once_at_construction(
    mesh: meshlib.Mesh, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        meshlib.MeshMiddleware(Recorder(), mesh=mesh, **kwargs)


def test_inbound_requests_are_counted(mesh: meshlib.Mesh) -> None:
    middleware = meshlib.MeshMiddleware(Recorder(), mesh=mesh, rate_limit=(1, 1))
    call(middleware, http_scope())
    call(middleware, http_scope())
    assert mesh.metrics is not None
    samples = {
        (s.labels["code"], s.labels["reason"]): s.value
        for family in mesh.metrics.calls.collect()
        for s in family.samples
        if s.name == "mesh_requests_total" and s.labels.get("direction") == "inbound"
    }
    assert samples == {("200", "ok"): 1.0, ("429", "rate_limited"): 1.0}


@pytest.mark.parametrize("method", ["get", "Get", "Delete", "pOST", "options", "patch"])
def test_a_case_variant_of_a_standard_method_is_refused_before_the_app(
    mesh: meshlib.Mesh, method: str
) -> None:
    app = Recorder()
    sent = call(meshlib.MeshMiddleware(app, mesh=mesh), http_scope(method=method))
    assert sent[0]["status"] == 400
    assert headers_of(sent[0])["x-mesh-reason"] == "bad_request"
    assert app.scopes == []
    assert mesh.metrics is not None
    reasons = {
        s.labels["reason"]
        for family in mesh.metrics.calls.collect()
        for s in family.samples
        if s.name == "mesh_requests_total" and s.labels.get("code") == "400"
    }
    assert reasons == {"bad_request"}


@pytest.mark.parametrize(
    "method", ["GET", "DELETE", "PATCH", "PURGE", "purge", "PROPFIND", "M-Search"]
)
def test_standard_methods_and_other_extension_methods_pass_as_sent(
    mesh: meshlib.Mesh, method: str
) -> None:
    app = Recorder()
    sent = call(meshlib.MeshMiddleware(app, mesh=mesh), http_scope(method=method))
    assert sent[0]["status"] == 200
    assert [scope["method"] for scope in app.scopes] == [method]
