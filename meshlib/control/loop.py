"""The control plane's background event loop: one asyncio loop in a daemon thread that the
registrar (and the discovery driver) run their coroutines on, so a sync caller never blocks on
the registry and one :meth:`LoopThread.stop` ends every loop at once.

A sync program has no loop of its own to lend, and each client part starting its own thread
would multiply threads and shutdown paths; the parts instead take a :class:`LoopThread` (or
make one) and submit coroutines to it. Stopping cancels every task still running, which wakes
every ``asyncio.sleep`` at once (no part polls a flag), then joins the thread, bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread"]

T = TypeVar("T")


class LoopThread:
    """An asyncio loop running in a daemon thread named ``name``; :meth:`start` it first."""

    def __init__(self, name: str = "meshlib-control") -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError(f"{self.name}: the loop is not running (call start() first)")
        return self._loop

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 5.0) -> LoopThread:
        """Start the thread and return once its loop runs (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return self
            ready = threading.Event()
            loop = asyncio.new_event_loop()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                try:
                    loop.run_forever()
                finally:
                    loop.close()

            self._loop = loop
            self._thread = threading.Thread(target=run, name=self.name, daemon=True)
            self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"{self.name}: the loop did not start within {timeout}s")
        return self

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` as a task on the loop (thread-safe); its future completes with it."""
        if not self.running:
            coro.close()  # never awaited: close it so Python does not warn
            raise RuntimeError(f"{self.name}: the loop is not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel every task on the loop, let them unwind, stop the loop and join the thread;
        :class:`TimeoutError` if that takes longer than ``timeout`` seconds."""
        with self._lock:
            thread, loop = self._thread, self._loop
        if thread is None or loop is None or not thread.is_alive():
            return
        if thread is threading.current_thread():
            raise RuntimeError(f"{self.name}: stop() from a task on the loop it would stop")

        async def cancel_all() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            # A task that swallows its cancellation must not hold the loop past the bound.
            if tasks:
                await asyncio.wait(tasks, timeout=timeout)
            loop.stop()

        asyncio.run_coroutine_threadsafe(cancel_all(), loop)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"{self.name}: the loop did not stop within {timeout}s")

    def __repr__(self) -> str:
        return f"<LoopThread {self.name} running={self.running}>"
