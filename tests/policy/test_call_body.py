"""The response body of a call (:class:`meshlib.outbound.call.Body`) on the fake clock, no sockets.

A buffered call's deadline covers every chunk of the body and sets the connection's read
timeout to what is left when the body starts; a streamed call (``STREAM_EXTENSION``) is bounded
per read by ``streamIdleTimeout`` instead. The call is reported once, when its body ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.config.model import STREAM_IDLE_TIMEOUT
from meshlib.outbound.call import STREAM_EXTENSION, Body, Outcome, Send
from policy.fakes import Driver, FakeClock, Responder, start
from policy.test_call import with_policy


class Chunks(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body on the wire: each chunk arrives ``gap`` seconds after the one before it; records
    the read timeout httpcore would use (the attempt's, read when the body starts)."""

    def __init__(self, clock: FakeClock, send: Send, n: int, gap: float) -> None:
        self.clock, self.send, self.n, self.gap = clock, send, n, gap
        self.read_timeout: Any = "unset"
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        self.read_timeout = self.send.request.extensions["timeout"]["read"]
        for _ in range(self.n):
            if self.read_timeout is not None and self.gap > self.read_timeout:
                self.clock.advance(self.read_timeout)
                raise httpx.ReadTimeout("timed out", request=self.send.request)
            self.clock.advance(self.gap)
            yield b"x"

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self:
            yield chunk

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


def body(clock: FakeClock, n: int, gap: float, made: list[Chunks]) -> Responder:
    def respond(send: Send) -> Outcome:
        stream = Chunks(clock, send, n, gap)
        made.append(stream)
        return Outcome(httpx.Response(200, stream=stream), None, 0.1)

    return respond


_made: list[meshlib.Mesh] = []


@pytest.fixture(autouse=True)
def _close_meshes() -> Iterator[None]:
    yield
    while _made:
        _made.pop().close()


def make(clock: FakeClock, text: str, registry: CollectorRegistry | None = None) -> meshlib.Mesh:
    mesh = meshlib.Mesh.from_text(
        text, service="productpage", clock=clock, seed=1, watch=False, registry=registry
    )
    _made.append(mesh)
    return mesh


def counted(registry: CollectorRegistry, code: str, reason: str) -> float | None:
    labels = {
        "direction": "outbound",
        "source": "productpage.default",
        "destination": "reviews.default",
        "route": "",
        "code": code,
        "reason": reason,
    }
    return registry.get_sample_value("mesh_requests_total", labels)


@pytest.mark.parametrize("driver_kind", ["sync", "async"])
def test_the_deadline_covers_every_chunk(clock: FakeClock, driver_kind: str) -> None:
    registry = CollectorRegistry()
    mesh = make(clock, with_policy("timeout: 1s"), registry)
    made: list[Chunks] = []
    response = Driver(clock, body(clock, 10, 0.3, made)).run(start(mesh))
    assert isinstance(response.stream, Body)
    assert counted(registry, "200", "ok") is None  # not counted before its body ends

    with pytest.raises(meshlib.MeshTimeout) as info:
        if driver_kind == "sync":
            response.read()
        else:
            import asyncio

            asyncio.run(response.aread())

    # headers at 0.1 s, so the body's reads may wait 0.9 s; the 4th chunk lands at 1.3 s
    assert made[0].read_timeout == pytest.approx(0.9)
    assert clock() - 1000.0 == pytest.approx(1.3)
    decision = info.value.decision
    assert decision is not None and decision.reason == "timeout" and decision.status == 504
    assert counted(registry, "504", "timeout") == 1
    assert counted(registry, "200", "ok") is None
    response.close()
    assert made[0].closed and counted(registry, "504", "timeout") == 1  # once, not again


