"""FAULT-4 and FAULT-5 over real sockets: outlier ejection after consecutive failures, growing
re-ejections, the maxEjectionPercent cap, return after the ejection time, panic (fail open)
when too few endpoints are healthy, and fail-fast when there is no endpoint at all.

Ejection times are the default 30 s × n on the mesh's injectable clock (a :class:`FakeClock`
the test advances), not slept through."""

from __future__ import annotations

import time

import httpx
import pytest
from policy.fakes import FakeClock
from prometheus_client import CollectorRegistry

from e2e.conftest import service_yaml
from meshlib.errors import REASON_HEADER, NoHealthyEndpointsError

pytestmark = pytest.mark.timeout(30)

URL = "http://reviews/r"


def outlier_policy(
    *,
    failures: int = 5,
    base: str = "30s",
    max_percent: int = 20,
    panic: int = 50,
) -> str:
    # No retries and a breaker that never trips: each call is one attempt on one endpoint,
    # so the backend counters are exactly what the balancer did.
    return f"""\
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {{name: reviews-policy}}
spec:
  target: {{service: reviews}}
  retries: {{attempts: 0}}
  circuitBreaker: {{consecutiveFailures: 1000000}}
  loadBalancer: {{type: round-robin}}
  outlierDetection: {{consecutiveFailures: {failures}, baseEjectionTime: {base},
                     maxEjectionTime: 300s, maxEjectionPercent: {max_percent},
                     panicThreshold: {panic}}}
"""


def state_of(mesh, backend):
    for state in mesh.destinations()["reviews.default"].endpoints.states:
        if state.address == f"127.0.0.1:{backend.port}":
            return state
    raise AssertionError(f"no endpoint state for {backend}")


def advance_to(clock: FakeClock, when: float) -> None:
    """Move the mesh's clock to ``when`` (the end of an ejection)."""
    clock.advance(max(0.0, when - clock()))


def ejections_metric(registry: CollectorRegistry) -> float:
    return sum(
        s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == "mesh_endpoint_ejections_total"
    )


def call_until(c, mesh, backend, requests: int, limit: int = 100) -> tuple[float, float]:
    """Call until ``backend`` has seen ``requests``; returns the mesh-clock window of the
    call that delivered the last one."""
    for _ in range(limit):
        before = mesh.clock()
        c.outcome("GET", URL)
        after = mesh.clock()
        if backend.requests >= requests:
            return before, after
    raise AssertionError(f"{backend} got only {backend.requests} requests in {limit} calls")


def test_failing_endpoint_is_ejected_longer_each_time_and_returns(
    caller, make_mesh, echo_factory
) -> None:
    """FAULT-4: ejected after 5 consecutive failures for base × n; back after that time."""
    backends = [echo_factory(f"b{i}") for i in range(5)]
    bad = backends[0]
    registry = CollectorRegistry()
    clock = FakeClock()
    mesh = make_mesh(
        service_yaml("reviews", [b.port for b in backends]) + "---\n" + outlier_policy(),
        registry=registry,
        clock=clock,
    )
    c = caller.bind(mesh)
    bad.set_status(503)

    before, after = call_until(c, mesh, bad, 5)
    state = state_of(mesh, bad)
    assert state.times_ejected == 1
    assert before + 30.0 <= state.ejected_until <= after + 30.0
    assert ejections_metric(registry) == 1

    # While ejected it gets nothing and every call succeeds elsewhere.
    results = [c.get(URL) for _ in range(20)]
    assert all(r.status_code == 200 for r in results)
    assert bad.requests == 5
    assert all(b.requests >= 5 for b in backends[1:])

    # Just before its ejection ends it still gets nothing.
    advance_to(clock, state.ejected_until - 0.01)
    assert [c.get(URL).status_code for _ in range(8)] == [200] * 8
    assert bad.requests == 5

    # After its ejection time it is tried again; still failing, it is ejected for twice as long.
    advance_to(clock, state.ejected_until)
    before, after = call_until(c, mesh, bad, 10)
    assert state.times_ejected == 2
    assert before + 60.0 <= state.ejected_until <= after + 60.0
    assert ejections_metric(registry) == 2
    assert [c.get(URL).status_code for _ in range(8)] == [200] * 8
    assert bad.requests == 10

    # Healed, it returns after the (longer) ejection and serves again.
    bad.reset()
    advance_to(clock, state.ejected_until)
    served = [c.get(URL).json()["backend"] for _ in range(10)]
    assert served.count("b0") == 2  # round-robin over 5 again
    assert state.times_ejected == 2


