"""An embedded service mesh on loopback, Bookinfo style: productpage → reviews → ratings.

Everything runs in this one process on 127.0.0.1:

* a certificate authority is created in a temporary directory, and every workload gets an
  X.509 SVID for its service account (``productpage``, ``reviews`` for both versions,
  ``ratings``);
* ``productpage`` is this script: it calls ``http://reviews/...`` through a mesh client;
* ``reviews-v1`` and ``reviews-v2`` (the canary) are ASGI apps served by ``meshlib.serve``
  (strict mutual TLS) behind ``MeshMiddleware``; each calls ``http://ratings/...`` through its
  own mesh and still answers, without stars, when ratings fails; reviews-v1 is flaky (503 on
  ~10% of requests);
* ``ratings`` is served the same way.

One policy file (written to the temporary directory) drives every mesh: ``mtls: strict``, a
canary split of reviews (a Gateway API HTTPRoute: v1 90 / v2 10), retries and a timeout for
reviews, fault injection on ratings, and SMI TrafficTargets allowing productpage → reviews and
reviews → ratings only.
Traffic runs for ``--duration`` seconds; then intruders call ratings directly (with
productpage's valid certificate, which no TrafficTarget allows there; over plain HTTP; over TLS
without a client certificate), and the script prints a per-edge table and what each policy
did, computed from the calls' decision records (``response.extensions["mesh_decision"]``) and
the mesh's metrics.

Then the Observe pillar, on the live services. Each workload has a localhost-only admin port
serving its mesh's admin app (``mesh.admin_app()``) and, for the three served workloads, its
metrics (``meshlib.metrics_app`` mounted at ``/metrics``); productpage, a plain client program,
runs the standalone exporter (``meshlib.start_metrics_server``). Every workload has its own
OpenTelemetry SDK provider (as separate processes would), all exporting to one in-memory
exporter, and the policy samples 5% of the traces productpage starts. The script prints one
sampled trace as a tree, then runs the real ``meshctl`` verbs against the running services:
``status`` and ``top`` of productpage, ``tap --limit 5`` of reviews-v1, and ``graph`` of the
four metrics endpoints (text, then an SVG and an HTML page written to ``--out``, a new
temporary directory by default).

    python examples/demo.py --duration 20 --concurrency 8 [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx
import uvicorn
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.samples import Sample

import meshlib
import meshlib.cli
from meshlib.identity import CertificateAuthority, SpiffeID
from meshlib.identity.tls import SVIDSource
from meshlib.inbound.serving import Server as ServedApp

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

TRUST_DOMAIN = "bookinfo.local"
#: workload → service account; each workload gets its own SVID (both reviews versions are
#: the same account, so both present the same SPIFFE ID).
ACCOUNTS = {
    "productpage": "productpage",
    "reviews-v1": "reviews",
    "reviews-v2": "reviews",
    "ratings": "ratings",
}
CANARY_PERCENT = 10
FLAKY_PERCENT = 10  # reviews-v1 answers 503 this often
ABORT_PERCENT = 10  # ratings: injected 503
DELAY_PERCENT = 25  # ratings: injected 100 ms delay
TRACE_SAMPLING = 0.05  # share of productpage's calls that start a recorded trace

POLICY = """\
apiVersion: meshlib/v1
kind: Mesh
metadata: {{name: mesh}}
spec: {{trustDomain: {trust_domain}, mtls: strict, tracing: {{sampling: {sampling}}}}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: productpage}}
spec: {{serviceAccount: productpage}}   # a caller only: no endpoints
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews}}
spec: {{serviceAccount: reviews}}       # the HTTPRoute's parent: callers say http://reviews/
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews-v1}}
spec:
  serviceAccount: reviews
  endpoints: [{{address: "127.0.0.1:{reviews_v1}", labels: {{version: v1}}}}]
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews-v2}}
spec:
  serviceAccount: reviews
  endpoints: [{{address: "127.0.0.1:{reviews_v2}", labels: {{version: v2}}}}]
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: ratings}}
spec:
  serviceAccount: ratings
  endpoints: [{{address: "127.0.0.1:{ratings}"}}]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {{name: bookinfo-api}}
