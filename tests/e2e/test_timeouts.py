"""Deadlines and per-try timeouts over real sockets, through both drivers (FAULT-2).

The route timeout is one deadline over every attempt and backoff; each attempt is bounded by
``perTryTimeout`` and by what is left of the deadline, and tells the upstream how much is left
in ``x-mesh-timeout-ms``.
"""

from __future__ import annotations

import textwrap
import time

import httpx
import pytest

import meshlib
from e2e.conftest import service_yaml

pytestmark = pytest.mark.timeout(30)

DEADLINE_HEADER = "x-mesh-timeout-ms"


def traffic_policy(spec: str, *, service: str = "reviews") -> str:
    return (
        "---\napiVersion: meshlib/v1\nkind: TrafficPolicy\n"
        f"metadata: {{name: {service}-policy, namespace: default}}\n"
        f"spec:\n  target: {{service: {service}}}\n" + textwrap.indent(spec, "  ")
    )


QUIET_HEALTH = (
    "circuitBreaker: {consecutiveFailures: 1000}\noutlierDetection: {consecutiveFailures: 1000}\n"
)


def test_slow_endpoints_end_at_the_deadline(caller, make_mesh, echo_factory) -> None:
    backends = [echo_factory(name) for name in ("a", "b", "c")]
    for b in backends:
        b.set_delay(2.0)
    policy = traffic_policy(
        "timeout: 1s\n"
        "retries: {attempts: 2, perTryTimeout: 300ms, retryOn: [timeout, 5xx]}\n" + QUIET_HEALTH
    )
    mesh = make_mesh(service_yaml("reviews", [b.port for b in backends]) + policy)
    c = caller.bind(mesh)
    start = time.monotonic()
    result = c.outcome("GET", "http://reviews/slow")
    elapsed = time.monotonic() - start
    deadline = start + 1.0

    assert isinstance(result, meshlib.MeshTimeout), result
    assert isinstance(result, httpx.TimeoutException)  # `except httpx.TimeoutException` works
    assert result.reason is meshlib.Reason.TIMEOUT
    assert 0.9 <= elapsed <= 1.5, elapsed
    decision = result.decision
    assert decision is not None and decision.reason == "timeout" and decision.status == 504
    assert decision.deadline == pytest.approx(1.0)
    assert 1 <= len(decision.attempts) <= 3
    assert {a.outcome for a in decision.attempts} == {"timeout"}
    # per-try timeout honoured: no attempt lasted much longer than 300 ms
    assert max(a.duration for a in decision.attempts) < 0.45

    records = sorted((r for b in backends for r in b.records), key=lambda r: r.arrived)
    assert len(records) == len(decision.attempts) == 3
    assert all(r.arrived < deadline for r in records)  # no attempt starts after the deadline
    remaining = [int(r.headers[DEADLINE_HEADER]) for r in records]
    assert remaining[0] <= 1000
    assert remaining == sorted(remaining, reverse=True) and len(set(remaining)) == 3, remaining
    # every retry went to an endpoint not tried yet, and each saw its attempt abandoned
    assert len({a.endpoint for a in decision.attempts}) == 3
    assert all(b.wait_for_disconnects(1) for b in backends)


def test_deadline_bounds_a_single_attempt_without_per_try_timeout(
    caller, make_mesh, echo_factory
) -> None:
    a = echo_factory("a")
    a.set_behavior("hang")
    mesh = make_mesh(service_yaml("reviews", [a.port]) + traffic_policy("timeout: 500ms\n"))
    start = time.monotonic()
    result = caller.bind(mesh).outcome("GET", "http://reviews/hang")
    elapsed = time.monotonic() - start
    assert isinstance(result, meshlib.MeshTimeout), result
    assert 0.45 <= elapsed <= 1.0, elapsed
    assert result.decision is not None and len(result.decision.attempts) == 1
    assert a.wait_for_disconnects(1)  # the upstream saw the call abandoned
    assert 0 < int(a.records[0].headers[DEADLINE_HEADER]) <= 500


def test_deadline_header_only_with_a_deadline(caller, make_mesh, echo_factory) -> None:
    a = echo_factory("a")
    b = echo_factory("b")
    text = (
        service_yaml("reviews", [a.port])
        + "---\n"
        + service_yaml("ratings", [b.port])
        + traffic_policy("timeout: 2s\n")
    )
    c = caller.bind(make_mesh(text))
    assert 1000 < int(c.get("http://reviews/x").json()["headers"][DEADLINE_HEADER]) <= 2000
    assert DEADLINE_HEADER not in c.get("http://ratings/x").json()["headers"]


def test_per_try_timeout_not_shorter_than_timeout_is_rejected(make_mesh) -> None:
    policy = traffic_policy("timeout: 1s\nretries: {attempts: 2, perTryTimeout: 1s}\n")
    with pytest.raises(meshlib.ConfigError) as info:
        make_mesh(service_yaml("reviews", [1]) + policy)
    assert any("perTryTimeout" in p.message for p in info.value.problems)


def test_per_try_timeout_then_success_on_another_endpoint(caller, make_mesh, echo_factory) -> None:
    slow, fast = echo_factory("slow"), echo_factory("fast")
    slow.set_delay(2.0)
    policy = traffic_policy(
        "timeout: 2s\nretries: {attempts: 2, perTryTimeout: 200ms, retryOn: [timeout]}\n"
        "loadBalancer: {type: round-robin}\n" + QUIET_HEALTH
    )
    c = caller.bind(make_mesh(service_yaml("reviews", [slow.port, fast.port]) + policy))
    retried = []
    for _ in range(2):  # round-robin: one of the two calls starts on the slow endpoint
        start = time.monotonic()
        r = c.get("http://reviews/x")
        assert time.monotonic() - start < 0.6
        assert r.status_code == 200 and r.json()["backend"] == "fast"
        attempts = r.extensions["mesh_decision"].attempts
        if len(attempts) == 2:
            retried.append(r)
            assert [a.outcome for a in attempts] == ["timeout", "ok"]
            assert 0.2 <= attempts[0].duration < 0.5
            # the retry was told what was left after the first try
            assert int(r.json()["headers"][DEADLINE_HEADER]) <= 1800
    assert len(retried) == 1
    assert slow.requests == 1
    assert slow.wait_for_disconnects(1)
