"""The registry's signing numbers (issue 12): renewals signed per second on one core, the time
from a join token to a first mutual-TLS call, and what 1,000 workloads renewing every 12 h cost.

    python benchmarks/signing.py [--quick] [--json out.json]

The registry is the real process of ``benchmarks/registry.py`` (``meshctl registry serve`` on a
fresh ``meshctl registry init`` data dir, SQLite, pinned to one core; the load runs on the
others), whose helpers this module imports. Three figures, one after another:

a. **renewals/s**: ``--clients`` workloads, each with its own SVID issued from ``DIR/ca`` and its
   own :class:`~meshlib.control.client.AsyncRegistryClient` (one mTLS connection), send
   ``--signs`` ``POST /v1/ca/sign`` renewals concurrently over their kept connections (the
   warm-up sign that opens each is not timed): the signing path alone. Every CSR carries a
   fresh EC P-256 key and is made before the clock starts, so the figure is the registry's
   (CSR checks, reading ``DIR/ca``, the signature, the answer), not the load generator's. The
   registry's CPU per sign comes from ``/proc/PID/stat`` (every thread). Each answer is checked:
   the leaf is for the caller's identity and for the CSR's key.
   Then ``--fresh-signs`` more, each on a NEW connection (a client made, one sign, closed), as
   :class:`~meshlib.control.remote.RemoteIssuer` does: the registry's CPU per renewal then
   includes the mutual-TLS handshake and the check of the caller's SVID.
b. **token → first mTLS call**: a workload ``reviews`` is bootstrapped from a token and served
   (``meshlib.serve``, strict mTLS) once; then ``--repetitions`` times: the admin creates a token
   for ``productpage`` (``POST /v1/tokens``), ``Mesh.from_registry(join_token=..., bundle=...)``
   bootstraps a fresh, empty SVID dir (key made locally, CSR, SVID written), and calls
   ``http://reviews.bench/`` until one answers 200 (bounded): p50/p99 of the whole, and of the
   bootstrap part (token created → ``from_registry`` returned).
c. **1,000 workloads renewing every 12 h** (``--workloads``, ``--renew-every``): DERIVED from
   a.'s CPU per renewal on a new connection (12 h apart, no connection is kept), not measured:
   signs/s = workloads / renew_every_s, and registry CPU = signs/s × CPU s per renewal, as a
   share of one core.

Markdown goes to stdout, progress to stderr. Every process and server it starts is stopped on
the way out. Importing this module has no side effects; everything happens in :func:`main`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if not __package__ and str(REPO_ROOT) not in sys.path:  # run as a script, not imported
    sys.path.insert(0, str(REPO_ROOT))  # so that ``benchmarks`` (a package of the repo) imports

from benchmarks.registry import (  # noqa: E402 - needs the path above when run as a script
    RegistryProcess,
    machine_info,
    percentile,
    registry_process,
    split_cores,
)

NS = "bench"
#: How long the first call of b. may keep failing (discovery not there yet) before the run fails.
FIRST_CALL_BOUND = 15.0

POLICY = """apiVersion: meshlib/v1
kind: Mesh
metadata: {{name: mesh}}
spec: {{trustDomain: {td}, mtls: strict}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews, namespace: {ns}}}
spec: {{serviceAccount: reviews}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: productpage, namespace: {ns}}}
spec: {{serviceAccount: productpage}}
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Settings:
    clients: int
    signs: int
    fresh_signs: int
    repetitions: int
    workloads: int
    renew_every: float


# -- a. renewals ----------------------------------------------------------------------------------


