"""Run a real uvicorn server for an ASGI app on a background thread, for end-to-end tests.

Usage::

    with run_uvicorn(app) as srv:          # binds 127.0.0.1 on a free port
        httpx.get(srv.url + "/x")

The server is driven by hand (``Server.startup()`` / a custom fast shutdown) on a
:class:`~harness._loop.LoopThread` rather than through ``Server.run()``: that avoids
uvicorn's 100 ms main-loop tick and its fixed 100 ms sleep during shutdown, so start
and stop each take a few milliseconds. Signal handlers are never installed (uvicorn
0.54's ``capture_signals`` is a no-op off the main thread anyway, and we do not call it).
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any

import uvicorn

from ._loop import LoopThread

_TICK_SECONDS = 1.0  # refresh of uvicorn's cached Date header


class ServerHandle:
    """A running uvicorn server; :meth:`stop` (or leaving the ``with`` block) shuts it down."""

    def __init__(
        self,
        server: uvicorn.Server,
        loop_thread: LoopThread,
        host: str,
        port: int,
        ticker: asyncio.Task[None],
        shutdown_grace: float,
    ) -> None:
        self.server = server
        self.host = host
        self.port = port
        self._loop_thread = loop_thread
        self._ticker = ticker
        self._shutdown_grace = shutdown_grace
        self._stopped = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def thread_name(self) -> str:
        return self._loop_thread.name

    @property
    def alive(self) -> bool:
        return self._loop_thread.alive

    @property
    def open_connections(self) -> int:
        """Number of client connections uvicorn currently holds open."""
        return len(self.server.server_state.connections)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, let in-flight responses finish for ``shutdown_grace`` s, then abort.

        Idempotent. Raises if the server thread does not exit within ``timeout``.
        """
        if self._stopped:
            return
        self._stopped = True
        try:
            self._loop_thread.run(self._shutdown(), timeout)
        finally:
            self._loop_thread.stop(timeout)

    async def _shutdown(self) -> None:
        server = self.server
        state = server.server_state
        loop = asyncio.get_running_loop()
        self._ticker.cancel()
        server.should_exit = True
        for listener in server.servers:
            listener.close()
        # Idle keep-alive connections close now; busy ones close after their response.
        for conn in list(state.connections):
            conn.shutdown()
        deadline = loop.time() + self._shutdown_grace
        while (state.connections or state.tasks) and loop.time() < deadline:
            await asyncio.sleep(0.005)
        # Abort whatever is left (e.g. a "hang" request whose client never went away);
        # the app then sees http.disconnect and returns.
        for conn in list(state.connections):
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abort()
        deadline = loop.time() + 1.0
        while state.tasks and loop.time() < deadline:
            await asyncio.sleep(0.005)
        for task in list(state.tasks):
            task.cancel()
        for listener in server.servers:
            await listener.wait_closed()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ServerHandle {self.url} stopped={self._stopped}>"


async def _tick(server: uvicorn.Server) -> None:
    while True:
        await asyncio.sleep(_TICK_SECONDS)
        await server.on_tick(0)


async def _startup(server: uvicorn.Server) -> tuple[int, asyncio.Task[None]]:
    config = server.config
    if not config.loaded:
        config.load()
    server.lifespan = config.lifespan_class(config)
    try:
        await server.startup()
    except SystemExit as exc:  # uvicorn calls sys.exit() when bind() fails
        raise RuntimeError(
            f"uvicorn failed to start on {config.host}:{config.port} (see uvicorn.error log)"
        ) from exc
    if not server.started:
        raise RuntimeError("uvicorn startup returned without setting server.started")
    await server.on_tick(0)  # fills the default (Date) headers, as Server.main_loop would
    sockets = server.servers[0].sockets
    port = int(sockets[0].getsockname()[1])
    return port, asyncio.ensure_future(_tick(server))


def run_uvicorn(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout_keep_alive: float = 5,
    shutdown_grace: float = 0.5,
    startup_timeout: float = 10.0,
    name: str | None = None,
    **config_kwargs: Any,
) -> ServerHandle:
    """Start ``app`` under a real uvicorn (h11, asyncio loop) and return once it listens.

    ``port=0`` picks a free port (read back from the listening socket).
    ``timeout_keep_alive`` is uvicorn's idle keep-alive (seconds, floats work).
    ``shutdown_grace`` bounds how long :meth:`ServerHandle.stop` waits for in-flight
    requests before aborting their connections. Extra keyword arguments go to
    :class:`uvicorn.Config`.
    """
    options: dict[str, Any] = {
        "lifespan": "off",
        "log_level": "warning",
        "log_config": None,  # do not dictConfig() global logging for every server
        "access_log": False,
        "timeout_keep_alive": timeout_keep_alive,
    }
    options.update(config_kwargs)
    config = uvicorn.Config(app, host=host, port=port, **options)
    server = uvicorn.Server(config)
    label = name or getattr(app, "name", None) or type(app).__name__
    loop_thread = LoopThread(f"uvicorn-{label}")
    try:
        bound_port, ticker = loop_thread.run(_startup(server), startup_timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            loop_thread.stop()
        raise
    return ServerHandle(server, loop_thread, host, bound_port, ticker, shutdown_grace)
