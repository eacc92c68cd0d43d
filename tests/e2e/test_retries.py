"""Which failures are retried, for which requests, and where the retry goes (real sockets).

DATA-1 (the method × failure matrix, Idempotency-Key and ``retryable`` routes), FAULT-1 (a
crashing endpoint: the retry goes to a different one) and Retry-After. Every case runs through
the sync and the async driver (``caller`` fixture).
"""

from __future__ import annotations

import socket
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import meshlib
from e2e.conftest import service_yaml

pytestmark = pytest.mark.timeout(30)

METHODS = ["GET", "PUT", "POST", "PATCH"]
IDEMPOTENT = frozenset({"GET", "PUT"})

# Breaker and outlier detection are pushed out of the way so that only retry decisions are
# observed; round-robin makes "which endpoint goes first" alternate instead of depending on
# latency estimates.
QUIET_HEALTH = (
    "circuitBreaker: {consecutiveFailures: 1000}\n"
    "outlierDetection: {consecutiveFailures: 1000}\n"
    "loadBalancer: {type: round-robin}\n"
)
POLICIES = {
    # no `retries`: the unconfigured default (connect failures; resets for idempotent methods)
    "default": QUIET_HEALTH,
    "configured": QUIET_HEALTH
    + "retries: {attempts: 2, perTryTimeout: 300ms,"
    + " retryOn: [5xx, reset, connect-failure, timeout]}\n",
}


def traffic_policy(spec: str, *, service: str = "reviews", route: str | None = None) -> str:
    target = f"{{service: {service}" + (f", route: {route}" if route else "") + "}"
    name = f"{service}-{route or 'all'}-policy"
    return (
        "---\napiVersion: meshlib/v1\nkind: TrafficPolicy\n"
        f"metadata: {{name: {name}, namespace: default}}\n"
        f"spec:\n  target: {target}\n" + textwrap.indent(spec, "  ")
    )


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port bound but not listening: connects get ECONNREFUSED and nobody can take it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def attempts_of(decision: meshlib.Decision) -> list[tuple[str, str]]:
    return [(a.endpoint, a.outcome) for a in decision.attempts]


def decision_of(result: httpx.Response | BaseException) -> meshlib.Decision:
    if isinstance(result, httpx.Response):
        return result.extensions["mesh_decision"]  # type: ignore[no-any-return]
    decision = getattr(result, "decision", None)
    assert decision is not None, f"{result!r} carries no decision"
    return decision  # type: ignore[no-any-return]