spec:
  matches:
  - {{name: reviews, methods: [GET], pathRegex: "/reviews/.*"}}
  - {{name: ratings, methods: [GET], pathRegex: "/ratings/.*"}}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: productpage-to-reviews}}
spec:
  destination: {{kind: ServiceAccount, name: reviews, namespace: default}}
  rules: [{{kind: HTTPRouteGroup, name: bookinfo-api, matches: [reviews]}}]
  sources: [{{kind: ServiceAccount, name: productpage, namespace: default}}]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: reviews-to-ratings}}
spec:
  destination: {{kind: ServiceAccount, name: ratings, namespace: default}}
  rules: [{{kind: HTTPRouteGroup, name: bookinfo-api, matches: [ratings]}}]
  sources: [{{kind: ServiceAccount, name: reviews, namespace: default}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews-canary}}
spec:
  parentRefs: [{{group: "", kind: Service, name: reviews}}]   # callers say http://reviews/
  rules:
  - backendRefs:   # port: the spec requires it; the Services' endpoints carry their own
    - {{name: reviews-v1, port: 9080, weight: {v1_weight}}}
    - {{name: reviews-v2, port: 9080, weight: {v2_weight}}}
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
    """A 127.0.0.1 port reserved now (the policy file needs it), an ASGI app served there later
    by ``meshlib.serve`` under strict mutual TLS, behind ``MeshMiddleware``."""

    def __init__(self, name: str) -> None:
        self.name = name
        # Bound but not listening, with SO_REUSEADDR: no other socket gets the port, and
        # uvicorn (which binds with SO_REUSEADDR too) can listen on it; closed once it does.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.server: ServedApp | None = None

    def serve(self, app: Any, mesh: meshlib.Mesh, svid_dir: Path, lifespan: str = "off") -> None:
        self.server = meshlib.serve(
            meshlib.MeshMiddleware(app, mesh=mesh),  # caller identity, then authorization
            mesh=mesh,
            host="127.0.0.1",
            port=self.port,
            svid_dir=str(svid_dir),
            mode="strict",
            lifespan=lifespan,
            log_level="warning",
            access_log=False,
        )
        self.sock.close()

    def stop(self) -> None:
        try:
            if self.server is not None:
                self.server.stop(timeout=10)
        finally:
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

    line = ProgressLine(sys.stdout)

    async def progress() -> None:
        while True:
            calls = [r for r in recorder.records if r.source == "productpage"]
            elapsed = time.monotonic() - started
            ok = sum(r.ok for r in calls)
            rate = 100.0 * ok / len(calls) if calls else 100.0
            line.show(
                f"  {min(elapsed, duration):5.1f}s/{duration:g}s  calls {len(calls):6d}"
                f"  success {rate:6.2f}%  {len(calls) / max(elapsed, 1e-9):6.1f} rps"
            )
            if elapsed >= duration:
                return
            await asyncio.sleep(line.interval)

    async with mesh.async_client() as client:
        reporter = asyncio.create_task(progress())
        await asyncio.gather(*(worker(n, client) for n in range(concurrency)))
        await reporter
    line.end()


