"""run_call driven by hand: a fake clock, a seeded mesh, and a driver loop answering effects.

No sockets: every Send is answered by a scripted responder, every Sleep advances the clock.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.errors import REASON_HEADER
from meshlib.outbound.call import (
    DEADLINE_HEADER,
    Buffer,
    Close,
    Mirror,
    Outcome,
    Race,
    RaceResult,
    Send,
)
from policy.fakes import Driver, FakeClock, Responder, refused, script, start, status, timed_out

ENDPOINTS = ", ".join(f'{{address: "10.0.0.{i}:80"}}' for i in range(1, 6))
SERVICE = f"""
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews, namespace: default}}
spec: {{endpoints: [{ENDPOINTS}]}}
"""


def with_policy(spec: str, extra: str = "") -> str:
    body = "\n".join("  " + line for line in spec.strip().splitlines())
    policy = (
        "apiVersion: meshlib/v1\nkind: TrafficPolicy\n"
        "metadata: {name: p, namespace: default}\n"
        f"spec:\n  target: {{service: reviews}}\n{body}\n"
    )
    return SERVICE + "---\n" + policy + extra


RETRY_5XX = "retries: {attempts: 3, retryOn: [5xx]}\ncircuitBreaker: {consecutiveFailures: 100}"


def call(
    mesh: meshlib.Mesh, clock: FakeClock, respond: Responder, method: str = "GET", **kw: Any
) -> tuple[httpx.Response, Driver]:
    driver = Driver(clock, respond)
    return driver.run(start(mesh, method, **kw)), driver


def endpoints_of(driver: Driver) -> list[str]:
    return [s.state.address for s in driver.sends]


# -- retries ---------------------------------------------------------------------------------------


def test_get_retries_on_503_go_to_a_different_endpoint_each_time(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(RETRY_5XX))
    response, driver = call(mesh, clock, status(503))
    assert response.status_code == 503
    assert len(set(endpoints_of(driver))) == len(driver.sends) == 4
    decision = response.extensions["mesh_decision"]
    assert decision.retries == 3 and [a.status for a in decision.attempts] == [503] * 4
    assert decision.reason == "upstream_error"
    assert len(driver.of(Close)) == 3  # every response the caller will not see is closed
    assert all(0 <= s <= 0.25 for s in driver.sleeps())


def test_get_retry_succeeds(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(RETRY_5XX))
    response, driver = call(mesh, clock, script(status(503), status(503), status(200)))
    assert response.status_code == 200 and len(driver.sends) == 3
    assert response.extensions["mesh_decision"].retries == 2


def test_post_not_retried_on_503_without_retryable(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(RETRY_5XX))
    response, driver = call(mesh, clock, status(503), "POST", content=b"pay")
    assert response.status_code == 503 and len(driver.sends) == 1


def test_post_retried_on_503_when_route_is_retryable(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(RETRY_5XX.replace("[5xx]", "[5xx], retryable: true")))
    response, driver = call(mesh, clock, status(503), "POST", content=b"pay")
    assert len(driver.sends) == 4 and response.status_code == 503


def test_post_with_idempotency_key_retried_on_503(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(RETRY_5XX))
    _, driver = call(
        mesh, clock, status(503), "POST", content=b"pay", headers={"Idempotency-Key": "k1"}
    )
    assert len(driver.sends) == 4
    assert {s.request.headers["idempotency-key"] for s in driver.sends} == {"k1"}


@pytest.mark.parametrize("text", [SERVICE, with_policy(RETRY_5XX)])
def test_post_retried_on_connect_failure(mesh_for, clock, text: str) -> None:
    mesh = mesh_for(text)
    response, driver = call(mesh, clock, script(refused, status(201)), "POST", content=b"x")
    assert response.status_code == 201 and len(driver.sends) == 2
    assert endpoints_of(driver)[0] != endpoints_of(driver)[1]


def test_unconfigured_retries_give_up_with_the_connect_error(mesh_for, clock) -> None:
    mesh = mesh_for(SERVICE)
    driver = Driver(clock, refused)
    with pytest.raises(httpx.ConnectError) as info:
        driver.run(start(mesh, "POST", content=b"x"))
    assert len(driver.sends) == 3  # 2 unconfigured retries
    assert info.value.decision.reason == "connect_failure"  # type: ignore[attr-defined]


def test_unconfigured_retries_do_not_cover_503(mesh_for, clock) -> None:
    response, driver = call(mesh_for(SERVICE), clock, status(503))
    assert response.status_code == 503 and len(driver.sends) == 1


def _chunks() -> Iterator[bytes]:
    yield b"a"
    yield b"b"


@pytest.mark.parametrize("respond", [status(503), refused])
def test_no_retry_when_body_is_not_replayable(mesh_for, clock, respond: Responder) -> None:
    mesh = mesh_for(with_policy(RETRY_5XX))
    driver = Driver(clock, respond)
    with contextlib.suppress(httpx.ConnectError):
        driver.run(start(mesh, "PUT", content=_chunks()))  # streamed, no Content-Length
    assert len(driver.sends) == 1 and not driver.of(Buffer)


def test_small_streamed_body_is_buffered_and_replayed(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(RETRY_5XX))
    request_kw = {"content": _chunks(), "headers": {"content-length": "2"}}
    response, driver = call(mesh, clock, script(status(503), status(200)), "PUT", **request_kw)
    assert response.status_code == 200 and len(driver.of(Buffer)) == 1
    assert [s.request.read() for s in driver.sends] == [b"ab", b"ab"]


def test_large_streamed_body_is_not_retried(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(RETRY_5XX))
    big = 64 * 1024 + 1
    kw = {"content": iter([b"x" * big]), "headers": {"content-length": str(big)}}
    _, driver = call(mesh, clock, status(503), "PUT", **kw)
    assert len(driver.sends) == 1 and not driver.of(Buffer)


def test_large_in_memory_body_is_not_retried(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(RETRY_5XX))
    _, driver = call(mesh, clock, status(503), "PUT", content=b"x" * (64 * 1024 + 1))
    assert len(driver.sends) == 1


def test_attempts_capped_at_five_even_when_configured_ten(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy("retries: {attempts: 10, retryOn: [5xx]}"))
    response, driver = call(mesh, clock, status(503))
    assert len(driver.sends) == 5 and response.extensions["mesh_decision"].retries == 4


# -- deadline --------------------------------------------------------------------------------------

DEADLINE = (
    "timeout: 1s\nretries: {attempts: 4, perTryTimeout: 300ms, retryOn: [5xx, timeout]}\n"
    "circuitBreaker: {consecutiveFailures: 100}"
)


def test_deadline_no_attempt_after_it_and_mesh_timeout(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(DEADLINE))
    started = clock()
    driver = Driver(clock, timed_out)
    with pytest.raises(meshlib.MeshTimeout) as info:
        driver.run(start(mesh))
    assert isinstance(info.value, httpx.TimeoutException)
    assert all(t < started + 1.0 for t in driver.sent_at)
    assert 2 <= len(driver.sends) <= 4
    decision = info.value.decision
    assert decision is not None and decision.reason == "timeout" and decision.deadline == 1.0
    assert len(decision.attempts) == len(driver.sends)
    for send, at in zip(driver.sends, driver.sent_at, strict=True):
        assert send.request.extensions["timeout"]["read"] <= min(0.3, started + 1.0 - at) + 1e-9


def test_deadline_header_decreases_per_attempt(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(DEADLINE))
    _, driver = call(mesh, clock, status(503, elapsed=0.1))
    remaining = [int(s.request.headers[DEADLINE_HEADER]) for s in driver.sends]
    assert len(remaining) >= 2 and remaining[0] == 1000
    assert all(a > b for a, b in itertools.pairwise(remaining))


def test_no_deadline_header_without_timeout(mesh_for, clock) -> None:
    _, driver = call(mesh_for(with_policy(RETRY_5XX)), clock, status(200))
    assert DEADLINE_HEADER not in driver.sends[0].request.headers


# -- Retry-After and budget ------------------------------------------------------------------------


def test_retry_after_is_honoured(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(RETRY_5XX))
    respond = script(status(503, {"retry-after": "2"}), status(200))
    response, driver = call(mesh, clock, respond)
    assert response.status_code == 200 and driver.sleeps() and driver.sleeps()[0] >= 2.0


def test_retry_after_beyond_ten_seconds_stops_retrying(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(RETRY_5XX))
    response, driver = call(mesh, clock, status(503, {"retry-after": "11"}))
    assert response.status_code == 503 and len(driver.sends) == 1 and not driver.sleeps()


def test_retry_after_beyond_the_deadline_stops_retrying(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(DEADLINE))
    response, driver = call(mesh, clock, status(503, {"retry-after": "5"}))
    assert response.status_code == 503 and len(driver.sends) == 1


BUDGET = RETRY_5XX.replace(
    "retryOn: [5xx]", "retryOn: [5xx], budget: {ratio: 0, minRetriesPerSecond: 0.1}"
)


def test_budget_exhaustion_returns_the_last_503(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(BUDGET))  # 0.1/s over 10 s: exactly one retry in the window
    response, driver = call(mesh, clock, status(503))
    assert response.status_code == 503 and len(driver.sends) == 2
    assert response.extensions["mesh_decision"].budget == "exhausted"
    response, driver = call(mesh, clock, status(503))
    assert len(driver.sends) == 1 and response.extensions["mesh_decision"].budget == "exhausted"


def test_budget_exhaustion_on_connect_failure_raises(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(BUDGET))
    driver = Driver(clock, refused)
    with pytest.raises(meshlib.RetryBudgetExhaustedError) as info:
        driver.run(start(mesh))
    assert len(driver.sends) == 2 and info.value.decision.budget == "exhausted"


# -- faults, limits, breaker -----------------------------------------------------------------------

FAULT = """---
apiVersion: meshlib/v1
kind: FaultInjection
metadata: {name: f, namespace: default}
spec:
  target: {service: reviews}
  delay: {fixed: 200ms, percent: 100}
  abort: {status: 418, percent: 100}
