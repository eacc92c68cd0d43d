"""The slow-endpoint tail on the pure balancer: the share of picks one slow endpoint gets.

    python benchmarks/balancer_share.py [--calls 20000] [--seeds 3]

The tail scenario of ``benchmarks/run.py`` on a fake clock, without sockets: 3 endpoints, one
ten times slower (2/20 ms and 20/200 ms), 8 closed-loop callers. Every attempt's latency is the
endpoint's plus the caller's own jitter, exponential with a mean of a given fraction of the fast
latency (on the benchmark machine the healthy p99 is 1.5-2.4x the fast delay: about 0.15-0.4).
p99 is the slow endpoint's latency as soon as it gets more than 1% of the calls.

Two scores side by side: meshlib's ``max(peak, typical x (pending + 1))`` and, for contrast,
Finagle's and tower's ``peak x (pending + 1)`` (what meshlib scored before). Deterministic:
seeded picks and jitter. Importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlib.config.model import Endpoint
    from meshlib.policy.balancer import EndpointSet, EndpointState

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ((0.002, 0.020), (0.020, 0.200))
JITTERS = (0.0, 0.15, 0.35, 1.0)
CONCURRENCY = 8


def finagle_set(endpoints: Sequence[Endpoint]) -> EndpointSet:
    """An EndpointSet whose states score ``peak x (pending + 1)`` (Finagle's PeakEwma.load)."""
    from meshlib.policy.balancer import EndpointSet, EndpointState

    class FinagleState(EndpointState):
        __slots__ = ()

        def score(self, now: float, decay: float) -> float:
            cost = self.cost(now, decay)
            if cost == 0.0 and self.pending:
                return 1e6 + self.pending  # Finagle's penalty while the first probe is out
            return cost * (self.pending + 1)

    es = EndpointSet(endpoints)
    es.states = [FinagleState(e) for e in endpoints]
    return es


def slow_share(
    finagle: bool, fast: float, slow: float, jitter: float, calls: int, seed: int
) -> float:
    """Share of the picks that went to the slow endpoint, over ``calls`` calls."""
    from meshlib.config.model import Endpoint
    from meshlib.policy.balancer import EndpointSet

    endpoints = [Endpoint(f"10.0.0.{i + 1}:80") for i in range(3)]
    es = finagle_set(endpoints) if finagle else EndpointSet(endpoints)
    latency = {id(s): fast for s in es.states}
    slow_state = es.states[2]
    latency[id(slow_state)] = slow
    picks, noise = random.Random(seed), random.Random(seed + 1)
    in_flight: list[tuple[float, int, float, EndpointState]] = []
    to_slow = 0

    def start(now: float, n: int) -> None:
        nonlocal to_slow
        state = es.pick(now, picks)
        assert state is not None
        es.on_start(state)
        to_slow += state is slow_state
        rtt = latency[id(state)]
        if jitter:
            rtt += noise.expovariate(1.0 / (jitter * fast))
        heapq.heappush(in_flight, (now + rtt, n, rtt, state))

    for n in range(CONCURRENCY):
        start(0.0, n)
    for n in range(CONCURRENCY, calls):
        now, _, rtt, state = heapq.heappop(in_flight)
        es.on_end(state, now, rtt, failed=False)
        start(now, n)
    return to_slow / calls


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls per simulation")
    parser.add_argument("--seeds", type=int, default=3, help="simulations per cell")
    args = parser.parse_args(argv)
    if str(REPO_ROOT) not in sys.path:  # the checkout, installed or not
        sys.path.insert(0, str(REPO_ROOT))
    print(f"Slow endpoint's share of {args.calls} calls, 8 callers, seeds 1-{args.seeds}:\n")
    print("| fast/slow ms | jitter (x fast) | Finagle peak x (pending + 1) | meshlib |")
    print("|---|--:|--:|--:|")
    for fast, slow in CONFIGS:
        for jitter in JITTERS:
            cells = []
            for finagle in (True, False):
                shares = [
                    slow_share(finagle, fast, slow, jitter, args.calls, seed)
                    for seed in range(1, args.seeds + 1)
                ]
                cells.append(f"{min(shares) * 100:.2f}-{max(shares) * 100:.2f}%")
            print(f"| {fast * 1e3:g}/{slow * 1e3:g} | {jitter:g} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
