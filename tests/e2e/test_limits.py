"""LOAD-3 (connection-pool overflow under concurrency) and the local rate limit, over real
sockets: refused calls fail fast, carry their reason, never reach the backend, never queue."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client import CollectorRegistry

from e2e.conftest import service_yaml
from meshlib.errors import REASON_HEADER, ConnectionPoolOverflowError, RateLimitedError

pytestmark = pytest.mark.timeout(30)


def policy(spec: str) -> str:
    return (
        "apiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: reviews-policy}\n"
        f"spec:\n  target: {{service: reviews}}\n{spec}"
    )


POOL_OF_ONE = policy("  timeout: 2s\n  connectionPool: {maxConnections: 1}\n")


def timed_calls(c, clients: int, per_client: int, url: str) -> list[tuple[object, float]]:
    """``clients`` threads each making ``per_client`` sequential calls; (outcome, seconds)."""

    def client(_: int) -> list[tuple[object, float]]:
        out = []
        for _ in range(per_client):
            start = time.perf_counter()
            result = c.outcome("GET", url)
            out.append((result, time.perf_counter() - start))
        return out

    with ThreadPoolExecutor(clients) as pool:
        return [item for batch in pool.map(client, range(clients)) for item in batch]


def overflow_durations(registry: CollectorRegistry) -> dict[str, float]:
    """The mesh's own latency histogram for overflowed calls: bucket bound -> count."""
    buckets: dict[str, float] = {}
    for metric in registry.collect():
        for sample in metric.samples:
            if (
                sample.name == "mesh_request_duration_seconds_bucket"
                and sample.labels.get("reason") == "overflow"
            ):
                le = sample.labels["le"]
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return buckets


@pytest.mark.parametrize("local_responses", [False, True], ids=["raise", "local-503"])
def test_pool_overflow_fails_fast_under_concurrency(
    caller, make_mesh, echo_factory, local_responses
) -> None:
    """LOAD-3: maxConnections 1, 50 ms backend, 3 callers × 30: both 200 and overflow occur,
    overflow is immediate (never queued behind a 50 ms call) and never reaches the backend."""
    backend = echo_factory("a")
    backend.set_delay(0.05)
    registry = CollectorRegistry()
    mesh = make_mesh(
        service_yaml("reviews", [backend.port]) + "---\n" + POOL_OF_ONE, registry=registry
    )
    c = caller.bind(mesh, local_responses=local_responses)

    results = timed_calls(c, clients=3, per_client=30, url="http://reviews/r")

    assert len(results) == 90  # nobody hung
    ok, overflow = [], []
    for r, t in results:
        is_ok = isinstance(r, httpx.Response) and r.status_code == 200
        (ok if is_ok else overflow).append((r, t))
    assert ok and overflow, f"{len(ok)} ok / {len(overflow)} overflow"
    for r, _ in overflow:
        if local_responses:
            assert isinstance(r, httpx.Response)
            assert r.status_code == 503
            assert r.headers[REASON_HEADER] == "overflow"
            decision = r.extensions["mesh_decision"]
        else:
            assert isinstance(r, ConnectionPoolOverflowError), repr(r)
            assert isinstance(r, httpx.PoolTimeout)  # still an httpx error for plain code
            assert r.status == 503
            decision = r.decision
        assert decision.reason == "overflow"
        assert decision.attempts == []  # refused before any attempt
    # Overflows take < 10 ms inside the mesh (its own latency histogram, so hand-offs in this
    # test's caller do not count) and are counted as overflows. Server and callers share one
    # interpreter here, so a GIL hand-off (5 ms each) can delay a rare one: 95 % under 10 ms,
    # every one under the 50 ms that a call queued behind the backend would take.
    buckets = overflow_durations(registry)
    assert buckets["+Inf"] == len(overflow)
    assert buckets["0.01"] >= 0.95 * len(overflow), buckets
    assert buckets["0.05"] == len(overflow), buckets
    # Seen from the caller too: typically far below the 50 ms a queued call would wait.
    times = sorted(t for _, t in overflow)
    assert statistics.median(times) < 0.010, times
    assert times[-1] < 0.5, times  # never hangs
    assert all(t >= 0.05 for _, t in ok)  # the successes really waited for the backend
    assert backend.requests == len(ok)  # overflowed calls never reached it
    assert backend.max_in_flight == 1  # the limit held


RATE_5 = policy("  rateLimit: {requestsPerSecond: 5, burst: 5}\n")


@pytest.mark.parametrize("local_responses", [False, True], ids=["raise", "local-429"])
def test_rate_limit_refuses_the_call_past_the_burst(
    caller, make_mesh, echo_factory, local_responses
) -> None:
    """5 rps, burst 5: five immediate calls pass, the sixth is refused locally."""
    backend = echo_factory("a")
    mesh = make_mesh(service_yaml("reviews", [backend.port]) + "---\n" + RATE_5)
    c = caller.bind(mesh, local_responses=local_responses)

    for _ in range(5):
        assert c.get("http://reviews/r").status_code == 200
    sixth = c.outcome("GET", "http://reviews/r")
    if local_responses:
        assert isinstance(sixth, httpx.Response)
        assert sixth.status_code == 429
        assert sixth.headers[REASON_HEADER] == "rate_limited"
        decision = sixth.extensions["mesh_decision"]
    else:
        assert isinstance(sixth, RateLimitedError), repr(sixth)
        assert sixth.status == 429
        decision = sixth.decision
    assert decision.reason == "rate_limited"
    assert decision.attempts == []
    assert backend.requests == 5

    # Tokens come back at 5/s: within ~200 ms a call passes again.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        r = c.outcome("GET", "http://reviews/r")
        if isinstance(r, httpx.Response) and r.status_code == 200:
            break
        time.sleep(0.02)
    else:
        pytest.fail("the rate limit never refilled")
    assert backend.requests == 6


def test_rate_limit_is_per_destination(caller, make_mesh, echo_factory) -> None:
    """Exhausting reviews' bucket leaves calls to another service untouched."""
    a, b = echo_factory("a"), echo_factory("b")
    mesh = make_mesh(
        "---\n".join([service_yaml("reviews", [a.port]), service_yaml("ratings", [b.port]), RATE_5])
    )
    c = caller.bind(mesh)
    outcomes = [c.outcome("GET", "http://reviews/r") for _ in range(8)]
    assert sum(isinstance(o, RateLimitedError) for o in outcomes) >= 2
    assert all(c.get("http://ratings/r").status_code == 200 for _ in range(8))
    assert b.requests == 8
