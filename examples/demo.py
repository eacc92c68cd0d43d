"""An embedded service mesh on loopback, Bookinfo style: productpage → reviews → ratings.

Everything runs in this one process on 127.0.0.1:

* ``productpage`` is this script: it calls ``http://reviews/...`` through a mesh client;
* ``reviews-v1`` and ``reviews-v2`` (the canary) are uvicorn apps; each calls
  ``http://ratings/...`` through its own mesh (service ``reviews``) and still answers, without
  stars, when ratings fails; reviews-v1 is flaky (503 on ~10% of requests);
* ``ratings`` is a uvicorn app.

One policy file (written to a temporary directory) drives both meshes: a canary split of
reviews (v1 90 / v2 10), retries and a timeout for reviews, and fault injection on ratings.
Traffic runs for ``--duration`` seconds, then the script prints a per-edge table and what each
policy did, computed from the calls' decision records (``response.extensions["mesh_decision"]``).

    python examples/demo.py --duration 20 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from prometheus_client import CollectorRegistry

import meshlib

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

CANARY_PERCENT = 10
FLAKY_PERCENT = 10  # reviews-v1 answers 503 this often
ABORT_PERCENT = 10  # ratings: injected 503
DELAY_PERCENT = 25  # ratings: injected 100 ms delay

POLICY = """\
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews}}
spec: {{}}                      # the root of the split: callers say http://reviews/
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews-v1}}
spec: {{endpoints: [{{address: "127.0.0.1:{reviews_v1}", labels: {{version: v1}}}}]}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews-v2}}
spec: {{endpoints: [{{address: "127.0.0.1:{reviews_v2}", labels: {{version: v2}}}}]}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: ratings}}
spec: {{endpoints: [{{address: "127.0.0.1:{ratings}"}}]}}
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {{name: reviews-canary}}
spec:
  service: reviews
  backends:
  - {{service: reviews-v1, weight: {v1_weight}}}
  - {{service: reviews-v2, weight: {v2_weight}}}
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {{name: reviews-resilience}}
spec:
  target: {{service: reviews}}
  timeout: 1s
  retries: {{attempts: 2, perTryTimeout: 400ms, retryOn: [5xx, reset, connect-failure]}}
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {{name: ratings-timeout}}
spec:
  target: {{service: ratings}}
  timeout: 500ms
---
apiVersion: meshlib/v1
kind: FaultInjection
metadata: {{name: ratings-chaos}}
spec:
  target: {{service: ratings}}
  delay: {{fixed: 100ms, percent: {delay_percent}}}
  abort: {{status: 503, percent: {abort_percent}}}
"""


# --- the services -----------------------------------------------------------------------------


@dataclass
class Record:
    """One call as its caller saw it."""

    source: str
    decision: meshlib.Decision | None
    ok: bool
    seconds: float
    degraded: bool = False  # reviews answered without ratings


class Recorder:
    """Calls recorded by every caller (productpage and both reviews versions), thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: list[Record] = []

    def add(self, record: Record) -> None:
        with self.lock:
            self.records.append(record)