# --- DATA-1: the method × failure matrix ---------------------------------------------------------


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("method", METHODS)
def test_connect_refused_is_retried_elsewhere_for_every_method(
    caller, make_mesh, echo_factory, refused_port, method, policy
) -> None:
    a = echo_factory("a")
    mesh = make_mesh(
        service_yaml("reviews", [refused_port, a.port]) + traffic_policy(POLICIES[policy])
    )
    c = caller.bind(mesh)
    refused, good = f"127.0.0.1:{refused_port}", f"127.0.0.1:{a.port}"
    first_refused = 0
    for i in range(2):  # round-robin: one of two calls starts on the refused endpoint
        rid = f"{method}-{i}"
        r = c.request(
            method, "http://reviews/pay", content=b"debit 10", headers={"x-request-id": rid}
        )
        assert r.status_code == 200
        assert a.side_effects[rid] == 1
        attempts = attempts_of(decision_of(r))
        if attempts[0][0] == refused:
            first_refused += 1
            assert attempts == [(refused, "connect_failure"), (good, "ok")]
        else:
            assert attempts == [(good, "ok")]
    assert first_refused == 1


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("method", METHODS)
def test_reset_before_headers_retried_only_for_idempotent(
    caller, make_mesh, raw_server_factory, method, policy
) -> None:
    raw = raw_server_factory("r")
    raw.set_mode("reset_before_headers", times=1)  # reads the request, then RST
    mesh = make_mesh(service_yaml("reviews", [raw.port]) + traffic_policy(POLICIES[policy]))
    rid = f"{method}-1"
    result = caller.bind(mesh).outcome(
        method, "http://reviews/pay", content=b"debit 10", headers={"x-request-id": rid}
    )
    decision = decision_of(result)
    if method in IDEMPOTENT:
        assert isinstance(result, httpx.Response) and result.status_code == 200
        assert [o for _, o in attempts_of(decision)] == ["reset", "ok"]
        assert raw.side_effects[rid] == 2  # replayed: allowed, the method is idempotent
    else:
        assert isinstance(result, (httpx.ReadError, httpx.RemoteProtocolError)), result
        assert not isinstance(result, meshlib.MeshError)
        assert [o for _, o in attempts_of(decision)] == ["reset"]
        assert decision.reason == "reset"
        assert raw.side_effects[rid] == 1  # reached the backend once, never replayed


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("method", METHODS)
def test_503_retried_only_when_configured_and_idempotent(
    caller, make_mesh, echo_factory, method, policy
) -> None:
    a = echo_factory("a")
    a.set_status(503, times=1)
    mesh = make_mesh(service_yaml("reviews", [a.port]) + traffic_policy(POLICIES[policy]))
    rid = f"{method}-1"
    r = caller.bind(mesh).request(
        method, "http://reviews/pay", content=b"debit 10", headers={"x-request-id": rid}
    )
    decision = decision_of(r)
    if policy == "configured" and method in IDEMPOTENT:
        assert r.status_code == 200
        assert [(x.outcome, x.status) for x in decision.attempts] == [
            ("status", 503),
            ("ok", 200),
        ]
        assert a.side_effects[rid] == 2
    else:
        assert r.status_code == 503
        assert len(decision.attempts) == 1
        assert decision.reason == "upstream_error"
        assert a.side_effects[rid] == 1


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("method", METHODS)
def test_timeout_after_body_sent_retried_only_when_configured_and_idempotent(
    caller, make_mesh, echo_factory, method, policy
) -> None:
    a = echo_factory("a")
    a.set_delay(3.0, times=1)  # the body was read (side effect counted), the answer never comes
    mesh = make_mesh(service_yaml("reviews", [a.port]) + traffic_policy(POLICIES[policy]))
    # The default policy has no per-try timeout: the client's own timeout plays that part.
    c = caller.bind(mesh, timeout=0.3) if policy == "default" else caller.bind(mesh)
    rid = f"{method}-1"
    result = c.outcome(
        method, "http://reviews/pay", content=b"debit 10", headers={"x-request-id": rid}
    )
    decision = decision_of(result)
    if policy == "configured" and method in IDEMPOTENT:
        assert isinstance(result, httpx.Response) and result.status_code == 200
        assert [o for _, o in attempts_of(decision)] == ["timeout", "ok"]
        assert a.side_effects[rid] == 2
    else:
        assert isinstance(result, meshlib.MeshTimeout), result
        assert isinstance(result, httpx.TimeoutException)
        assert [o for _, o in attempts_of(decision)] == ["timeout"]
        assert a.side_effects[rid] == 1
    assert a.wait_for_disconnects(1)  # the timed-out attempt's connection was dropped


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("method", METHODS)
def test_reset_after_response_headers_never_retried(
    caller, make_mesh, raw_server_factory, method, policy
) -> None:
    raw = raw_server_factory("r")
    raw.set_mode("headers_then_reset", times=1)  # 200 + Content-Length 1000, 10 bytes, RST
    mesh = make_mesh(service_yaml("reviews", [raw.port]) + traffic_policy(POLICIES[policy]))
    c = caller.bind(mesh)
    rid = f"{method}-1"
    result = c.outcome(
        method, "http://reviews/pay", content=b"debit 10", headers={"x-request-id": rid}
    )
    # The response was committed to the caller: the error surfaces while reading the body.
    assert isinstance(result, (httpx.ReadError, httpx.RemoteProtocolError)), result
    assert raw.requests == 1
    assert raw.side_effects[rid] == 1
    after = c.request(method, "http://reviews/pay", headers={"x-request-id": f"{method}-2"})
    assert after.status_code == 200
    assert raw.requests == 2


# --- DATA-1: opting POST in ---------------------------------------------------------------------

CONFIGURED_503 = QUIET_HEALTH + "retries: {attempts: 2, retryOn: [5xx, reset]}\n"


