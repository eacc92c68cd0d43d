"""Hot-path cost of call events (meshlib.observe), without sockets.

Runs the outbound call sequence (``run_call``) against an in-memory answer, and the inbound
middleware around a trivial ASGI app, N times each, and prints µs per call for: no consumer
attached (the hook is one attribute read and a None check), the JSON access log on, and the
admin app's tap + top on. Compare the first row with the same script run on a tree without the
hook (``PYTHONPATH=<other checkout> python benchmarks/observe_hook.py``: rows it cannot build are
skipped).

    python benchmarks/observe_hook.py [--calls 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx

import meshlib
from meshlib.outbound.call import Outcome, Send, run_call

POLICY = """\
apiVersion: meshlib/v1
kind: Service
metadata: {name: reviews}
spec: {endpoints: [{address: 10.0.0.1:80}, {address: 10.0.0.2:80}]}
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: tester}
spec: {}
"""


def outbound(mesh: meshlib.Mesh, calls: int) -> float:
    """Seconds per call of the pure call sequence answered at once with 200."""
    router = mesh.router
    service = router.resolve("reviews", "default")
    assert service is not None
    request = httpx.Request("GET", "http://reviews/r/1")
    start = time.perf_counter()
    for _ in range(calls):
        call = run_call(mesh, router, service, request)
        value: Any = None
        try:
            while True:
                effect = call.send(value)
                value = None
                if isinstance(effect, Send):
                    response = httpx.Response(200, request=effect.request)
                    value = Outcome(response, None, 0.001)
        except StopIteration:
            pass
    return (time.perf_counter() - start) / calls


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def inbound(mesh: meshlib.Mesh, calls: int) -> float:
    """Seconds per request through MeshMiddleware around a trivial app."""
    middleware = meshlib.MeshMiddleware(_app, mesh=mesh)
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/r/1",
        "headers": [(b"host", b"tester")],
        "query_string": b"",
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    async def run() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            await middleware(scope, receive, send)
        return (time.perf_counter() - start) / calls

    return asyncio.run(run())


def best(fn: Callable[[], float], repeat: int) -> float:
    return min(fn() for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--metrics", action="store_true", help="metrics on (default off)")
    args = parser.parse_args()
    logging.getLogger("meshlib.access").addHandler(logging.NullHandler())
    logging.getLogger("meshlib.access").propagate = False

    def mesh(**kwargs: Any) -> meshlib.Mesh:
        if args.metrics:
            from prometheus_client import CollectorRegistry

            kwargs["registry"] = CollectorRegistry()
        return meshlib.Mesh.from_text(POLICY, service="tester", metrics=args.metrics, **kwargs)

    rows: list[tuple[str, Callable[[], meshlib.Mesh]]] = [("no consumer", mesh)]
    if hasattr(meshlib.Mesh, "admin_app"):
        rows.append(("json access log", lambda: mesh(access_log="json")))
        rows.append(("admin tap + top", lambda: _with_admin(mesh())))
    print(f"{'':<18}{'outbound µs/call':>18}{'inbound µs/request':>20}")
    for name, make in rows:
        m = make()
        out = best(lambda m=m: outbound(m, args.calls), args.repeat) * 1e6
        inn = best(lambda m=m: inbound(m, args.calls), args.repeat) * 1e6
        print(f"{name:<18}{out:>18.2f}{inn:>20.2f}")
        m.close()


def _with_admin(mesh: meshlib.Mesh) -> meshlib.Mesh:
    mesh.admin_app()
    return mesh


if __name__ == "__main__":
    main()
