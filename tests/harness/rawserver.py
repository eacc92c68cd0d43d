"""Minimal raw asyncio HTTP/1.1 server for connection-level misbehaviour uvicorn cannot produce.

Runs on its own :class:`~harness._loop.LoopThread`. The mode is chosen per request
(per connection for ``close_before_read``) and can be switched at runtime from the
test thread; ``times=N`` applies a mode to the next N requests/connections only::

    raw = RawServer("r").start()
    raw.set_mode("reset_before_headers", times=1)   # first request is reset, then "ok"
    raw.set_mode("status", status=503)               # every request answers 503

Modes:

``ok``
    Parse request line, headers and body (Content-Length or chunked); answer 200
    JSON ``{"server", "path", "method", "headers", "body_len", "body_sha256"}``
    with keep-alive (unless the client sent ``Connection: close``).
``status``
    Same, with ``status=<code>`` (default 503) and optional ``headers={...}``.
``reset_before_headers``
    Read the whole request (side effect counted), then RST (SO_LINGER 1,0 + close).
``close_before_read``
    Connection-level: accept, then RST at once without reading a byte (counted in
    ``connections``, never in ``requests``).
``headers_then_reset``
    Send ``200 OK`` with ``Content-Length: 1000`` and 10 body bytes, wait
    ``reset_delay`` (default 0.05 s, so the client has parsed the headers), then RST.
``close_on_reuse``
    Serve the first request of each connection normally; on any later request on
    the same connection close it (FIN) without reading it or answering — a
    deterministic stand-in for the keep-alive race (FAULT-14). Such requests are
    counted in ``dropped_requests``, not ``requests``.
``keepalive_close_after``
    Answer OK with keep-alive, then close the connection (FIN) once it has been idle
    for ``idle`` seconds (default 1.0) — like uvicorn's ``timeout_keep_alive``.

Counters: ``requests``, ``connections``, ``by_path``, ``side_effects`` (per
``idempotency-key`` header, else ``x-request-id``), ``dropped_requests``,
``active_connections``; wait on them with :meth:`wait_until` /
:meth:`wait_for_requests`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from ._loop import LoopThread, rst_transport

MODES = frozenset(
    {
        "ok",
        "status",
        "reset_before_headers",
        "close_before_read",
        "headers_then_reset",
        "close_on_reuse",
        "keepalive_close_after",
    }
)
_MAX_HEADER_BYTES = 64 * 1024
_REASONS = {200: "OK", 204: "No Content", 500: "Internal Server Error", 502: "Bad Gateway"}
_REASONS |= {503: "Service Unavailable", 504: "Gateway Timeout", 429: "Too Many Requests"}


class _BadRequest(Exception):
    pass


@dataclass
class _Mode:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    times: int | None = None


@dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def keep_alive(self) -> bool:
        return "close" not in self.headers.get("connection", "").lower()


class RawServer:
    """Raw HTTP/1.1 server with runtime-switchable misbehaviours (see module docstring)."""

    def __init__(self, name: str = "raw", *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        self.host = host
        self._requested_port = port
        self.port = 0
        self._cond = threading.Condition(threading.Lock())
        self._default = _Mode("ok")
        self._queue: list[_Mode] = []
        self._loop_thread: LoopThread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.requests = 0
        self.connections = 0
        self.active_connections = 0
        self.dropped_requests = 0
        self.by_path: Counter[str] = Counter()
        self.side_effects: Counter[str] = Counter()
        self.last_headers: dict[str, str] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> RawServer:
        if self._loop_thread is not None:
            raise RuntimeError("RawServer already started")
        self._loop_thread = LoopThread(f"raw-{self.name}")
        try:
            self.port = self._loop_thread.run(self._start())
        except BaseException:
            self._loop_thread.stop()
            raise
        return self

    async def _start(self) -> int:
        self._server = await asyncio.start_server(
            self._on_connection, self.host, self._requested_port, limit=_MAX_HEADER_BYTES
        )
        return int(self._server.sockets[0].getsockname()[1])

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection, then stop the thread; idempotent."""
        if self._loop_thread is None or not self._loop_thread.alive:
            return
        try:
            self._loop_thread.run(self._stop(), timeout)
        finally:
            self._loop_thread.stop(timeout)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    close = stop

    def __enter__(self) -> RawServer:
        return self if self._loop_thread is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("RawServer not started")
        return f"http://{self.host}:{self.port}"

    @property
    def thread_name(self) -> str:
        return self._loop_thread.name if self._loop_thread is not None else ""

    @property
    def alive(self) -> bool:
        return self._loop_thread is not None and self._loop_thread.alive

    # ------------------------------------------------------------------ control
    def set_mode(self, mode: str, *, times: int | None = None, **params: Any) -> None:
        """Switch mode; with ``times`` only for the next N requests (connections for
        ``close_before_read``), queued in order, before falling back to the default."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1")
        with self._cond:
            if times is None:
                self._default = _Mode(mode, params)
                self._queue.clear()
            else:
                self._queue.append(_Mode(mode, params, times))

    def reset(self, *, counters: bool = False) -> None:
        with self._cond:
            self._default = _Mode("ok")
            self._queue.clear()
            if counters:
                self.requests = self.connections = self.dropped_requests = 0
                self.by_path = Counter()
                self.side_effects = Counter()
                self.last_headers = {}
                self._cond.notify_all()

    def wait_until(self, predicate: Callable[[RawServer], bool], timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> bool:
        return self.wait_until(lambda s: s.requests >= n, timeout)

    def wait_for_connections(self, n: int, timeout: float = 5.0) -> bool:
        return self.wait_until(lambda s: s.connections >= n, timeout)

    def _take_mode(self, connection_level: bool) -> _Mode:
        with self._cond:
            if self._queue:
                head = self._queue[0]
                if (head.name == "close_before_read") == connection_level:
                    assert head.times is not None
                    head.times -= 1
                    if head.times == 0:
                        self._queue.pop(0)
                    return head
            if (self._default.name == "close_before_read") == connection_level:
                return self._default
            return _Mode("ok")

    def _bump(self, **deltas: int) -> None:
        with self._cond:
            for attr, delta in deltas.items():
                setattr(self, attr, getattr(self, attr) + delta)
            self._cond.notify_all()

    # ------------------------------------------------------------------ protocol
    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self._bump(connections=1, active_connections=1)
        try:
            if self._take_mode(connection_level=True).name == "close_before_read":
                rst_transport(writer.transport)
                return
            await self._serve_connection(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, _BadRequest, TimeoutError):
            pass
        finally:
            if not writer.transport.is_closing():
                writer.close()
            # count the connection as gone only once its socket is really closed
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._writers.discard(writer)
            self._tasks.discard(task)
            self._bump(active_connections=-1)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        served = 0
        idle: float | None = None
        while True:
            try:
                head = await asyncio.wait_for(_read_head(reader), idle)
            except asyncio.TimeoutError:  # idle keep-alive expired (keepalive_close_after)
                return
            if head is None:
                return  # clean EOF between requests
            mode = self._take_mode(connection_level=False)
            if mode.name == "close_on_reuse" and served > 0:
                self._bump(dropped_requests=1)
                return  # FIN without reading the body or answering
            request = await _read_body(reader, head)
            self._record(request)
            served += 1
            if mode.name == "reset_before_headers":
                rst_transport(writer.transport)
                return
            if mode.name == "headers_then_reset":
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                    b"content-length: 1000\r\n\r\n" + b"x" * 10
                )
                await writer.drain()
                await asyncio.sleep(float(mode.params.get("reset_delay", 0.05)))
                rst_transport(writer.transport)
                return
            status = int(mode.params.get("status", 503)) if mode.name == "status" else 200
            extra: dict[str, str] = dict(mode.params.get("headers", {}))
            writer.write(self._response(request, status, extra))
            await writer.drain()
            if not request.keep_alive:
                return
            if mode.name == "keepalive_close_after":
                idle = float(mode.params.get("idle", 1.0))
            else:
                idle = None

    def _record(self, request: _Request) -> None:
        key = request.headers.get("idempotency-key", request.headers.get("x-request-id"))
        with self._cond:
            self.requests += 1
            self.by_path[request.path] += 1
            if key is not None:
                self.side_effects[key] += 1
            self.last_headers = request.headers
            self._cond.notify_all()

    def _response(self, request: _Request, status: int, extra: dict[str, str]) -> bytes:
        payload = json.dumps(
            {
                "server": self.name,
                "path": request.path,
                "method": request.method,
                "headers": request.headers,
                "body_len": len(request.body),
                "body_sha256": hashlib.sha256(request.body).hexdigest(),
            }
        ).encode()
        body = b"" if request.method == "HEAD" or status in (204, 304) else payload
        headers = {
            "content-type": "application/json",
            "content-length": str(len(payload) if request.method == "HEAD" else len(body)),
            "x-backend": self.name,
            **extra,
        }
        if not request.keep_alive:
            headers["connection"] = "close"
        head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        return head.encode("latin-1") + body

    def __repr__(self) -> str:
        return f"<RawServer {self.name!r} port={self.port} requests={self.requests}>"


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]] | None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    except asyncio.LimitOverrunError as exc:
        raise _BadRequest("header block too large") from exc
    lines = raw.decode("latin-1").split("\r\n")
    try:
        method, target, _version = lines[0].split(" ", 2)
    except ValueError as exc:
        raise _BadRequest(f"bad request line {lines[0]!r}") from exc
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    path = target.split("?", 1)[0]
    return method, path, headers


async def _read_body(
    reader: asyncio.StreamReader, head: tuple[str, str, dict[str, str]]
) -> _Request:
    method, path, headers = head
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                break
            chunks += await reader.readexactly(size)
            await reader.readexactly(2)
        body = bytes(chunks)
    else:
        length = int(headers.get("content-length", "0") or 0)
        body = await reader.readexactly(length) if length else b""
    return _Request(method, path, headers, body)
