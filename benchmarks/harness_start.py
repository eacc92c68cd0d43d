"""How long the test harness's uvicorn runner takes to start and stop servers (wall time).

    python benchmarks/harness_start.py [--servers 5] [--rounds 7] [--json out.json]

``tests/harness/server.py``'s ``run_uvicorn`` drives uvicorn by hand (no 100 ms main-loop tick,
no fixed sleep in shutdown), so that end-to-end tests can start and stop real servers freely.
Each round starts ``--servers`` servers one after another (as a test does), checks that each
answers a request, then stops them all; the wall time of the starts and of the stops is
reported per server, best and median of the rounds. The tests only check the behaviour (every
server is listening and answering when ``run_uvicorn`` returns, and is gone after ``stop``);
the figure lives here and in docs/performance.md.

Importing this module has no side effects; everything happens in :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _harness() -> tuple[Any, Any]:
    """The harness's ``EchoBackend`` and ``run_uvicorn`` (the tests' package, by path)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from harness import EchoBackend, run_uvicorn

    return EchoBackend, run_uvicorn


def measure_round(servers: int) -> tuple[float, float]:
    """(start seconds, stop seconds) for ``servers`` servers started and stopped in a row."""
    import httpx

    echo_backend, run_uvicorn = _harness()
    backend = echo_backend("bench")
    started = time.perf_counter()
    handles = [run_uvicorn(backend) for _ in range(servers)]
    start_seconds = time.perf_counter() - started
    try:
        for handle in handles:
            if httpx.get(handle.url + "/").status_code != 200:
                raise RuntimeError(f"{handle.url} did not answer 200")
    finally:
        stopping = time.perf_counter()
        for handle in handles:
            handle.stop()
        stop_seconds = time.perf_counter() - stopping
    return start_seconds, stop_seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=5, help="servers per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write every round's numbers here")
    args = parser.parse_args(argv)
    if args.servers < 1 or args.rounds < 1:
        parser.error("--servers and --rounds must be at least 1")
    rounds = [measure_round(args.servers) for _ in range(args.rounds)]
    per_server = {
        "start": [start / args.servers * 1000 for start, _ in rounds],
        "stop": [stop / args.servers * 1000 for _, stop in rounds],
    }
    print(f"{args.servers} servers per round, {args.rounds} rounds (ms per server, wall time)\n")
    print("| step | best | median | worst |")
    print("|---|--:|--:|--:|")
    for step, values in per_server.items():
        best, median, worst = min(values), statistics.median(values), max(values)
        print(f"| {step} | {best:.2f} | {median:.2f} | {worst:.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"servers": args.servers, "ms_per_server": per_server}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
