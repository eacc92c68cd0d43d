"""What one ``Mesh.set_endpoints`` costs, and that it does not grow with the size of the policy.

    python benchmarks/endpoint_churn.py [--quick] [--rounds 5] [--json out.json] [--callgrind]

A mesh is built on a policy of N services (10 and 10,000; ``--quick``: 10 and 1,000), one
static endpoint each; one service's destination exists (it has been called), and its
discovered set alternates between two sets of 10 endpoints, 5 of them shared (so every update
keeps 5 endpoint states and adds 5). The figure is the best of ``--rounds`` runs of this
thread's CPU time per update (the machine may be shared; the best run is the least disturbed).
``--callgrind`` also counts instructions per update under valgrind (the difference between a
run of K and one of 2K updates, divided by K: start-up and loading cancel out), which do not
depend on the machine's load.

No sockets. Importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshlib import Mesh
from meshlib.config.loader import load_texts
from meshlib.config.model import Endpoint

#: The loader takes at most 1000 documents per file.
_PER_FILE = 1000
KEY = "s0.default"
SETS = (
    tuple(Endpoint(f"10.0.0.1:{8000 + i}") for i in range(10)),
    tuple(Endpoint(f"10.0.0.1:{8005 + i}") for i in range(10)),
)


def policy(services: int) -> list[tuple[str, str]]:
    docs = [
        "apiVersion: meshlib/v1\nkind: Service\n"
        f"metadata: {{name: s{i}}}\n"
        f"spec: {{endpoints: [{{address: 127.0.0.1:{1000 + i % 5000}}}]}}\n"
        for i in range(services)
    ]
    return [
        (f"services-{j}.yaml", "---\n".join(docs[j : j + _PER_FILE]))
        for j in range(0, services, _PER_FILE)
    ]


def mesh_of(services: int) -> Mesh:
    mesh = Mesh(load_texts(policy(services), version=1), service="bench", metrics=False)
    mesh.destination(KEY, mesh.router)  # the destination exists: updates go through it
    return mesh


def churn(mesh: Mesh, updates: int) -> None:
    for i in range(updates):
        mesh.set_endpoints(KEY, SETS[i & 1])


def per_update(services: int, updates: int, rounds: int) -> float:
    """Best CPU seconds per update over ``rounds`` runs."""
    mesh = mesh_of(services)
    try:
        best = float("inf")
        for _ in range(rounds):
            start = time.thread_time()
            churn(mesh, updates)
            best = min(best, (time.thread_time() - start) / updates)
        states = mesh.destinations()[KEY].endpoints.states  # the static one, then the set
        if [s.endpoint for s in states[1:]] != list(SETS[(updates - 1) & 1]):
            raise AssertionError("set_endpoints did not reach the destination")
        return best
    finally:
        mesh.close()


def instructions(services: int, updates: int) -> float:
    """Instructions per update under callgrind: (Ir at 2K - Ir at K) / K."""
    counts = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in (updates, 2 * updates):
            out = Path(tmp) / f"cg.{k}"
            subprocess.run(
                [
                    "valgrind",
                    "--tool=callgrind",
                    f"--callgrind-out-file={out}",
                    sys.executable,
                    __file__,
                    "--inner",
                    str(services),
                    str(k),
                ],
                check=True,
                capture_output=True,
                env={**os.environ, "PYTHONHASHSEED": "0"},
            )
            match = re.search(r"^summary: (\d+)", out.read_text(), re.MULTILINE)
            assert match is not None, "no callgrind summary"
            counts.append(int(match.group(1)))
    return (counts[1] - counts[0]) / updates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--inner", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:  # one callgrind run: build, then churn
        churn(mesh_of(args.inner[0]), args.inner[1])
        return 0
    sizes = (10, 1_000) if args.quick else (10, 10_000)
    updates = 2_000 if args.quick else 20_000
    figures: dict[str, Any] = {"updates": updates, "us_per_update": {}, "ir_per_update": {}}
    print("| services in the policy | CPU per set_endpoints | instructions |")
    print("|---|---|---|")
    for n in sizes:
        us = per_update(n, updates, args.rounds) * 1e6
        figures["us_per_update"][str(n)] = us
        ir = instructions(n, 200) if args.callgrind else None
        figures["ir_per_update"][str(n)] = ir
        shown = "—" if ir is None else f"{ir:,.0f}"
        print(f"| {n:,} | {us:.2f} µs | {shown} |")
    small, large = (figures["us_per_update"][str(n)] for n in sizes)
    figures["ratio"] = large / small
    print(f"\nratio {sizes[1]:,} / {sizes[0]:,} services: {figures['ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
