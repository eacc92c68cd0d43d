"""A GatewayServer run on a thread of its own, for tests that need its real listeners."""

from __future__ import annotations

import asyncio
import threading

import httpx

from meshlib.gateway.serve import GatewayServer


class RunningGateway:
    """A GatewayServer on its own thread and event loop, as ``meshctl gateway serve`` runs it."""

    def __init__(self, server: GatewayServer, transport: httpx.AsyncBaseTransport) -> None:
        self.server = server
        self.transport = transport
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, name="gateway", daemon=True)
        self.thread.start()
        assert self.started.wait(10), "the gateway did not start"
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            await self.server.start()
        except BaseException as exc:
            self.error = exc
            self.started.set()
            return
        self.started.set()
        try:
            await self.server.wait()
        finally:
            await self.transport.aclose()

    def port(self, listener_port: int) -> int:
        return self.server.bound[listener_port]

    def stop(self) -> None:
        if self.loop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.server.stop)
        self.thread.join(15)
        assert not self.thread.is_alive(), "the gateway did not stop"