async def renewals(running: RegistryProcess, s: Settings, svids: Path) -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509 import load_pem_x509_certificate

    from meshlib.cli.registry import RegistryDir
    from meshlib.control.client import AsyncRegistryClient
    from meshlib.identity import SpiffeID
    from meshlib.identity.csr import make_csr

    registry_dir = RegistryDir(running.data, running.trust_domain)
    ids = [SpiffeID.for_workload(running.trust_domain, NS, f"w{c}") for c in range(s.clients)]
    dirs = [registry_dir.issue(NS, f"w{c}", svids / f"w{c}") for c in range(s.clients)]
    total = s.signs + s.fresh_signs + s.clients  # + one warm-up sign per client
    log(f"a. making {total} P-256 keys and CSRs (before the clock)")
    # (CSR, key's public numbers) per request; request n is sent by client n % clients
    work: list[list[tuple[bytes, ec.EllipticCurvePublicNumbers]]] = [[] for _ in ids]
    for n in range(total):
        key = ec.generate_private_key(ec.SECP256R1())
        c = n % s.clients
        work[c].append((make_csr(key, ids[c]), key.public_key().public_numbers()))
    warm = [batch[:1] for batch in work]
    kept = [
        batch[1 : 1 + s.signs // s.clients + (c < s.signs % s.clients)]
        for c, batch in enumerate(work)
    ]
    fresh = [batch[1 + len(kept[c]) :] for c, batch in enumerate(work)]
    wrong = 0

    def check(c: int, signed: Any, numbers: ec.EllipticCurvePublicNumbers) -> None:
        nonlocal wrong
        leaf = load_pem_x509_certificate(signed.certificate.encode("ascii"))
        public = leaf.public_key()
        if (
            signed.spiffe_id != str(ids[c])
            or not isinstance(public, ec.EllipticCurvePublicKey)
            or public.public_numbers() != numbers
        ):
            wrong += 1

    clients = [AsyncRegistryClient(running.url, svid_dir=str(d), timeout=60.0) for d in dirs]

    async def on_kept(c: int, batch: list[tuple[bytes, ec.EllipticCurvePublicNumbers]]) -> None:
        for csr, numbers in batch:
            check(c, await clients[c].sign(csr), numbers)

    async def on_new(c: int, batch: list[tuple[bytes, ec.EllipticCurvePublicNumbers]]) -> None:
        # what RemoteIssuer does: a client, so a connection and a handshake, per renewal
        for csr, numbers in batch:
            client = AsyncRegistryClient(running.url, svid_dir=str(dirs[c]), timeout=60.0)
            try:
                check(c, await client.sign(csr), numbers)
            finally:
                await client.aclose()

    async def timed(run: Any, batches: list[Any]) -> tuple[float, float]:
        cpu, started = running.cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(run(c, batch) for c, batch in enumerate(batches)))
        return time.perf_counter() - started, running.cpu_seconds() - cpu

    try:
        # warm-up: one sign each opens every client's connection (its handshake not timed)
        await asyncio.gather(*(on_kept(c, batch) for c, batch in enumerate(warm)))
        log(f"a. {s.signs} renewals from {s.clients} concurrent clients, connections kept")
        wall, cpu = await timed(on_kept, kept)
    finally:
        for client in clients:
            await client.aclose()
    log(f"a. {s.fresh_signs} renewals from {s.clients} concurrent clients, a connection each")
    fresh_wall, fresh_cpu = await timed(on_new, fresh)
    return {
        "signs": s.signs,
        "clients": s.clients,
        "wall_s": wall,
        "per_second": s.signs / wall,
        "registry_cpu_ms_per_sign": cpu / s.signs * 1000,
        "registry_cpu_util": cpu / wall,
        "fresh_signs": s.fresh_signs,
        "fresh_per_second": s.fresh_signs / fresh_wall,
        "registry_cpu_ms_per_fresh_sign": fresh_cpu / s.fresh_signs * 1000,
        "fresh_registry_cpu_util": fresh_cpu / fresh_wall,
        "wrong_answers": wrong,
    }


# -- b. token -> first mTLS call -------------------------------------------------------------------


