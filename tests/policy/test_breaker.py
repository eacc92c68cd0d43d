"""CircuitBreaker: closed → open → half-open (one probe) → closed or open again; and what the
call sequence reports to it — one verdict per call, the call's final outcome after retries and
endpoint switching (fake clock, scripted answers, no sockets)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

import meshlib
from meshlib.config.model import CircuitBreakerPolicy
from meshlib.outbound.call import Outcome, Race, RaceResult, Send
from meshlib.policy.breaker import Admission, BreakerState, CircuitBreaker
from policy.fakes import Driver, FakeClock, Responder, refused, start, status, timed_out

POLICY = CircuitBreakerPolicy(consecutive_failures=3, open_duration=30.0)
CALL, PROBE, REFUSED = Admission.CALL, Admission.PROBE, Admission.REFUSED


def tripped(now: float = 100.0) -> CircuitBreaker:
    breaker = CircuitBreaker(POLICY)
    for _ in range(3):
        assert breaker.admit(now) is CALL
        breaker.on_failure(CALL, now)
    assert breaker.state is BreakerState.OPEN
    return breaker


def test_starts_closed_and_admits() -> None:
    breaker = CircuitBreaker(POLICY)
    assert breaker.state is BreakerState.CLOSED
    assert all(breaker.admit(float(t)) is CALL for t in range(100))


def test_opens_after_n_consecutive_failures() -> None:
    breaker = CircuitBreaker(POLICY)
    breaker.on_failure(CALL, 1.0)
    breaker.on_failure(CALL, 1.0)
    assert breaker.state is BreakerState.CLOSED and breaker.admit(1.0) is CALL
    breaker.on_failure(CALL, 1.0)
    assert breaker.state is BreakerState.OPEN
    assert breaker.admit(1.0) is REFUSED


def test_success_resets_the_consecutive_counter() -> None:
    breaker = CircuitBreaker(POLICY)
    for _ in range(5):
        breaker.on_failure(CALL, 1.0)
        breaker.on_failure(CALL, 1.0)
        breaker.on_success(CALL)
    assert breaker.state is BreakerState.CLOSED
    breaker.on_failure(CALL, 1.0)
    breaker.on_failure(CALL, 1.0)
    assert breaker.state is BreakerState.CLOSED


def test_open_refuses_until_open_duration() -> None:
    breaker = tripped(100.0)
    for t in (100.0, 110.0, 129.999):
        assert breaker.admit(t) is REFUSED
        assert breaker.state is BreakerState.OPEN
    assert breaker.admit(130.0) is PROBE
    assert breaker.state is BreakerState.HALF_OPEN


def test_half_open_admits_exactly_one_probe() -> None:
    breaker = tripped(100.0)
    assert breaker.admit(130.0) is PROBE
    assert [breaker.admit(130.0 + i) for i in range(10)] == [REFUSED] * 10
    assert breaker.state is BreakerState.HALF_OPEN


def test_probe_success_closes() -> None:
    breaker = tripped(100.0)
    assert breaker.admit(130.0) is PROBE
    breaker.on_success(PROBE)
    assert breaker.state is BreakerState.CLOSED
    assert all(breaker.admit(130.0) is CALL for _ in range(10))
    # The counter starts from zero again after closing.
    breaker.on_failure(CALL, 131.0)
    breaker.on_failure(CALL, 131.0)
    assert breaker.state is BreakerState.CLOSED


def test_probe_failure_reopens_with_a_fresh_timer() -> None:
    breaker = tripped(100.0)
    assert breaker.admit(130.0) is PROBE
    breaker.on_failure(PROBE, 135.0)
    assert breaker.state is BreakerState.OPEN
    assert breaker.admit(135.0) is REFUSED
    assert breaker.admit(164.999) is REFUSED  # 30 s from the probe's failure, not the first trip
    assert breaker.admit(165.0) is PROBE
    assert breaker.state is BreakerState.HALF_OPEN


def test_abandoned_probe_frees_the_slot() -> None:
    breaker = tripped(100.0)
    assert breaker.admit(130.0) is PROBE
    assert breaker.admit(130.0) is REFUSED
    breaker.on_abandon(PROBE)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.admit(130.0) is PROBE
    assert breaker.admit(130.0) is REFUSED


def test_only_the_probe_decides_in_half_open() -> None:
    # Calls admitted before the trip may end while the probe is out: their verdicts are late
    # news about the old state, and neither close nor re-open the breaker, nor free the slot.
    breaker = tripped(100.0)
    assert breaker.admit(130.0) is PROBE
    breaker.on_success(CALL)
    breaker.on_failure(CALL, 130.5)
    breaker.on_abandon(CALL)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.admit(131.0) is REFUSED
    breaker.on_success(PROBE)
    assert breaker.state is BreakerState.CLOSED


def test_failures_while_open_do_not_extend_the_timer() -> None:
    # Late answers of calls admitted before the trip must not keep the breaker open forever.
    breaker = tripped(100.0)
    breaker.on_failure(CALL, 120.0)
    assert breaker.admit(130.0) is PROBE


@pytest.mark.parametrize("n", [1, 5])
def test_threshold_follows_policy(n: int) -> None:
    breaker = CircuitBreaker(CircuitBreakerPolicy(consecutive_failures=n, open_duration=1.0))
    for _ in range(n - 1):
        breaker.on_failure(CALL, 0.0)
    assert breaker.state is BreakerState.CLOSED
    breaker.on_failure(CALL, 0.0)
    assert breaker.state is BreakerState.OPEN


def test_late_success_does_not_close_an_open_breaker() -> None:
    # A call admitted before the trip may answer after it; only the open timer and the
    # half-open probe decide when traffic flows again.
    breaker = tripped(100.0)
    breaker.on_success(CALL)
    assert breaker.state is BreakerState.OPEN
    assert breaker.admit(110.0) is REFUSED
    assert breaker.admit(130.0) is PROBE


# -- what a call reports: its final outcome, once -------------------------------------------------

THREE = ", ".join(f'{{address: "10.0.0.{i}:80"}}' for i in range(1, 4))


RETRIES = "{attempts: 2, retryOn: [5xx, reset, connect-failure, timeout]}"


def backend(policy: str = "", retries: str = RETRIES) -> str:
    """Service reviews with three endpoints; the default breaker (5 failed calls, 30 s), retries
    on 5xx/reset/connect-failure/timeout over the other endpoints, outlier detection out of
    the way (these tests are about the breaker alone)."""
    return (
        "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: reviews}\n"
        f"spec: {{endpoints: [{THREE}]}}\n---\n"
        "apiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: p}\n"
        "spec:\n  target: {service: reviews}\n"
        f"  retries: {retries}\n"
        "  outlierDetection: {consecutiveFailures: 1000}\n" + policy
    )


def by_endpoint(answers: dict[str, Responder]) -> Responder:
    """Answers per endpoint address (10.0.0.1:80 ...)."""

    def respond(send: Send) -> Outcome:
        return answers[send.state.address](send)

    return respond


def breaker_of(mesh: meshlib.Mesh) -> CircuitBreaker:
    return mesh.destinations()["reviews.default"].breaker


def outcome_of(mesh: meshlib.Mesh, clock: FakeClock, respond: Responder) -> object:
    try:
        return Driver(clock, respond).run(start(mesh))
    except httpx.HTTPError as error:
        return error


def test_whole_backend_outage_opens_after_five_failed_calls_then_one_probe(
    mesh_for: Callable[[str], meshlib.Mesh], clock: FakeClock
) -> None:
    """Every endpoint failing: each call fails after its 3 attempts; the 5th failed call opens
    the breaker (not the 2nd, as counting attempts would); 30 s later one probe is let
    through, the others are refused; the probe's success closes it."""
    mesh = mesh_for(backend())
    for n in range(1, 6):
        driver = Driver(clock, status(503))
        response = driver.run(start(mesh))
        assert response.status_code == 503 and len(driver.sends) == 3
        expected = BreakerState.OPEN if n == 5 else BreakerState.CLOSED
        assert breaker_of(mesh).state is expected, n

    driver = Driver(clock, status(200))
    with pytest.raises(meshlib.CircuitOpenError) as info:
        driver.run(start(mesh))
    assert not driver.sends and info.value.decision.attempts == []

    clock.advance(29.9)
    assert isinstance(outcome_of(mesh, clock, status(200)), meshlib.CircuitOpenError)
    clock.advance(0.1)  # 30 s after the trip
    probe = start(mesh)
    first = probe.send(None)  # the probe is admitted and sent...
    assert isinstance(first, Send)
    assert breaker_of(mesh).state is BreakerState.HALF_OPEN
    for _ in range(3):  # ...and while it is out, nobody else gets through
        assert isinstance(outcome_of(mesh, clock, status(200)), meshlib.CircuitOpenError)
    with pytest.raises(StopIteration) as stop:
        probe.send(Outcome(httpx.Response(200, request=first.request), None, 0.01))
    assert stop.value.value.status_code == 200
    assert breaker_of(mesh).state is BreakerState.CLOSED
    assert Driver(clock, status(200)).run(start(mesh)).status_code == 200