async def read_body(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def reply(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Ratings:
    """ASGI app: ``GET /ratings/<id>`` → ``{"stars": 1..5}``."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        product = scope["path"].rsplit("/", 1)[-1]
        await reply(send, 200, {"id": product, "stars": 1 + sum(map(ord, product)) % 5})


class Reviews:
    """ASGI app: one version of reviews. Calls ratings through the mesh, degrades gracefully
    (reviews without stars) when ratings fails, and is flaky when ``flaky_percent`` > 0."""

    def __init__(
        self, version: str, mesh: meshlib.Mesh, recorder: Recorder, flaky_percent: float, seed: int
    ) -> None:
        self.version = version
        self.mesh = mesh
        self.recorder = recorder
        self.flaky_percent = flaky_percent
        self.rng = random.Random(seed)
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # the client lives on this server's event loop
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.client = self.mesh.async_client()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.client is not None:
                        await self.client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        await read_body(receive)
        if self.rng.random() * 100 < self.flaky_percent:
            await reply(send, 503, {"error": f"reviews-{self.version} is having a bad moment"})
            return
        product = scope["path"].rsplit("/", 1)[-1]
        stars = await self.rating(product)
        await reply(
            send, 200, {"id": product, "version": self.version, "reviews": 2, "stars": stars}
        )

    async def rating(self, product: str) -> int | None:
        assert self.client is not None
        start = time.perf_counter()
        decision = None
        stars = None
        try:
            response = await self.client.get(f"http://ratings/ratings/{product}")
            decision = response.extensions.get("mesh_decision")
            if response.status_code == 200:
                stars = response.json()["stars"]
        except httpx.HTTPError as error:  # MeshError subclasses httpx errors
            decision = getattr(error, "decision", None)
        self.recorder.add(
            Record("reviews", decision, stars is not None, time.perf_counter() - start)
        )
        return stars


class Server:
    """A free 127.0.0.1 port now (the policy file needs it), an ASGI app served there by
    uvicorn on a thread later."""

    def __init__(self, name: str) -> None:
        self.name = name
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only when
        # the listening socket says it is TCP, and without it every reply waits ~40 ms (Nagle).
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    def serve(self, app: Any, lifespan: str = "off") -> None:
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan=lifespan)
        self.server = server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=server.run, kwargs={"sockets": [self.sock]}, name=self.name, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout=10)
        self.sock.close()


# --- traffic ------------------------------------------------------------------------------------


async def productpage(
    mesh: meshlib.Mesh, recorder: Recorder, duration: float, concurrency: int
) -> None:
    """``concurrency`` tasks calling reviews until ``duration`` is up, with a progress line."""
    stop_at = time.monotonic() + duration
    started = time.monotonic()

    async def worker(n: int, client: httpx.AsyncClient) -> None:
        i = n
        while time.monotonic() < stop_at:
            i += concurrency
            start = time.perf_counter()
            try:
                response = await client.get(f"http://reviews/reviews/{i % 100}")
                ok = response.status_code < 500
                degraded = ok and response.json().get("stars") is None
                record = Record(
                    "productpage",
                    response.extensions.get("mesh_decision"),
                    ok,
                    time.perf_counter() - start,
                    degraded,
                )
            except httpx.HTTPError as error:
                decision = getattr(error, "decision", None)
                record = Record("productpage", decision, False, time.perf_counter() - start)
            recorder.add(record)

    # On a terminal the progress line redraws in place; piped, it is written once a second.
    interval = 0.25 if sys.stdout.isatty() else 1.0

    async def progress() -> None:
        while True:
            calls = [r for r in recorder.records if r.source == "productpage"]
            elapsed = time.monotonic() - started
            ok = sum(r.ok for r in calls)
            rate = 100.0 * ok / len(calls) if calls else 100.0
            print(
                f"\r  {min(elapsed, duration):5.1f}s/{duration:g}s  calls {len(calls):6d}"
                f"  success {rate:6.2f}%  {len(calls) / max(elapsed, 1e-9):6.1f} rps",
                end="",
                flush=True,
            )
            if elapsed >= duration:
                return
            await asyncio.sleep(interval)

    async with mesh.async_client() as client:
        reporter = asyncio.create_task(progress())
        await asyncio.gather(*(worker(n, client) for n in range(concurrency)))
        await reporter
    print()


# --- the report ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def short(key: str | None) -> str:
    return (key or "?").removesuffix(".default")


EXHAUSTED = "mesh_retry_budget_exhausted_total"


def report(recorder: Recorder, registry: CollectorRegistry) -> bool:
    """Print the per-edge table and the policy summary; True if the run looks healthy."""
    records = list(recorder.records)
    edges: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in records:
        backend = r.decision.backend if r.decision is not None else None
        edges[(r.source, short(backend))].append(r)

    print()
    print(f"{'edge':<34}{'requests':>9}{'success':>9}{'p50 ms':>9}{'p99 ms':>9}{'retries':>9}")
    for (source, backend), rs in sorted(edges.items()):
        ms = [r.seconds * 1000 for r in rs]
        retries = sum(r.decision.retries for r in rs if r.decision is not None)
        success = 100 * sum(r.ok for r in rs) / len(rs)
        print(
            f"{source + ' → ' + backend:<34}{len(rs):>9}{success:>8.2f}%"
            f"{percentile(ms, 0.5):>9.1f}{percentile(ms, 0.99):>9.1f}{retries:>9}"
        )

    page = [r for r in records if r.source == "productpage"]
    decided = [r.decision for r in page if r.decision is not None]
    to_ratings = [r.decision for r in records if r.source == "reviews" and r.decision is not None]
    canary = sum(d.backend == "reviews-v2.default" for d in decided)
    retried = [r for r in page if r.decision is not None and r.decision.retries]
    rescued = sum(r.ok for r in retried)
    retries = sum(d.retries for d in decided)
    exhausted = sum(d.budget == "exhausted" for d in decided + to_ratings)
    timeouts = sum(d.reason == "timeout" for d in decided + to_ratings)
    aborts = sum(any(f.startswith("abort:") for f in d.faults) for d in to_ratings)
    delays = sum(any(f.startswith("delay:") for f in d.faults) for d in to_ratings)
    degraded = sum(r.degraded for r in page)
    ok = sum(r.ok for r in page)

    def share(part: int, whole: int) -> str:
        return f"{100 * part / whole:.1f}%" if whole else "n/a"

    metrics = {
        sample.name: sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name in ("mesh_retries_total", EXHAUSTED)
    }
    calls_metric = sum(
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "mesh_requests_total"
    )

    print()
    print("What each policy did")
    print("  TrafficSplit reviews-canary (reviews-v1 90 / reviews-v2 10)")
    print(
        f"    reviews-v2 got {canary} of {len(decided)} calls:"
        f" {share(canary, len(decided))} observed, {CANARY_PERCENT}% configured"
    )
    print("  TrafficPolicy reviews-resilience (timeout 1s, retries: attempts 2 on 5xx)")
    print(
        f"    {retries} retries performed; {rescued} of {len(retried)} retried calls rescued"
        f" (reviews-v1 fails {FLAKY_PERCENT}% on purpose)"
    )
    print(f"    retry budget exhausted: {exhausted}; deadline exceeded: {timeouts}")
    print("  FaultInjection ratings-chaos (abort 503, delay 100ms)")
    print(
        f"    aborts injected: {aborts} of {len(to_ratings)} ratings calls"
        f" ({share(aborts, len(to_ratings))} observed, {ABORT_PERCENT}% configured)"
    )
    print(
        f"    delays injected: {delays} ({share(delays, len(to_ratings))} observed,"
        f" {DELAY_PERCENT}% configured)"
    )
    print(f"    pages served without stars (reviews degraded gracefully): {degraded}")
    print(
        f"  metrics: mesh_requests_total {calls_metric:g},"
        f" mesh_retries_total {metrics.get('mesh_retries_total', 0):g},"
        f" mesh_retry_budget_exhausted_total {metrics.get(EXHAUSTED, 0):g}"
    )
    print()
    print(f"productpage: {len(page)} calls, {share(ok, len(page))} answered without a 5xx")
    return bool(page) and ok >= 0.9 * len(page)


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of traffic")
    parser.add_argument("--concurrency", type=int, default=8, help="calls in flight")
    parser.add_argument("--seed", type=int, default=7, help="seed for every random choice")
    args = parser.parse_args(argv)

    registry = CollectorRegistry()
    recorder = Recorder()
    servers = [Server(name) for name in ("ratings", "reviews-v1", "reviews-v2")]
    ratings, reviews_v1, reviews_v2 = servers
    meshes: list[meshlib.Mesh] = []
    healthy = False
    with tempfile.TemporaryDirectory(prefix="meshlib-demo-") as tmp:
        try:
            path = Path(tmp) / "mesh.yaml"
            path.write_text(
                POLICY.format(
                    ratings=ratings.port,
                    reviews_v1=reviews_v1.port,
                    reviews_v2=reviews_v2.port,
                    v1_weight=100 - CANARY_PERCENT,
                    v2_weight=CANARY_PERCENT,
                    delay_percent=DELAY_PERCENT,
                    abort_percent=ABORT_PERCENT,
                )
            )
            # Two services, two meshes, one policy file: each mesh knows who it calls from.
            page_mesh = meshlib.Mesh.from_file(
                path, service="productpage", seed=args.seed, registry=registry
            )
            meshes.append(page_mesh)
            reviews_mesh = meshlib.Mesh.from_file(
                path, service="reviews", seed=args.seed + 1, registry=registry
            )
            meshes.append(reviews_mesh)
            ratings.serve(Ratings())
            reviews_v1.serve(
                Reviews("v1", reviews_mesh, recorder, FLAKY_PERCENT, args.seed + 11), "on"
            )
            reviews_v2.serve(Reviews("v2", reviews_mesh, recorder, 0, args.seed + 12), "on")

            print("meshlib demo: productpage → reviews (v1 90% / v2 10% canary) → ratings")
            for server in servers:
                print(f"  {server.name:<11} http://127.0.0.1:{server.port}")
            print(f"  policy      {path}")
            print(f"traffic for {args.duration:g}s, {args.concurrency} calls in flight:")
            asyncio.run(productpage(page_mesh, recorder, args.duration, args.concurrency))
            healthy = report(recorder, registry)
        finally:
            for server in reversed(servers):
                server.stop()
            for mesh in meshes:
                mesh.close()
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
