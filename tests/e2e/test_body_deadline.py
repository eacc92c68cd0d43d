"""What bounds a response body, over real sockets, through both drivers (issue 8, item 3).

A buffered call (``client.get``) is held to its deadline up to the last byte of the body: a
backend that trickles, stalls or never ends cannot hold the caller past it. A streamed call
(``client.stream`` on ``mesh.client()``) is held to its deadline up to the headers, and each
read of the body to ``streamIdleTimeout``. The call is counted once, when its body ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
import threading
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import httpx
import pytest
from harness.server import ServerHandle, run_uvicorn
from prometheus_client import CollectorRegistry

import meshlib
from e2e.conftest import service_yaml
from meshlib.outbound.call import STREAM_EXTENSION

pytestmark = pytest.mark.timeout(30)

MiB = 1 << 20


class BodyBackend:
    """An ASGI backend whose response body the test shapes: 200 headers, then ``chunks``
    chunks of ``size`` bytes, ``gap`` seconds apart (0: as fast as the client takes them),
    then the end of the body — or, with ``stall``, nothing more until the client leaves.

    ``sent`` counts the body bytes handed to the connection; ``done`` is set when the
    response ended or the client disconnected, ``gone`` when the client disconnected before
    the end of the body.
    """

    def __init__(self, *, size: int, gap: float, chunks: int, stall: bool = False) -> None:
        self.size = size
        self.gap = gap
        self.chunks = chunks
        self.stall = stall
        self.sent = 0
        self.done = threading.Event()
        self.gone = threading.Event()

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Any],
        send: Callable[[MutableMapping[str, Any]], Any],
    ) -> None:
        assert scope["type"] == "http"
        left = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            left.set()

        watcher = asyncio.ensure_future(watch())
        complete = False  # uvicorn answers receive() with a disconnect after a whole response
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            chunk = b"x" * self.size
            for _ in range(self.chunks):
                if left.is_set():
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                self.sent += len(chunk)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(left.wait(), self.gap)  # gap 0: just yield
            else:
                if self.stall:
                    await asyncio.wait_for(left.wait(), 25)
                else:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    complete = True
        finally:
            watcher.cancel()
            if left.is_set() and not complete:
                self.gone.set()
            self.done.set()


@pytest.fixture
def body_backend() -> Iterator[Callable[..., tuple[BodyBackend, ServerHandle]]]:
    servers: list[ServerHandle] = []

    def make(**kwargs: Any) -> tuple[BodyBackend, ServerHandle]:
        backend = BodyBackend(**kwargs)
        server = run_uvicorn(backend, name="body")
        servers.append(server)
        return backend, server

    yield make
    for server in servers:
        server.stop()


def policy(spec: str) -> str:
    return (
        "---\napiVersion: meshlib/v1\nkind: TrafficPolicy\n"
        "metadata: {name: reviews-policy, namespace: default}\n"
        "spec:\n  target: {service: reviews}\n" + textwrap.indent(spec, "  ")
    )


def calls(registry: CollectorRegistry, code: str, reason: str) -> float | None:
    labels = {
        "direction": "outbound",
        "source": "tester.default",
        "destination": "reviews.default",
        "route": "",
        "code": code,
        "reason": reason,
    }
    return registry.get_sample_value("mesh_requests_total", labels)


# --- buffered calls: the deadline covers the whole body ---------------------------------------


def test_a_trickling_body_ends_at_the_deadline(caller, make_mesh, body_backend) -> None:
    """One byte every 100 ms for 10 s, and a 1 s deadline: the call ends after about ten
    bytes, counted once as a timeout (not also as the 200 its headers said)."""
    backend, server = body_backend(size=1, gap=0.1, chunks=100)
    registry = CollectorRegistry()
    mesh = make_mesh(
        service_yaml("reviews", [server.port]) + policy("timeout: 1s\n"), registry=registry
    )
    result = caller.bind(mesh).outcome("GET", "http://reviews/trickle")

    assert isinstance(result, meshlib.MeshTimeout), result
    assert result.reason is meshlib.Reason.TIMEOUT
    assert "response body" in str(result)
    decision = result.decision
    assert decision is not None and decision.reason == "timeout" and decision.status == 504
    assert [a.outcome for a in decision.attempts] == ["ok"]  # the headers came in time
    assert backend.gone.wait(5)  # the connection was dropped, not drained
    assert backend.sent < 40, backend.sent  # 4 s of trickle at most, not 10 s
    assert calls(registry, "504", "timeout") == 1
    assert calls(registry, "200", "ok") is None


def test_a_stalled_body_ends_at_the_deadline(caller, make_mesh, body_backend) -> None:
    """A first chunk, then silence: the read waits only for what is left of the deadline and
    fails as MeshTimeout (before: the client's ReadTimeout), also with local responses."""
    backend, server = body_backend(size=10, gap=0, chunks=1, stall=True)
    mesh = make_mesh(
        service_yaml("reviews", [server.port]) + policy("timeout: 500ms\n"), local_responses=True
    )
    result = caller.bind(mesh).outcome("GET", "http://reviews/stall")

    # Headers already reached the caller: a body that runs out of time can only raise.
    assert isinstance(result, meshlib.MeshTimeout), result
    assert result.decision is not None and result.decision.reason == "timeout"
    assert backend.gone.wait(5) and backend.sent == 10
    said = "\n".join([str(result), *getattr(result, "__notes__", ())])  # the traceback's text
    assert (
        f"mesh call to reviews.default failed (timeout) after 1 attempt: 127.0.0.1:{server.port}"
        " 200; deadline 0.5s; in the response body"
    ) in said, said


def test_an_endless_body_ends_at_the_deadline(caller, make_mesh, body_backend) -> None:
    """A body sent as fast as it is read, for ever (128 MiB here): the client's memory must
    stop growing at the deadline. The mesh's clock is the backend's progress, one second per
    MiB sent, so "1 s" is "1 MiB" whatever the machine's speed."""
    backend, server = body_backend(size=64 * 1024, gap=0, chunks=2048)

    def clock() -> float:
        return 1000.0 + backend.sent / MiB

    mesh = make_mesh(service_yaml("reviews", [server.port]) + policy("timeout: 1s\n"), clock=clock)
    result = caller.bind(mesh).outcome("GET", "http://reviews/endless")

    assert isinstance(result, meshlib.MeshTimeout), result
    assert backend.gone.wait(5)
    # 1 MiB, plus what the sockets' buffers held when the caller stopped reading.
    assert backend.sent < 32 * MiB, backend.sent


def test_a_body_within_the_deadline_is_read_whole(caller, make_mesh, body_backend) -> None:
    _, server = body_backend(size=1000, gap=0.05, chunks=5)
    registry = CollectorRegistry()
    mesh = make_mesh(
        service_yaml("reviews", [server.port]) + policy("timeout: 5s\n"), registry=registry
    )
    response = caller.bind(mesh).get("http://reviews/ok")

    assert response.status_code == 200 and len(response.content) == 5000
    assert response.extensions["mesh_decision"].reason == "ok"
    assert calls(registry, "200", "ok") == 1


# --- streamed calls: the deadline covers the headers, streamIdleTimeout each read ------------


def test_a_streamed_body_outlives_the_deadline(caller, make_mesh, body_backend) -> None:
    """``client.stream``: the deadline (400 ms) ends at the headers; a body arriving over
    about 1 s is read whole, and the call counted once, as a success, when it is closed."""
    backend, server = body_backend(size=100, gap=0.25, chunks=4)
    registry = CollectorRegistry()
    mesh = make_mesh(
        service_yaml("reviews", [server.port]) + policy("timeout: 400ms\n"), registry=registry
    )
    response, chunks = caller.bind(mesh).stream("GET", "http://reviews/stream")

    assert response.status_code == 200 and b"".join(chunks) == b"x" * 400
    assert response.extensions["mesh_decision"].reason == "ok"
    assert backend.done.wait(5) and not backend.gone.is_set()
    assert calls(registry, "200", "ok") == 1


def test_stream_idle_timeout_bounds_each_read(caller, make_mesh, body_backend) -> None:
    backend, server = body_backend(size=100, gap=3.0, chunks=3)
    registry = CollectorRegistry()
    mesh = make_mesh(
        service_yaml("reviews", [server.port]) + policy("streamIdleTimeout: 300ms\n"),
        registry=registry,
    )
    c = caller.bind(mesh)
    with pytest.raises(meshlib.MeshTimeout) as info:
        c.stream("GET", "http://reviews/idle")

    assert "read timeout (0.3s)" in str(info.value)
    assert info.value.decision is not None and info.value.decision.reason == "timeout"
    assert backend.gone.wait(5) and backend.sent == 100  # gave up after the first chunk
    assert calls(registry, "504", "timeout") == 1
    assert calls(registry, "200", "ok") is None


# --- the plug-in form: no client to tell a stream from a buffered call ------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_plug_in_form_bounds_every_body_unless_told(mode, make_mesh, body_backend) -> None:
    """``httpx.Client(transport=mesh.transport())`` cannot tell ``client.stream`` from a
    buffered call: the deadline covers every body there, unless the request carries
    ``STREAM_EXTENSION``."""
    _, server = body_backend(size=100, gap=0.25, chunks=4)
    mesh = make_mesh(service_yaml("reviews", [server.port]) + policy("timeout: 400ms\n"))

    def read(extensions: dict[str, Any]) -> bytes | Exception:
        try:
            if mode == "sync":
                with (
                    httpx.Client(transport=mesh.transport()) as client,
                    client.stream("GET", "http://reviews/s", extensions=extensions) as response,
                ):
                    return b"".join(response.iter_raw())

            async def go() -> bytes:
                async with (
                    httpx.AsyncClient(transport=mesh.async_transport()) as client,
                    client.stream("GET", "http://reviews/s", extensions=extensions) as response,
                ):
                    return b"".join([chunk async for chunk in response.aiter_raw()])

            return asyncio.run(go())
        except httpx.HTTPError as error:
            return error

    assert isinstance(read({}), meshlib.MeshTimeout)
    assert read({STREAM_EXTENSION: True}) == b"x" * 400


# --- the call span ends with the body ------------------------------------------------------------


def test_the_call_span_ends_with_the_body(caller, make_mesh, body_backend) -> None:
    """The CLIENT span of a call stays open while its body is read and records a body that
    ran out of time."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    backend, server = body_backend(size=1, gap=0.1, chunks=100)
    mesh = make_mesh(
        service_yaml("reviews", [server.port]) + policy("timeout: 500ms\n"),
        tracer_provider=provider,
    )
    try:
        result = caller.bind(mesh).outcome("GET", "http://reviews/trickle")
        assert isinstance(result, meshlib.MeshTimeout), result
        spans = exporter.get_finished_spans()
    finally:
        provider.shutdown()

    # One attempt: one CLIENT span, the call's, carrying the attempt (docs/design.md).
    (call,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert call.attributes is not None and call.attributes["mesh.reason"] == "timeout"
    assert call.status.status_code is StatusCode.ERROR
    # The attempt had its headers in time: its outcome is ok, the default, left out.
    assert "mesh.outcome" not in call.attributes
    assert call.end_time is not None and call.start_time is not None
    # It ended when the body ran out of time (500 ms into the call), not at the headers (the
    # first byte comes at once). The span starts before the call's deadline is set.
    assert call.end_time - call.start_time >= 500_000_000
    assert backend.gone.wait(5)