def test_a_stalled_read_ends_at_the_deadline(clock: FakeClock) -> None:
    mesh = make(clock, with_policy("timeout: 1s"))
    made: list[Chunks] = []
    response = Driver(clock, body(clock, 2, 5.0, made)).run(start(mesh))
    with pytest.raises(meshlib.MeshTimeout) as info:
        response.read()
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)
    assert clock() - 1000.0 == pytest.approx(1.0)  # the read gave up at the deadline


def test_a_streamed_body_is_bounded_per_read_not_by_the_deadline(clock: FakeClock) -> None:
    registry = CollectorRegistry()
    mesh = make(clock, with_policy("timeout: 1s"), registry)
    made: list[Chunks] = []
    request = start(mesh, extensions={STREAM_EXTENSION: True, "timeout": {"read": None}})
    response = Driver(clock, body(clock, 10, 0.3, made)).run(request)
    assert response.read() == b"x" * 10  # 3 s of body under a 1 s deadline
    assert made[0].read_timeout == STREAM_IDLE_TIMEOUT
    assert counted(registry, "200", "ok") == 1


def test_the_client_read_timeout_still_applies_when_shorter(clock: FakeClock) -> None:
    mesh = make(clock, with_policy("streamIdleTimeout: 2s"))
    made: list[Chunks] = []
    request = start(mesh, extensions={STREAM_EXTENSION: True, "timeout": {"read": 0.5}})
    response = Driver(clock, body(clock, 3, 1.0, made)).run(request)
    with pytest.raises(meshlib.MeshTimeout, match=r"read timeout \(0.5s\)"):
        response.read()
    assert made[0].read_timeout == 0.5


def test_stream_idle_timeout_bounds_a_streamed_read(clock: FakeClock) -> None:
    mesh = make(clock, with_policy("streamIdleTimeout: 2s"))
    made: list[Chunks] = []
    request = start(mesh, extensions={STREAM_EXTENSION: True})
    response = Driver(clock, body(clock, 3, 1.5, made)).run(request)
    assert response.read() == b"xxx"
    assert made[0].read_timeout == 2.0


def test_a_response_already_in_memory_is_reported_at_once(clock: FakeClock) -> None:
    registry = CollectorRegistry()
    mesh = make(clock, with_policy("timeout: 1s"), registry)
    response = Driver(clock, lambda send: Outcome(httpx.Response(200), None, 0.1)).run(start(mesh))
    assert not isinstance(response.stream, Body)
    assert counted(registry, "200", "ok") == 1


def test_stream_idle_timeout_is_a_policy_field(clock: FakeClock) -> None:
    mesh = make(clock, with_policy("streamIdleTimeout: 45s"))
    policy = mesh.router.policy("reviews.default", None)
    assert policy.stream_idle_timeout == 45.0
    assert policy.sources["stream_idle_timeout"].startswith("service:")
    default = make(clock, with_policy("timeout: 1s")).router.policy("reviews.default", None)
    assert default.stream_idle_timeout == STREAM_IDLE_TIMEOUT == 300.0
    with pytest.raises(meshlib.ConfigError, match="streamIdleTimeout"):
        make(clock, with_policy("streamIdleTimeout: forever"))


@pytest.mark.parametrize(("idle", "bound"), [("2s", 2.0), ("10s", 5.0)])
def test_the_callers_timeout_dict_is_never_edited(
    clock: FakeClock, idle: str, bound: float
) -> None:
    """No deadline: the attempt carries the caller's own timeout dict; the body's read bound
    (the idle timeout when shorter, else the client's read) never edits it, whether it
    differs from the client's read (a copy) or not (nothing to set)."""
    mesh = make(clock, with_policy(f"streamIdleTimeout: {idle}"))
    made: list[Chunks] = []
    own = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}
    call = start(mesh, extensions={STREAM_EXTENSION: True, "timeout": own})
    response = Driver(clock, body(clock, 3, 1.0, made)).run(call)
    assert response.read() == b"xxx"
    assert made[0].read_timeout == bound
    assert own == {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}
