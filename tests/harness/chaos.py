"""Chaos proxy: an asyncio TCP proxy on a background thread that injects network faults at runtime.

Put it between the client under test and any backend (echo, raw server, ...)::

    proxy = ChaosProxy(backend.url).start()      # or ChaosProxy(("127.0.0.1", port))
    httpx.get(proxy.url)                          # mode "pass": bytes flow unchanged
    proxy.set_mode("refuse")                      # new connects get ECONNREFUSED
    proxy.set_mode("blackhole")                   # accepted, never answered
    proxy.set_mode("reset_after", n=100)          # 100 response bytes then RST
    proxy.close()                                 # closes every socket it owns

``set_mode`` is synchronous: when it returns the mode is in force. Data-path modes
apply live to existing connections too (checked per chunk); ``refuse`` only
affects new connects unless ``kill_existing=True`` (which RSTs every open
connection, e.g. pooled keep-alive ones, whatever the new mode).

Modes and parameters:

``pass``
    Forward both directions unchanged (EOF is propagated as a half-close).
``refuse``
    ``how="close_listener"`` (default): close the listening socket so connects
    fail with ECONNREFUSED (httpx ``ConnectError``); it is re-bound on the same
    port when the mode changes. ``how="rst"``: accept, then RST at once (the TCP
    connect succeeds; the client's first read fails).
``blackhole``
    Accept (kernel completes the handshake and buffers the request) but never
    read, write or connect upstream; existing connections stop forwarding. Data
    flow resumes if the mode changes back. Client sees a read timeout.
``delay``
    ``seconds`` (fixed) + uniform ``jitter`` before forwarding each chunk;
    ``direction`` is ``"both"`` (default), ``"upstream"`` (client→backend) or
    ``"downstream"`` (backend→client).
``bandwidth``
    ``rate`` bytes/second per direction (``direction`` as for delay).
``reset_after``
    Forward ``n`` bytes in ``direction`` (default ``"downstream"``, i.e. of the
    response), counted from when the mode was set, then RST the client and
    close the upstream connection.
``half_close``
    Forward ``n`` (default 0) response bytes, then send FIN to the client while
    still forwarding the client's bytes upstream; further response bytes are
    dropped.

Counters: ``connections`` (accepted), ``active``, ``resets`` (RSTs injected),
``bytes_up``, ``bytes_down``; :meth:`wait_until` blocks on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from ._loop import LoopThread, rst_transport

MODES = frozenset(
    {"pass", "refuse", "blackhole", "delay", "bandwidth", "reset_after", "half_close"}
)
_CHUNK = 64 * 1024


class _Reset(Exception):
    """A pump decided to RST the client connection."""


@dataclass
class _Mode:
    name: str = "pass"
    params: dict[str, Any] = field(default_factory=dict)
    generation: int = 0

    def applies(self, direction: str, default: str = "both") -> bool:
        wanted = self.params.get("direction", default)
        return wanted in ("both", direction)


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    counted: dict[str, tuple[int, int]] = field(default_factory=dict)  # dir -> (gen, bytes)


class ChaosProxy:
    """TCP fault-injection proxy; see the module docstring."""

    def __init__(
        self,
        upstream: str | tuple[str, int],
        *,
        name: str = "chaos",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if isinstance(upstream, str):
            parts = urlsplit(upstream if "//" in upstream else f"//{upstream}")
            if parts.hostname is None or parts.port is None:
                raise ValueError(f"upstream needs host and port: {upstream!r}")
            upstream = (parts.hostname, parts.port)
        self.upstream = upstream
        self.name = name
        self.host = host
        self.port = port
        self._mode = _Mode()
        self._cond = threading.Condition(threading.Lock())
        self._loop_thread: LoopThread | None = None
        self._listener: asyncio.Server | None = None
        self._changed: asyncio.Event | None = None
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0
        self.active = 0
        self.resets = 0
        self.bytes_up = 0
        self.bytes_down = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> ChaosProxy:
        if self._loop_thread is not None:
            raise RuntimeError("ChaosProxy already started")
        self._loop_thread = LoopThread(f"chaos-{self.name}")
        try:
            self._loop_thread.run(self._listen())
        except BaseException:
            self._loop_thread.stop()
            raise
        return self

    async def _listen(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        self._listener = await asyncio.start_server(self._on_connection, self.host, self.port)
        self.port = int(self._listener.sockets[0].getsockname()[1])

    async def _unlisten(self, *, wait: bool = False) -> None:
        # No wait_closed() while connections may be open: from Python 3.12 it waits
        # for every connection the listener accepted, not just the listening socket.
        if self._listener is not None:
            self._listener.close()
            if wait:
                await self._listener.wait_closed()
            self._listener = None

    def close(self, timeout: float = 5.0) -> None:
        """Close the listener and every client/upstream socket, stop the thread; idempotent."""
        if self._loop_thread is None or not self._loop_thread.alive:
            return
        try:
            self._loop_thread.run(self._close(), timeout)
        finally:
            self._loop_thread.stop(timeout)

    async def _close(self) -> None:
        listener = self._listener
        await self._unlisten()
        self._abort_all(rst=False)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if listener is not None:
            await listener.wait_closed()

    stop = close

    def __enter__(self) -> ChaosProxy:
        return self if self._loop_thread is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def thread_name(self) -> str:
        return self._loop_thread.name if self._loop_thread is not None else ""

    @property
    def alive(self) -> bool:
        return self._loop_thread is not None and self._loop_thread.alive

    @property
    def mode(self) -> str:
        return self._mode.name

    # ------------------------------------------------------------------ control
    def set_mode(self, mode: str, *, kill_existing: bool = False, **params: Any) -> None:
        """Switch mode (in force when this returns); see the module docstring."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
        if self._loop_thread is None:
            raise RuntimeError("ChaosProxy not started")
        self._loop_thread.run(self._set_mode(_Mode(mode, params), kill_existing))

    async def _set_mode(self, mode: _Mode, kill_existing: bool) -> None:
        mode.generation = self._mode.generation + 1
        self._mode = mode
        if kill_existing:
            self._abort_all(rst=True)
        closing = mode.name == "refuse" and mode.params.get("how", "close_listener") != "rst"
        if closing and self._listener is not None:
            await self._unlisten()
        elif not closing and self._listener is None:
            await self._listen()
        assert self._changed is not None
        self._changed.set()
        self._changed = asyncio.Event()

    def wait_until(self, predicate: Callable[[ChaosProxy], bool], timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def _bump(self, **deltas: int) -> None:
        with self._cond:
            for attr, delta in deltas.items():
                setattr(self, attr, getattr(self, attr) + delta)
            self._cond.notify_all()

    def _abort_all(self, *, rst: bool) -> None:
        for conn in list(self._conns):
            for writer in (conn.client, conn.upstream):
                if writer is None:
                    continue
                if rst:
                    rst_transport(writer.transport)
                else:
                    writer.transport.abort()

    async def _while_blackholed(self) -> None:
        while self._mode.name == "blackhole":
            assert self._changed is not None
            await self._changed.wait()

    # ------------------------------------------------------------------ data path
    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = _Conn(writer)
        self._tasks.add(task)
        self._conns.add(conn)
        self._bump(connections=1, active=1)
        try:
            if self._mode.name == "refuse":
                rst_transport(writer.transport)
                self._bump(resets=1)
                return
            await self._while_blackholed()
            up_reader, conn.upstream = await asyncio.open_connection(*self.upstream)
            pumps = [
                asyncio.ensure_future(self._pump(conn, reader, conn.upstream, "upstream")),
                asyncio.ensure_future(self._pump(conn, up_reader, writer, "downstream")),
            ]
            try:
                done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
                failed = [p for p in done if not p.cancelled() and p.exception() is not None]
                if failed:  # injected reset, or a real one on either side: RST the client
                    rst_transport(writer.transport)
                    if any(isinstance(p.exception(), _Reset) for p in failed):
                        self._bump(resets=1)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            rst_transport(writer.transport)  # upstream unreachable or proxy closing
        finally:
            if conn.upstream is not None and not conn.upstream.transport.is_closing():
                conn.upstream.transport.abort()
            if not writer.transport.is_closing():
                writer.close()
            for w in (writer, conn.upstream):  # "gone" only once the sockets are closed
                if w is not None:
                    with contextlib.suppress(Exception):
                        await w.wait_closed()
            self._conns.discard(conn)
            self._tasks.discard(task)
            self._bump(active=-1)

    async def _pump(
        self,
        conn: _Conn,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        direction: str,
    ) -> None:
        counter = "bytes_up" if direction == "upstream" else "bytes_down"
        eof_sent = False
        while True:
            try:
                data = await src.read(_CHUNK)
            except OSError:
                data = b""
            if not data:
                if not eof_sent and dst.can_write_eof() and not dst.transport.is_closing():
                    with contextlib.suppress(OSError):
                        dst.write_eof()
                return
            await self._while_blackholed()
            mode = self._mode
            if mode.name == "delay" and mode.applies(direction):
                seconds = float(mode.params.get("seconds", 0.0))
                await asyncio.sleep(
                    seconds + random.uniform(0, float(mode.params.get("jitter", 0)))
                )
            limit: int | None = None
            resetting = mode.name == "reset_after" and mode.applies(direction, "downstream")
            if resetting or (mode.name == "half_close" and direction == "downstream"):
                limit = int(mode.params.get("n", 0))
            if limit is not None:
                gen, sent = conn.counted.get(direction, (mode.generation, 0))
                sent = 0 if gen != mode.generation else sent
                allowed = max(0, limit - sent)
                conn.counted[direction] = (mode.generation, sent + min(allowed, len(data)))
                if allowed < len(data):
                    await self._write(dst, data[:allowed], mode, direction, counter)
                    if mode.name == "reset_after":
                        raise _Reset
                    if not eof_sent:  # half_close: FIN to the client, drop the rest
                        eof_sent = True
                        with contextlib.suppress(OSError):
                            dst.write_eof()
                    continue
            if not eof_sent:
                await self._write(dst, data, mode, direction, counter)

    async def _write(
        self, dst: asyncio.StreamWriter, data: bytes, mode: _Mode, direction: str, counter: str
    ) -> None:
        if not data:
            return
        if mode.name == "bandwidth" and mode.applies(direction):
            rate = float(mode.params["rate"])
            step = max(1, int(rate / 20))  # ~50 ms slices
            for i in range(0, len(data), step):
                dst.write(data[i : i + step])
                await dst.drain()
                self._bump(**{counter: len(data[i : i + step])})
                await asyncio.sleep(len(data[i : i + step]) / rate)
            return
        dst.write(data)
        await dst.drain()
        self._bump(**{counter: len(data)})

    def __repr__(self) -> str:
        return f"<ChaosProxy {self.name!r} :{self.port} -> {self.upstream} mode={self.mode}>"
