"""Echo backend: a pure-ASGI app whose behaviour the test controls and whose side effects it counts.

Behaviour is set by the *test* through methods (never by client headers), either
globally (``path=None``) or for a path prefix (longest matching prefix wins, so
``"/a"`` also matches ``"/abc"``). Each setting can be limited to the next
``times`` matching requests, after which it reverts to what applied before::

    backend = EchoBackend("a")
    backend.set_status(503, times=1)              # first request fails, later ones 200
    backend.set_delay(2.0, path="/slow")
    backend.set_behavior("reset_before_headers", path="/pay")

Behaviours (``set_behavior``):

``ok``
    Answer ``status`` (default 200) with the JSON echo body.
``hang``
    Never answer; return when the client disconnects (counted in ``disconnects``).
``reset_before_headers``
    Read the whole request (side effect counted), then abort the TCP connection
    with an RST and no response byte. Done by reaching uvicorn's transport through
    ``receive.__self__.transport`` (h11/httptools request cycles); :class:`RawServer`
    offers the same without relying on uvicorn internals.
``error_mid_body``
    Send 200 headers (Content-Length of the full body) and half of the body, then
    raise. uvicorn logs the exception and calls ``transport.close()``: a FIN after the
    partial body, so the client sees a truncated body (httpx ``RemoteProtocolError``).
``reset_mid_body``
    As ``error_mid_body`` but ends with a TCP RST (httpx ``ReadError`` or
    ``RemoteProtocolError``).

A delay (``set_delay``) runs after the request body is read and before the answer;
if the client disconnects during it, the request is counted in ``disconnects`` and
no response is sent (this is how hedged/cancelled losers are observed).

Every answer is JSON ``{"backend", "path", "query", "method", "headers",
"body_sha256", "body_len"}`` with header ``x-backend: <name>`` plus any extra
headers given to ``set_status``.

Counters (updated under a lock from the server thread; read them from the test):
``requests``, ``by_path``, ``side_effects`` (per ``idempotency-key`` header, else
per ``x-request-id``), ``bodies``, ``records``, ``disconnects``, ``in_flight``,
``max_in_flight``, ``last_headers``. Wait for them with :meth:`wait_for_requests`,
:meth:`wait_for_disconnects` or :meth:`wait_until` instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ._loop import rst_transport
from .server import ServerHandle, run_uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

Behavior = Literal["ok", "hang", "reset_before_headers", "error_mid_body", "reset_mid_body"]
BEHAVIORS: frozenset[str] = frozenset(
    {"ok", "hang", "reset_before_headers", "error_mid_body", "reset_mid_body"}
)


class MidBodyError(RuntimeError):
    """Raised on purpose by the ``error_mid_body`` behaviour."""


@dataclass(frozen=True)
class RequestRecord:
    """One request as the backend received it (after its body was fully read)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body_len: int
    body_sha256: str
    arrived: float  # time.monotonic()
    key: str | None  # side-effect key: idempotency-key, else x-request-id


@dataclass
class _Rule:
    value: Any
    times: int | None = None  # None = until changed


@dataclass
class _Table:
    """Per-prefix settings; each prefix holds a stack so ``times``-limited rules revert."""

    rules: dict[str | None, list[_Rule]] = field(default_factory=dict)

    def set(self, path: str | None, value: Any, times: int | None) -> None:
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 (or None for 'until changed')")
        stack = self.rules.setdefault(path, [])
        if times is None:
            stack.clear()
        stack.append(_Rule(value, times))

    def take(self, path: str, default: Any) -> Any:
        prefixes = sorted(
            (p for p in self.rules if p is not None and path.startswith(p)), key=len, reverse=True
        )
        for key in [*prefixes, None]:
            stack = self.rules.get(key)
            if not stack:
                continue
            rule = stack[-1]
            if rule.times is not None:
                rule.times -= 1
                if rule.times == 0:
                    stack.pop()
            return rule.value
        return default


