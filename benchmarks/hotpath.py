"""Outbound hot-path budget in CPU instructions per call, independent of machine load.

    python benchmarks/hotpath.py [--quick] [--variants raw,mesh,...] [--jobs 2]
                                  [--cache-sim] [--keep DIR]

Wall-clock benchmarks (benchmarks/run.py) move with the load of a shared machine; instruction
counts do not. This script starts ``benchmarks/server.py`` (uvicorn on loopback) and runs its
own client part under ``valgrind --tool=callgrind`` twice per variant, with N and 2N keep-alive
GETs after the same warm-up (N = 200; 50 with ``--quick``). Start-up, imports, warm-up and exit
are the same in both runs, so the cost of one call is ``(I(2N) - I(N)) / N``. Only the client
process is counted; the server runs natively.

Variants (all ``GET /`` on one keep-alive connection, sync client):

* ``raw``: ``httpx.Client.get`` straight to the server;
* ``raw-traceparent``: as ``raw`` with a constant ``traceparent`` header on every request: what
  sending the header costs httpx and h11, which no tracing that propagates can avoid;
* ``mesh``: ``mesh.client().get`` through meshlib, the default set-up: metrics on, tracing with
  OpenTelemetry's no-op provider; the policy has a timeout and retries;
* ``no-metrics``: as ``mesh`` with ``Mesh(metrics=False)``;
* ``no-timeout``: as ``mesh`` with no ``timeout`` in the policy: no deadline, so no
  ``x-mesh-timeout-ms`` header on the attempt, no per-try cap of the timeouts and no deadline
  check per body chunk: ``mesh`` minus this is what the deadline costs a call (mostly the
  header's, in httpx, httpcore and h11: compare ``raw-traceparent``);
* ``no-tracing``: as ``mesh`` with the tracing hook bypassed (what a call cost before tracing
  existed): ``mesh`` minus this is the no-op provider's cost;
* ``propagate``: as ``mesh`` (no SDK) inside an attached remote span context, as while handling
  a request that came with a ``traceparent``: the context is injected into every attempt;
* ``sdk``: as ``mesh`` with an SDK ``TracerProvider`` and a ``BatchSpanProcessor`` whose
  exporter drops everything (span creation, attributes, queueing and the export thread count).
* ``sdk-unsampled``: as ``sdk`` with the SDK's ``ALWAYS_OFF`` sampler: the SDK decides that
  no trace is sampled (as a ratio sampler deciding no does); only the ``traceparent`` goes out;
* ``sdk-sampling0``: as ``sdk`` (the SDK's default sampler) with the policy's
  ``spec.tracing.sampling: 0``: meshlib decides that the traces it starts are not sampled;
* ``sdk-unsampled-parent``: as ``sdk`` (the SDK's default parent-based sampler) inside an
  attached remote span context whose flags say *not sampled* (``00``), as while handling a
  request whose caller did not sample it;
* ``propagate-fresh``, ``sdk-unsampled-parent-fresh``: as ``propagate`` and
  ``sdk-unsampled-parent``, but each call in a context of its own (a new context attached
  before the call and detached after it, as when every inbound request makes one call):
  what the first call made in a context costs, where meshlib has nothing worked out for it yet;
  the attach and detach are in both, so compare the two with each other;
* ``httproute``: as ``mesh`` with a Gateway API HTTPRoute of four rules attached to the
  service (an Exact path, a PathPrefix with a header match, a RegularExpression, then the
  catch-all ``/`` that ``GET /`` reaches after trying the other three) and a
  ResponseHeaderModifier on the catch-all: the cost of HTTPRoute routing on a call.
* ``mesh-3ep``: as ``mesh`` with three endpoints instead of one: three server processes (the
  same ``benchmarks/server.py``, each on its own port), so the balancer picks among three and
  the client keeps one keep-alive connection to each: what a call costs per extra endpoint.

To measure another checkout of meshlib, put it first on the path (the client inherits it)::

    PYTHONPATH=/path/to/checkout python benchmarks/hotpath.py

Variants that checkout cannot run (no tracing module) are reported as n/a. The output is a
Markdown table; the ``≈ µs`` column scales the extra instructions by the raw call's cost on the
issue's reference machine (240 µs per raw GET), the way docs/design.md states the budget.
Importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

VARIANTS = (
    "raw",
    "raw-traceparent",
    "mesh",
    "no-metrics",
    "no-timeout",
    "no-tracing",
    "propagate",
    "sdk",
    "sdk-unsampled",
    "sdk-sampling0",
    "sdk-unsampled-parent",
    "propagate-fresh",
    "sdk-unsampled-parent-fresh",
    "httproute",
    "mesh-3ep",
)
#: Variants whose service has three endpoints (three server processes).
THREE_ENDPOINTS = ("mesh-3ep",)
#: Variants with an SDK ``TracerProvider``.
SDK_VARIANTS = (
    "sdk",
    "sdk-unsampled",
    "sdk-sampling0",
    "sdk-unsampled-parent",
    "sdk-unsampled-parent-fresh",
)
#: Variants that make each call in a new context of its own (a new inbound request's).
FRESH_CONTEXT = ("propagate-fresh", "sdk-unsampled-parent-fresh")
#: A raw keep-alive GET on the issue's reference machine, in µs (docs/design.md).
REFERENCE_RAW_US = 240.0

POLICY = """\
apiVersion: meshlib/v1
kind: Service
metadata: {{name: backend, namespace: default}}
spec:
  endpoints:
{endpoints}
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {{name: backend-policy, namespace: default}}
spec:
  target: {{service: backend}}
  timeout: 5s
  retries: {{attempts: 2, retryOn: [5xx, reset, connect-failure]}}
