"""FAULT-3 (hedging) and DATA-6 (no duplicated writes without consent) over real sockets.

The service lists B first and A second; with round-robin the first pick of a fresh mesh is
the second endpoint, so the first attempt of the first call deterministically goes to A.
"""

from __future__ import annotations

import time

import httpx
import pytest

from e2e.conftest import service_yaml

pytestmark = pytest.mark.timeout(30)

URL = "http://reviews/items/1"


def hedging_mesh(make_mesh, a, b, budget: str = "", delay: str = "100ms"):
    policy = f"""\
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {{name: reviews-policy}}
spec:
  target: {{service: reviews}}
  loadBalancer: {{type: round-robin}}
  hedging: {{enabled: true, delay: {delay}, maxAttempts: 2}}
  retries:
    attempts: 2
    retryOn: [5xx, reset]
    backoff: {{baseInterval: 1ms, maxInterval: 2ms}}
{budget}"""
    return make_mesh(service_yaml("reviews", [b.port, a.port]) + "---\n" + policy)


def total_requests(*backends) -> int:
    for backend in backends:
        assert backend.wait_for_idle()
    return sum(b.requests for b in backends)


def test_slow_first_attempt_is_hedged_and_the_loser_cancelled(
    caller, make_mesh, echo_factory
) -> None:
    """A takes 1 s, B 10 ms: the hedge after 100 ms answers from B in ≈ 100–300 ms."""
    a, b = echo_factory("a"), echo_factory("b")
    a.set_delay(1.0)
    b.set_delay(0.01)
    mesh = hedging_mesh(make_mesh, a, b)
    c = caller.bind(mesh)

    start = time.perf_counter()
    r = c.get(URL)
    elapsed = time.perf_counter() - start

    assert r.status_code == 200 and r.json()["backend"] == "b"
    assert 0.1 <= elapsed < 0.7, elapsed  # A alone would take 1 s
    d = r.extensions["mesh_decision"]
    assert d.hedges == 1
    assert d.retries == 0
    by_endpoint = {att.endpoint: att for att in d.attempts}
    assert set(by_endpoint) == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
    winner = by_endpoint[f"127.0.0.1:{b.port}"]
    assert (winner.hedge, winner.outcome, winner.status) == (True, "ok", 200)
    assert a.wait_for_requests(1)
    if caller.mode == "async":
        # The loser's task is cancelled: its connection closes and A sees the client leave.
        assert a.wait_for_disconnects(1, timeout=2.0)
        assert by_endpoint[f"127.0.0.1:{a.port}"].outcome == "cancelled"
    assert (a.requests, b.requests) == (1, 1)


def test_fast_first_attempt_is_not_hedged(caller, make_mesh, echo_factory) -> None:
    a, b = echo_factory("a"), echo_factory("b")
    # A generous hedge delay: "fast" must stay fast even on a loaded CI box.
    mesh = hedging_mesh(make_mesh, a, b, delay="1s")
    c = caller.bind(mesh)
    for _ in range(6):
        d = c.get(URL).extensions["mesh_decision"]
        assert (d.hedges, len(d.attempts)) == (0, 1)
    assert total_requests(a, b) == 6


def test_post_is_never_hedged(caller, make_mesh, echo_factory) -> None:
    """A POST without Idempotency-Key waits for its one attempt, however slow."""
    a, b = echo_factory("a"), echo_factory("b")
    a.set_delay(0.3)
    b.set_delay(0.3)
    mesh = hedging_mesh(make_mesh, a, b)
    c = caller.bind(mesh)

    start = time.perf_counter()
    r = c.post(URL, content=b"order=1", headers={"x-request-id": "post-1"})
    assert time.perf_counter() - start >= 0.3
    assert r.status_code == 200
    d = r.extensions["mesh_decision"]
    assert (d.hedges, d.retries, len(d.attempts)) == (0, 0, 1)
    assert total_requests(a, b) == 1
    assert a.side_effects["post-1"] + b.side_effects["post-1"] == 1


def test_hedges_stop_when_the_retry_budget_is_exhausted(caller, make_mesh, echo_factory) -> None:
    """Hedges spend retry budget: with room for one retry in the window, only the first slow
    call is hedged; the rest wait for their single attempt."""
    a, b = echo_factory("a"), echo_factory("b")
    a.set_delay(0.2)
    b.set_delay(0.2)
    mesh = hedging_mesh(
        make_mesh, a, b, budget="    budget: {ratio: 0.01, minRetriesPerSecond: 0.1, ttl: 10s}\n"
    )
    c = caller.bind(mesh)

    decisions = [c.get(URL).extensions["mesh_decision"] for _ in range(4)]

    assert [d.hedges for d in decisions] == [1, 0, 0, 0]
    assert [d.budget for d in decisions] == ["ok", "exhausted", "exhausted", "exhausted"]
    assert all(len(d.attempts) == 1 for d in decisions[1:])
    assert total_requests(a, b) == 5


