"""Start-up cost of meshlib: CPU time and RSS of ``import meshlib`` and of the first Mesh + call.

    python benchmarks/startup.py [--runs 11] [--importtime] [--breakdown] [--callgrind]
        [--inherit-env] [--json]

Each run is a fresh ``python`` process that reads its own CPU time (``time.process_time``, user +
system) and resident set (``VmRSS`` in ``/proc/self/status``) at three points:

1. before the import (the interpreter, ``site`` and the child's few stdlib imports);
2. after ``import meshlib``;
3. after ``Mesh.from_text`` of one service (default options: metrics on, tracing left to
   OpenTelemetry's global provider, which nothing here sets: OpenTelemetry is not loaded) and
   one ``GET`` through ``mesh.client()`` to ``benchmarks/server.py`` on loopback.

The anchor, ``raw httpx``, does the same with ``import httpx`` and one ``httpx.Client().get``;
the two variants alternate, run by run, and the last row is meshlib's share (the difference).
It prints the median of ``--runs`` runs of each difference, the heavy modules loaded at points
2 and 3, and with ``--importtime`` the sum of ``-X importtime``'s self times for ``import
meshlib`` (median of 5 runs per module; modules ``python -c pass`` loads are left out) with its
ten heaviest modules. ``--callgrind`` adds each variant's instructions (valgrind callgrind, one
run each: they do not move with the machine's load as CPU time does).

Bytecode: the children cache it under a temporary ``PYTHONPYCACHEPREFIX`` (written by one
discarded run per variant), as an installed package would have it. ``--inherit-env`` runs them
in this environment as is instead: where ``PYTHONDONTWRITEBYTECODE=1`` is set, an editable
checkout's sources are then compiled in every run (how issue 15 was measured).

``benchmarks/run.py --scenario import`` measures the import alone against ``python -c pass``
inside the overhead benchmark; this script adds the first Mesh, memory and the anchor. To
measure another checkout, put it first on the path (the children inherit it; they run in
``benchmarks/``, so the current directory does not shadow it): ``PYTHONPATH=/path/to/checkout
python benchmarks/startup.py``. Importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

try:  # imported as the ``benchmarks`` package (e.g. from a test)
    from benchmarks import run as bench
except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
    import run as bench  # type: ignore[no-redef]

BENCH_DIR = Path(__file__).resolve().parent

#: Third-party and stdlib modules worth naming when they are loaded (issue 15, item 3).
HEAVY = (
    "yaml",
    "re2",
    "decimal",
    "difflib",
    "prometheus_client",
    "opentelemetry",
    "tenacity",
    "cryptography",
    "jwt",
    "asyncio",
    "anyio",
    "ssl",
    "click",
    "pygments",
)

#: The children's resident set in kB (Linux).
RSS = """\
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")
"""

#: The child: three readings of (CPU s, RSS kB), then the heavy modules loaded at each point.
#: ``{imports}`` and ``{call}`` are the variant's: meshlib, or raw httpx as the anchor.
CHILD = """\
import sys, time
{rss}heavy = {heavy!r}
loaded = lambda: [m for m in heavy if m in sys.modules]
readings = [(time.process_time(), rss())]
{imports}
readings.append((time.process_time(), rss()))
after_import = loaded()
{call}
readings.append((time.process_time(), rss()))
print(repr((readings, after_import, loaded(), status)))
"""

#: What each variant imports, then how it makes its first call (``status`` is the answer's).
VARIANTS = {
    "meshlib": (
        "import meshlib",
        "mesh = meshlib.Mesh.from_text({policy!r}, service='startup', namespace='default')\n"
        "with mesh.client() as client:\n"
        "    status = client.get('http://backend/').status_code",
    ),
    "raw httpx": (
        "import httpx",
        "with httpx.Client() as client:\n"
        "    status = client.get('http://127.0.0.1:{port}/').status_code",
    ),
}

POLICY = """\
apiVersion: meshlib/v1
kind: Service
metadata: {{name: backend, namespace: default}}
spec:
  endpoints:
  - address: 127.0.0.1:{port}
"""


def child_env(pycache: str | None) -> dict[str, str]:
    """The children's environment: bytecode cached under ``pycache``, or inherited as is."""
    env = dict(os.environ)
    if pycache is not None:
        # PYTHONDONTWRITEBYTECODE=1 (set on some machines) makes every run compile meshlib's
        # sources again (an editable install has no .pyc otherwise): ~60 ms that a deployed
        # package, compiled at install time, never pays.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    return env