class EchoBackend:
    """Pure ASGI echo app; see the module docstring for behaviours and counters."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition(threading.Lock())
        self.server: ServerHandle | None = None
        self._status = _Table()
        self._delay = _Table()
        self._behavior = _Table()
        self.requests = 0
        self.by_path: Counter[str] = Counter()
        self.side_effects: Counter[str] = Counter()
        self.bodies: list[tuple[int, str]] = []
        self.records: list[RequestRecord] = []
        self.disconnects = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.last_headers: dict[str, str] = {}

    # ------------------------------------------------------------------ control API
    def set_status(
        self,
        code: int,
        path: str | None = None,
        headers: dict[str, str] | None = None,
        *,
        times: int | None = None,
    ) -> None:
        """Answer ``code`` (plus ``headers``) for ``path`` prefix or globally."""
        with self._cond:
            self._status.set(path, (code, dict(headers or {})), times)

    def set_delay(
        self, seconds: float, path: str | None = None, *, times: int | None = None
    ) -> None:
        """Wait ``seconds`` before answering (aborted early if the client disconnects)."""
        with self._cond:
            self._delay.set(path, float(seconds), times)

    def set_behavior(
        self, kind: Behavior, path: str | None = None, *, times: int | None = None
    ) -> None:
        """Select a behaviour (``ok``, ``hang``, ``reset_before_headers``, ...)."""
        if kind not in BEHAVIORS:
            raise ValueError(f"unknown behaviour {kind!r}; expected one of {sorted(BEHAVIORS)}")
        with self._cond:
            self._behavior.set(path, kind, times)

    def reset(self, *, counters: bool = False) -> None:
        """Back to defaults (200, no delay, ``ok``); also zero the counters if asked."""
        with self._cond:
            self._status = _Table()
            self._delay = _Table()
            self._behavior = _Table()
        if counters:
            self.clear_counters()

    def clear_counters(self) -> None:
        with self._cond:
            self.requests = 0
            self.by_path = Counter()
            self.side_effects = Counter()
            self.bodies = []
            self.records = []
            self.disconnects = 0
            self.max_in_flight = self.in_flight
            self.last_headers = {}
            self._cond.notify_all()

    # ------------------------------------------------------------------ waiting
    def wait_until(self, predicate: Callable[[EchoBackend], bool], timeout: float = 5.0) -> bool:
        """Block until ``predicate(self)`` holds (re-checked on every counter change)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> bool:
        """Block until at least ``n`` requests have been fully received."""
        return self.wait_until(lambda b: b.requests >= n, timeout)

    def wait_for_disconnects(self, n: int, timeout: float = 5.0) -> bool:
        """Block until at least ``n`` requests saw their client go away."""
        return self.wait_until(lambda b: b.disconnects >= n, timeout)

    def wait_for_idle(self, timeout: float = 5.0) -> bool:
        """Block until no request is being handled."""
        return self.wait_until(lambda b: b.in_flight == 0, timeout)

    # ------------------------------------------------------------------ serving
    def serve(self, **kwargs: Any) -> ServerHandle:
        """Start this app under uvicorn (see :func:`run_uvicorn` for options)."""
        if self.server is not None:
            raise RuntimeError(f"echo backend {self.name!r} is already being served")
        kwargs.setdefault("name", f"echo-{self.name}")
        self.server = run_uvicorn(self, **kwargs)
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    @property
    def url(self) -> str:
        if self.server is None:
            raise RuntimeError(f"echo backend {self.name!r} is not being served")
        return self.server.url

    @property
    def port(self) -> int:
        if self.server is None:
            raise RuntimeError(f"echo backend {self.name!r} is not being served")
        return self.server.port

    # ------------------------------------------------------------------ ASGI
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not supported
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                with self._cond:
                    self.disconnects += 1
                    self._cond.notify_all()
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break

        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            hname, hvalue = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[hname] = f"{headers[hname]}, {hvalue}" if hname in headers else hvalue
        path: str = scope["path"]
        digest = hashlib.sha256(body).hexdigest()
        key = headers.get("idempotency-key", headers.get("x-request-id"))
        record = RequestRecord(
            method=scope["method"],
            path=path,
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=headers,
            body_len=len(body),
            body_sha256=digest,
            arrived=time.monotonic(),
            key=key,
        )
        with self._cond:
            status, extra_headers = self._status.take(path, (200, {}))
            delay: float = self._delay.take(path, 0.0)
            behavior: str = self._behavior.take(path, "ok")
            self.requests += 1
            self.by_path[path] += 1
            if key is not None:
                self.side_effects[key] += 1
            self.bodies.append((len(body), digest))
            self.records.append(record)
            self.last_headers = headers
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._cond.notify_all()
        done = False

        def finish() -> None:
            # Called just before the last response byte is sent, so a client that has
            # its response always sees in_flight already decremented.
            nonlocal done
            if not done:
                done = True
                with self._cond:
                    self.in_flight -= 1
                    self._cond.notify_all()

        try:
            await self._respond(
                record, receive, send, status, extra_headers, delay, behavior, finish
            )
        finally:
            finish()

    async def _respond(
        self,
        record: RequestRecord,
        receive: Receive,
        send: Send,
        status: int,
        extra_headers: dict[str, str],
        delay: float,
        behavior: str,
        finish: Callable[[], None],
    ) -> None:
        if delay > 0 or behavior == "hang":
            gone = await _wait_for_disconnect(receive, None if behavior == "hang" else delay)
            if gone:
                with self._cond:
                    self.disconnects += 1
                    self._cond.notify_all()
                return
        if behavior == "reset_before_headers":
            rst_transport(_transport_of(receive))
            await _wait_for_disconnect(receive, 5.0)  # so uvicorn does not try to send a 500
            return

        payload = json.dumps(
            {
                "backend": self.name,
                "path": record.path,
                "query": record.query,
                "method": record.method,
                "headers": record.headers,
                "body_sha256": record.body_sha256,
                "body_len": record.body_len,
            }
        ).encode()
        if status in (204, 304) or 100 <= status < 200:
            payload = b""
        response_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"x-backend", self.name.encode()),
        ]
        response_headers += [(k.encode(), v.encode()) for k, v in extra_headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        if behavior in ("error_mid_body", "reset_mid_body"):
            await send(
                {
                    "type": "http.response.body",
                    "body": payload[: len(payload) // 2],
                    "more_body": True,
                }
            )
            if behavior == "reset_mid_body":
                rst_transport(_transport_of(receive))
                await _wait_for_disconnect(receive, 5.0)
                return
            raise MidBodyError(f"echo backend {self.name!r}: error_mid_body (on purpose)")
        finish()
        await send({"type": "http.response.body", "body": payload, "more_body": False})

    def __repr__(self) -> str:
        where = self.server.url if self.server is not None else "not served"
        return f"<EchoBackend {self.name!r} {where} requests={self.requests}>"


async def _wait_for_disconnect(receive: Receive, timeout: float | None) -> bool:
    """Wait up to ``timeout`` s (forever if None) for http.disconnect; True if it came."""

    async def until_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(until_disconnect())
    try:
        done, _ = await asyncio.wait({watcher}, timeout=timeout)
        return watcher in done
    finally:
        if not watcher.done():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


def _transport_of(receive: Receive) -> asyncio.BaseTransport:
    cycle = getattr(receive, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if not isinstance(transport, asyncio.BaseTransport):
        raise RuntimeError(
            "cannot reach the server transport from this ASGI server; "
            "use harness.rawserver.RawServer for connection resets"
        )
    return transport
