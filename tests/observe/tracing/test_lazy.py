"""OpenTelemetry loads only when something needs it (issue 15, item 3), and nothing is lost.

Each test runs a fresh interpreter (this process has OpenTelemetry loaded already) against a
real echo server: a mesh built and used without OpenTelemetry never imports it; an SDK set up
*after* the mesh was built still records the calls; an incoming W3C trace context is still
carried on to the calls a handler makes, with no SDK at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from .conftest import service_yaml, traceparent_ids

pytestmark = pytest.mark.timeout(60)

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def run_child(code: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; it prints one JSON line, returned parsed."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def otel_loaded() -> str:
    return "[m for m in sys.modules if m.startswith('opentelemetry')]"


def test_an_sdk_set_up_after_the_mesh_still_records_its_calls(echo_factory) -> None:
    backend = echo_factory("backend")
    code = f"""
import json, sys, meshlib
mesh = meshlib.Mesh.from_text({service_yaml("backend", backend.port)!r}, service="app")
with mesh.client() as client:
    first = client.get("http://backend/before").json()["headers"]
loaded_before = {otel_loaded()}

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
with mesh.client() as client:
    second = client.get("http://backend/after").json()["headers"]
spans = [(s.name, s.kind.name, format(s.context.span_id, "016x"))
         for s in exporter.get_finished_spans()]
print(json.dumps(dict(loaded_before=loaded_before, first=first, second=second, spans=spans)))
"""
    out = run_child(code)
    assert out["loaded_before"] == []  # no SDK, no context: OpenTelemetry never loaded
    assert "traceparent" not in out["first"]
    assert out["spans"] == [["GET backend", "CLIENT", out["spans"][0][2]]]
    _, span_id, flags = traceparent_ids(out["second"]["traceparent"])
    assert format(span_id, "016x") == out["spans"][0][2] and flags & 1  # sampled


def test_an_incoming_trace_context_is_carried_on_without_an_sdk(echo_factory) -> None:
    backend = echo_factory("backend")
    code = f"""
import asyncio, json, sys, meshlib
mesh = meshlib.Mesh.from_text({service_yaml("backend", backend.port)!r}, service="app")
seen = {{}}

async def app(scope, receive, send):
    async with mesh.async_client() as client:
        seen.update((await client.get("http://backend/next")).json()["headers"])
    await send({{"type": "http.response.start", "status": 200, "headers": []}})
    await send({{"type": "http.response.body", "body": b"ok"}})

async def receive():
    return {{"type": "http.request", "body": b"", "more_body": False}}

async def send(message):
    pass

def request(headers):
    scope = {{"type": "http", "method": "GET", "path": "/", "raw_path": b"/",
             "query_string": b"", "headers": [(b"host", b"app"), *headers],
             "scheme": "http", "server": ("127.0.0.1", 9080),
             "client": ("127.0.0.1", 50000), "http_version": "1.1"}}
    asyncio.run(meshlib.MeshMiddleware(app, mesh=mesh)(scope, receive, send))
    return dict(seen)

plain = request([])
loaded_plain = {otel_loaded()}
carried = request([(b"traceparent", {PARENT.encode()!r})])
sdk = "opentelemetry.sdk" in sys.modules
print(json.dumps(dict(plain=plain, loaded_plain=loaded_plain, carried=carried, sdk=sdk)))
"""
    out = run_child(code)
    assert "traceparent" not in out["plain"] and out["loaded_plain"] == []
    assert out["sdk"] is False
    trace_id, span_id, flags = traceparent_ids(out["carried"]["traceparent"])
    assert (trace_id, span_id, flags) == (TRACE_ID, 0x00F067AA0BA902B7, 1)


def test_a_provider_named_by_the_environment_is_used_with_no_import(echo_factory) -> None:
    """``OTEL_PYTHON_TRACER_PROVIDER``: the API loads the SDK's provider by itself, so the
    application imports nothing from OpenTelemetry and its calls are still traced."""
    backend = echo_factory("backend")
    code = f"""
import json, meshlib
mesh = meshlib.Mesh.from_text({service_yaml("backend", backend.port)!r}, service="app")
with mesh.client() as client:
    headers = client.get("http://backend/").json()["headers"]
print(json.dumps(dict(headers=headers)))
"""
    out = run_child(code, {"OTEL_PYTHON_TRACER_PROVIDER": "sdk_tracer_provider"})
    _, _, flags = traceparent_ids(out["headers"]["traceparent"])  # a span of the SDK's
    assert flags & 1