#: ``--breakdown``: after ``import meshlib``, what each part the first Mesh and call load adds,
#: in the order they load (each line is charged only what the lines above did not load).
BREAKDOWN = """\
import importlib, sys, time
{rss}import meshlib
out = []
for name in {parts!r}:
    r, t = rss(), time.process_time()
    if name == "httpx.HTTPTransport()":
        import httpx
        httpx.HTTPTransport()
    else:
        importlib.import_module(name)
    out.append((name, time.process_time() - t, rss() - r))
print(repr(out))
"""

#: What the first ``Mesh.from_text`` + call loads beyond ``import meshlib``, in load order
#: (OpenTelemetry no longer: it loads once the process imports it, ``meshlib.observe.tracehook``).
BREAKDOWN_PARTS = (
    "yaml",
    "meshlib.config.loader",
    "prometheus_client",
    "meshlib.observe.metrics",
    "httpcore",
    "httpx.HTTPTransport()",
)


def breakdown(env: dict[str, str], runs: int) -> list[tuple[str, float, float]]:
    """``(part, CPU ms, RSS kB)`` per part of :data:`BREAKDOWN_PARTS`, medians of ``runs``."""
    code = BREAKDOWN.format(rss=RSS, parts=BREAKDOWN_PARTS)
    results = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            cwd=str(BENCH_DIR),
        ).stdout
        results.append(eval(out))  # our own child's repr()
    return [
        (
            name,
            statistics.median(run[i][1] for run in results) * 1e3,
            statistics.median(run[i][2] for run in results),
        )
        for i, name in enumerate(BREAKDOWN_PARTS)
    ]


Run = tuple[list[tuple[float, int]], list[str], list[str]]


def one_run(variant: str, port: int, env: dict[str, str]) -> Run:
    """The readings, and the heavy modules loaded after the import and after the call."""
    imports, call = VARIANTS[variant]
    call = call.format(policy=POLICY.format(port=port), port=port)
    code = CHILD.format(rss=RSS, heavy=HEAVY, imports=imports, call=call)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
        cwd=str(BENCH_DIR),  # not the checkout root: PYTHONPATH picks the meshlib
    ).stdout
    readings, after_import, after_call, status = eval(out)  # our own child's repr()
    if status != 200:
        raise RuntimeError(f"the call answered {status}")
    return readings, after_import, after_call


VALGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")