def test_probe_that_fails_after_its_retries_reopens(
    mesh_for: Callable[[str], meshlib.Mesh], clock: FakeClock
) -> None:
    mesh = mesh_for(backend("  circuitBreaker: {consecutiveFailures: 2, openDuration: 10s}\n"))
    for _ in range(2):
        outcome_of(mesh, clock, refused)
    assert breaker_of(mesh).state is BreakerState.OPEN
    clock.advance(10.0)
    driver = Driver(clock, refused)
    with pytest.raises(httpx.ConnectError):
        driver.run(start(mesh))
    assert len(driver.sends) == 3  # the probe is a whole call: its retries went elsewhere
    assert breaker_of(mesh).state is BreakerState.OPEN
    assert isinstance(outcome_of(mesh, clock, status(200)), meshlib.CircuitOpenError)


def test_one_failing_endpoint_saved_by_retries_never_opens(
    mesh_for: Callable[[str], meshlib.Mesh], clock: FakeClock
) -> None:
    """One endpoint resetting every connection: its attempts fail (dozens in a row), but each
    call is saved by a retry on another endpoint, so no caller saw a failure."""
    mesh = mesh_for(backend("  loadBalancer: {type: round-robin}\n"))
    respond = by_endpoint(
        {"10.0.0.1:80": refused, "10.0.0.2:80": status(200), "10.0.0.3:80": status(200)}
    )
    failed_attempts = 0
    for _ in range(60):
        driver = Driver(clock, respond)
        assert driver.run(start(mesh)).status_code == 200
        failed_attempts += sum(s.state.address == "10.0.0.1:80" for s in driver.sends)
    assert failed_attempts >= 10
    assert breaker_of(mesh).state is BreakerState.CLOSED


