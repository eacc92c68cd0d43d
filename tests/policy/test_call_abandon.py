"""A call abandoned mid-attempt (task cancelled, KeyboardInterrupt) gives back what it held."""

from __future__ import annotations

from collections.abc import Callable

import meshlib
from meshlib.outbound.call import Race, Send
from meshlib.policy.breaker import BreakerState
from policy.fakes import Driver, FakeClock, start, status

TWO_ENDPOINTS = """
apiVersion: meshlib/v1
kind: Service
metadata: {name: reviews}
spec: {endpoints: [{address: "10.0.0.1:80"}, {address: "10.0.0.2:80"}]}
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: p}
spec:
  target: {service: reviews}
  circuitBreaker: {consecutiveFailures: 1, openDuration: 1s}
"""


def test_abandoned_half_open_probe_frees_the_breaker(
    mesh_for: Callable[[str], meshlib.Mesh], clock: FakeClock
) -> None:
    mesh = mesh_for(TWO_ENDPOINTS)
    Driver(clock, status(503)).run(start(mesh))  # trips the breaker
    dest = mesh.destinations()["reviews.default"]
    assert dest.breaker.state is BreakerState.OPEN
    clock.advance(1.5)

    call = start(mesh)
    effect = call.send(None)  # the half-open probe is admitted and sent...
    assert isinstance(effect, Send)
    assert dest.breaker.state is BreakerState.HALF_OPEN
    assert effect.state.pending == 1
    call.close()  # ...and the caller goes away before it answers

    assert effect.state.pending == 0
    assert dest.in_flight == 0
    # The probe slot is free again: the next call is admitted as the new probe.
    response = Driver(clock, status(200)).run(start(mesh))
    assert response.status_code == 200
    assert dest.breaker.state is BreakerState.CLOSED


def test_abandoned_race_gives_back_both_attempts(
    mesh_for: Callable[[str], meshlib.Mesh], clock: FakeClock
) -> None:
    mesh = mesh_for(
        TWO_ENDPOINTS
        + "  hedging: {enabled: true, delay: 50ms}\n  retries: {attempts: 2, retryOn: [5xx]}\n"
    )
    call = start(mesh)
    race = call.send(None)
    assert isinstance(race, Race)
    backup = race.backup()  # the driver launched the hedge...
    assert backup is not None
    assert race.first.state.pending == 1 and backup.state.pending == 1
    call.close()  # ...then the caller was cancelled
    assert race.first.state.pending == 0 and backup.state.pending == 0
    assert mesh.destinations()["reviews.default"].in_flight == 0
