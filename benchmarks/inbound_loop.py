"""In-process cost of MeshMiddleware per request, without a server, sockets or HTTP parsing.

    python benchmarks/inbound_loop.py [--calls N] [--rounds R]    # CPU time, interleaved
    python benchmarks/inbound_loop.py --profile                   # cProfile of the middleware
    python benchmarks/inbound_loop.py --callgrind                 # instructions per request

``benchmarks/inbound.py`` measures what issue 3 asks (server CPU inside uvicorn), but on a shared
machine its per-round differences are tens of microseconds wide. This script isolates the
middleware: the app of ``benchmarks/inbound_app.py`` is awaited in a tight ``asyncio`` loop with
a prebuilt scope, bare and wrapped, so what differs is the middleware alone:

* ``bare``: the ``200 ok`` app;
* ``mesh``: the app in :class:`meshlib.MeshMiddleware` under the benchmark's minimal policy (no
  authorization in force, metrics on, tracing a no-op) — the path the 10 µs target is about;
* ``mesh+authz``: the same with ``accessControl: enforce`` and an AuthorizationPolicy that
  allows the request (authorization evaluated, the path normalised, headers read).

The default mode reports process CPU time per request, best of ``--rounds`` interleaved rounds
(the minimum is the least disturbed by other tenants). ``--callgrind`` runs each variant under
``valgrind --tool=callgrind`` twice, with N and 2N requests, and reports the difference divided
by N: instructions per request, independent of machine load (setup and import cost cancel out).
``--profile`` prints the top functions of a cProfile run of the ``mesh`` variant.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

try:  # imported as the ``benchmarks`` package (e.g. from a test)
    from benchmarks.inbound_app import SERVICE, ok_app, policy_yaml
except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
    from inbound_app import SERVICE, ok_app, policy_yaml  # type: ignore[no-redef]

Message = MutableMapping[str, Any]
ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]

VARIANTS = ("bare", "mesh", "mesh+authz")

#: Allows the benchmark's request (``GET /items/1``) from anyone; with ``enforce``, everything
#: else is denied — authorization is in force and evaluated on every request.
_AUTHZ_POLICY = f"""
---
apiVersion: meshlib/v1
kind: AuthorizationPolicy
metadata: {{name: allow-items, namespace: default}}
spec:
  target: {{service: {SERVICE}}}
  action: ALLOW
  rules:
    - to: [{{methods: [GET], paths: ["/items/*"]}}]
"""


def build(variant: str) -> ASGIApp:
    """The ASGI app of ``variant`` (see the module docstring)."""
    if variant == "bare":
        return ok_app
    import meshlib

    text = policy_yaml()
    if variant == "mesh+authz":
        text = text.replace("mtls: disable", "mtls: disable, accessControl: enforce")
        text += _AUTHZ_POLICY
    elif variant != "mesh":
        raise ValueError(f"unknown variant {variant!r}")
    mesh = meshlib.Mesh.from_text(text, service=SERVICE, namespace="default")
    return meshlib.MeshMiddleware(ok_app, mesh=mesh)


def request_scope() -> dict[str, Any]:
    """What uvicorn (h11) passes for ``GET /items/1`` from ``wrk``, without TLS."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": "/items/1",
        "raw_path": b"/items/1",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk"), (b"accept", b"*/*")],
        "state": {},
    }


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Message) -> None:
    if message["type"] == "http.response.start" and message["status"] != 200:
        raise RuntimeError(f"benchmark request answered {message['status']}")


async def run(app: ASGIApp, calls: int) -> float:
    """Process CPU seconds per request over ``calls`` requests (a fresh scope each, as a
    server makes)."""
    make = request_scope
    start = time.process_time()
    for _ in range(calls):
        await app(make(), _receive, _send)
    return (time.process_time() - start) / calls


async def measure(calls: int, rounds: int) -> dict[str, float]:
    """Best CPU µs per request of each variant over ``rounds`` interleaved rounds."""
    apps = {name: build(name) for name in VARIANTS}
    for app in apps.values():
        await run(app, 1000)  # warm-up: first-use imports and caches
    best = dict.fromkeys(VARIANTS, float("inf"))
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for name in order:
            best[name] = min(best[name], await run(apps[name], calls) * 1e6)
    return best


async def profile(calls: int) -> None:
    app = build("mesh")
    await run(app, 1000)
    profiler = cProfile.Profile()
    profiler.enable()
    await run(app, calls)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


def callgrind(calls: int, variants: Sequence[str] = VARIANTS) -> dict[str, float]:
    """Instructions per request of each of ``variants``: (Ir at 2N calls - Ir at N calls) / N.

    ``benchmarks/bench_check.py`` (the regression gate) calls this with the variants it gates."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--callgrind needs valgrind (apt-get install valgrind)")
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in variants:
            totals = []
            for n in (calls, 2 * calls):
                out = Path(tmp) / f"cg.{len(totals)}.{name.replace('+', '_')}"
                command = [
                    "valgrind",
                    "--tool=callgrind",
                    f"--callgrind-out-file={out}",
                    sys.executable,
                    __file__,
                    "--single",
                    name,
                    "--calls",
                    str(n),
                ]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                found = re.search(r"Collected : (\d+)", done.stderr)
                if found is None:
                    raise SystemExit(f"no instruction count in valgrind output:\n{done.stderr}")
                totals.append(int(found.group(1)))
            result[name] = (totals[1] - totals[0]) / calls
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=20_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--profile", action="store_true", help="cProfile the mesh variant")
    mode.add_argument("--callgrind", action="store_true", help="instructions per request")
    mode.add_argument("--single", choices=VARIANTS, help=argparse.SUPPRESS)  # for --callgrind
    args = parser.parse_args(argv)
    if args.single:
        asyncio.run(run(build(args.single), args.calls))
        return 0
    if args.profile:
        asyncio.run(profile(args.calls))
        return 0
    if args.callgrind:
        counts = callgrind(args.calls)
        print("| variant | instructions/request | added vs bare |\n|---|--:|--:|")
        for name, count in counts.items():
            added = "-" if name == "bare" else f"+{count - counts['bare']:,.0f}"
            print(f"| {name} | {count:,.0f} | {added} |")
        return 0
    best = asyncio.run(measure(args.calls, args.rounds))
    print(f"CPU µs per request, best of {args.rounds} interleaved rounds of {args.calls:,}:\n")
    print("| variant | µs/request | added vs bare |\n|---|--:|--:|")
    for name, us in best.items():
        added = "-" if name == "bare" else f"+{us - best['bare']:.2f}"
        print(f"| {name} | {us:.2f} | {added} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
