"""CircuitBreaker: closed → open → half-open (one probe) → closed or open again."""

from __future__ import annotations

import pytest

from meshlib.config.model import CircuitBreakerPolicy
from meshlib.policy.breaker import BreakerState, CircuitBreaker

POLICY = CircuitBreakerPolicy(consecutive_failures=3, open_duration=30.0)


def tripped(now: float = 100.0) -> CircuitBreaker:
    breaker = CircuitBreaker(POLICY)
    for _ in range(3):
        assert breaker.allow(now)
        breaker.on_failure(now)
    assert breaker.state is BreakerState.OPEN
    return breaker


def test_starts_closed_and_admits() -> None:
    breaker = CircuitBreaker(POLICY)
    assert breaker.state is BreakerState.CLOSED
    assert all(breaker.allow(float(t)) for t in range(100))


def test_opens_after_n_consecutive_failures() -> None:
    breaker = CircuitBreaker(POLICY)
    breaker.on_failure(1.0)
    breaker.on_failure(1.0)
    assert breaker.state is BreakerState.CLOSED and breaker.allow(1.0)
    breaker.on_failure(1.0)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow(1.0)


def test_success_resets_the_consecutive_counter() -> None:
    breaker = CircuitBreaker(POLICY)
    for _ in range(5):
        breaker.on_failure(1.0)
        breaker.on_failure(1.0)
        breaker.on_success()
    assert breaker.state is BreakerState.CLOSED
    breaker.on_failure(1.0)
    breaker.on_failure(1.0)
    assert breaker.state is BreakerState.CLOSED


def test_open_refuses_until_open_duration() -> None:
    breaker = tripped(100.0)
    for t in (100.0, 110.0, 129.999):
        assert not breaker.allow(t)
        assert breaker.state is BreakerState.OPEN
    assert breaker.allow(130.0)
    assert breaker.state is BreakerState.HALF_OPEN


def test_half_open_admits_exactly_one_probe() -> None:
    breaker = tripped(100.0)
    assert breaker.allow(130.0)
    assert [breaker.allow(130.0 + i) for i in range(10)] == [False] * 10
    assert breaker.state is BreakerState.HALF_OPEN


def test_probe_success_closes() -> None:
    breaker = tripped(100.0)
    assert breaker.allow(130.0)
    breaker.on_success()
    assert breaker.state is BreakerState.CLOSED
    assert all(breaker.allow(130.0) for _ in range(10))
    # The counter starts from zero again after closing.
    breaker.on_failure(131.0)
    breaker.on_failure(131.0)
    assert breaker.state is BreakerState.CLOSED


def test_probe_failure_reopens_with_a_fresh_timer() -> None:
    breaker = tripped(100.0)
    assert breaker.allow(130.0)
    breaker.on_failure(135.0)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow(135.0)
    assert not breaker.allow(164.999)  # 30 s from the probe's failure, not the first trip
    assert breaker.allow(165.0)
    assert breaker.state is BreakerState.HALF_OPEN


def test_abandoned_probe_frees_the_slot() -> None:
    breaker = tripped(100.0)
    assert breaker.allow(130.0)
    assert not breaker.allow(130.0)
    breaker.on_abandon()
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow(130.0)
    assert not breaker.allow(130.0)


def test_failures_while_open_do_not_extend_the_timer() -> None:
    # Late answers of calls admitted before the trip must not keep the breaker open forever.
    breaker = tripped(100.0)
    breaker.on_failure(120.0)
    assert breaker.allow(130.0)


@pytest.mark.parametrize("n", [1, 5])
def test_threshold_follows_policy(n: int) -> None:
    breaker = CircuitBreaker(CircuitBreakerPolicy(consecutive_failures=n, open_duration=1.0))
    for _ in range(n - 1):
        breaker.on_failure(0.0)
    assert breaker.state is BreakerState.CLOSED
    breaker.on_failure(0.0)
    assert breaker.state is BreakerState.OPEN


def test_late_success_does_not_close_an_open_breaker() -> None:
    # A call admitted before the trip may answer after it; only the open timer and the
    # half-open probe decide when traffic flows again.
    breaker = tripped(100.0)
    breaker.on_success()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow(110.0)
    assert breaker.allow(130.0)
