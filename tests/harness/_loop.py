"""A daemon thread running a private asyncio event loop, shared by the harness servers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: Every harness thread name starts with this, so leak checks can find them.
THREAD_PREFIX = "harness-"


class LoopThread:
    """Run an event loop forever in a background thread until :meth:`stop`."""

    def __init__(self, name: str, *, start_timeout: float = 10.0) -> None:
        self.name = THREAD_PREFIX + name
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopped = False
        self.thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self.thread.start()
        if not self._ready.wait(start_timeout):
            raise RuntimeError(f"{self.name}: event loop did not start within {start_timeout}s")

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            try:
                pending = asyncio.all_tasks(self.loop)
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.run_until_complete(self.loop.shutdown_default_executor())
            finally:
                self.loop.close()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run ``coro`` on the loop from another thread and wait (bounded) for its result."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError(f"{self.name}: run() called from the loop thread itself")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"{self.name}: operation did not finish within {timeout}s") from None

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run the plain callable ``fn`` on the loop thread and return its result."""

        async def _call() -> T:
            return fn()

        return self.run(_call(), timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop (cancelling leftover tasks), join the thread; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"{self.name}: thread did not stop within {timeout}s")


def set_linger_rst(sock: Any) -> None:
    """Make the next close() of ``sock`` send a TCP RST instead of a FIN (SO_LINGER 1, 0)."""
    if sock is None:
        return
    with contextlib.suppress(OSError):  # already closed
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def rst_transport(transport: asyncio.BaseTransport) -> None:
    """Abort ``transport`` with a TCP RST (unsent buffered data is discarded)."""
    set_linger_rst(transport.get_extra_info("socket"))
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    else:
        transport.close()
