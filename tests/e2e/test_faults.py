"""FAULT-15 over real sockets: faults from the policy file (abort share, reason header, never
sent, never retried; header-matched delay), client-sent "fault" headers doing nothing, and the
``mesh_faults`` pytest fixture of :mod:`meshlib.testing` (faults for one test, then undone)."""

from __future__ import annotations

import math
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry

from e2e.conftest import service_yaml
from meshlib.errors import REASON_HEADER
from meshlib.testing import FaultInjector

pytestmark = pytest.mark.timeout(30)

RETRY_ON_5XX = """\
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: reviews-policy}
spec:
  target: {service: reviews}
  retries: {attempts: 3, retryOn: [5xx], backoff: {baseInterval: 1ms, maxInterval: 2ms}}
"""

ROUTES = """\
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: reviews-routes}
spec:
  matches:
  - name: ratings-route
    pathRegex: "/ratings.*"
"""

ABORT_HALF_ON_ROUTE = """\
apiVersion: meshlib/v1
kind: FaultInjection
metadata: {name: ratings-abort}
spec:
  target: {service: reviews, route: ratings-route}
  abort: {status: 503, percent: 50}
"""

DELAY_JASON = """\
apiVersion: meshlib/v1
kind: FaultInjection
metadata: {name: jason-delay}
spec:
  target: {service: reviews}
  match: {headers: {end-user: jason}}
  delay: {fixed: 200ms, percent: 100}
"""


def test_policy_abort_share_reason_and_no_retry(caller, make_mesh, echo_factory) -> None:
    """(a) 50 % abort on one route: share within 5σ over 400 calls; each abort is answered
    locally with ``x-mesh-reason: fault_abort``, never reaches the backend and is never
    retried although retries on 5xx are configured. Other routes are untouched."""
    backend = echo_factory("a")
    registry = CollectorRegistry()
    mesh = make_mesh(
        "---\n".join(
            [service_yaml("reviews", [backend.port]), RETRY_ON_5XX, ROUTES, ABORT_HALF_ON_ROUTE]
        ),
        registry=registry,
    )
    c = caller.bind(mesh)
    n = 400

    results = c.many(n, "GET", "http://reviews/ratings/1", concurrency=4)

    assert all(isinstance(r, httpx.Response) for r in results)
    aborted = [r for r in results if r.status_code == 503]
    passed = [r for r in results if r.status_code == 200]
    assert len(aborted) + len(passed) == n
    assert abs(len(aborted) - n / 2) <= 5 * math.sqrt(n * 0.25), len(aborted)
    for r in aborted:
        assert r.headers[REASON_HEADER] == "fault_abort"
        d = r.extensions["mesh_decision"]
        assert d.route == "ratings-route"
        assert d.faults == ["abort:503"]
        assert d.reason == "fault_abort"
        assert (d.attempts, d.retries) == ([], 0)
    assert all(r.extensions["mesh_decision"].faults == [] for r in passed)
    assert backend.requests == len(passed)  # aborts never left the process
    injected = registry.get_sample_value(
        "mesh_faults_injected_total",
        {"source": "tester.default", "destination": "reviews.default", "kind": "abort"},
    )
    assert injected == len(aborted)

    others = c.many(50, "GET", "http://reviews/reviews/1", concurrency=4)
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in others)
    assert backend.requests == len(passed) + 50


def test_policy_delay_applies_only_to_matching_requests(caller, make_mesh, echo_factory) -> None:
    backend = echo_factory("a")
    mesh = make_mesh(service_yaml("reviews", [backend.port]) + "---\n" + DELAY_JASON)
    c = caller.bind(mesh)

    for _ in range(2):
        start = time.perf_counter()
        r = c.get("http://reviews/r", headers={"end-user": "jason"})
        assert time.perf_counter() - start >= 0.2
        assert r.status_code == 200
        faults = r.extensions["mesh_decision"].faults
        assert len(faults) == 1 and faults[0].startswith("delay:")

        for headers in ({"end-user": "mary"}, {}, {"end-user": "jason-x"}):
            # The decision record says no delay was applied: no wall-clock bound needed.
            r = c.get("http://reviews/r", headers=headers)
            assert r.extensions["mesh_decision"].faults == []
    assert backend.requests == 8