# --- DATA-6 ----------------------------------------------------------------------------------


def test_post_without_key_is_not_retried_on_503(caller, make_mesh, echo_factory) -> None:
    a, b = echo_factory("a"), echo_factory("b")
    for backend in (a, b):
        backend.set_status(503, times=1)
    mesh = hedging_mesh(make_mesh, a, b)
    c = caller.bind(mesh)

    r = c.post(URL, content=b"pay=10", headers={"x-request-id": "pay-1"})
    assert r.status_code == 503
    d = r.extensions["mesh_decision"]
    assert (d.retries, d.hedges, len(d.attempts)) == (0, 0, 1)
    assert total_requests(a, b) == 1
    assert a.side_effects["pay-1"] + b.side_effects["pay-1"] == 1


def test_post_without_key_is_not_retried_after_a_reset(caller, make_mesh, echo_factory) -> None:
    """The request reached the app (its side effect happened) before the connection broke:
    replaying it could pay twice, so the error surfaces instead."""
    a, b = echo_factory("a"), echo_factory("b")
    for backend in (a, b):
        backend.set_behavior("reset_before_headers", times=1)
    mesh = hedging_mesh(make_mesh, a, b)
    c = caller.bind(mesh)

    error = c.outcome("POST", URL, content=b"pay=10", headers={"x-request-id": "pay-2"})
    assert isinstance(error, httpx.TransportError), repr(error)
    d = error.decision  # type: ignore[union-attr]
    assert (d.retries, len(d.attempts)) == (0, 1)
    assert d.attempts[0].outcome == "reset"
    assert total_requests(a, b) == 1
    assert a.side_effects["pay-2"] + b.side_effects["pay-2"] == 1


def test_post_with_idempotency_key_is_retried_with_the_same_key(
    caller, make_mesh, echo_factory
) -> None:
    a, b = echo_factory("a"), echo_factory("b")
    for backend in (a, b):
        backend.set_status(503, times=1)
    mesh = hedging_mesh(make_mesh, a, b)
    c = caller.bind(mesh)

    r = c.post(URL, content=b"pay=10", headers={"idempotency-key": "key-7"})
    assert r.status_code == 200
    d = r.extensions["mesh_decision"]
    assert d.retries == 2
    assert total_requests(a, b) == 3 == len(d.attempts)
    # Every copy carried the same key, so a deduplicating server applies it once.
    assert a.side_effects["key-7"] + b.side_effects["key-7"] == 3
    assert {rec.key for rec in a.records + b.records} == {"key-7"}


def test_post_with_idempotency_key_may_be_hedged(caller, make_mesh, echo_factory) -> None:
    a, b = echo_factory("a"), echo_factory("b")
    a.set_delay(1.0)
    mesh = hedging_mesh(make_mesh, a, b)
    c = caller.bind(mesh)

    r = c.post(URL, content=b"pay=10", headers={"idempotency-key": "key-8"})
    assert r.json()["backend"] == "b"
    assert r.extensions["mesh_decision"].hedges == 1
    assert a.wait_for_requests(1)
    assert [rec.key for rec in a.records + b.records] == ["key-8", "key-8"]
    assert a.records[0].body_sha256 == b.records[0].body_sha256


def test_nothing_is_retried_past_the_commit_point(caller, make_mesh, echo_factory) -> None:
    """Once response headers are handed over, a broken body is the caller's error, even for
    an idempotent GET with retries on reset configured."""
    a, b = echo_factory("a"), echo_factory("b")
    for backend in (a, b):
        backend.set_behavior("error_mid_body", times=1)
    # a long hedge delay: on a loaded machine a first attempt slower than 100 ms would be
    # hedged, which is not what this test is about
    mesh = hedging_mesh(make_mesh, a, b, delay="2s")
    c = caller.bind(mesh)

    error = c.outcome("GET", URL)
    assert isinstance(error, httpx.RemoteProtocolError | httpx.ReadError), repr(error)
    assert total_requests(a, b) == 1
    a.reset()
    b.reset()
    assert c.get(URL).status_code == 200  # the next call is fine
