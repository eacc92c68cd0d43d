"""Tracing with no application code: three meshed services, one trace, printed as a tree.

    python examples/tracing_chain.py

``frontend`` calls ``catalog`` from its handler; ``catalog`` calls ``inventory`` from a spawned
task and from a worker thread (``asyncio.to_thread``). ``inventory`` fails its first request
with a 503, so the catalog's retry shows as an attempt span under its call (a call with one
attempt is one span). No handler touches a trace
header: the mesh's middleware opens each SERVER span and attaches its context, the mesh's
client continues it. Each service has its own OpenTelemetry SDK provider (as separate
processes would), all exporting to one in-memory exporter so the tree can be printed; use an
OTLP exporter instead to see it in Jaeger (docs/features/tracing.md).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import uvicorn
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import meshlib

EXPORTER = InMemorySpanExporter()

SERVICE = """\
apiVersion: meshlib/v1
kind: Service
metadata: {{name: {name}}}
spec:
  endpoints: [{{address: "127.0.0.1:{port}"}}]
"""
RETRY = """\
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: inventory-retries}
spec:
  target: {service: inventory}
  retries: {attempts: 1, retryOn: [5xx], backoff: {baseInterval: 1ms, maxInterval: 2ms}}
"""
NO_SERVICES = "apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: mesh}\nspec: {}\n"


def provider(service: str) -> TracerProvider:
    """One SDK provider per service, as each process would have its own."""
    tracer_provider = TracerProvider(resource=Resource.create({"service.name": service}))
    tracer_provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    return tracer_provider


async def answer(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": body})


class Running:
    """A uvicorn server on a free port, in a thread."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.port: int = self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()


def inventory_app(mesh: meshlib.Mesh) -> Any:
    failed = threading.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if not failed.is_set():  # the first request fails: the caller's retry is a new attempt
            failed.set()
            await answer(send, 503, b"busy")
        else:
            await answer(send, 200, b"42 in stock")

    return meshlib.MeshMiddleware(app, mesh=mesh)


def catalog_app(mesh: meshlib.Mesh) -> Any:
    def from_thread() -> str:
        with mesh.client() as client:
            return client.get("http://inventory/stock/2").text

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async def from_task() -> str:
            async with mesh.async_client() as client:
                return (await client.get("http://inventory/stock/1")).text

        first = await asyncio.create_task(from_task())
        second = await asyncio.to_thread(from_thread)
        await answer(send, 200, f"{first}; {second}".encode())

    return meshlib.MeshMiddleware(app, mesh=mesh, default_timeout=2.0)


def frontend_app(mesh: meshlib.Mesh) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        async with mesh.async_client() as client:
            response = await client.get("http://catalog/items")
        await answer(send, response.status_code, response.content)

    return meshlib.MeshMiddleware(app, mesh=mesh, default_timeout=5.0)


def describe(span: ReadableSpan) -> str:
    attrs = span.attributes or {}
    service = span.resource.attributes.get("service.name")
    kind = span.kind.name
    if kind == "SERVER":
        what = f"{attrs.get('http.request.method')} {attrs.get('url.path')}"
    elif "http.request.resend_count" in attrs:  # a retry or a hedge: a span of its own
        what = f"attempt {attrs['mesh.attempt']} → {attrs['server.address']}:{attrs['server.port']}"
    else:  # the call, which carries its first attempt (an event when more followed)
        first = next((e.attributes for e in span.events if e.name == "mesh.attempt"), attrs)
        sent = f"{first.get('network.peer.address')}:{first.get('network.peer.port')}"
        got = f" {first['http.response.status_code']}" if first is not attrs else ""
        what = (
            f"{span.name} (call, deadline {attrs.get('mesh.deadline_ms')} ms, "
            f"attempt 1 → {sent}{got})"
        )
    status = attrs.get("http.response.status_code", "-")
    return f"{service:<9} {kind:<6} {what}  {status}"


def print_tree(spans: list[ReadableSpan]) -> None:
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        parent = span.parent.span_id if span.parent is not None else None
        children.setdefault(parent, []).append(span)

    def walk(parent: int | None, depth: int) -> None:
        for span in children.get(parent, []):
            print("  " * depth + describe(span))
            walk(span.context.span_id, depth + 1)

    walk(None, 0)


def main() -> None:
    inventory_mesh = meshlib.Mesh.from_text(
        NO_SERVICES, service="inventory", tracer_provider=provider("inventory"), metrics=False
    )
    servers = [Running(inventory_app(inventory_mesh))]
    catalog_mesh = meshlib.Mesh.from_text(
        SERVICE.format(name="inventory", port=servers[0].port) + RETRY,
        service="catalog",
        tracer_provider=provider("catalog"),
        metrics=False,
    )
    servers.append(Running(catalog_app(catalog_mesh)))
    frontend_mesh = meshlib.Mesh.from_text(
        SERVICE.format(name="catalog", port=servers[1].port),
        service="frontend",
        tracer_provider=provider("frontend"),
        metrics=False,
    )
    servers.append(Running(frontend_app(frontend_mesh)))
    try:
        import httpx

        response = httpx.get(f"http://127.0.0.1:{servers[2].port}/checkout")
        print(f"GET /checkout: {response.status_code} {response.text}")
    finally:
        for server in reversed(servers):
            server.stop()  # each SERVER span has ended once its server is down
    spans = list(EXPORTER.get_finished_spans())
    traces = {span.context.trace_id for span in spans}
    print(f"one trace, {len(spans)} spans" if len(traces) == 1 else f"{len(traces)} traces!")
    print_tree(spans)


if __name__ == "__main__":
    main()