def first_calls(running: RegistryProcess, s: Settings, work_dir: Path) -> dict[str, Any]:
    import meshlib
    from benchmarks.server import app as echo_app
    from meshlib.control.client import RegistryClient
    from meshlib.identity import SpiffeID

    bundle = Path(running.admin_svid) / "bundle.pem"
    reviews_id = SpiffeID.for_workload(running.trust_domain, NS, "reviews")
    productpage_id = str(SpiffeID.for_workload(running.trust_domain, NS, "productpage"))
    totals: list[float] = []
    bootstraps: list[float] = []
    attempts: list[int] = []
    with RegistryClient(running.url, svid_dir=running.admin_svid, timeout=30.0) as admin:
        admin.apply(POLICY.format(td=running.trust_domain, ns=NS))
        reviews = meshlib.Mesh.from_registry(
            running.url,
            service="reviews",
            namespace=NS,
            svid_dir=work_dir / "reviews-svid",
            cache_dir=work_dir / "cache-reviews",
            join_token=admin.create_token(str(reviews_id)).token,
            bundle=bundle,
            metrics=False,
        )
        server = None
        try:
            server = meshlib.serve(echo_app, mesh=reviews, svid_dir=str(work_dir / "reviews-svid"))
            for rep in range(s.repetitions):
                svid_dir = work_dir / f"productpage-{rep}"
                started = time.perf_counter()
                token = admin.create_token(productpage_id).token
                mesh = meshlib.Mesh.from_registry(
                    running.url,
                    service="productpage",
                    namespace=NS,
                    svid_dir=svid_dir,
                    cache_dir=work_dir / f"cache-productpage-{rep}",
                    join_token=token,
                    bundle=bundle,
                    metrics=False,
                )
                try:
                    booted = time.perf_counter()
                    tries = _call_until_ok(mesh, f"http://reviews.{NS}/")
                    done = time.perf_counter()
                finally:
                    mesh.close()
                totals.append((done - started) * 1000)
                bootstraps.append((booted - started) * 1000)
                attempts.append(tries)
                log(f"b. rep {rep + 1}: {totals[-1]:.0f} ms ({tries} call(s))")
        finally:
            if server is not None:
                server.stop()
            reviews.close()
    return {
        "repetitions": s.repetitions,
        "total_ms": _quantiles(totals),
        "bootstrap_ms": _quantiles(bootstraps),
        "calls_max": max(attempts),
    }


def _call_until_ok(mesh: Any, url: str) -> int:
    """Call ``url`` until it answers 200 (bounded); how many calls that took. A call that fails
    before discovery has the endpoint is retried at once: its time counts."""
    deadline = time.monotonic() + FIRST_CALL_BOUND
    tries = 0
    last = ""
    with mesh.client() as client:
        while time.monotonic() < deadline:
            tries += 1
            try:
                response = client.get(url)
            except Exception as exc:  # not there yet: counted in the time, tried again
                last = repr(exc)
                time.sleep(0.005)
                continue
            if response.status_code == 200:
                return tries
            last = f"{response.status_code} {response.text[:200]}"
            time.sleep(0.005)
    raise RuntimeError(f"no 200 from {url} within {FIRST_CALL_BOUND} s: last {last}")


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": statistics.median(values),
        "p99": percentile(values, 0.99),
        "max": max(values),
    }


# -- c. derived ----------------------------------------------------------------------------------


def derived(a: dict[str, Any], s: Settings) -> dict[str, Any]:
    """1,000 workloads renewing every 12 h, from a.'s CPU per renewal on a new connection
    (what each of them pays: 12 h apart, no connection is kept): not measured."""
    signs_per_second = s.workloads / s.renew_every
    cpu_percent = signs_per_second * a["registry_cpu_ms_per_fresh_sign"] / 1000 * 100
    return {
        "workloads": s.workloads,
        "renew_every_s": s.renew_every,
        "signs_per_second": signs_per_second,
        "registry_cpu_percent": cpu_percent,
    }


# -- report --------------------------------------------------------------------------------------


def _ceiling(cpu_ms: float) -> str:
    # a quick run's few signs may all fall inside one clock tick of /proc's CPU counters
    return f"{1000 / cpu_ms:.0f}" if cpu_ms > 0 else "unmeasured (under one clock tick)"


