"""A tiny pure-ASGI backend for the benchmarks.

Every request is answered with ``STATUS`` (default 200) and the body ``ok`` after an optional
``DELAY`` (seconds, float; default 0). ``GET /__count`` answers the number of requests served so
far (``/__count`` itself excluded), so a benchmark can count attempts on the server side.

Run it as a script so the benchmark owns the listening socket's lifetime::

    DELAY=0.005 STATUS=200 python benchmarks/server.py [--port 0]

The script binds 127.0.0.1 (port 0 = any free port), prints ``PORT <n>`` on stdout once the socket
listens, then serves with uvicorn: 1 worker, asyncio loop, h11 protocol, no access log.
``uvicorn server:app --app-dir benchmarks`` also works, but then the caller must pick the port.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DELAY = float(os.environ.get("DELAY", "0") or 0)
STATUS = int(os.environ.get("STATUS", "200") or 200)

_BODY = b"ok"
_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
_served = 0


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer ``STATUS`` with ``ok`` after ``DELAY`` seconds; ``/__count`` reports the tally."""
    global _served
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/__count":
        body = str(_served).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return
    _served += 1
    if DELAY > 0:
        await asyncio.sleep(DELAY)
    await send({"type": "http.response.start", "status": STATUS, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})


def main(argv: list[str] | None = None) -> int:
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = any free)")
    args = parser.parse_args(argv)

    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it the body segment waits for the client's delayed ACK (~40 ms per response).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(1024)
    sys.stdout.write(f"PORT {sock.getsockname()[1]}\n")
    sys.stdout.flush()

    config = uvicorn.Config(
        app,
        workers=1,
        loop="asyncio",
        http="h11",
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=300,  # never close an idle keep-alive connection mid-benchmark
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