"""

#: Appended to POLICY for the ``sdk-sampling0`` variant.
SAMPLING_ZERO = """\
---
apiVersion: meshlib/v1
kind: Mesh
metadata: {name: mesh}
spec: {tracing: {sampling: 0}}
"""

#: Appended to POLICY for the ``httproute`` variant.
HTTP_ROUTE = """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend-routes, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: backend}]
  rules:
  - name: health
    matches: [{path: {type: Exact, value: /healthz}}]
    backendRefs: [{name: backend, port: 80}]
  - name: api-v2
    matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: x-version, value: v2}]
    backendRefs: [{name: backend, port: 80}]
  - name: items
    matches: [{path: {type: RegularExpression, value: "/items/[0-9]+"}}]
    backendRefs: [{name: backend, port: 80}]
  - name: default
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-route, value: default}]}
    backendRefs: [{name: backend, port: 80}]
"""

#: A remote parent for the ``propagate`` variant (the W3C spec's example ids).
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331
#: The same ids as a header, for the ``raw-traceparent`` variant.
TRACEPARENT = f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"


# --- client part (runs under callgrind) -----------------------------------------------------------


def _client(variant: str, ports: Sequence[int]) -> tuple[Any, str, Any]:
    """The client for ``variant``, the URL it calls, and what to close/shut down at the end.
    ``ports``: the servers' ports; one endpoint per port for the mesh's service."""
    import httpx

    port = ports[0]

    if variant in ("raw", "raw-traceparent"):
        headers = {"traceparent": TRACEPARENT} if variant == "raw-traceparent" else None
        client = httpx.Client(headers=headers)
        return client, f"http://127.0.0.1:{port}/", None
    import meshlib

    options: dict[str, Any] = {}
    provider: Any = None
    if variant == "no-metrics":
        options["metrics"] = False
    elif variant in SDK_VARIANTS:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

        provider = (
            TracerProvider(sampler=ALWAYS_OFF) if variant == "sdk-unsampled" else TracerProvider()
        )
        provider.add_span_processor(BatchSpanProcessor(_drop_exporter(), max_queue_size=1 << 16))
        options["tracer_provider"] = provider
    extra = {"httproute": HTTP_ROUTE, "sdk-sampling0": SAMPLING_ZERO}.get(variant, "")
    endpoints = "\n".join(f"  - address: 127.0.0.1:{p}" for p in ports)
    policy = POLICY.format(endpoints=endpoints) + extra
    if variant == "no-timeout":
        policy = policy.replace("  timeout: 5s\n", "")
    mesh = meshlib.Mesh.from_text(policy, service="bench-client", namespace="default", **options)
    if variant == "no-tracing":
        mesh.tracing.trace_call = lambda call, request, service: call
    return mesh.client(), "http://backend/", provider


def _drop_exporter() -> Any:
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    return Drop()


def run_client(variant: str, ports: Sequence[int], calls: int, warmup: int) -> int:
    """``warmup`` + ``calls`` GETs; exits non-zero if any answer is not 200."""
    client, url, provider = _client(variant, ports)
    token = None
    get = client.get
    bad = 0
    if variant in FRESH_CONTEXT:
        from opentelemetry import context, trace

        flags = trace.TraceFlags(1 if variant == "propagate-fresh" else 0)
        parent = trace.SpanContext(TRACE_ID, SPAN_ID, True, flags)
        for _ in range(warmup + calls):
            # a new context per call, as each inbound request has its own
            call_token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(parent)))
            response = get(url)
            context.detach(call_token)
            bad += response.status_code != 200
    else:
        if variant in ("propagate", "sdk-unsampled-parent"):
            from opentelemetry import context, trace

            flags = trace.TraceFlags(1 if variant == "propagate" else 0)
            parent = trace.SpanContext(TRACE_ID, SPAN_ID, True, flags)
            token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(parent)))
        for _ in range(warmup + calls):
            response = get(url)
            bad += response.status_code != 200
    if token is not None:
        from opentelemetry import context

        context.detach(token)
    client.close()
    if provider is not None:
        provider.shutdown()  # the queued spans are exported (dropped) inside the measurement
    return 1 if bad else 0


def _supported(variant: str) -> bool:
    """Whether the meshlib on the path can run ``variant`` (older checkouts had no tracing)."""
    if variant in ("no-tracing", "propagate", *FRESH_CONTEXT, *SDK_VARIANTS):
        import importlib.util

        for name in ("meshlib.observe.tracing", "meshlib.tracing"):  # its home before the layout
            try:
                if importlib.util.find_spec(name) is not None:
                    return True
            except ModuleNotFoundError:  # no meshlib.observe package in that checkout
                pass
        return False
    if variant == "httproute":
        import importlib.util

        return importlib.util.find_spec("meshlib.policy.routes") is not None
    return True


# --- driver ---------------------------------------------------------------------------------------


#: Cache-simulation events as ``--cache-sim`` reports them: (column, callgrind events summed).
MISS_COLUMNS = (
    ("L1 instr misses", ("I1mr",)),
    ("L1 data misses", ("D1mr", "D1mw")),
    ("last-level misses", ("ILmr", "DLmr", "DLmw")),
    ("branch mispredicts", ("Bcm", "Bim")),
)


def counts(
    variant: str,
    ports: Sequence[int],
    calls: int,
    warmup: int,
    out_dir: Path,
    cache_sim: bool = False,
) -> dict[str, int]:
    """Callgrind's event totals (``Ir``; with ``cache_sim`` also the cache and branch
    simulation's) for the client process of ``variant`` with ``calls`` measured GETs."""
    out = out_dir / f"callgrind.{variant}.{calls}"
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        *(["--cache-sim=yes", "--branch-sim=yes"] if cache_sim else []),
        sys.executable,
        __file__,
        "--client",
        variant,
        "--ports",
        ",".join(map(str, ports)),
        "--calls",
        str(calls),
        "--warmup",
        str(warmup),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # same dict layouts in both runs
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{variant} ({calls} calls) failed:\n{result.stderr[-3000:]}")
    text = out.read_text()
    events = re.search(r"^events: (.+)$", text, re.MULTILINE)
    summary = re.search(r"^summary: (.+)$", text, re.MULTILINE)
    if events is None or summary is None:
        raise RuntimeError(f"no events or summary line in {out}")
    return dict(zip(events.group(1).split(), map(int, summary.group(1).split()), strict=True))


