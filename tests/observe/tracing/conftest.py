"""Tracing fixtures: a private SDK TracerProvider per test (never the global one), its
in-memory exporter, meshed services under real uvicorn servers, and span-tree helpers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from harness import ServerHandle, run_uvicorn
from harness.leaks import assert_threads_stopped
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.trace import SpanKind

import meshlib


class _Notify(SpanProcessor):
    """Wakes waiters whenever a span ends (after the exporter has it)."""

    def __init__(self, condition: threading.Condition) -> None:
        self._condition = condition

    def on_end(self, span: ReadableSpan) -> None:
        with self._condition:
            self._condition.notify_all()


class Recorder:
    """A provider whose finished spans are kept in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self._ended = threading.Condition()
        self.provider.add_span_processor(_Notify(self._ended))

    def wait_for(
        self, predicate: Callable[[list[ReadableSpan]], bool], timeout: float = 5.0
    ) -> None:
        """Block until ``predicate(spans)`` holds: a server ends its span after it has sent the
        response, so the client may read the answer before the span is exported."""
        with self._ended:
            assert self._ended.wait_for(lambda: predicate(self.spans()), timeout), self.spans()

    def wait_for_server(self, path: str, count: int = 1) -> None:
        self.wait_for(
            lambda spans: sum(1 for s in spans if s.attributes.get("url.path") == path) >= count
        )

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str, kind: SpanKind | None = None) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name == name and (kind is None or s.kind is kind)]

    def by_id(self) -> dict[int, ReadableSpan]:
        return {s.context.span_id: s for s in self.spans()}

    def children(self, parent: ReadableSpan) -> list[ReadableSpan]:
        return [
            s
            for s in self.spans()
            if s.parent is not None and s.parent.span_id == parent.context.span_id
        ]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.provider.shutdown()


@pytest.fixture
def make_mesh() -> Iterator[Callable[..., meshlib.Mesh]]:
    """``make_mesh(policy_text, service=..., **Mesh kwargs)`` → a Mesh closed at teardown."""
    from prometheus_client import CollectorRegistry

    made: list[meshlib.Mesh] = []

    def make(text: str, **kwargs: Any) -> meshlib.Mesh:
        kwargs.setdefault("service", "tester")
        kwargs.setdefault("seed", 7)
        kwargs.setdefault("registry", CollectorRegistry())
        mesh = meshlib.Mesh.from_text(text, **kwargs)
        made.append(mesh)
        return mesh

    yield make
    for mesh in made:
        mesh.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., ServerHandle]]:
    """``serve(asgi_app, name)`` → a running uvicorn server, stopped at teardown."""
    started: list[ServerHandle] = []

    def start(app: Any, name: str) -> ServerHandle:
        handle = run_uvicorn(app, name=name)
        started.append(handle)
        return handle

    yield start
    names = [h.thread_name for h in started]
    for handle in reversed(started):
        handle.stop()
    assert_threads_stopped(names)


def service_yaml(name: str, port: int, extra: str = "") -> str:
    """A Service ``name`` at 127.0.0.1:``port`` (plus any further documents)."""
    return (
        "apiVersion: meshlib/v1\nkind: Service\n"
        f"metadata: {{name: {name}}}\n"
        f"spec:\n  endpoints:\n  - address: 127.0.0.1:{port}\n" + extra
    )


MESH_ONLY = "apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: mesh}\nspec: {}\n"


def sampling(rate: str) -> str:
    """A Mesh document (after a ``---``) with ``spec.tracing.sampling: rate``."""
    return MESH_ONLY.replace("spec: {}", f"spec: {{tracing: {{sampling: {rate}}}}}")


async def reply(send: Any, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def drain(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


def headers_of(scope: dict[str, Any]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or ()}


def traceparent_ids(value: str) -> tuple[int, int, int]:
    """(trace id, parent span id, flags) of a W3C traceparent header."""
    _version, trace_id, span_id, flags = value.split("-")
    return int(trace_id, 16), int(span_id, 16), int(flags, 16)


class Counted:
    """A provider (its spans kept in memory) whose tracers count the spans they are asked to
    start and, with ``count_asks``, whose sampler counts the times it is asked: the SDK's own
    sampler object, only its method wrapped (so never pass a shared one such as ``ALWAYS_ON``
    with ``count_asks``: the wrapper would outlive the test)."""

    def __init__(self, sampler: Sampler | None, count_asks: bool = False) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider() if sampler is None else TracerProvider(sampler=sampler)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.started = 0
        self.asked = 0
        if count_asks and sampler is not None:
            real_sample = sampler.should_sample

            def should_sample(*args: Any, **kwargs: Any) -> Any:
                self.asked += 1
                return real_sample(*args, **kwargs)

            sampler.should_sample = should_sample  # type: ignore[method-assign]
        real_tracer = self.provider.get_tracer

        def get_tracer(*args: Any, **kwargs: Any) -> Any:
            tracer = real_tracer(*args, **kwargs)
            start = tracer.start_span

            def start_span(*a: Any, **k: Any) -> Any:
                self.started += 1
                return start(*a, **k)

            tracer.start_span = start_span  # type: ignore[method-assign]
            return tracer

        self.provider.get_tracer = get_tracer  # type: ignore[method-assign]