def test_idempotency_key_makes_post_retryable_and_is_forwarded_unchanged(
    caller, make_mesh, echo_factory
) -> None:
    a = echo_factory("a")
    a.set_status(503, times=2)
    mesh = make_mesh(service_yaml("reviews", [a.port]) + traffic_policy(CONFIGURED_503))
    c = caller.bind(mesh)
    r = c.post("http://reviews/pay", content=b"debit 10", headers={"Idempotency-Key": "pay-7f3a"})
    assert r.status_code == 200
    assert [x.status for x in decision_of(r).attempts] == [503, 503, 200]
    assert [rec.headers.get("idempotency-key") for rec in a.records] == ["pay-7f3a"] * 3
    assert {rec.body_sha256 for rec in a.records} == {a.records[0].body_sha256}
    assert a.side_effects["pay-7f3a"] == 3  # the backend sees one key: it can deduplicate
    # Without the key the same POST is not replayed.
    a.set_status(503, times=1)
    r = c.post("http://reviews/pay", content=b"debit 10", headers={"x-request-id": "no-key"})
    assert r.status_code == 503
    assert a.side_effects["no-key"] == 1


def test_idempotency_key_post_retried_after_reset_before_headers(
    caller, make_mesh, raw_server_factory
) -> None:
    raw = raw_server_factory("r")
    raw.set_mode("reset_before_headers", times=1)
    mesh = make_mesh(service_yaml("reviews", [raw.port]) + traffic_policy(CONFIGURED_503))
    r = caller.bind(mesh).post(
        "http://reviews/pay", content=b"debit 10", headers={"Idempotency-Key": "pay-1"}
    )
    assert r.status_code == 200
    assert r.json()["headers"]["idempotency-key"] == "pay-1"
    assert raw.side_effects["pay-1"] == 2


ROUTE_GROUP = """---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: payment-routes, namespace: default}
spec:
  matches:
  - {name: payments, pathRegex: "/pay.*"}
"""


def test_retryable_route_retries_post_other_routes_do_not(caller, make_mesh, echo_factory) -> None:
    a = echo_factory("a")
    text = (
        service_yaml("reviews", [a.port])
        + ROUTE_GROUP
        + traffic_policy(QUIET_HEALTH)
        + traffic_policy(
            "retries: {attempts: 2, retryOn: [5xx], retryable: true}\n", route="payments"
        )
    )
    c = caller.bind(make_mesh(text))
    a.set_status(503, times=1)
    r = c.post("http://reviews/pay/1", content=b"debit 10", headers={"x-request-id": "p1"})
    assert r.status_code == 200
    assert decision_of(r).route == "payments"
    assert [x.status for x in decision_of(r).attempts] == [503, 200]
    assert a.side_effects["p1"] == 2
    a.set_status(503, times=1)
    r = c.post("http://reviews/other", content=b"debit 10", headers={"x-request-id": "o1"})
    assert r.status_code == 503
    assert a.side_effects["o1"] == 1


# --- FAULT-1: endpoint crash mid-request --------------------------------------------------------

RETRY_GET = QUIET_HEALTH + "retries: {attempts: 2, retryOn: [reset, 5xx]}\n"


def weighted_service(*weighted: tuple[int, int]) -> str:
    """A reviews Service whose endpoints (port, weight) carry explicit weights."""
    lines = "".join(f"  - {{address: '127.0.0.1:{p}', weight: {w}}}\n" for p, w in weighted)
    return (
        "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\n"
        f"spec:\n  endpoints:\n{lines}"
    )