def test_only_max_ejection_percent_is_ejected(caller, make_mesh, echo_factory) -> None:
    """FAULT-4: 3 of 10 failing with maxEjectionPercent 10: one ejected, the other two keep
    receiving traffic."""
    backends = [echo_factory(f"b{i}") for i in range(10)]
    failing = backends[:3]
    for b in failing:
        b.set_status(503)
    mesh = make_mesh(
        service_yaml("reviews", [b.port for b in backends])
        + "---\n"
        + outlier_policy(base="30s", max_percent=10)
    )
    c = caller.bind(mesh)

    c.many(60, "GET", URL)
    states = [state_of(mesh, b) for b in failing]
    now = mesh.clock()
    assert sum(s.is_ejected(now) for s in states) == 1
    assert all(s.consecutive_failures >= 5 for s in states if not s.is_ejected(now))
    counts = [b.requests for b in failing]

    c.many(30, "GET", URL)
    still_served = [
        b for b, s, n in zip(failing, states, counts, strict=True) if not s.is_ejected(now)
    ]
    assert len(still_served) == 2
    assert all(b.requests > n for b, n in zip(failing, counts, strict=True) if b in still_served)
    assert mesh.destinations()["reviews.default"].endpoints.panic is False


def test_panic_spreads_traffic_over_all_endpoints(caller, make_mesh, echo_factory) -> None:
    """FAULT-5a: 3 of 4 ejected (maxEjectionPercent 100) leaves 25 % healthy, below the 50 %
    panic threshold: the balancer fails open and uses every endpoint again."""
    backends = [echo_factory(f"b{i}") for i in range(4)]
    for b in backends[1:]:
        b.set_status(503)
    mesh = make_mesh(
        service_yaml("reviews", [b.port for b in backends])
        + "---\n"
        + outlier_policy(failures=2, base="30s", max_percent=100)
    )
    c = caller.bind(mesh)
    endpoints = mesh.destinations  # read after the first call created the destination

    for _ in range(30):
        c.outcome("GET", URL)
        if endpoints()["reviews.default"].endpoints.panic:
            break
    eps = endpoints()["reviews.default"].endpoints
    assert eps.panic is True
    now = mesh.clock()
    assert sum(s.is_ejected(now) for s in eps.states) == 3

    before = [b.requests for b in backends]
    results = [c.get(URL) for _ in range(20)]
    gained = [b.requests - n for b, n in zip(backends, before, strict=True)]
    assert all(g > 0 for g in gained), gained  # every endpoint, ejected or not, gets traffic
    assert sum(r.status_code == 200 for r in results) == gained[0] > 0
    assert eps.panic is True


def test_fail_closed_when_all_ejected_and_panic_disabled(caller, make_mesh, echo_factory) -> None:
    """panicThreshold 0: with every endpoint ejected calls fail fast with no healthy upstream."""
    backends = [echo_factory(f"b{i}") for i in range(3)]
    for b in backends:
        b.set_status(503)
    mesh = make_mesh(
        service_yaml("reviews", [b.port for b in backends])
        + "---\n"
        + outlier_policy(failures=2, base="30s", max_percent=100, panic=0)
    )
    c = caller.bind(mesh)
    outcomes = [c.outcome("GET", URL) for _ in range(6)]
    assert all(isinstance(o, httpx.Response) and o.status_code == 503 for o in outcomes)
    assert sum(b.requests for b in backends) == 6

    start = time.perf_counter()
    error = c.outcome("GET", URL)
    assert time.perf_counter() - start < 0.5  # far below any timeout; no attempt was made
    assert isinstance(error, NoHealthyEndpointsError), repr(error)
    assert error.decision.attempts == []
    assert sum(b.requests for b in backends) == 6


@pytest.mark.parametrize("local_responses", [False, True], ids=["raise", "local-503"])
def test_service_without_endpoints_fails_fast(
    caller, make_mesh, echo_factory, local_responses
) -> None:
    """FAULT-5b: no endpoints at all → NoHealthyEndpointsError at once (no attempt), not
    after the 2 s timeout."""
    text = (
        "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: reviews}\n"
        "spec: {endpoints: []}\n---\n"
        "apiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: p}\n"
        "spec: {target: {service: reviews}, timeout: 2s}\n"
    )
    mesh = make_mesh(text)
    c = caller.bind(mesh, local_responses=local_responses)
    for _ in range(3):
        start = time.perf_counter()
        result = c.outcome("GET", URL)
        elapsed = time.perf_counter() - start
        assert elapsed < 0.5  # the 2 s timeout was not waited for (attempts are checked too)
        if local_responses:
            assert isinstance(result, httpx.Response)
            assert result.status_code == 503
            assert result.headers[REASON_HEADER] == "no_healthy_endpoints"
        else:
            assert isinstance(result, NoHealthyEndpointsError), repr(result)
            assert isinstance(result, httpx.ConnectError)
            assert result.decision.reason == "no_healthy_endpoints"
