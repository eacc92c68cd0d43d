"""LOAD-4 over real sockets: peak-EWMA P2C steers load away from a slow endpoint (round-robin
does not), and a fast-failing endpoint gets no more than its fair share — it is ejected by
outlier detection and retries to other hosts keep end-to-end success ≥ 99 %."""

from __future__ import annotations

import httpx
import pytest

from e2e.conftest import service_yaml

pytestmark = pytest.mark.timeout(60)

URL = "http://reviews/r"


def lb_policy(kind: str, extra: str = "") -> str:
    return f"""\
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {{name: reviews-policy}}
spec:
  target: {{service: reviews}}
  loadBalancer: {{type: {kind}}}
{extra}"""


@pytest.mark.parametrize(
    ("kind", "calls"), [("p2c-ewma", 320), ("round-robin", 200)], ids=["p2c-ewma", "round-robin"]
)
def test_slow_endpoint_share(caller, make_mesh, echo_factory, kind, calls) -> None:
    """Variant A (500 ms scaled to 100 ms): under 8 concurrent callers P2C over peak-EWMA
    sends the slow endpoint < 10 % of requests; round-robin keeps giving it ~25 %."""
    backends = [echo_factory(f"b{i}") for i in range(4)]
    slow = backends[2]
    slow.set_delay(0.1)
    mesh = make_mesh(
        service_yaml("reviews", [b.port for b in backends]) + "---\n" + lb_policy(kind)
    )
    c = caller.bind(mesh)

    results = c.many(calls, "GET", URL, concurrency=8)

    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results)
    assert sum(b.requests for b in backends) == calls
    share = slow.requests / calls
    if kind == "p2c-ewma":
        assert share < 0.10, [b.requests for b in backends]
        # Every fast endpoint gets a real share. Not an equal one: peak-EWMA follows measured
        # latency, and on a loaded machine the noise between the fast three moves their shares
        # (one fell to 0.19 once in CI); the property under test is the slow one's share.
        assert all(b.requests > 0.1 * calls for b in backends if b is not slow)
    else:
        assert share >= 0.20, [b.requests for b in backends]


FAST_FAILING = """\
  retries: {attempts: 2, retryOn: [5xx, "429"], backoff: {baseInterval: 1ms, maxInterval: 5ms}}
  circuitBreaker: {consecutiveFailures: 1000000}
  outlierDetection: {consecutiveFailures: 5, baseEjectionTime: 30s, maxEjectionPercent: 50}
"""


@pytest.mark.parametrize(
    ("kind", "status"),
    [("p2c-ewma", 503), ("p2c-ewma", 429), ("round-robin", 503)],
    ids=["p2c-503", "p2c-429", "rr-503"],
)
def test_fast_failing_endpoint_gets_no_more_than_its_fair_share(
    caller, make_mesh, echo_factory, kind, status
) -> None:
    """Variant B: an endpoint answering errors instantly does not attract load (fast errors
    count as slow), is ejected once it fails 5 times in a row, and retries on other hosts keep
    success ≥ 99 %."""
    backends = [echo_factory(f"b{i}") for i in range(4)]
    bad = backends[1]
    bad.set_status(status)
    mesh = make_mesh(
        service_yaml("reviews", [b.port for b in backends])
        + "---\n"
        + lb_policy(kind, FAST_FAILING)
    )
    c = caller.bind(mesh)
    calls = 200

    results = c.many(calls, "GET", URL, concurrency=4)

    ok = sum(isinstance(r, httpx.Response) and r.status_code == 200 for r in results)
    assert ok >= 0.99 * calls, [r for r in results if not isinstance(r, httpx.Response)][:3]
    attempts = sum(b.requests for b in backends)
    assert bad.requests <= attempts / 4, [b.requests for b in backends]
    for r in results:
        assert isinstance(r, httpx.Response)
        d = r.extensions["mesh_decision"]
        if d.retries:  # a retry went to another endpoint than the failed attempt
            assert d.attempts[0].endpoint != d.attempts[1].endpoint
    state = next(
        s
        for s in mesh.destinations()["reviews.default"].endpoints.states
        if s.address == f"127.0.0.1:{bad.port}"
    )
    if kind == "round-robin":
        # Round-robin keeps sending it its turn until it has failed 5 times in a row: then it
        # is ejected (30 s) and gets nothing more.
        # (at most 3 more already picked by the other concurrent callers meanwhile).
        assert state.times_ejected == 1
        assert state.is_ejected(mesh.clock())
        assert 5 <= bad.requests <= 5 + 3
        seen = bad.requests
        assert all(c.get(URL).status_code == 200 for _ in range(12))
        assert bad.requests == seen
    elif status == 429:
        # A 429 is push-back from a live endpoint: it is observed as slow (so P2C starves it)
        # but never ejected. Far below its fair share, not necessarily near zero under load.
        assert state.times_ejected == 0
        assert bad.requests <= 0.1 * attempts
    else:
        # P2C stops choosing it after its first failures (observed as 500 ms slow), so it is
        # ejected or starved: either way far below its fair share.
        assert state.times_ejected == 1 or bad.requests < 5
        assert bad.requests <= 0.05 * attempts