@pytest.mark.parametrize(
    ("respond", "failure"),
    [
        (status(503), True),  # a 5xx handed back after the retries
        (status(500), True),
        (timed_out, True),  # a call that timed out (MeshTimeout)
        (refused, True),  # a transport error re-raised after the retries
        (status(429), False),  # the backend is alive and pushing back
        (status(404), False),
    ],
    ids=["503", "500", "timeout", "refused", "429", "404"],
)
def test_which_final_outcomes_count_as_failed_calls(
    mesh_for: Callable[[str], meshlib.Mesh], clock: FakeClock, respond: Responder, failure: bool
) -> None:
    """The breaker's classification is the attempts': 5xx and transport failures (refused,
    reset, timeout) are failures, 4xx (429 included) are not — applied to the answer the
    caller got."""
    mesh = mesh_for(
        backend(
            "  timeout: 1s\n  circuitBreaker: {consecutiveFailures: 3}\n",
            "{attempts: 1, retryOn: [5xx, connect-failure, timeout], perTryTimeout: 100ms}",
        )
    )
    for _ in range(3):
        outcome_of(mesh, clock, respond)
    assert breaker_of(mesh).state is (BreakerState.OPEN if failure else BreakerState.CLOSED)


def test_a_timed_out_call_is_one_failure_whatever_its_attempts(
    mesh_for: Callable[[str], meshlib.Mesh], clock: FakeClock
) -> None:
    mesh = mesh_for(
        backend(
            "  timeout: 250ms\n  circuitBreaker: {consecutiveFailures: 2}\n",
            RETRIES.replace("attempts: 2,", "attempts: 2, perTryTimeout: 100ms,"),
        )
    )
    with pytest.raises(meshlib.MeshTimeout):
        Driver(clock, timed_out).run(start(mesh))
    assert breaker_of(mesh).state is BreakerState.CLOSED  # one failed call, not three
    with pytest.raises(meshlib.MeshTimeout):
        Driver(clock, timed_out).run(start(mesh))
    assert breaker_of(mesh).state is BreakerState.OPEN