class ProgressLine:
    """A status line: on a terminal it redraws in place (``\\r``) four times a second; piped
    to a file or another program, where a carriage return would garble the text, each update
    is a line of its own, once a second."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.redraw = stream.isatty()
        self.interval = 0.25 if self.redraw else 1.0
        self.shown = False

    def show(self, text: str) -> None:
        self.stream.write(f"\r{text}" if self.redraw else f"{text}\n")
        self.stream.flush()
        self.shown = True

    def end(self) -> None:
        """End the line redrawn in place (piped, every update already ended its line)."""
        if self.redraw and self.shown:
            self.stream.write("\n")
            self.stream.flush()


# --- intruders -----------------------------------------------------------------------------------


@dataclass
class Intrusions:
    """What ratings answered to callers the policy does not allow."""

    denied_status: int | None = None  # productpage's valid SVID, no TrafficTarget for it
    denied_reason: str | None = None
    plain: str = "not tried"  # plain HTTP: the error the client saw, or "served" (bad)
    no_cert: str = "not tried"  # TLS without a client certificate: likewise

    @property
    def held(self) -> bool:
        return (
            self.denied_status == 403
            and self.denied_reason == "denied"
            and self.plain.startswith("refused")
            and self.no_cert.startswith("refused")
        )


async def intruders(ratings_port: int, productpage_svid: Path) -> Intrusions:
    """Call ratings directly, skipping reviews: with productpage's certificate (authenticated,
    not authorized), over plain HTTP, and over TLS without a client certificate."""
    url = f"https://127.0.0.1:{ratings_port}/ratings/1"
    out = Intrusions()
    source = SVIDSource(productpage_svid, trust_domain=TRUST_DOMAIN)
    try:
        async with httpx.AsyncClient(verify=source.client_context(), timeout=5) as client:
            response = await client.get(url)
        out.denied_status = response.status_code
        out.denied_reason = response.headers.get(meshlib.REASON_HEADER)
    except httpx.HTTPError as error:  # not the expected answer either: reported, not raised
        out.denied_reason = f"no answer, {type(error).__name__}"

    async def refused(client: httpx.AsyncClient, target: str) -> str:
        try:
            async with client:
                response = await client.get(target)
        except httpx.HTTPError as error:
            return f"refused ({type(error).__name__})"
        return f"served {response.status_code}"

    plain_url = url.replace("https://", "http://")
    out.plain = await refused(httpx.AsyncClient(timeout=5), plain_url)
    # Trusts the mesh's root, so only the missing client certificate can fail the handshake.
    no_cert = ssl.create_default_context(cadata=source.material.bundle_pem)
    no_cert.check_hostname = False
    out.no_cert = await refused(httpx.AsyncClient(verify=no_cert, timeout=5), url)
    return out


# --- the report ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def short(key: str | None) -> str:
    return (key or "?").removesuffix(".default")


EXHAUSTED = "mesh_retry_budget_exhausted_total"


def samples(registries: Iterable[CollectorRegistry], *names: str) -> Iterator[Sample]:
    """The samples called ``names`` in every workload's registry."""
    for registry in registries:
        for family in registry.collect():
            yield from (sample for sample in family.samples if sample.name in names)


def report(recorder: Recorder, registries: list[CollectorRegistry], intrusions: Intrusions) -> bool:
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

    metrics: dict[str, float] = defaultdict(float)
    for sample in samples(registries, "mesh_retries_total", EXHAUSTED):
        metrics[sample.name] += sample.value
    calls_metric = sum(
        sample.value
        for sample in samples(registries, "mesh_requests_total")
        if sample.labels["direction"] == "outbound"
    )
    # Inbound authorization decisions: (caller SPIFFE ID, destination, verdict) → count.
    authz: dict[tuple[str, str, str], float] = defaultdict(float)
    for sample in samples(registries, "mesh_authz_decisions_total"):
        labels = sample.labels
        authz[(labels["source"], labels["destination"], labels["verdict"])] += sample.value
    allowed = sum(n for (_, _, verdict), n in authz.items() if verdict == "allow")
    verified = sum(n for (src, _, _), n in authz.items() if src.startswith("spiffe://"))
    unauthenticated = sum(authz.values()) - verified
    callers = sorted({src.rsplit("/", 1)[-1] for (src, _, _) in authz if src.startswith("spiffe")})

    print()
    print("What each policy did")
    print("  HTTPRoute reviews-canary (reviews-v1 90 / reviews-v2 10)")
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
    print(f"  Mesh mtls: strict (trust domain {TRUST_DOMAIN}, one CA, {len(ACCOUNTS)} SVIDs)")
    print(
        f"    every edge encrypted and authenticated: {verified:g} requests from verified"
        f" SPIFFE IDs\n      (sa {', '.join(callers) or 'none'}),"
        f" {unauthenticated:g} without a certificate"
    )
    print(f"    plain HTTP client: {intrusions.plain}")
    print(f"    TLS client without a certificate: {intrusions.no_cert}")
    print("  TrafficTarget productpage-to-reviews, reviews-to-ratings (no other caller allowed)")
    verdict = "denied" if intrusions.denied_status == 403 else "NOT denied, answered"
    print(
        f"    {allowed:g} calls allowed; intruder {verdict} {intrusions.denied_status}"
        f" (x-mesh-reason: {intrusions.denied_reason}):\n      productpage's valid SVID"
        " calling ratings directly"
    )
    print(
        f"  metrics: mesh_requests_total {calls_metric:g},"
        f" mesh_retries_total {metrics.get('mesh_retries_total', 0):g},"
        f" mesh_retry_budget_exhausted_total {metrics.get(EXHAUSTED, 0):g}"
    )
    print()
    print(f"productpage: {len(page)} calls, {share(ok, len(page))} answered without a 5xx")
    if not intrusions.held:
        print("intruders were NOT kept out: the mesh's security policy did not hold")
    return bool(page) and ok >= 0.9 * len(page) and intrusions.held