"""


def test_injected_abort_returns_the_status_without_sending(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(RETRY_5XX, FAULT))
    response, driver = call(mesh, clock, status(200))
    assert response.status_code == 418 and not driver.sends
    assert response.headers[REASON_HEADER] == "fault_abort"
    assert driver.sleeps() == [pytest.approx(0.2)]
    assert response.extensions["mesh_decision"].faults == ["delay:0.2s", "abort:418"]


def test_deadline_expires_during_injected_delay(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy("timeout: 100ms", FAULT))  # the delay outlasts the deadline
    started = clock()
    driver = Driver(clock, status(200))
    with pytest.raises(meshlib.MeshTimeout) as info:
        driver.run(start(mesh))
    assert driver.sleeps() == [pytest.approx(0.1)] and not driver.sends
    assert clock() == pytest.approx(started + 0.1)
    assert info.value.decision.faults == ["delay:0.2s"]


def test_runtime_abort_is_not_retried(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(RETRY_5XX))
    with mesh.inject_fault("reviews", abort=503):
        response, driver = call(mesh, clock, status(200))
    assert response.status_code == 503 and not driver.sends
    assert call(mesh, clock, status(200))[0].status_code == 200  # the fault is gone


def test_rate_limit_raises(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy("rateLimit: {requestsPerSecond: 1, burst: 2}"))
    for _ in range(2):
        assert call(mesh, clock, status(200))[0].status_code == 200
    driver = Driver(clock, status(200))
    with pytest.raises(meshlib.RateLimitedError) as info:
        driver.run(start(mesh))
    assert not driver.sends and info.value.decision.reason == "rate_limited"
    clock.advance(1.0)
    assert call(mesh, clock, status(200))[0].status_code == 200


def test_connection_pool_overflow(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy("connectionPool: {maxConnections: 1}"))
    first = start(mesh)
    assert isinstance(first.send(None), Send)  # in flight
    with pytest.raises(meshlib.ConnectionPoolOverflowError):
        Driver(clock, status(200)).run(start(mesh))
    first.close()  # abandoning the call frees its slot
    assert call(mesh, clock, status(200))[0].status_code == 200


def test_circuit_open_refuses_then_probes(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy("circuitBreaker: {consecutiveFailures: 2, openDuration: 10s}"))
    for _ in range(2):
        call(mesh, clock, status(503))
    driver = Driver(clock, status(200))
    with pytest.raises(meshlib.CircuitOpenError) as info:
        driver.run(start(mesh))
    assert isinstance(info.value, httpx.TransportError) and not driver.sends
    assert info.value.decision.reason == "circuit_open" and info.value.decision.status == 503
    clock.advance(10.0)
    response, driver = call(mesh, clock, status(200))  # the half-open probe
    assert response.status_code == 200 and len(driver.sends) == 1
    assert mesh.destinations()["reviews.default"].breaker.state.value == "closed"


def test_no_endpoints_raises_no_healthy_endpoints(mesh_for, clock) -> None:
    mesh = mesh_for(SERVICE.replace(f"[{ENDPOINTS}]", "[]"))
    with pytest.raises(meshlib.NoHealthyEndpointsError) as info:
        Driver(clock, status(200)).run(start(mesh))
    assert isinstance(info.value, httpx.ConnectError)
    assert info.value.decision.reason == "no_healthy_endpoints"


# -- hedging and mirroring -------------------------------------------------------------------------

HEDGE = RETRY_5XX + "\nhedging: {enabled: true, delay: 50ms, maxAttempts: 2}"


def test_hedging_races_idempotent_requests(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(HEDGE))
    response, driver = call(mesh, clock, status(200))
    races = driver.of(Race)
    assert response.status_code == 200 and len(races) == 1
    assert races[0].delay == pytest.approx(0.05)


def test_hedge_backup_goes_elsewhere_and_loser_is_recorded(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(HEDGE))
    call_ = start(mesh)
    race = call_.send(None)
    assert isinstance(race, Race)
    backup = race.backup()
    assert backup is not None and backup.hedge and backup.state is not race.first.state
    won = Outcome(httpx.Response(200, request=backup.request), None, 0.02)
    with pytest.raises(StopIteration) as stop:
        call_.send(RaceResult(backup, won, loser=race.first, loser_outcome=None))
    decision = stop.value.value.extensions["mesh_decision"]
    assert decision.hedges == 1
    assert sorted(a.outcome for a in decision.attempts) == ["cancelled", "ok"]


def test_no_hedging_for_post(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(HEDGE))
    _, driver = call(mesh, clock, status(200), "POST", content=b"x")
    assert not driver.of(Race) and len(driver.sends) == 1


def test_mirror_copies_carry_the_shadow_host(mesh_for, clock) -> None:
    extra = SERVICE.replace("reviews,", "reviews-shadow,") + (
        "---\napiVersion: meshlib/v1\nkind: TrafficMirror\nmetadata: {name: m}\n"
        "spec: {service: reviews, mirror: reviews-shadow, percent: 100}\n"
    )
    mesh = mesh_for(with_policy(RETRY_5XX, "---" + extra))
    response, driver = call(mesh, clock, status(200))
    mirrors = driver.of(Mirror)
    assert len(mirrors) == 1 and mirrors[0].request.headers["host"] == "reviews-shadow"
    assert response.extensions["mesh_decision"].mirrored_to == "reviews-shadow.default"


# -- the destination's lock ------------------------------------------------------------------------


def test_every_way_out_of_admission_and_outcome_gives_the_lock_back(mesh_for, clock) -> None:
    """The call path takes the destination's lock with acquire/release (cheaper than a
    with-block): a refusal raised under it, a success and a failure all release it."""
    mesh = mesh_for(
        with_policy(
            "rateLimit: {requestsPerSecond: 1, burst: 1}\n"
            "circuitBreaker: {consecutiveFailures: 1, openDuration: 10s}"
        )
    )
    assert call(mesh, clock, status(200))[0].status_code == 200  # success: released in _finish
    lock = mesh.destinations()["reviews.default"].lock
    assert not lock.locked()
    with pytest.raises(meshlib.RateLimitedError):  # raised while the lock is held
        Driver(clock, status(200)).run(start(mesh))
    assert not lock.locked()
    clock.advance(1.0)
    assert call(mesh, clock, status(503))[0].status_code == 503  # a failure opens the circuit
    assert not lock.locked()
    clock.advance(1.0)
    with pytest.raises(meshlib.CircuitOpenError):
        Driver(clock, status(200)).run(start(mesh))
    assert not lock.locked()