CLIENT_FAULT_HEADERS = {
    "x-mesh-fault": "abort",
    "x-mesh-fault-abort": "503",
    "x-mesh-fault-delay": "1000",
    "x-envoy-fault-abort-request": "503",
    "x-envoy-fault-abort-request-percentage": "100",
    "x-envoy-fault-delay-request": "1000",
    "x-mesh-reason": "fault_abort",
}


def test_client_sent_fault_headers_do_nothing(caller, make_mesh, echo_factory) -> None:
    """(b) there are no fault-control headers: a client cannot abort or delay calls."""
    backend = echo_factory("a")
    mesh = make_mesh(service_yaml("reviews", [backend.port]) + "---\n" + RETRY_ON_5XX)
    c = caller.bind(mesh)
    for _ in range(5):
        r = c.get("http://reviews/r", headers=CLIENT_FAULT_HEADERS)
        assert r.status_code == 200
        assert r.json()["backend"] == "a"
        d = r.extensions["mesh_decision"]
        assert (d.faults, d.reason, len(d.attempts)) == ([], "ok", 1)
    assert backend.requests == 5


# --- meshlib.testing: the mesh_faults fixture ---------------------------------------------------


@pytest.fixture
def backend(echo_factory):
    return echo_factory("a")


@pytest.fixture
def mesh(make_mesh, backend):
    """Picked up by ``mesh_faults`` as its default mesh."""
    return make_mesh(service_yaml("reviews", [backend.port]) + "---\n" + RETRY_ON_5XX)


def test_fixture_abort_applies_until_cleared(caller, mesh, backend, mesh_faults) -> None:
    c = caller.bind(mesh)
    mesh_faults.abort("reviews", status=503)
    for _ in range(3):
        r = c.get("http://reviews/r")
        assert r.status_code == 503
        assert r.headers[REASON_HEADER] == "fault_abort"
        assert r.extensions["mesh_decision"].retries == 0
    assert backend.requests == 0

    mesh_faults.clear()
    assert c.get("http://reviews/r").status_code == 200
    assert backend.requests == 1


def test_fixture_header_matched_abort(caller, mesh, backend, mesh_faults) -> None:
    c = caller.bind(mesh)
    mesh_faults.abort("reviews", status=500, headers={"End-User": "jason"})
    assert c.get("http://reviews/r", headers={"end-user": "jason"}).status_code == 500
    assert c.get("http://reviews/r", headers={"end-user": "mary"}).status_code == 200
    assert c.get("http://reviews/r").status_code == 200
    assert backend.requests == 2


def test_fixture_delay_handle_is_a_context_manager(caller, mesh, backend, mesh_faults) -> None:
    c = caller.bind(mesh)
    with mesh_faults.delay("reviews", 0.2):
        start = time.perf_counter()
        assert c.get("http://reviews/r").status_code == 200
        assert time.perf_counter() - start >= 0.2
    r = c.get("http://reviews/r")
    assert r.extensions["mesh_decision"].faults == []
    assert backend.requests == 2


def test_fixture_refuse_fails_like_a_refused_connection(caller, mesh, backend, mesh_faults) -> None:
    c = caller.bind(mesh)
    handle = mesh_faults.refuse("reviews")
    error = c.outcome("GET", "http://reviews/r")
    assert isinstance(error, httpx.ConnectError), repr(error)
    attempts = error.decision.attempts  # type: ignore[union-attr]
    assert len(attempts) > 1  # retried like a connect failure
    assert {a.outcome for a in attempts} == {"connect_failure"}
    assert backend.requests == 0

    handle.remove()
    assert c.get("http://reviews/r").status_code == 200
    assert backend.requests == 1


def test_injector_on_an_explicit_mesh_is_undone_by_clear(caller, make_mesh, echo_factory) -> None:
    """What the fixture does at teardown, done by hand on a mesh passed explicitly."""
    other = echo_factory("other")
    mesh = make_mesh(service_yaml("ratings", [other.port]))
    c = caller.bind(mesh)
    injector = FaultInjector()
    injector.abort("ratings", status=418, mesh=mesh)
    injector.delay("ratings", 0.2, mesh=mesh)
    assert c.get("http://ratings/r").status_code == 418
    injector.clear()
    r = c.get("http://ratings/r")
    assert r.status_code == 200
    assert r.extensions["mesh_decision"].faults == []
    assert other.requests == 1
    with pytest.raises(LookupError):
        injector.abort("ratings")  # no default mesh and none given