def report(results: dict[str, Any], command: str) -> str:
    m = results["machine"]
    lines = [
        f"`{command}` — {m['summary']}; registry on CPU {m['registry_cpu']}, load on "
        f"{m['load_cpus']}; load average {m['load_average'][0]:.2f} before, "
        f"{m['load_average'][1]:.2f} after",
        "",
        "| measurement | value |",
        "|---|---|",
    ]
    a = results.get("renewals")
    if a is not None:
        lines += [
            f"| renewals signed/s ({a['clients']} clients, {a['signs']} signs, mTLS connections "
            f"kept, fresh P-256 key each) | {a['per_second']:.0f} |",
            f"| registry CPU per sign (ms) | {a['registry_cpu_ms_per_sign']:.2f} |",
            f"| ... so one core signs at most (1000 / CPU ms per sign), /s | "
            f"{_ceiling(a['registry_cpu_ms_per_sign'])} |",
            f"| registry CPU utilisation meanwhile (%) | {a['registry_cpu_util'] * 100:.0f} |",
            f"| renewals signed/s, a new mTLS connection each (as `RemoteIssuer`; "
            f"{a['clients']} clients, {a['fresh_signs']} signs) | {a['fresh_per_second']:.0f} |",
            f"| registry CPU per renewal on a new connection (ms) | "
            f"{a['registry_cpu_ms_per_fresh_sign']:.2f} |",
            f"| registry CPU utilisation meanwhile (%) | "
            f"{a['fresh_registry_cpu_util'] * 100:.0f} |",
            f"| answers for the wrong identity or key | {a['wrong_answers']} |",
        ]
    b = results.get("first_call")
    if b is not None:
        t, boot = b["total_ms"], b["bootstrap_ms"]
        lines += [
            f"| token created → first 200 over strict mTLS, p50 / p99 / max (ms, "
            f"{b['repetitions']} reps) | {t['p50']:.0f} / {t['p99']:.0f} / {t['max']:.0f} |",
            f"| ... of which token → `from_registry` returned, p50 / p99 (ms) | "
            f"{boot['p50']:.0f} / {boot['p99']:.0f} |",
            f"| calls until the first 200 (max over reps) | {b['calls_max']} |",
        ]
    c = results.get("derived")
    if c is not None:
        lines += [
            f"| registry CPU for {c['workloads']:,} workloads renewing every "
            f"{c['renew_every_s'] / 3600:g} h (% of one core, DERIVED: {c['workloads']:,}/"
            f"{c['renew_every_s']:.0f} signs/s × CPU per renewal on a new connection) | "
            f"{c['registry_cpu_percent']:.4f} |",
        ]
    return "\n".join(lines)


PARTS = ("renewals", "first_call")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: the smoke test")
    parser.add_argument("--clients", type=int, help="concurrent renewing workloads in a. (16)")
    parser.add_argument("--signs", type=int, help="renewals timed in a. (5000)")
    parser.add_argument(
        "--fresh-signs", type=int, help="renewals on a new connection each in a. (1000)"
    )
    parser.add_argument("--repetitions", type=int, help="token → first call reps in b. (10)")
    parser.add_argument("--workloads", type=int, default=1000, help="c.'s workloads (1000)")
    parser.add_argument(
        "--renew-every", type=float, default=12 * 3600.0, help="c.'s renewal period, s (43200)"
    )
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument(
        "--only", action="append", choices=PARTS, help="run only this part (repeatable)"
    )
    args = parser.parse_args(argv)
    defaults = (
        {"clients": 4, "signs": 40, "fresh_signs": 20, "repetitions": 2}
        if args.quick
        else {
            "clients": 16,
            "signs": 5000,
            "fresh_signs": 1000,
            "repetitions": 10,
        }
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("clients", "signs", "fresh_signs", "repetitions", "workloads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.renew_every <= 0:
        parser.error("--renew-every must be above zero")
    s = Settings(
        args.clients,
        args.signs,
        args.fresh_signs,
        args.repetitions,
        args.workloads,
        args.renew_every,
    )
    parts = args.only or list(PARTS)
    registry_cpu, load_cpus = split_cores()
    load_before = os.getloadavg()[0]
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, load_cpus)  # restored below: a test calling main() keeps its cores
    results: dict[str, Any] = {}
    try:
        with (
            tempfile.TemporaryDirectory(prefix="meshlib-signing-bench-") as tmp,
            registry_process(Path(tmp) / "data", registry_cpu) as running,
        ):
            if "renewals" in parts:
                (Path(tmp) / "svids").mkdir()
                results["renewals"] = asyncio.run(renewals(running, s, Path(tmp) / "svids"))
                results["derived"] = derived(results["renewals"], s)
            if "first_call" in parts:
                (Path(tmp) / "work").mkdir()
                results["first_call"] = first_calls(running, s, Path(tmp) / "work")
    finally:
        os.sched_setaffinity(0, previous)
    results["machine"] = machine_info(registry_cpu, load_cpus)
    results["machine"]["load_average"] = [load_before, os.getloadavg()[0]]
    results["settings"] = vars(s)
    shown = list(argv) if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/signing.py", *shown])
    print(report(results, command))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: the registry process is stopped on the way


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    raise SystemExit(main())
