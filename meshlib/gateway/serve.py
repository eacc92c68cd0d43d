"""Running the ingress gateway: one uvicorn server per Gateway listener port, all in one event
loop, each serving :func:`meshlib.gateway.app.edge_stack` of its port; HTTPS ports with the SNI
context of :mod:`meshlib.gateway.tls`; stopped gracefully on SIGTERM or SIGINT.

Slow clients (slowloris) are bounded three ways:

* ``header_timeout``: the request head (request line and headers) must be complete this long
  after the connection opens, or after the previous response on a kept-alive connection; else
  the connection is closed. uvicorn has no such timeout of its own (its ``timeout_keep_alive``
  stops at the first byte of the next request), so the gateway's h11 protocol class adds it,
  as nginx's ``client_header_timeout`` and Envoy's ``request_headers_timeout`` do;
* ``timeout_keep_alive``: an idle kept-alive connection is closed after this long (uvicorn's);
* ``h11_max_incomplete_event_size``: an unfinished head larger than the edge limits (header
  bytes plus URL plus a margin) is refused before it is buffered further.

* ``body_timeout``: while a request body is being received, the longest pause between two
  reads of it (nginx's ``client_body_timeout``); past it the connection is closed, which the
  app sees as the client gone (the call into the mesh is cancelled). Time during which the
  server itself stopped reading (flow control: the backend is slower than the client) does
  not count. A body that trickles faster than that is bounded by the route's request timeout
  (:class:`~meshlib.gateway.app.GatewayApp` answers **408**) and the body limit.

WebSocket upgrades are served by uvicorn's wsproto protocol (``ws="wsproto"``, the ``gateway``
extra; without wsproto installed, upgrades reach the app as plain requests and are answered
501) without per-message deflate, messages bounded by
:attr:`~meshlib.gateway.edge.EdgeLimits.max_websocket_message_bytes` (``ws_max_size``).

uvicorn's ``proxy_headers`` is off: the peer address the
edge writes into ``x-forwarded-for`` is the socket's, never a header's.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from meshlib.gateway.app import ASGIApp, GatewayApp, edge_stack
from meshlib.gateway.edge import EdgeLimits, head_refusal
from meshlib.gateway.tls import SniContext
from meshlib.inbound.middleware import InboundHost

if TYPE_CHECKING:
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["EdgeTimeouts", "GatewayMetrics", "GatewayServer", "announce", "head_limit"]

log = logging.getLogger("meshlib.gateway")

#: Room for the request line's method, version and separators beyond the URL and headers.
_HEAD_MARGIN = 1024


@dataclass(frozen=True)
class EdgeTimeouts:
    """Connection timeouts of the gateway's listeners, in seconds (see the module docstring).
    ``shutdown_grace``: how long in-flight requests may finish after SIGTERM."""

    header_timeout: float = 10.0  # nginx client_header_timeout: 60 s; Envoy: none by default
    body_timeout: float = 60.0  # nginx client_body_timeout; Envoy: stream_idle_timeout 5 min
    keep_alive: float = 5.0  # uvicorn's default
    shutdown_grace: float = 10.0


@runtime_checkable
class GatewayMetrics(Protocol):
    """Metrics that can say a process is an ingress gateway
    (:class:`meshlib.observe.metrics.MeshMetrics`)."""

    def set_gateway(self, service: str, gateway: str) -> None: ...


def announce(inbound: InboundHost, app: GatewayApp) -> None:
    """Mark the gateway mesh's metrics with the Gateway it serves (``mesh_gateway_info``), so
    ``meshctl graph`` draws this process as the entry node and its unauthenticated callers as
    clients outside the mesh."""
    metrics = inbound.metrics
    if isinstance(metrics, GatewayMetrics):
        gateway = app.gateway
        service = f"{inbound.service}.{inbound.namespace}"
        metrics.set_gateway(service, f"{gateway.namespace}/{gateway.name}")


def head_limit(limits: EdgeLimits) -> int | None:
    """h11's ``max_incomplete_event_size`` for the edge limits: the largest head the limits
    allow, so check_request (not h11) answers a head within them; None: h11's default."""
    if limits.max_header_bytes is None or limits.max_url_length is None:
        return None
    return limits.max_header_bytes + limits.max_url_length + _HEAD_MARGIN