PerCall = dict[str, float]


def measure(
    variants: Sequence[str],
    calls: int,
    warmup: int,
    jobs: int,
    cache_sim: bool = False,
    keep: Path | None = None,
) -> dict[str, PerCall | None]:
    """Callgrind events per call for each variant (``None``: not supported by this meshlib).
    ``keep``: a directory to leave the callgrind output files in (for callgrind_annotate)."""
    # Here, not at the top: the measured ``--client`` processes import nothing of the harness.
    try:  # imported as the ``benchmarks`` package (e.g. from a test)
        from benchmarks import run as bench
    except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
        import run as bench  # type: ignore[no-redef]

    three = any(v in THREE_ENDPOINTS for v in variants)
    with (
        tempfile.TemporaryDirectory(prefix="hotpath-") as tmp,
        contextlib.ExitStack() as stack,
        ThreadPoolExecutor(jobs) as ex,
    ):
        servers = bench.start_servers([(0.0, 200)] * (3 if three else 1), stack, Path(tmp))
        ports = [server.port for server in servers]
        out_dir = keep if keep is not None else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        runnable = [v for v in variants if _supported(v)]
        futures = {
            (v, n): ex.submit(
                counts,
                v,
                ports if v in THREE_ENDPOINTS else ports[:1],
                n,
                warmup,
                out_dir,
                cache_sim,
            )
            for v in runnable
            for n in (calls, 2 * calls)
        }
        per_call: dict[str, PerCall | None] = dict.fromkeys(variants)
        for v in runnable:
            big, small = futures[v, 2 * calls].result(), futures[v, calls].result()
            per_call[v] = {event: (big[event] - small[event]) / calls for event in big}
        return per_call


