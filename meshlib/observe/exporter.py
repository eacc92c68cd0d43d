"""Serving the mesh's metrics: an ASGI ``/metrics`` app to mount, a standalone exporter.

Both read a prometheus-client registry — the one given to ``Mesh(registry=...)``, or the
default one, as ``Mesh`` itself does. prometheus-client is imported when they are called, not
when this module is, so ``import meshlib`` stays light.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING

from meshlib.inbound.middleware import UNCOUNTED
from meshlib.observe.asgi import Receive, Scope, Send, answer_lifespan

if TYPE_CHECKING:
    import threading
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def metrics_app(
    registry: CollectorRegistry | None = None, *, app: ASGIApp | None = None, path: str = "/metrics"
) -> MetricsApp:
    """The registry's metrics as an ASGI app (see :class:`MetricsApp`).

    Alone (``app=None``) it answers every HTTP request with the metrics: mount it
    (``Mount("/metrics", metrics_app())`` in Starlette, ``app.mount(...)`` in FastAPI; both then
    answer at ``/metrics/``, the router redirecting ``/metrics`` there or handing it to a
    sibling route) or serve it bare. In front of an application (``metrics_app(app=api)``)
    it answers ``path`` and ``path/`` itself and passes every other request on, so scrapes
    never reach the application's middleware and ``/metrics`` needs no redirect.
    """
    return MetricsApp(app, registry=registry, path=path)


class MetricsApp:
    """The Prometheus text format by default, OpenMetrics when the scraper asks for it in
    ``Accept`` (as Prometheus does), gzip when ``Accept-Encoding`` allows it.

    Requests it answers are marked in the scope (:data:`UNCOUNTED`): when it is mounted behind
    ``MeshMiddleware`` (FastAPI's ``add_middleware`` wraps the mounts too) the middleware
    leaves the scrape out of the request metrics, the tap and top (its authorization decision
    is still counted). A class, not a function, so that
    Starlette's ``Route("/metrics", ...)`` treats it as an ASGI app, and so that
    ``add_middleware(MetricsApp)`` puts it in front of an application.
    """

    def __init__(
        self,
        app: ASGIApp | None = None,
        *,
        registry: CollectorRegistry | None = None,
        path: str = "/metrics",
    ) -> None:
        from prometheus_client import REGISTRY, make_asgi_app

        if not path.startswith("/"):
            raise ValueError(f"the metrics path must start with '/', not {path!r}")
        self.app = app
        self.path = path.rstrip("/") or "/"
        self._paths = {self.path, self.path.rstrip("/") + "/"}
        self._exposition = make_asgi_app(registry if registry is not None else REGISTRY)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is not None and (
            scope["type"] != "http" or scope.get("path", "") not in self._paths
        ):
            await self.app(scope, receive, send)  # the application's own paths and lifespan
        elif scope["type"] == "http":
            scope[UNCOUNTED] = "metrics"
            await self._exposition(scope, receive, send)
        elif scope["type"] == "lifespan":
            await answer_lifespan(receive, send)


class MetricsServer:
    """A running standalone exporter (see :func:`start_metrics_server`); :meth:`stop` it, or
    use it as a context manager."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host = str(server.server_address[0])
        self.port = int(server.server_address[1])

    @property
    def url(self) -> str:
        """The exporter's base URL (every path answers with the metrics)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close the socket and wait for the server thread. Idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def start_metrics_server(
    port: int, addr: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> MetricsServer:
    """Serve the registry's metrics over HTTP from a daemon thread, for programs that are not
    ASGI applications (a worker, a CLI, a sync web app). ``port=0`` picks a free port (read it
    back from ``.port``). Loopback by default: exposing metrics is the caller's choice."""
    from prometheus_client import REGISTRY, start_http_server

    server, thread = start_http_server(
        port, addr=addr, registry=registry if registry is not None else REGISTRY
    )
    return MetricsServer(server, thread)
