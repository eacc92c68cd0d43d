"""LOAD-3 (connection-pool overflow under concurrency) and the local rate limit, over real
sockets: refused calls fail fast, carry their reason, never reach the backend, never queue."""

from __future__ import annotations

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


def overflow_count(registry: CollectorRegistry) -> float:
    """Calls the mesh counted as refused for overflow (mesh_requests_total, any code)."""
    return sum(
        sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == "mesh_requests_total" and sample.labels.get("reason") == "overflow"
    )


@pytest.mark.parametrize("local_responses", [False, True], ids=["raise", "local-503"])
def test_pool_overflow_is_refused_locally_while_the_slot_is_held(
    caller, make_mesh, echo_factory, local_responses
) -> None:
    """LOAD-3: maxConnections 1 and one call held in flight at the backend: every further call
    is refused at once — it returns while the held call is still in flight (never queued
    behind it) — with reason overflow, counted, never reaching the backend. (How long a refusal
    takes is a benchmark: ``benchmarks/run.py --scenario overflow``, docs/performance.md.)"""
    backend = echo_factory("a")
    backend.set_delay(1.5, times=1)  # the held call (within the 2 s timeout)
    registry = CollectorRegistry()
    mesh = make_mesh(
        service_yaml("reviews", [backend.port]) + "---\n" + POOL_OF_ONE, registry=registry
    )
    c = caller.bind(mesh, local_responses=local_responses)

    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(c.outcome, "GET", "http://reviews/r")
        assert backend.wait_until(lambda b: b.in_flight == 1)
        refused = [c.outcome("GET", "http://reviews/r") for _ in range(20)]
        # Every refusal came back while the held call was still in flight at the backend.
        assert not held.done() and backend.in_flight == 1
        assert backend.requests == 1  # no refused call reached the backend
        first = held.result(timeout=10)
    assert isinstance(first, httpx.Response) and first.status_code == 200

    for r in refused:
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
    assert overflow_count(registry) == len(refused)
    assert backend.requests == 1
    assert backend.max_in_flight == 1  # the limit held

    # The slot is free again once the held call has ended.
    assert c.get("http://reviews/r").status_code == 200
    assert backend.requests == 2


@pytest.mark.parametrize("local_responses", [False, True], ids=["raise", "local-503"])
def test_pool_overflow_under_concurrency(caller, make_mesh, echo_factory, local_responses) -> None:
    """LOAD-3 under concurrency: maxConnections 1, a 50 ms backend, 3 callers × 30 calls: both
    answers and overflows occur, the limit holds, and only the answered calls reached the
    backend."""
    backend = echo_factory("a")
    backend.set_delay(0.05)
    registry = CollectorRegistry()
    mesh = make_mesh(
        service_yaml("reviews", [backend.port]) + "---\n" + POOL_OF_ONE, registry=registry
    )
    c = caller.bind(mesh, local_responses=local_responses)

    def client(_: int) -> list[object]:
        return [c.outcome("GET", "http://reviews/r") for _ in range(30)]

    with ThreadPoolExecutor(3) as pool:
        results = [r for batch in pool.map(client, range(3)) for r in batch]

    assert len(results) == 90  # nobody hung
    ok = [r for r in results if isinstance(r, httpx.Response) and r.status_code == 200]
    overflow = [r for r in results if r not in ok]
    assert ok and overflow, f"{len(ok)} ok / {len(overflow)} overflow"
    for r in overflow:
        decision = r.extensions["mesh_decision"] if local_responses else r.decision  # type: ignore[union-attr]
        assert decision.reason == "overflow" and decision.attempts == []
    assert overflow_count(registry) == len(overflow)
    assert backend.requests == len(ok)  # overflowed calls never reached it
    assert backend.max_in_flight == 1  # the limit held


RATE_5 = policy("  rateLimit: {requestsPerSecond: 5, burst: 5}\n")


@pytest.mark.parametrize("local_responses", [False, True], ids=["raise", "local-429"])
def test_rate_limit_refuses_the_call_past_the_burst(
    caller, make_mesh, echo_factory, local_responses
) -> None:
    """5 rps, burst 5: five immediate calls pass, the sixth is refused locally.

    The mesh's clock is the test's: "immediate" must not depend on how fast a loaded machine
    makes six calls (at 5/s a token comes back every 200 ms of real time)."""
    backend = echo_factory("a")
    now = [time.monotonic()]
    mesh = make_mesh(
        service_yaml("reviews", [backend.port]) + "---\n" + RATE_5, clock=lambda: now[0]
    )
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

    # Tokens come back at 5/s, one per 200 ms: 150 ms on, none yet; 250 ms on, one call passes.
    now[0] += 0.15
    refused = c.outcome("GET", "http://reviews/r")
    assert not (isinstance(refused, httpx.Response) and refused.status_code == 200)
    now[0] += 0.1
    assert c.get("http://reviews/r").status_code == 200
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
