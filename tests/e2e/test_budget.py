"""LOAD-2: the retry budget caps amplification during a full outage (real sockets, both drivers).

Scaled down from 100 calls/s × 30 s to 100 calls/s × 5 s. The budget is the default one:
retries ≤ 20 % of calls (over a 10 s window) + 10/s (a rate, at most one second's worth at
once), so upstream attempts stay within 1.2 × calls + 10 × duration + 10.
"""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client import CollectorRegistry

from e2e.conftest import service_yaml

pytestmark = pytest.mark.timeout(60)

RATE = 100  # calls per second
DURATION = 5.0  # seconds
BATCH = 10  # calls sent together, RATE / BATCH batches per second
MIN_PER_SECOND = 10.0  # default budget floor
RATIO = 0.2  # default budget ratio

POLICY = """---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: reviews-policy, namespace: default}
spec:
  target: {service: reviews}
  retries: {attempts: 3, retryOn: [5xx]}
  circuitBreaker: {consecutiveFailures: 1000000}
  outlierDetection: {consecutiveFailures: 1000000}
"""


def test_retry_budget_caps_amplification_in_a_full_outage(caller, make_mesh, echo_factory) -> None:
    backends = [echo_factory(name) for name in ("a", "b", "c")]
    for b in backends:
        b.set_status(503)
    registry = CollectorRegistry()
    mesh = make_mesh(
        service_yaml("reviews", [b.port for b in backends]) + POLICY, registry=registry
    )
    c = caller.bind(mesh)

    results: list[httpx.Response | Exception] = []
    batches = int(RATE * DURATION / BATCH)
    start = time.monotonic()
    for i in range(batches):
        results += c.many(BATCH, "GET", "http://reviews/item", concurrency=BATCH)
        # pace the load; a batch that ran late is not made up for (bounded run time)
        pause = start + (i + 1) * BATCH / RATE - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    duration = time.monotonic() - start

    calls = len(results)
    assert calls == batches * BATCH
    assert all(isinstance(r, httpx.Response) and r.status_code == 503 for r in results), [
        r for r in results if not isinstance(r, httpx.Response)
    ][:3]
    decisions = [r.extensions["mesh_decision"] for r in results]  # type: ignore[union-attr]
    upstream = sum(b.requests for b in backends)
    assert upstream == sum(len(d.attempts) for d in decisions)

    cap = (1 + RATIO) * calls + MIN_PER_SECOND * duration + MIN_PER_SECOND
    assert upstream <= cap, (upstream, cap, duration)
    assert upstream >= calls + 100  # the budget did allow retries: it caps, it does not forbid
    assert max(len(d.attempts) for d in decisions) <= 4  # attempts: 3 → at most 4 tries (≤ 5)
    assert any(d.budget == "exhausted" for d in decisions)
    skipped = registry.get_sample_value(
        "mesh_retry_budget_exhausted_total",
        {"source": "tester.default", "destination": "reviews.default"},
    )
    assert skipped is not None and skipped > 0

    # Once the floor is spent, retries track 20 % of new calls: no growing pile of retries.
    late = decisions[calls // 2 :]
    # The floor is a rate: the second half gets its share of it, not a fresh reserve.
    late_cap = RATIO * len(late) + MIN_PER_SECOND * duration / 2 + MIN_PER_SECOND
    assert sum(d.retries for d in late) <= late_cap