# --- observe: admin ports, traces, meshctl ----------------------------------------------------

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
SPANS = InMemorySpanExporter()


def tracer_provider(workload: str) -> TracerProvider:
    """One OpenTelemetry SDK provider per workload, as each process would have its own; all
    export to ``SPANS`` so the demo can print a trace (an OTLP exporter would send them to
    Jaeger instead: docs/observability.md)."""
    provider = TracerProvider(resource=Resource.create({"service.name": workload}))
    provider.add_span_processor(SimpleSpanProcessor(SPANS))
    return provider


class AdminPort:
    """One workload's localhost-only admin port: its mesh's admin app, and ``/metrics`` when
    ``metrics`` is given. Served workloads mount ``meshlib.metrics_app`` here rather than on
    their strict-mTLS listener, so a scraper needs no client certificate and scrapes are not
    counted as traffic."""

    def __init__(self, name: str, mesh: meshlib.Mesh, metrics: ASGIApp | None) -> None:
        self.admin = mesh.admin_app()  # from now on the mesh feeds its tap and top
        admin = self.admin

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if metrics is not None and scope["type"] == "http" and scope["path"] == "/metrics":
                await metrics(scope, receive, send)
            else:
                await admin(scope, receive, send)

        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, lifespan="off", log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"admin-{name}", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"{name}: the admin port did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.admin.close()


def describe(span: ReadableSpan) -> str:
    """One line of the trace tree: workload, span kind, what the span is, its status."""
    attrs = span.attributes or {}
    workload = span.resource.attributes.get("service.name")
    notes = []
    if span.kind.name == "SERVER":
        what = f"{attrs.get('http.request.method')} {attrs.get('url.path')}"
        if "mesh.peer" in attrs:
            notes.append(f"from sa/{str(attrs['mesh.peer']).rsplit('/', 1)[-1]}")
        if "mesh.deadline_ms" in attrs:
            notes.append(f"{attrs['mesh.deadline_ms']} ms left")
    elif "http.request.resend_count" in attrs:  # a retry or a hedge: a span of its own
        what = f"attempt {attrs['mesh.attempt']} → {attrs['server.address']}:{attrs['server.port']}"
    else:  # the call, which carries its first attempt
        what = f"{span.name} → {short(str(attrs.get('mesh.backend', attrs.get('mesh.service'))))}"
        notes.append(f"deadline {attrs.get('mesh.deadline_ms')} ms")
        if attrs.get("mesh.fault"):
            notes.append(f"fault {attrs['mesh.fault']}")
        if attrs.get("mesh.retries"):
            notes.append(f"retries {attrs['mesh.retries']}")
        # the first attempt: on the call span, or its event when more attempts followed
        first = next((e.attributes for e in span.events if e.name == "mesh.attempt"), attrs)
        if first and "network.peer.port" in first:
            got = first.get("http.response.status_code") if first is not attrs else None
            sent = f"{first['network.peer.address']}:{first['network.peer.port']}"
            notes.append(f"attempt 1 → {sent}" + (f" {got}" if got else ""))
    status = attrs.get("http.response.status_code", "-")
    extra = f" ({', '.join(notes)})" if notes else ""
    return f"{workload:<11} {span.kind.name:<6} {what}{extra}  {status}"