def collected(env: dict[str, str], code: str) -> int:
    """Instructions a fresh ``python -c code`` executes, start to exit (valgrind callgrind)."""
    err = subprocess.run(
        [*VALGRIND, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        env={**env, "PYTHONHASHSEED": "0"},  # the same dict layouts, so the same count each run
        cwd=str(BENCH_DIR),
    ).stderr
    found = re.search(r"Collected : (\d+)", err)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind: {err[-500:]}")
    return int(found[1])


def instructions(env: dict[str, str], port: int) -> dict[str, tuple[int, int]]:
    """``--callgrind``: per variant, the instructions of its import and of its first Mesh and
    call, each over the process before it (``python -c pass``, then the import alone). Unlike
    CPU time these do not move with the machine's load: one run per reading."""
    base = collected(env, "pass")
    counts = {}
    for variant, (imports, call) in VARIANTS.items():
        call = call.format(policy=POLICY.format(port=port), port=port)
        imported = collected(env, imports)
        called = collected(env, f"{imports}\n{call}\nassert status == 200")
        counts[variant] = (imported - base, called - imported)
    return counts


def importtime(env: dict[str, str], runs: int) -> tuple[float, list[tuple[float, float, str]]]:
    """Sum of self µs for ``import meshlib``, and ``(self, cumulative, module)`` per module:
    the median over ``runs`` runs of ``-X importtime`` (one run is as noisy as the machine)."""
    at_startup = set()  # site, encodings... are loaded by `python -c pass` too
    for line in subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(BENCH_DIR),
    ).stderr.splitlines():
        m = re.match(r"import time:.*\|\s*(\S+)$", line)
        if m:
            at_startup.add(m[1])
    per_run: list[dict[str, tuple[int, int]]] = []
    for _ in range(runs):
        err = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import meshlib"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            cwd=str(BENCH_DIR),  # not the checkout root: PYTHONPATH picks the meshlib
        ).stderr
        found = {}
        for line in err.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s*(\S+)", line)
            if m and m[3] not in at_startup:
                found[m[3]] = (int(m[1]), int(m[2]))
        per_run.append(found)
    modules = set().union(*per_run)
    rows = [
        (
            statistics.median(run.get(name, (0, 0))[0] for run in per_run),
            statistics.median(run.get(name, (0, 0))[1] for run in per_run),
            name,
        )
        for name in modules
    ]
    return sum(row[0] for row in rows), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--importtime", action="store_true")
    parser.add_argument(
        "--inherit-env",
        action="store_true",
        help="run the children in this environment as is (with PYTHONDONTWRITEBYTECODE=1, "
        "meshlib's sources are compiled in every run)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also what each part the first Mesh and call load adds (CPU, RSS)",
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="also the instructions of the import and of the first Mesh and call, each variant "
        "once under valgrind callgrind (~1 min; stable where CPU time is not)",
    )
    parser.add_argument("--json", action="store_true", help="print the raw readings as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="meshlib-startup-") as tmp:
        pycache = Path(tmp) / "pycache"
        env = child_env(None if args.inherit_env else str(pycache))
        with contextlib.ExitStack() as stack:
            port = bench.start_servers([(0.0, 200)], stack, Path(tmp))[0].port
            runs: dict[str, list[Run]] = {variant: [] for variant in VARIANTS}
            for variant in VARIANTS:
                one_run(variant, port, env)  # writes the .pyc files; not counted
            for _ in range(args.runs):  # interleaved, so a change of load hits both alike
                for variant in VARIANTS:
                    runs[variant].append(one_run(variant, port, env))
            counts = instructions(env, port) if args.callgrind else None
        imports = importtime(env, 5) if args.importtime else None
        parts = breakdown(env, args.runs) if args.breakdown else None
    med = statistics.median
    print(f"python {sys.version.split()[0]}, {args.runs} fresh processes per variant, medians")
    print()
    print(
        "| variant | import CPU ms | first call CPU ms | both CPU ms "
        "| import RSS MB | first call RSS MB | both RSS MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    figures: dict[str, tuple[float, ...]] = {}
    for variant, variant_runs in runs.items():
        readings = [r for r, _, _ in variant_runs]
        cpu = [
            med((r[i][0] - r[j][0]) * 1e3 for r in readings) for i, j in ((1, 0), (2, 1), (2, 0))
        ]
        mem = [
            med((r[i][1] - r[j][1]) / 1024 for r in readings) for i, j in ((1, 0), (2, 1), (2, 0))
        ]
        figures[variant] = (*cpu, *mem)
        cells = " | ".join(f"{x:.0f}" for x in cpu) + " | " + " | ".join(f"{x:.1f}" for x in mem)
        print(f"| {variant} | {cells} |")
    share = [m - r for m, r in zip(figures["meshlib"], figures["raw httpx"], strict=True)]
    cells = " | ".join(f"{x:+.0f}" for x in share[:3]) + " | "
    cells += " | ".join(f"{x:+.1f}" for x in share[3:])
    print(f"| meshlib − raw httpx | {cells} |")
    print()
    for variant, variant_runs in runs.items():
        after_import, after_call = variant_runs[0][1], variant_runs[0][2]
        print(f"{variant}: heavy modules after the import: {', '.join(after_import) or 'none'}")
        print(f"{variant}: heavy modules after the call: {', '.join(after_call) or 'none'}")
    print("bytecode: " + ("as the environment says" if args.inherit_env else "cached (.pyc)"))
    if counts is not None:
        print()
        print("Instructions (valgrind callgrind, PYTHONHASHSEED=0, one run each, millions):")
        print()
        print("| variant | import | first call | both |")
        print("|---|---:|---:|---:|")
        for variant, (imported, called) in counts.items():
            both = (imported + called) / 1e6
            print(f"| {variant} | {imported / 1e6:.1f} | {called / 1e6:.1f} | {both:.1f} |")
        mesh, raw = counts["meshlib"], counts["raw httpx"]
        diff = (mesh[0] - raw[0], mesh[1] - raw[1])
        print(
            f"| meshlib − raw httpx | {diff[0] / 1e6:+.1f} | {diff[1] / 1e6:+.1f} "
            f"| {(diff[0] + diff[1]) / 1e6:+.1f} |"
        )
    if imports is not None:
        total, rows = imports
        print(
            f"-X importtime, median of 5 runs, sum of self times for import meshlib: "
            f"{total / 1e3:.0f} ms"
        )
        for self_us, cumulative_us, name in sorted(rows, reverse=True)[:10]:
            print(f"  {name}: self {self_us / 1e3:.1f} ms, cumulative {cumulative_us / 1e3:.1f}")
    if parts is not None:
        print()
        print("After `import meshlib`, each part the first Mesh and call load, in load order")
        print(
            f"(medians of {args.runs} fresh processes; a part is charged what those above did not"
        )
        print("load):")
        print()
        print("| part | CPU ms | RSS kB |")
        print("|---|---:|---:|")
        for name, cpu_ms, rss_kb in parts:
            print(f"| `{name}` | {cpu_ms:.1f} | {rss_kb:.0f} |")
    if args.json:
        data: dict[str, Any] = {variant: variant_runs for variant, variant_runs in runs.items()}
        print(json.dumps(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