def table(per_call: dict[str, PerCall | None], calls: int) -> str:
    raw_events = per_call.get("raw")
    raw = raw_events["Ir"] if raw_events else None
    lines = [
        f"Instructions per call, (I({2 * calls}) - I({calls})) / {calls}, client process only:",
        "",
        "| variant | instructions per call | vs raw | ≈ µs at 240 µs per raw call |",
        "|---|--:|--:|--:|",
    ]
    for variant, events in per_call.items():
        if events is None:
            lines.append(f"| {variant} | n/a | | |")
            continue
        value = events["Ir"]
        extra = us = ""
        if raw and variant != "raw":
            delta = value - raw
            extra = f"{delta:+,.0f} ({delta / raw:+.1%})"
            us = f"{delta / raw * REFERENCE_RAW_US:+.1f}"
        lines.append(f"| {variant} | {value:,.0f} | {extra} | {us} |")
    return "\n".join(lines)


def miss_table(per_call: dict[str, PerCall | None], calls: int) -> str:
    """Misses per call from callgrind's cache and branch simulation (``--cache-sim``), each
    with its difference to ``raw``: simulated caches (the host's L1 and last-level sizes), not
    the hardware's counters, but deterministic and load-independent like the instructions."""
    raw = per_call.get("raw")
    head = " | ".join(name for name, _ in MISS_COLUMNS)
    lines = [
        f"Simulated misses per call, (M({2 * calls}) - M({calls})) / {calls}, client process"
        " only (in brackets: added to raw):",
        "",
        f"| variant | {head} |",
        "|---|" + "--:|" * len(MISS_COLUMNS),
    ]
    for variant, events in per_call.items():
        if events is None or "D1mr" not in events:
            lines.append(f"| {variant} |" + " n/a |" * len(MISS_COLUMNS))
            continue
        cells = []
        for _, names in MISS_COLUMNS:
            value = sum(events[n] for n in names)
            cell = f"{value:,.0f}"
            if raw is not None and variant != "raw":
                cell += f" ({value - sum(raw[n] for n in names):+,.0f})"
            cells.append(cell)
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 50 instead of 200")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--jobs", type=int, default=2, help="callgrind runs at a time")
    parser.add_argument(
        "--cache-sim",
        action="store_true",
        help="also simulate caches and branch prediction, and report misses per call",
    )
    parser.add_argument(
        "--keep", type=Path, help="leave the callgrind output files in this directory"
    )
    parser.add_argument("--client", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=50, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client is not None:
        ports = [int(p) for p in args.ports.split(",")]
        return run_client(args.client, ports, args.calls, args.warmup)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    calls = 50 if args.quick else 200
    warmup = 20 if args.quick else 50
    per_call = measure(variants, calls, warmup, args.jobs, args.cache_sim, args.keep)
    print(table(per_call, calls))
    if args.cache_sim:
        print()
        print(miss_table(per_call, calls))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
