"""The ASGI apps served by ``benchmarks/inbound.py``, one variant per process.

    python benchmarks/inbound_app.py --variant bare|mesh|naive [--port 0]
    python benchmarks/inbound_app.py --variant tls --svid-dir DIR

Every variant answers ``200 ok`` to any path through the same tiny pure-ASGI app:

* ``bare``: the app alone;
* ``mesh``: the app wrapped in :class:`meshlib.MeshMiddleware` (a minimal policy, no TLS);
* ``naive``: the app wrapped in a hand-written pure-ASGI middleware that, per request, starts an
  OpenTelemetry SDK span (``SimpleSpanProcessor`` + ``InMemorySpanExporter``, cleared every
  1000 spans) and updates two prometheus-client metrics through ``.labels(...)``;
* ``tls``: ``mesh`` served by :func:`meshlib.serve` in strict mTLS mode from ``--svid-dir``.
  Reading stdin, the line ``reload`` times ``Server.reload_svid()`` and answers
  ``RELOAD <seconds> <swapped>`` on stdout.

``GET /__cpu`` (handled outside the variant's middleware, identically for every variant) answers
this process's CPU time in nanoseconds (``time.process_time_ns``), so the benchmark reads server
CPU at nanosecond resolution instead of /proc's 10 ms ticks. ``bare``/``mesh``/``naive`` run
uvicorn exactly like ``benchmarks/server.py``: 1 worker, asyncio loop, h11, no access log, on a
socket bound to 127.0.0.1 whose port is printed as ``PORT <n>`` once it listens.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

VARIANTS = ("bare", "mesh", "naive", "tls")
SERVICE = "bench"
TRUST_DOMAIN = "bench.test"

_BODY = b"ok"
_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"2")]


def policy_yaml(*, mtls: str = "disable") -> str:
    """A Mesh (trust domain, mTLS mode) and one Service ``bench`` with no endpoints."""
    return (
        "apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: mesh}\n"
        f"spec: {{trustDomain: {TRUST_DOMAIN}, mtls: {mtls}}}\n"
        "---\n"
        "apiVersion: meshlib/v1\nkind: Service\n"
        f"metadata: {{name: {SERVICE}, namespace: default}}\n"
        "spec: {endpoints: []}\n"
    )


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The app every variant serves: ``200 ok``."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})


class NaiveMiddleware:
    """What a team writes by hand: a span and two labelled metrics per request (pure ASGI)."""

    def __init__(self, app: ASGIApp) -> None:
        import prometheus_client
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.app = app
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = provider.get_tracer("naive-inbound")
        self.registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter(
            "naive_inbound_requests_total",
            "Inbound requests by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.duration = prometheus_client.Histogram(
            "naive_inbound_request_duration_seconds",
            "Inbound request latency.",
            ["method"],
            registry=self.registry,
        )
        self.spans = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        method = scope.get("method", "")
        status = 500

        async def observing_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        with self.tracer.start_as_current_span(
            f"{method} {scope.get('path', '')}",
            attributes={"http.method": method, "http.target": scope.get("path", "")},
        ) as span:
            try:
                await self.app(scope, receive, observing_send)
            finally:
                span.set_attribute("http.status_code", status)
                self.requests.labels(method=method, code=str(status)).inc()
                self.duration.labels(method=method).observe(time.perf_counter() - start)
        self.spans += 1
        if self.spans >= 1000:  # bounded memory: "export" to nowhere
            self.exporter.clear()
            self.spans = 0


def with_cpu_endpoint(app: ASGIApp) -> ASGIApp:
    """``GET /__cpu`` answers this process's CPU time (ns); everything else goes to ``app``."""

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/__cpu":
            body = str(time.process_time_ns()).encode()
            headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    return outer


def build(variant: str, *, mtls: str = "disable") -> ASGIApp:
    if variant == "bare":
        return with_cpu_endpoint(ok_app)
    if variant == "naive":
        return with_cpu_endpoint(NaiveMiddleware(ok_app))
    if variant in ("mesh", "tls"):
        import meshlib

        mesh = meshlib.Mesh.from_text(policy_yaml(mtls=mtls), service=SERVICE, namespace="default")
        return with_cpu_endpoint(meshlib.MeshMiddleware(ok_app, mesh=mesh))
    raise ValueError(f"unknown variant {variant!r}")


def serve_plain(app: ASGIApp, port: int) -> None:
    import uvicorn

    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets whose proto says TCP.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sys.stdout.write(f"PORT {sock.getsockname()[1]}\n")
    sys.stdout.flush()
    config = uvicorn.Config(
        app,
        workers=1,
        loop="asyncio",
        http="h11",
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=300,
    )
    uvicorn.Server(config).run(sockets=[sock])


def serve_tls(svid_dir: Path, port: int) -> None:
    """``meshlib.serve`` strict mTLS on a thread; stdin drives reloads; EOF stops it."""
    import meshlib

    mesh = meshlib.Mesh.from_text(policy_yaml(mtls="strict"), service=SERVICE, namespace="default")
    app = with_cpu_endpoint(meshlib.MeshMiddleware(ok_app, mesh=mesh))
    server = meshlib.serve(
        app,
        mesh=mesh,
        port=port,
        svid_dir=str(svid_dir),
        mode="strict",
        loop="asyncio",
        access_log=False,
        log_level="warning",
        lifespan="off",
        timeout_keep_alive=300,
    )
    sys.stdout.write(f"PORT {server.port}\n")
    sys.stdout.flush()
    try:
        for line in sys.stdin:
            if line.strip() != "reload":
                continue
            t0 = time.perf_counter()
            try:
                swapped = server.reload_svid()
                answer = f"RELOAD {time.perf_counter() - t0:.9f} {int(swapped)}"
            except Exception as exc:  # reported to the benchmark, which fails the row
                answer = f"RELOAD-ERROR {type(exc).__name__}: {exc}"
            sys.stdout.write(answer + "\n")
            sys.stdout.flush()
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = any free)")
    parser.add_argument("--svid-dir", type=Path, help="tls: directory with cert/key/bundle.pem")
    args = parser.parse_args(argv)
    repo_root = str(Path(__file__).resolve().parent.parent)
    if repo_root not in sys.path:  # serve the checkout, installed or not
        sys.path.insert(0, repo_root)
    try:
        if args.variant == "tls":
            if args.svid_dir is None:
                parser.error("--variant tls needs --svid-dir")
            serve_tls(args.svid_dir, args.port)
        else:
            serve_plain(build(args.variant), args.port)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
