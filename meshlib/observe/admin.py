"""The admin app: a read-only ASGI debug surface for one mesh (``mesh.admin_app()``).

Endpoints (GET, JSON unless noted):

- ``/status``    snapshot version, digest and files; the last reload attempt; the last rejected
                 reload with its problems; access log and SVID state.
- ``/config``    the snapshot in force, as the documents it was loaded from.
- ``/endpoints`` per destination: endpoints with health, ejection, peak-EWMA latency and
                 attempts in flight; breaker state; retry budget balance.
- ``/tap``       NDJSON: recent call events, then live ones, until ``?limit=N`` events or
                 ``?seconds=S`` have passed; ``?destination=``, ``?route=``, ``?direction=``
                 and ``?source=`` filter.
- ``/top``       per-edge request rate, success rate, p50/p99 over a sliding window.

It exposes configuration and traffic details, so serve it on a separate port bound to
localhost (``uvicorn.run(mesh.admin_app(), host="127.0.0.1", port=9901)``), never on the
application's public listener. Creating it attaches a :class:`~meshlib.observe.tap.Tap` and a
:class:`~meshlib.observe.top.Top` to the mesh, so call events are built from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

from meshlib.inbound.middleware import UNCOUNTED
from meshlib.observe.asgi import Receive, Scope, Send, answer_lifespan
from meshlib.observe.events import CallEvent, Observed, attach, detach
from meshlib.observe.tap import DROP_NEWEST, Predicate, Tap
from meshlib.observe.top import Top

if TYPE_CHECKING:
    from meshlib.config.model import Snapshot
    from meshlib.errors import ConfigError
    from meshlib.identity.rotation import RotationStatus
    from meshlib.outbound.destination import Destination


#: Defaults and caps of ``/tap``: a tap is always bounded, in events and in time.
TAP_DEFAULT_LIMIT = 100
TAP_MAX_LIMIT = 100_000
TAP_DEFAULT_SECONDS = 30.0
TAP_MAX_SECONDS = 3600.0
_FILTERS = ("destination", "route", "direction", "source")


class ReloadRecord(Protocol):
    """How a reload attempt went (:class:`meshlib.ReloadStatus`)."""

    @property
    def ok(self) -> bool: ...

    @property
    def version(self) -> int: ...

    @property
    def error(self) -> ConfigError | None: ...

    @property
    def digest(self) -> str | None: ...

    @property
    def at(self) -> float: ...


class Administered(Observed, Protocol):
    """What the admin app reads from the mesh it shows (:class:`meshlib.Mesh`); it only
    attaches consumers to its events, never changes anything else."""

    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def source(self) -> str: ...

    @property
    def reload_status(self) -> ReloadRecord: ...

    @property
    def last_rejected(self) -> ReloadRecord | None: ...

    @property
    def svid_status(self) -> RotationStatus | None: ...

    def clock(self) -> float: ...

    def destinations(self) -> Mapping[str, Destination]: ...

    def registry_status(self) -> dict[str, Any] | None: ...


class _BadRequest(Exception):
    pass


class AdminApp:
    """ASGI app serving the debug endpoints of ``mesh`` (see the module docstring)."""

    def __init__(
        self, mesh: Administered, *, tap_size: int = 1000, top_window: float = 60.0
    ) -> None:
        self.mesh = mesh
        self.tap = Tap(tap_size)
        self.top = Top(mesh.clock, top_window)
        attach(mesh, self.tap)
        attach(mesh, self.top)
        self._routes: dict[str, Callable[[dict[str, list[str]]], Any]] = {
            "/status": lambda q: status(self.mesh),
            "/config": lambda q: config(self.mesh),
            "/endpoints": lambda q: endpoints(self.mesh),
            "/top": lambda q: {
                "window_seconds": self.top.window,
                "edges": [s.as_dict() for s in self.top.stats()],
            },
        }

    def close(self) -> None:
        """Stop collecting (detach the tap and top from the mesh)."""
        detach(self.mesh, self.tap)
        detach(self.mesh, self.top)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        scope[UNCOUNTED] = "admin"  # behind MeshMiddleware, a look at the admin app is no traffic
        path = _own_path(scope)
        if scope.get("method") not in ("GET", "HEAD"):
            await _json(send, 405, {"error": "the admin app is read-only: GET only"})
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            if path == "/tap":
                await self._tap(query, receive, send)
                return
            route = self._routes.get(path)
            if route is None:
                paths = sorted([*self._routes, "/tap"])
                await _json(send, 404, {"error": f"no such endpoint; try one of {paths}"})
                return
            await _json(send, 200, route(query))
        except _BadRequest as exc:
            await _json(send, 400, {"error": str(exc)})

    async def _tap(self, query: dict[str, list[str]], receive: Receive, send: Send) -> None:
        limit = int(_number(query, "limit", TAP_DEFAULT_LIMIT, 1, TAP_MAX_LIMIT))
        seconds = _number(query, "seconds", TAP_DEFAULT_SECONDS, 0.0, TAP_MAX_SECONDS)
        predicate = _predicate(query)
        # The stream ends after `limit` events, so a reader that lags keeps the first ones:
        # dropping the oldest would skip events in the middle of what it prints.
        sub = self.tap.subscribe(size=limit, predicate=predicate, recent=True, drop=DROP_NEWEST)
        disconnected = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/x-ndjson"),
                        (b"cache-control", b"no-store"),
                    ],
                }
            )
            deadline = time.monotonic() + seconds
            sent = 0
            while sent < limit and not disconnected.done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                event = await sub.next(timeout=min(remaining, 0.25))
                if event is None:
                    continue
                line = json.dumps(event.as_dict(), separators=(",", ":")) + "\n"
                await send({"type": "http.response.body", "body": line.encode(), "more_body": True})
                sent += 1
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            sub.close()
            disconnected.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await disconnected


# --- the documents ------------------------------------------------------------------------------


def status(mesh: Administered) -> dict[str, Any]:
    """``/status``: what is in force and how the last reloads went."""
    from meshlib.observe.accesslog import access_log_of

    snapshot = mesh.snapshot
    access = access_log_of(mesh)
    svid = mesh.svid_status
    return {
        "service": mesh.source,
        "snapshot": {
            "version": snapshot.version,
            "digest": snapshot.digest,
            "files": [f for f in snapshot.files if f],
            "warnings": [str(w) for w in snapshot.warnings],
        },
        "reload": _reload(mesh.reload_status),
        "last_rejected": _reload(mesh.last_rejected) if mesh.last_rejected else None,
        "mtls": snapshot.mesh.mtls.value,
        # The registry link (Mesh.from_registry): url, up, epoch, staleness, the policy
        # version applied or rejected, each watched service's index; None without one.
        "registry": mesh.registry_status(),
        "access_log": None
        if access is None
        else {"format": access.format, "dropped": access.dropped},
        "svid": None
        if svid is None
        else {
            "identity": svid.identity,
            "expires_at": svid.expires_at,
            "renew_at": svid.renew_at,
            "last_error": svid.last_error,
        },
    }


def _reload(reload: ReloadRecord) -> dict[str, Any]:
    return {
        "ok": reload.ok,
        "version": reload.version,
        "digest": reload.digest,
        "at": reload.at or None,
        "error": None if reload.error is None else _error(reload.error),
    }


def _error(error: ConfigError) -> dict[str, Any]:
    return {
        "message": str(error),
        "problems": [
            {
                "file": p.file,
                "line": p.line,
                "document": p.document,
                "field": p.field,
                "message": p.message,
                "text": str(p),
            }
            for p in error.problems
        ],
    }


def config(mesh: Administered) -> dict[str, Any]:
    """``/config``: the documents of the snapshot in force."""
    snapshot = mesh.snapshot
    return {
        "version": snapshot.version,
        "digest": snapshot.digest,
        "source": snapshot.source,
        "documents": list(snapshot.raw_documents),
    }


def endpoints(mesh: Administered) -> dict[str, Any]:
    """``/endpoints``: the run-time state of every destination called so far."""
    now = mesh.clock()
    wall = time.time()
    return {
        "destinations": [
            _destination(dest, now, wall) for _, dest in sorted(mesh.destinations().items())
        ]
    }


def _destination(dest: Destination, now: float, wall: float) -> dict[str, Any]:
    with dest.lock:  # one consistent reading; the budget's balance advances its window
        decay = dest.endpoints.balancer.decay
        rows = []
        for state in dest.endpoints.states:
            ejected = state.is_ejected(now)
            rows.append(
                {
                    "address": state.address,
                    "weight": state.endpoint.weight,
                    "healthy": not ejected,
                    "ejected_until": wall + (state.ejected_until - now) if ejected else None,
                    "ejected_for_seconds": round(state.ejected_until - now, 3) if ejected else 0,
                    "times_ejected": state.times_ejected,
                    "consecutive_failures": state.consecutive_failures,
                    "ewma_ms": round(state.cost(now, decay) * 1000.0, 3),
                    "in_flight": state.pending,
                    "requests": state.requests,
                }
            )
        return {
            "destination": dest.key,
            "in_flight": dest.in_flight,
            "breaker": dest.breaker.state.value,
            "retry_budget": round(dest.budget.balance(now), 3),
            "panic": dest.endpoints.panic,
            "ejections": dest.endpoints.ejections,
            "endpoints": rows,
        }


# --- helpers ------------------------------------------------------------------------------------


def _number(
    query: dict[str, list[str]], name: str, default: float, low: float, high: float
) -> float:
    values = query.get(name)
    if not values:
        return default
    try:
        value = float(values[-1])
    except ValueError:
        raise _BadRequest(f"{name} must be a number, not {values[-1]!r}") from None
    if not low <= value <= high:
        raise _BadRequest(f"{name} must be between {low:g} and {high:g}, not {value:g}")
    return value


def _predicate(query: dict[str, list[str]]) -> Predicate | None:
    wanted = {k: query[k][-1] for k in _FILTERS if query.get(k)}
    if not wanted:
        return None

    def match(event: CallEvent) -> bool:
        for key, value in wanted.items():
            actual = getattr(event, key)
            if key == "destination" and "." not in value:
                actual = (actual or "").split(".", 1)[0]  # "reviews" matches reviews.<ns>
            if actual != value:
                return False
        return True

    return match


def _own_path(scope: Scope) -> str:
    """The path below the app's mount point (Starlette's ``Mount`` keeps the full path in
    ``path`` and the mount point in ``root_path``), without a trailing slash."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path.rstrip("/") or "/"


async def _json(send: Send, status_code: int, body: Any) -> None:
    data = json.dumps(body, indent=2, default=str).encode() + b"\n"
    await send(
        {
            "type": "http.response.start",
            "status": status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