def interesting_trace(spans: Iterable[ReadableSpan]) -> list[ReadableSpan]:
    """The sampled trace to show: one with a retry if any, else one with a fault, else the
    longest (empty without any)."""
    traces: dict[int, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        traces[span.context.trace_id].append(span)

    def interest(trace: list[ReadableSpan]) -> tuple[bool, bool, int]:
        attrs = [span.attributes or {} for span in trace]
        return (
            any(a.get("mesh.retries") for a in attrs),
            any(a.get("mesh.fault") for a in attrs),
            len(trace),
        )

    return max(traces.values(), key=interest, default=[])


def print_tree(trace: list[ReadableSpan]) -> None:
    """Each span under its parent, in start order (a parent outside ``trace`` makes a root)."""
    ids = {span.context.span_id for span in trace}
    children: dict[int | None, list[ReadableSpan]] = defaultdict(list)
    for span in sorted(trace, key=lambda s: s.start_time or 0):
        parent = span.parent.span_id if span.parent is not None else None
        children[parent if parent in ids else None].append(span)

    def walk(parent: int | None, depth: int) -> None:
        for span in children.get(parent, []):
            print("  " + "  " * depth + describe(span))
            walk(span.context.span_id, depth + 1)

    walk(None, 0)


def meshctl(*argv: str) -> int:
    """Run a ``meshctl`` verb in this process, as typed in a shell."""
    print(f"\n$ meshctl {' '.join(argv)}", flush=True)
    code = meshlib.cli.main(list(argv))
    sys.stdout.flush()
    return code


def observe(ports: dict[str, AdminPort], metrics_urls: list[str], out: Path) -> bool:
    """Print one sampled trace and run meshctl against the live admin ports and metrics; True
    if a trace was recorded and every verb succeeded."""
    spans = SPANS.get_finished_spans()
    trace = interesting_trace(spans)
    sampled = len({span.context.trace_id for span in spans})
    print()
    print("Observe")
    print(
        f"  {sampled} traces sampled ({TRACE_SAMPLING:.0%} of productpage's calls start one);"
        f" one of them, {len(trace)} spans:"
    )
    print_tree(trace)
    graph = ("graph", *metrics_urls)
    codes = [
        meshctl("status", ports["productpage"].url),
        meshctl("top", ports["productpage"].url),
        meshctl("tap", ports["reviews-v1"].url, "--limit", "5"),
        meshctl(*graph),
        meshctl(*graph, "--format", "svg", "--out", str(out / "demo-graph.svg")),
        meshctl(*graph, "--format", "html", "--out", str(out / "demo-graph.html")),
    ]
    print(f"service graph written to {out}/demo-graph.svg and demo-graph.html")
    failed = [code for code in codes if code != 0]
    if failed or not trace:
        print("Observe: no trace recorded" if not trace else f"Observe: {len(failed)} verbs failed")
    return bool(trace) and not failed


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of traffic")
    parser.add_argument("--concurrency", type=int, default=8, help="calls in flight")
    parser.add_argument("--seed", type=int, default=7, help="seed for every random choice")
    parser.add_argument(
        "--out", type=Path, help="where to write demo-graph.svg/.html (default: a new temp dir)"
    )
    args = parser.parse_args(argv)
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="meshlib-demo-graph-"))
    out.mkdir(parents=True, exist_ok=True)

    # One registry and one tracer provider per workload, as if each were its own process:
    # each /metrics shows one workload's view, and meshctl graph puts them together.
    registries = {workload: CollectorRegistry() for workload in ACCOUNTS}
    providers = {workload: tracer_provider(workload) for workload in ACCOUNTS}
    recorder = Recorder()
    servers = [Server(name) for name in ("ratings", "reviews-v1", "reviews-v2")]
    ratings, reviews_v1, reviews_v2 = servers
    meshes: dict[str, meshlib.Mesh] = {}
    ports: dict[str, AdminPort] = {}
    exporter: meshlib.MetricsServer | None = None
    healthy = False
    with tempfile.TemporaryDirectory(prefix="meshlib-demo-") as tmp:
        try:
            # One CA for the mesh; one SVID (cert.pem, key.pem, bundle.pem) per workload.
            ca = CertificateAuthority.create(TRUST_DOMAIN)
            svids: dict[str, Path] = {}
            for workload, account in ACCOUNTS.items():
                spiffe_id = SpiffeID.for_workload(TRUST_DOMAIN, "default", account)
                svids[workload] = ca.issue(spiffe_id).save(Path(tmp) / "svid" / workload)
            path = Path(tmp) / "mesh.yaml"
            path.write_text(
                POLICY.format(
                    trust_domain=TRUST_DOMAIN,
                    ratings=ratings.port,
                    reviews_v1=reviews_v1.port,
                    reviews_v2=reviews_v2.port,
                    v1_weight=100 - CANARY_PERCENT,
                    v2_weight=CANARY_PERCENT,
                    delay_percent=DELAY_PERCENT,
                    abort_percent=ABORT_PERCENT,
                    sampling=TRACE_SAMPLING,
                )
            )

            # One policy file, one mesh per workload: each knows who it is (for authorization
            # of what arrives) and presents its own SVID (for mTLS on what it sends).
            def mesh_for(workload: str, seed: int) -> meshlib.Mesh:
                mesh = meshlib.Mesh.from_file(
                    path,
                    service=workload,
                    seed=seed,
                    registry=registries[workload],
                    tracer_provider=providers[workload],
                    svid_dir=svids[workload],
                )
                meshes[workload] = mesh
                return mesh

            page_mesh = mesh_for("productpage", args.seed)
            ratings.serve(Ratings(), mesh_for("ratings", args.seed + 1), svids["ratings"])
            v1_mesh = mesh_for("reviews-v1", args.seed + 2)
            reviews_v1.serve(
                Reviews("v1", v1_mesh, recorder, FLAKY_PERCENT, args.seed + 11),
                v1_mesh,
                svids["reviews-v1"],
                "on",
            )
            v2_mesh = mesh_for("reviews-v2", args.seed + 3)
            reviews_v2.serve(
                Reviews("v2", v2_mesh, recorder, 0, args.seed + 12),
                v2_mesh,
                svids["reviews-v2"],
                "on",
            )
            # Admin ports on localhost; productpage is a plain client program, so its
            # metrics come from the standalone exporter rather than a mounted app.
            exporter = meshlib.start_metrics_server(0, registry=registries["productpage"])
            metrics_urls = {"productpage": exporter.url}
            ports["productpage"] = AdminPort("productpage", page_mesh, None)
            for server in servers:
                app = meshlib.metrics_app(registries[server.name])
                ports[server.name] = AdminPort(server.name, meshes[server.name], app)
                metrics_urls[server.name] = f"{ports[server.name].url}/metrics"

            print("meshlib demo: productpage → reviews (v1 90% / v2 10% canary) → ratings")
            for server in servers:
                account = SpiffeID.for_workload(TRUST_DOMAIN, "default", ACCOUNTS[server.name])
                print(f"  {server.name:<11} https://127.0.0.1:{server.port}  {account}")
            print(f"  policy      {path}")
            print("admin apps and metrics, on localhost only:")
            for workload, port in ports.items():
                print(f"  {workload:<11} admin {port.url}  metrics {metrics_urls[workload]}")
            print(f"traffic for {args.duration:g}s, {args.concurrency} calls in flight:")
            asyncio.run(productpage(page_mesh, recorder, args.duration, args.concurrency))
            intrusions = asyncio.run(intruders(ratings.port, svids["productpage"]))
            healthy = report(recorder, list(registries.values()), intrusions)
            healthy = observe(ports, list(metrics_urls.values()), out) and healthy
        finally:
            for port in ports.values():
                port.stop()
            if exporter is not None:
                exporter.stop()
            for server in reversed(servers):
                server.stop()
            for mesh in meshes.values():
                mesh.close()
            for provider in providers.values():
                provider.shutdown()
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
