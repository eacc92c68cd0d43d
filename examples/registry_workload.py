"""One workload of the registry demo, as its own process: its mesh comes from the registry
(``Mesh.from_env()``) and ``meshlib.serve`` registers it there, heartbeats, and drains it on stop.

    MESHLIB_REGISTRY=https://127.0.0.1:8700 MESHLIB_SERVICE=reviews-v1 \\
    MESHLIB_SVID_DIR=svids/reviews MESHLIB_CACHE_DIR=cache python examples/registry_workload.py

``productpage`` answers ``GET /productpage`` by calling ``http://reviews/reviews`` through its
mesh (the HTTPRoute picks reviews-v1 or reviews-v2); any other service answers ``GET
/reviews`` with its service name and its own address, so a caller can tell which instance it
reached. Both answers name the ``caller``: the identity their MeshMiddleware verified from the
caller's certificate (``x-mesh-identity``; ``-`` for none), so a demo can show who got in
(examples/gateway_demo.py). The process prints ``serving <service> on <url>`` once it listens
and stops cleanly on SIGTERM or SIGINT (SIGKILL, of course, drains nothing: the registry's TTL
removes the instance).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import meshlib

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def respond(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def caller(scope: Scope) -> str:
    """The caller's SPIFFE ID as MeshMiddleware verified it: it sets ``x-mesh-identity`` from
    the client certificate and drops any such header the request itself carried."""
    for name, value in scope["headers"]:
        if name == b"x-mesh-identity":
            return str(value.decode("latin-1"))
    return "-"


def reviews_app(service: str) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        host, port = scope["server"]
        body = {"service": service, "instance": f"{host}:{port}", "caller": caller(scope)}
        await respond(send, 200, body)

    return app


def productpage_app(mesh: meshlib.Mesh) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    client = mesh.async_client(timeout=5.0)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # the mesh client closes with the server
            await receive()  # lifespan.startup
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        try:
            answer = await client.get("http://reviews/reviews")
        except meshlib.MeshError as exc:  # the caller sees why, not a traceback
            await respond(send, 502, {"error": f"{type(exc).__name__}: {exc}"})
            return
        body = answer.json() if answer.status_code == 200 else {"error": answer.text}
        await respond(send, answer.status_code, {"caller": caller(scope), "reviews": body})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description="A registry demo workload: set MESHLIB_REGISTRY, MESHLIB_SERVICE, "
        "MESHLIB_SVID_DIR and MESHLIB_CACHE_DIR (see Mesh.from_env)."
    )
    parser.add_argument("--seed", type=int, default=None, help="the mesh's random seed")
    args = parser.parse_args()

    mesh = meshlib.Mesh.from_env(metrics=False, seed=args.seed)
    app = productpage_app(mesh) if mesh.service == "productpage" else reviews_app(mesh.service)
    # mTLS as the policy says; serve registers 127.0.0.1:<port> once it listens.
    server = meshlib.serve(
        meshlib.MeshMiddleware(app, mesh=mesh),
        mesh=mesh,
        svid_dir=os.environ["MESHLIB_SVID_DIR"],
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving {mesh.service} on {server.url}", flush=True)
    try:
        while not stop.wait(1.0):  # a bounded wait, so the signal handler runs promptly
            pass
    finally:
        server.stop()  # drains the registration first, while the port still accepts
        mesh.close()


if __name__ == "__main__":
    main()