def _can_pass_websockets() -> bool:
    """Whether wsproto (the ``gateway`` extra) is installed: without it the listeners take no
    WebSocket upgrades, and the app answers them 501 (uvicorn would refuse to start)."""
    return importlib.util.find_spec("wsproto") is not None


def _protocol_class(header_timeout: float, body_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a timer on the request head and one on pauses in the
    request body (slowloris), and the head's line endings checked before h11 reads them."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class EdgeH11Protocol(H11Protocol):
        head_timer: asyncio.TimerHandle | None = None
        body_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.arm_head_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            state = self.conn.their_state
            if state is not h11.IDLE:  # a whole request head has arrived
                self.disarm_head_timer()
            if state is h11.SEND_BODY and not self.transport.is_closing():
                self.arm_body_timer()  # each read of the body restarts it
            else:
                self.disarm_body_timer()

        def handle_events(self) -> None:
            # Every head h11 is about to parse, read or pipelined, is checked first: while the
            # client's side is IDLE, h11's buffer holds the next head from its first byte.
            if self.conn.their_state is h11.IDLE:
                buffered, _ = self.conn.trailing_data
                refusal = head_refusal(buffered) if buffered else None
                if refusal is not None:
                    log.info("refused a request head from %s: %s", self.client, refusal.detail)
                    self.send_400_response(refusal.detail)
                    return
            super().handle_events()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm_head_timer()
            self.disarm_body_timer()
            super().connection_lost(exc)

        def arm_head_timer(self) -> None:
            self.disarm_head_timer()
            self.head_timer = self.loop.call_later(header_timeout, self.head_timed_out)

        def disarm_head_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def arm_body_timer(self) -> None:
            self.disarm_body_timer()
            self.body_timer = self.loop.call_later(body_timeout, self.body_timed_out)

        def disarm_body_timer(self) -> None:
            if self.body_timer is not None:
                self.body_timer.cancel()
                self.body_timer = None

        def body_timed_out(self) -> None:
            self.body_timer = None
            if self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing():
                return
            if self.flow.read_paused:  # the server is not reading: the client is not to blame
                self.arm_body_timer()
                return
            log.info("closing a connection from %s: the request body stalled", self.client)
            self.transport.close()

        def head_timed_out(self) -> None:
            self.head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closing a connection from %s: no request head in time", self.client)
                self.transport.close()

    return EdgeH11Protocol


class GatewayServer:
    """The listeners of one :class:`~meshlib.gateway.app.GatewayApp`.

    ``inbound`` is the gateway's mesh (its MeshMiddleware wraps each port); ``contexts`` the
    SNI contexts of the HTTPS ports (:func:`meshlib.gateway.tls.listener_contexts`); ``ports``
    maps a Gateway listener port to the port actually bound (0: any free port); ``host`` is the
    bind address. After :meth:`start`, :attr:`bound` maps each listener port to its real port.
    ``metrics`` (an ASGI app, e.g. :func:`meshlib.metrics_app`) is served on its own port,
    ``metrics_port`` on 127.0.0.1 only (0: a free one; :attr:`metrics_bound` after start),
    never on a public listener: ``meshctl graph`` scrapes it.
    """

    def __init__(
        self,
        app: GatewayApp,
        inbound: InboundHost,
        *,
        contexts: Mapping[int, SniContext] | None = None,
        host: str = "127.0.0.1",
        ports: Mapping[int, int] | None = None,
        timeouts: EdgeTimeouts = EdgeTimeouts(),
        trust_trace_context: bool = False,
        metrics: ASGIApp | None = None,
        metrics_port: int = 0,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.metrics_port = metrics_port
        self.metrics_bound: int | None = None
        self.inbound = inbound
        self.contexts = dict(contexts or {})
        self.host = host
        self.ports = dict(ports or {})
        self.timeouts = timeouts
        self.trust_trace_context = trust_trace_context
        self.bound: dict[int, int] = {}
        self._servers: list[uvicorn.Server] = []
        self._stopping: asyncio.Event | None = None

    @property
    def listener_ports(self) -> tuple[int, ...]:
        return tuple(sorted({item.port for item in self.app.gateway.listeners}))

    def scheme(self, port: int) -> str:
        return "https" if port in self.contexts else "http"

    async def start(self) -> None:
        """Bind every listener port (in this event loop); raises OSError if one cannot be."""
        import uvicorn

        protocol = _protocol_class(self.timeouts.header_timeout, self.timeouts.body_timeout)
        announce(self.inbound, self.app)
        self._stopping = asyncio.Event()
        try:
            for port in self.listener_ports:
                options: dict[str, Any] = {
                    "host": self.host,
                    "port": self.ports.get(port, port),
                    "http": protocol,
                    "lifespan": "off",
                    "log_config": None,
                    "access_log": False,  # the mesh's access log (MeshMiddleware) is the record
                    "proxy_headers": False,
                    "server_header": False,
                    "timeout_keep_alive": self.timeouts.keep_alive,
                    "timeout_graceful_shutdown": self.timeouts.shutdown_grace,
                    "h11_max_incomplete_event_size": head_limit(self.app.limits),
                    # WebSocket handshakes reach the app as ``websocket`` scopes (the
                    # pass-through); no per-message deflate at the edge: a small compressed
                    # frame may not cost the gateway a large inflated message.
                    "ws": "wsproto" if _can_pass_websockets() else "none",
                    "ws_per_message_deflate": False,
                }
                ws_max = self.app.limits.max_websocket_message_bytes
                if ws_max is not None:
                    options["ws_max_size"] = ws_max
                app = edge_stack(
                    self.app.on_port(port),
                    self.inbound,
                    trust_trace_context=self.trust_trace_context,
                )
                config = uvicorn.Config(app, **options)
                config.load()
                sni = self.contexts.get(port)
                if sni is not None:
                    config.ssl = sni.context  # set after load(), which would reset it
                server = uvicorn.Server(config)
                server.lifespan = config.lifespan_class(config)  # as Server.serve() sets it
                try:
                    await server.startup()
                except SystemExit:  # uvicorn exits when it cannot bind
                    raise OSError(
                        f"cannot listen on {self.host}:{options['port']} for the Gateway's "
                        f"port {port}"
                    ) from None
                self._servers.append(server)
                self.bound[port] = int(server.servers[0].sockets[0].getsockname()[1])
            if self.metrics is not None:
                self.metrics_bound = await self._serve_metrics(self.metrics)
        except BaseException:
            await self._shutdown()
            raise

    async def _serve_metrics(self, app: ASGIApp) -> int:
        import uvicorn

        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.metrics_port,
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup()
        except SystemExit:
            raise OSError(f"cannot serve metrics on 127.0.0.1:{self.metrics_port}") from None
        self._servers.append(server)
        return int(server.servers[0].sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Ask every listener to stop (safe from a signal handler on the loop)."""
        for server in self._servers:
            server.should_exit = True
        if self._stopping is not None:
            self._stopping.set()

    async def wait(self) -> None:
        """Serve until :meth:`stop`, then stop gracefully: listeners close, idle connections
        close, in-flight requests get ``shutdown_grace`` seconds."""
        try:
            await asyncio.gather(*(server.main_loop() for server in self._servers))
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        servers, self._servers = self._servers, []
        await asyncio.gather(*(server.shutdown() for server in servers), return_exceptions=True)
        for server in servers:
            # What the grace left open is cut, so no socket outlives the loop.
            for connection in list(server.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abort()

    async def run(self, *, on_started: Callable[[GatewayServer], None] | None = None) -> None:
        """:meth:`start`, stop on SIGTERM or SIGINT, :meth:`wait`; ``on_started(self)`` is
        called once every port listens."""
        await self.start()
        loop = asyncio.get_running_loop()
        handled: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stop)
                handled.append(sig)
            except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
                pass
        try:
            if on_started is not None:
                on_started(self)
            await self.wait()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