def test_refused_calls_are_not_failures(
    mesh_for: Callable[[str], meshlib.Mesh], clock: FakeClock
) -> None:
    """A call the open breaker refused and an injected abort reached no backend: neither is a
    verdict on it."""
    mesh = mesh_for(backend("  circuitBreaker: {consecutiveFailures: 2, openDuration: 10s}\n"))
    outcome_of(mesh, clock, status(503))
    with mesh.inject_fault("reviews", abort=503):
        for _ in range(5):
            assert Driver(clock, status(200)).run(start(mesh)).status_code == 503
    assert breaker_of(mesh).state is BreakerState.CLOSED  # one failure so far
    outcome_of(mesh, clock, status(503))
    assert breaker_of(mesh).state is BreakerState.OPEN
    for _ in range(20):  # refused by the breaker itself: must not re-arm the timer
        assert isinstance(outcome_of(mesh, clock, status(200)), meshlib.CircuitOpenError)
        clock.advance(0.4)
    clock.advance(2.001)  # 10 s after the trip, whatever was refused meanwhile
    assert Driver(clock, status(200)).run(start(mesh)).status_code == 200
    assert breaker_of(mesh).state is BreakerState.CLOSED


def test_half_open_probe_may_hedge_and_only_its_verdict_counts(
    mesh_for: Callable[[str], meshlib.Mesh], clock: FakeClock
) -> None:
    """The probe is one call with its own policy: its hedge is part of it (not a second probe
    refused by the breaker), and a hedge loser is no verdict — the call's answer is."""
    mesh = mesh_for(
        backend(
            "  circuitBreaker: {consecutiveFailures: 1, openDuration: 10s}\n"
            "  hedging: {enabled: true, delay: 50ms, maxAttempts: 2}\n"
        )
    )
    outcome_of(mesh, clock, refused)
    assert breaker_of(mesh).state is BreakerState.OPEN
    clock.advance(10.0)

    probe = start(mesh)
    race = probe.send(None)
    assert isinstance(race, Race)
    assert breaker_of(mesh).state is BreakerState.HALF_OPEN
    backup = race.backup()  # the probe's own hedge goes out
    assert backup is not None and backup.state is not race.first.state
    assert isinstance(outcome_of(mesh, clock, status(200)), meshlib.CircuitOpenError)
    won = Outcome(httpx.Response(200, request=backup.request), None, 0.02)
    lost = Outcome(None, httpx.ConnectError("x", request=race.first.request), 0.06)
    with pytest.raises(StopIteration) as stop:
        probe.send(RaceResult(backup, won, loser=race.first, loser_outcome=lost))
    assert stop.value.value.status_code == 200
    assert breaker_of(mesh).state is BreakerState.CLOSED


def test_abandoned_call_leaves_no_verdict(
    mesh_for: Callable[[str], meshlib.Mesh], clock: FakeClock
) -> None:
    mesh = mesh_for(backend("  circuitBreaker: {consecutiveFailures: 1}\n"))
    call = start(mesh)
    first = call.send(None)
    assert isinstance(first, Send)
    call.send(Outcome(None, httpx.ConnectError("x", request=first.request), 0.01))  # a retry
    call.close()  # the caller went away before the call ended
    assert breaker_of(mesh).state is BreakerState.CLOSED
    assert mesh.destinations()["reviews.default"].in_flight == 0


def test_calls_in_flight_stop_retrying_once_the_breaker_opens(
    mesh_for: Callable[[str], meshlib.Mesh], clock: FakeClock
) -> None:
    """A call admitted while closed whose attempt fails after other calls' verdicts opened the
    breaker ends with what it has: the backend as a whole is failing, retries would only add
    load. (Its own verdict arrives while open and changes nothing.)"""
    mesh = mesh_for(backend("  circuitBreaker: {consecutiveFailures: 1, openDuration: 10s}\n"))
    slow = start(mesh)
    first = slow.send(None)  # admitted while closed, its first attempt out
    assert isinstance(first, Send)
    assert isinstance(outcome_of(mesh, clock, status(503)), httpx.Response)  # opens it
    assert breaker_of(mesh).state is BreakerState.OPEN
    with pytest.raises(StopIteration) as stop:
        slow.send(Outcome(httpx.Response(503, request=first.request), None, 0.01))
    decision = stop.value.value.extensions["mesh_decision"]
    assert (decision.retries, len(decision.attempts), decision.status) == (0, 1, 503)
    clock.advance(10.0)  # the open timer was not re-armed by that late failure
    assert Driver(clock, status(200)).run(start(mesh)).status_code == 200
    assert breaker_of(mesh).state is BreakerState.CLOSED
