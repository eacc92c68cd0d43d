"""The registry app's own CPU per heartbeat and per fan-out, in process: no server, no TLS, no
HTTP parsing — what :class:`meshlib.control.app.RegistryApp` (routing, authorization, the core's
plan / commit, the store write, JSON, metrics) costs, to set beside ``benchmarks/registry.py``'s
whole-process figures.

    python benchmarks/registry_app.py [--instances 1000] [--beats 20000] [--watchers 200]

* **heartbeat**: ``--instances`` registered (TTL 10 s, as ``benchmarks/registry.py``), then
  ``--beats`` beats round-robin on a fake clock that advances so each instance beats every
  3 s — the same share of beats reach the ``ttl/3`` persistence rule as in the real run — on
  the memory store and on SQLite (a temporary data dir). Reported: µs of CPU per beat (best of
  ``--rounds``) and store writes per beat.
* **fan-out**: ``--watchers`` blocking queries held on one service of ``--endpoints``
  instances (``benchmarks/registry.py``'s service grows from 1 to 100 over its changes); one
  register; the CPU from the register to the last answer sent (best of ``--rounds``).

Each request is a prebuilt ASGI scope awaited directly; the registry's metrics are real
(``registry serve``'s :func:`~meshlib.cli.registry.registry_with_metrics`, on a private
Prometheus registry).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TD = "bench.test"
ADMIN = f"spiffe://{TD}/ns/meshlib-system/sa/meshctl"
NS = "bench"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _scope(method: str, path: str, query: bytes = b"") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "query_string": query, "headers": []}


async def _call(app: Any, scope: dict[str, Any], body: bytes = b"") -> tuple[int, bytes]:
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], sent[1]["body"]


def _app(store: Any, clock: Clock) -> Any:
    from prometheus_client import CollectorRegistry

    from meshlib.cli.registry import registry_with_metrics

    return registry_with_metrics(
        store,
        trust_domain=TD,
        collector=CollectorRegistry(),
        identify=lambda scope: ADMIN,
        clock=clock,
        wall=clock,
    )


class CountingStore:
    """``store`` with its puts counted (every other method passed through)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.puts = 0

    async def put(self, key: str, value: bytes, **kw: Any) -> int:
        self.puts += 1
        rev: int = await self.store.put(key, value, **kw)
        return rev

    async def put_all(self, puts: Any) -> int:
        self.puts += 1
        rev: int = await self.store.put_all(puts)
        return rev

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def _instance(n: int) -> tuple[str, str, int, str]:
    from meshlib.control.registry import instance_id

    svc, address, port = f"hb{n % 50}", f"10.0.{n // 256 % 256}.{n % 256}", 8000
    return svc, address, port, instance_id(NS, svc, address, port)


async def heartbeats(store: Any, instances: int, beats: int) -> tuple[float, float]:
    """(CPU µs per beat, store writes per beat)."""
    clock = Clock()
    counting = CountingStore(store)
    app = _app(counting, clock)
    await app.startup()
    try:
        paths = []
        for n in range(instances):
            svc, address, port, id = _instance(n)
            path = f"/v1/instances/{NS}/{svc}/{id}"
            body = json.dumps({"address": address, "port": port, "ttl": 10}).encode()
            status, _ = await _call(app, _scope("PUT", path), body)
            assert status in (200, 201), status
            paths.append(path + "/heartbeat")
        step = 3.0 / instances  # each instance beats every 3 s of the fake clock
        puts = counting.puts
        started = time.process_time()
        for i in range(beats):
            clock.now += step
            status, _ = await _call(app, _scope("POST", paths[i % instances]))
            assert status == 200, status
        cpu = time.process_time() - started
        return cpu / beats * 1e6, (counting.puts - puts) / beats
    finally:
        await app.shutdown()


async def fanout(watchers: int, endpoints: int, rounds: int) -> float:
    """CPU ms per answer from a register to the last of ``watchers`` answers (best of
    ``rounds``), the service having ``endpoints`` instances before it."""
    from meshlib.control.memory import MemoryStore
    from meshlib.control.registry import instance_id

    clock = Clock()
    app = _app(MemoryStore(), clock)
    await app.startup()
    clock.now += 3600  # past warming: held queries wait for a change
    best = float("inf")
    try:
        for n in range(endpoints):
            _, address, port, _ = _instance(n)
            path = f"/v1/instances/{NS}/fan/{instance_id(NS, 'fan', address, port)}"
            body = json.dumps({"address": address, "port": port, "ttl": 300}).encode()
            await _call(app, _scope("PUT", path), body)
        for r in range(rounds + 1):
            _, address, port, _ = _instance(endpoints + r)
            index = app.registry.index(NS, "fan")
            held = [
                asyncio.create_task(
                    _call(
                        app,
                        _scope(
                            "GET",
                            f"/v1/services/{NS}/fan/endpoints",
                            f"index={index}&wait=60s".encode(),
                        ),
                    )
                )
                for _ in range(watchers)
            ]
            while app.watchers < watchers:
                await asyncio.sleep(0)
            path = f"/v1/instances/{NS}/fan/{instance_id(NS, 'fan', address, port)}"
            body = json.dumps({"address": address, "port": port, "ttl": 300}).encode()
            started = time.process_time()
            await _call(app, _scope("PUT", path), body)
            answers = await asyncio.gather(*held)
            cpu = time.process_time() - started
            assert all(status == 200 for status, _ in answers)
            if r:  # the first round warms up
                best = min(best, cpu)
    finally:
        await app.shutdown()
    return best / watchers * 1e3


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--beats", type=int, default=20_000)
    parser.add_argument("--watchers", type=int, default=200)
    parser.add_argument("--endpoints", type=int, default=50, help="the watched service's (50)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from meshlib.control.memory import MemoryStore
    from meshlib.control.sqlite import SQLiteStore

    for name in ("memory", "sqlite"):
        results = []
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="meshlib-registry-app-") as tmp:
                store = MemoryStore() if name == "memory" else SQLiteStore(Path(tmp))
                results.append(asyncio.run(heartbeats(store, args.instances, args.beats)))
        us, writes = min(results)
        print(
            f"heartbeat, {name} store: {us:.1f} µs of app CPU per beat (best of {args.rounds}), "
            f"{writes:.3f} store writes per beat"
        )
    per_answer = asyncio.run(fanout(args.watchers, args.endpoints, args.rounds))
    print(
        f"fan-out to {args.watchers} held queries of a service of {args.endpoints} endpoints: "
        f"{per_answer * 1e3:.1f} µs of app CPU per "
        f"answer ({per_answer * args.watchers:.2f} ms per change, best of {args.rounds})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