def test_crashing_endpoint_retry_goes_to_a_different_endpoint(
    caller, make_mesh, echo_factory, raw_server_factory
) -> None:
    crash = raw_server_factory("crash")
    crash.set_mode("reset_before_headers")  # reads every request, then closes with RST
    b, cc = echo_factory("b"), echo_factory("c")
    # A random balancer ignores health and the crashing endpoint weighs 50x: only the rule
    # "a retry prefers an endpoint not tried yet" keeps the retry away from it.
    policy = (
        "loadBalancer: {type: random}\n"
        "circuitBreaker: {consecutiveFailures: 1000}\n"
        "outlierDetection: {consecutiveFailures: 1000}\n"
        "retries: {attempts: 2, retryOn: [reset, 5xx]}\n"
    )
    text = weighted_service((crash.port, 50), (b.port, 1), (cc.port, 1)) + traffic_policy(policy)
    c = caller.bind(make_mesh(text))
    crashed = f"127.0.0.1:{crash.port}"
    hit_crash = 0
    for i in range(5):
        r = c.get(f"http://reviews/item/{i}")
        assert r.status_code == 200
        assert r.json()["backend"] in ("b", "c")
        attempts = attempts_of(decision_of(r))
        assert len(attempts) <= 3  # attempts: 2 → at most 3 tries
        if attempts[0][0] == crashed:
            hit_crash += 1
            assert attempts[0][1] == "reset"  # the record names why the attempt failed
            assert attempts[1:] == [(attempts[1][0], "ok")] and attempts[1][0] != crashed
    assert hit_crash >= 3
    assert crash.requests == hit_crash


def test_endpoint_killed_mid_request_retry_goes_elsewhere(caller, make_mesh, echo_factory) -> None:
    doomed = echo_factory("doomed", shutdown_grace=0.05)
    doomed.set_behavior("hang")
    survivor = echo_factory("survivor")
    # The doomed endpoint weighs 50x, so the (seeded) balancer sends the first try there.
    text = weighted_service((doomed.port, 50), (survivor.port, 1)) + traffic_policy(
        "retries: {attempts: 2, retryOn: [reset, 5xx]}\n"
    )
    c = caller.bind(make_mesh(text))
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(c.get, "http://reviews/item")
        assert doomed.wait_until(lambda b: b.in_flight == 1)
        doomed.stop()  # the process dies with the request in flight
        r = pending.result(10)
    assert r.status_code == 200 and r.json()["backend"] == "survivor"
    attempts = attempts_of(decision_of(r))
    assert attempts == [
        (f"127.0.0.1:{doomed.port}", "reset"),
        (f"127.0.0.1:{survivor.port}", "ok"),
    ]


def test_retries_avoid_every_endpoint_already_tried(
    caller, make_mesh, echo_factory, raw_server_factory
) -> None:
    crash = raw_server_factory("crash")
    crash.set_mode("reset_before_headers")
    failing, ok = echo_factory("failing"), echo_factory("ok")
    failing.set_status(503)
    mesh = make_mesh(
        service_yaml("reviews", [crash.port, failing.port, ok.port]) + traffic_policy(RETRY_GET)
    )
    c = caller.bind(mesh)
    total_attempts = 0
    for i in range(6):
        r = c.get(f"http://reviews/item/{i}")
        assert r.status_code == 200 and r.json()["backend"] == "ok"
        endpoints = [e for e, _ in attempts_of(decision_of(r))]
        assert len(endpoints) == len(set(endpoints)) <= 3
        total_attempts += len(endpoints)
    assert crash.requests + failing.requests + ok.requests == total_attempts
    assert total_attempts > 6  # the failing endpoints were tried, and never twice in a call
    assert ok.requests == 6


# --- Retry-After ---------------------------------------------------------------------------------


def test_retry_after_is_honoured(caller, make_mesh, echo_factory) -> None:
    a = echo_factory("a")
    a.set_status(503, headers={"retry-after": "0.3"}, times=1)
    mesh = make_mesh(service_yaml("reviews", [a.port]) + traffic_policy(RETRY_GET))
    r = caller.bind(mesh).get("http://reviews/item")
    assert r.status_code == 200
    first, second = a.records
    assert second.arrived - first.arrived >= 0.3


@pytest.mark.parametrize("retry_after", ["30", "2"])
def test_retry_after_beyond_cap_or_deadline_ends_the_call(
    caller, make_mesh, echo_factory, retry_after
) -> None:
    a = echo_factory("a")
    a.set_status(503, headers={"retry-after": retry_after}, times=1)
    mesh = make_mesh(
        service_yaml("reviews", [a.port]) + traffic_policy("timeout: 1s\n" + RETRY_GET)
    )
    c = caller.bind(mesh)
    start = time.monotonic()
    r = c.get("http://reviews/item")
    assert time.monotonic() - start < 0.5
    assert r.status_code == 503  # waiting longer than allowed is pointless: answer now
    assert len(decision_of(r).attempts) == 1
    assert a.requests == 1
